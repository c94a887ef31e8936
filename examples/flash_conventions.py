"""What users of flash-attn and FlexAttention bring, as longattn arguments: soft-capping, per-row key
lengths, packed sequences, asymmetric windows, FlexAttention mask_mods, ALiBi slopes and
top-left alignment; each checked against the float64 oracle. Runs in a second on a CPU."""

import torch

import longattn
from longattn import masks, positions

torch.manual_seed(0)
q = torch.randn(2, 4, 64, 32)
k = torch.randn(2, 2, 64, 32)
v = torch.randn(2, 2, 64, 32)


def same(a, b):
    return torch.allclose(a.double(), b, atol=1e-5)


# softcap (Gemma 2): scores become c·tanh(s/c), on every exact method
out = longattn.attention(q, k, v, causal=True, softcap=5.0, method=longattn.method("window", window=16))
ref, _ = longattn.reference_attention(q, k, v, softcap=5.0,
                                      mask=masks.Window(16).dense(2, 4, 64, 64) & masks.Causal().dense(2, 4, 64, 64))
print("softcap:", same(out, ref))

# seqused_k / cache_seqlens: row b has seqlens_k[b] real keys; its last query sees its last real key
step = q[:, :, -1:]                                          # one decode step per row
out = longattn.attention(step, k, v, causal=True, seqlens_k=torch.tensor([64, 40]))
ref, _ = longattn.reference_attention(step[1:], k[1:, :, :40], v[1:, :, :40], causal=True)
print("seqlens_k:", same(out[1:], ref))

# packed sequences (flash_attn_varlen_func's layout): [total_tokens, heads, head_dim] + cu_seqlens
cu = torch.tensor([0, 10, 64])
packed = longattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                   cu, cu, causal=True)
ref, _ = longattn.reference_attention(q[:1, :, 10:], k[:1, :, 10:], v[:1, :, 10:], causal=True)
print("varlen:", same(packed[10:].transpose(0, 1)[None], ref))

# flash-attn's window_size=(left, right): keys p-8 … p+2 around the query at position p
out = longattn.attention(q, k, v, method=longattn.method("window", window=(8, 2)))
ref, _ = longattn.reference_attention(q, k, v, mask=masks.band(8, 2).dense(2, 4, 64, 64))
print("window (8, 2):", same(out, ref))


# a FlexAttention / attention-gym mask_mod as written: here causal within documents
doc = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)


def document_causal(b, h, q_idx, kv_idx):
    return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)


mask = masks.from_mask_mod(document_causal)
out, stats = longattn.attention(q, k, v, method=longattn.method("pattern", mask=mask), return_stats=True)
ref, _ = longattn.reference_attention(q, k, v, mask=mask.dense(2, 4, 64, 64))
print("mask_mod:", same(out, ref), f"density={stats.density:.3f}")

# ALiBi with user slopes, per head [H] or per batch row [B, H] (flash-attn's alibi_slopes)
alibi = positions.ALiBi(heads=4, slopes=torch.tensor([[0.5, 0.25, 0.125, 0.0625], [1.0, 0.5, 0.25, 0.125]]))
out = longattn.attention(q, k, v, causal=True, position=alibi)
dist = (torch.arange(64)[:, None] - torch.arange(64)[None, :]).abs().double()
bias = -alibi.slopes.double()[:, :, None, None] * dist
ref, _ = longattn.reference_attention(q, k, v, causal=True, bias=bias)
print("ALiBi [B, H]:", same(out, ref))

# top-left alignment (FlexAttention's convention): 16 queries over 64 keys, query i sees keys <= i
out = longattn.attention(q[:, :, :16], k, v, causal=True, align="top_left")
ref, _ = longattn.reference_attention(q[:, :, :16], k, v, mask=torch.ones(16, 64, dtype=torch.bool).tril())
print("top-left:", same(out, ref))
