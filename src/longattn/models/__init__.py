"""Small models readable top to bottom: the embedded llama2.c checkpoint (stories260K)."""
