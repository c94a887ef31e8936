"""RetrievalAttention as a KV cache: every key leaves the recent window into an ANN index (faiss,
else hnswlib, else exact search); each step attends to sinks + the 32 best keys + the window.
recall = share of the exactly ranked top keys the index returned."""

import torch

import longattn.hf

model, tok = longattn.hf.load_llama2c()
ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a little girl named Lily.")])
with longattn.hf.apply(model, "dense"):
    cache = longattn.hf.LongattnCache(model, "retrieval", page=16, sinks=16, window=64, retrieve=32,
                                      measure_recall=True)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=200, do_sample=False)
stats = cache.stats()
print("index backend:", cache.spec["backend"], "| index bytes:", stats["index_bytes"])
print(f"recall of the index against exact ranking: {stats['recall']:.3f}")
