"""A KV cache that really drops tokens: StreamingLLM's 4 sinks + 60 recent tokens per layer and
key head, through transformers' generate."""

import torch

import longattn.hf

model, tok = longattn.hf.load_llama2c()
ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a little girl named Lily.")])
with longattn.hf.apply(model, "dense"):
    cache = longattn.hf.LongattnCache(model, "streaming", sinks=4, window=60)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=200, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:].tolist())[:80], "…")
print("tokens kept per layer × key head:", cache.stats()["tokens"])
