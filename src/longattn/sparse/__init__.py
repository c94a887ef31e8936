"""Shared machinery of content-based sparse attention (selection → exact kernel → LSE merge): summaries of key
blocks, block scores estimated from them, selectors that turn scores into a per-(head, query
block) set of key blocks, and one exact kernel over any such selection."""
