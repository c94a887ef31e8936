"""One decoding step with block retrieval: the loop keeps block summaries current, so a step never
touches the whole cache (Landmark-style mean keys, 1024 of 4096 keys)."""

import torch

import longattn
from longattn.sparse.summaries import BlockSummaries

torch.manual_seed(0)
k, v = torch.randn(1, 8, 4096, 64), torch.randn(1, 8, 4096, 64)
summaries = BlockSummaries.build(k, 128)          # once, then .append(new_key) per token
q = torch.randn(1, 8, 1, 64)                      # one new query
m = longattn.method("landmark", budget=1024, block=128, q_block=1, sinks=128, window=256)
out, stats = longattn.attention(q, k, v, causal=True, method=m, summaries=summaries, return_stats=True)
print(tuple(out.shape), f"density {stats.density:.3f}")  # 1024 of 4096 keys
