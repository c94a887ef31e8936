"""longattn in one page: dense and windowed attention, the float64 oracle, patterns, positions and
the exact merge of partial results. Runs in a few seconds on a CPU."""

import torch

import longattn
from longattn import masks, positions

torch.manual_seed(0)
q = torch.randn(1, 8, 2048, 64)          # [batch, heads_q, tokens_q, head_dim]
k = torch.randn(1, 2, 2048, 64)          # [batch, heads_kv, tokens_k, head_dim] (GQA: 8 % 2 == 0)
v = torch.randn(1, 2, 2048, 64)

out = longattn.attention(q, k, v, causal=True)                       # dense, torch SDPA
out, stats = longattn.attention(q, k, v, causal=True, return_stats=True,
                                method=longattn.method("streaming", sinks=64, window=256))
print(stats.path, f"density={stats.density:.3f}")                    # 64 sinks + 256 recent keys per query

# the float64 oracle, on the exact mask the method claims to attend with
m = longattn.method("window", window=128)
ref_out, ref_lse = longattn.reference_attention(
    q[:, :, -64:], k, v, mask=m.visible_mask(64, 2048, causal=True).dense(1, 8, 64, 2048))
out = longattn.attention(q[:, :, -64:], k, v, causal=True, method=m)  # causal cross: last query ↔ last key
print("window equals the float64 oracle:", torch.allclose(out.double(), ref_out, atol=1e-5))

# static patterns, documents, prefix-LM, explicit block maps
pat = longattn.method("pattern", mask=masks.a_shape(sinks=64, window=256) | masks.power(block_size=128))
out, stats = longattn.attention(q, k, v, causal=True, method=pat, return_stats=True)
print("A-shape | power:", f"density={stats.density:.3f}")

# positions: rotations on q/k or a score bias, with any method that can take them
out = longattn.attention(q, k, v, causal=True, method="dense_chunked", position=positions.ALiBi(heads=8))

# exact merge of partial results over disjoint key sets
o1, l1 = longattn.reference_attention(q, k[:, :, :1000], v[:, :, :1000])
o2, l2 = longattn.reference_attention(q, k[:, :, 1000:], v[:, :, 1000:])
merged, lse = longattn.merge_partials([o1, o2], [l1, l2])
whole, _ = longattn.reference_attention(q, k, v)
print("two merged halves equal the whole:", torch.allclose(merged, whole))
