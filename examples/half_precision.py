"""bf16 inputs: the kernels read them in bf16 where the hardware multiplies bf16 fast (GPUs,
CPUs with AVX512-BF16 or AMX), else in float32; stats say which ran, and either can be forced."""

import torch

import longattn

torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, 1024, 64).to(torch.bfloat16) for _ in range(3))
ref = longattn.reference_attention(q.double(), k.double(), v.double(), causal=True)[0]
sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
sdpa_err = (sdpa.double() - ref).abs().max().item()
for choice in ("float32", "input"):
    out, stats = longattn.attention(q, k, v, causal=True, return_stats=True, compute_dtype=choice)
    err = (out.double() - ref).abs().max().item()
    print(f"{choice}: computed in {stats.compute_dtype}, out {out.dtype}, error <= 2x SDPA's: {err <= 2 * sdpa_err}")
