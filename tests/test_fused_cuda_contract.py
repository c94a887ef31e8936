"""The CUDA side of ``longattn.kernels.sdpa.fused_flash``, checked on any machine.

On a GPU ``fused_flash`` hands prepared inputs to ``_cuda_kernel`` (torch's CUDA flash or
memory-efficient op). Here ``_cuda_kernel`` is replaced by a stand-in that keeps those kernels'
contract and their awkward corners — it refuses more than one head count, unaligned strides and a
bias of another dtype or shape; it pads its LSE past ``M`` rows with junk; it returns NaN on rows
whose every key is hidden — and computes in float64. Everything ``fused_flash`` does around the
kernel (GQA heads, alignment, cutting the LSE, rows that see no key, gradients) and every caller
that batches work into fused calls on a GPU (the sparse kernel's batched path, GQA folding) then
runs here against the float64 oracle. Found on an H200: the batched sparse path handed grouped
heads to the kernel, which took only one head count, and the causal square hid rows the mask
alone did not.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import longattn
from longattn.kernels import sdpa

from conftest import CASES, FUSED_USERS, assert_close_to_oracle, full, make_qkv, oracle_for

#: the LSE rows the memory-efficient kernel pads to
LSE_ROWS = 32


def _stand_in(calls: list):
    def kernel(q, k, v, bias, causal, scale):
        if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
            raise RuntimeError(f"one head count expected: q {tuple(q.shape)}, k {tuple(k.shape)}")
        for t in (q, k, v) + (() if bias is None else (bias,)):
            if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]):
                raise RuntimeError(f"unaligned strides {t.stride()}")
        m, n = q.shape[2], k.shape[2]
        if bias is not None and (bias.dtype != q.dtype or tuple(bias.shape) != (*q.shape[:3], n)):
            raise RuntimeError(f"bias {bias.dtype} {tuple(bias.shape)} for q {q.dtype} {tuple(q.shape)}")
        if causal and m != n:
            raise RuntimeError("causal needs a square")
        s = q.double() @ k.double().transpose(-1, -2) * scale
        if bias is not None:
            s = s + bias.double()
        if causal:
            s = s.masked_fill(torch.ones(m, n, dtype=torch.bool, device=s.device).triu(1), -math.inf)
        lse = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ v.double()  # NaN on rows that see nothing, as a kernel may give
        rows = -(-m // LSE_ROWS) * LSE_ROWS
        padded = torch.full((*lse.shape[:2], rows), 123.0, dtype=torch.float32, device=q.device)
        padded[..., :m] = lse
        calls.append((tuple(q.shape), tuple(k.shape), bias is not None, causal))
        return out.to(q.dtype), padded

    return kernel


@pytest.fixture
def cuda_contract(monkeypatch):
    """``fused_flash`` and its callers take their CUDA path on these tensors, the stand-in kernel
    answering; the CPU op and the native CPU kernels are out of the way. Returns the kernel calls."""
    from longattn.kernels import native

    calls: list = []
    monkeypatch.setattr(sdpa, "_cuda_kernel", _stand_in(calls))
    monkeypatch.setattr(sdpa, "fused_cuda_available", lambda q: q.dtype in (torch.float32, torch.bfloat16,
                                                                             torch.float16))
    monkeypatch.setattr(sdpa, "fused_cpu_available", lambda q: False)
    for name in FUSED_USERS:
        module = importlib.import_module(name)
        if hasattr(module, "fused_available"):
            monkeypatch.setattr(module, "fused_available", lambda q: True)
    monkeypatch.setattr(importlib.import_module("longattn.sparse.kernel"), "sparse_prefill_applies",
                        lambda *a, **kw: False)
    monkeypatch.setattr(native, "decode_blocks_applies", lambda *a, **kw: False)
    return calls


def _reference(q, k, v, scale, causal, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        m, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(m, n, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    safe = s.masked_fill(dead, 0.0)  # no NaN from an all -inf row, in values or gradients
    lse = torch.logsumexp(safe, -1, keepdim=True)
    out = (torch.exp(safe - lse) @ v).masked_fill(dead, 0.0)
    return out, lse.squeeze(-1).masked_fill(dead.squeeze(-1), -math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fused_flash_prepares_what_the_cuda_kernels_need(cuda_contract, dtype, causal, masked, kv_heads):
    """Grouped heads, odd key counts (unaligned strides), rows hidden by the mask alone or by the
    mask and the causal square together: the float64 oracle's out and LSE, through the kernel."""
    n = 45
    q, k, v = make_qkv(b=2, hq=4, hk=kv_heads, tq=n, tk=n, d=12, dtype=dtype, seed=4)
    mask = None
    if masked:
        hidden = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(1)) < 0.5
        hidden[0, 0, 3] = True  # sees nothing
        hidden[1, 0, 0, 0] = True  # sees nothing under causality (its one causal key is hidden)
        mask = torch.zeros(hidden.shape).masked_fill(hidden, -math.inf).to(q.device)
    out, lse = sdpa.fused_flash(q, k, v, scale=0.3, causal=causal, attn_mask=mask)
    assert cuda_contract, "the kernel was not reached (the eager fallback ran)"
    ref, ref_lse = _reference(q, k, v, 0.3, causal, mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=tol, rtol=tol)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_flash_gradients_through_the_cuda_path(cuda_contract, kv_heads):
    """Out and LSE differentiate (grouped heads summed back) as the float64 oracle does."""
    n = 30
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=4, hk=kv_heads, tq=n, tk=n, d=8, seed=6))
    hidden = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(2)) < 0.4
    hidden[0, 0, 5] = True
    mask = torch.zeros(hidden.shape).masked_fill(hidden, -math.inf).to(q.device)
    out, lse = sdpa.fused_flash(q, k, v, scale=0.4, causal=False, attn_mask=mask)
    assert cuda_contract
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(q.device)
    g_lse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(4)).to(q.device)
    live = torch.isfinite(lse)
    got = torch.autograd.grad((out * g_out).sum() + (lse.masked_fill(~live, 0.0) * g_lse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = _reference(q64, k64, v64, 0.4, False, mask)
    want = torch.autograd.grad((r_out * g_out.double()).sum() + (r_lse.masked_fill(~live, 0.0) * g_lse.double()).sum(),
                               (q64, k64, v64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, causal", [c for c in CASES if c[1]])
def test_every_causal_method_on_the_cuda_path(cuda_contract, name, causal):
    """Every method with grouped heads, its fused calls answered by the CUDA kernels' stand-in
    (the block family takes its batched path there, as on a GPU): the float64 oracle."""
    m = full(name)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=96, tk=96, d=16, seed=5)
    out = longattn.attention(q, k, v, causal=causal, method=m)
    ref, _ = oracle_for(m, q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)
    if m.capabilities.half_compute:  # the fused-kernel methods: their calls reached the kernel
        assert cuda_contract, f"{name}: no fused call reached the CUDA kernel"
