"""Shared helpers: seeded inputs and the oracle comparison every method test starts from."""

from __future__ import annotations

import pytest
import torch

import longattn

torch.set_num_threads(2)


def make_qkv(b=2, hq=4, hk=2, tq=64, tk=64, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, tk, d, generator=g).to(dtype)
    return q, k, v


def oracle_for(method, q, k, v, *, causal, key_padding_mask=None, scale=None):
    """Reference output/LSE on the exact mask the method claims to attend with."""
    m = longattn.method(method) if isinstance(method, str) else method
    b, hq, tq = q.shape[:3]
    tk = k.shape[2]
    vm = m.visible_mask(tq, tk, causal)
    mask = None if vm is None else vm.dense(b, hq, tq, tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return longattn.reference_attention(q, k, v, causal=False, mask=mask, scale=scale)


def assert_close_to_oracle(out, ref, *, atol=2e-5, rtol=1e-4):
    assert not torch.isnan(out).any(), "output has NaN"
    torch.testing.assert_close(out.to(torch.float64), ref, atol=atol, rtol=rtol)


@pytest.fixture
def qkv():
    return make_qkv()


@pytest.fixture(scope="module")
def stories():
    """stories260K as ``(LlamaForCausalLM, tokenizer)`` through ``longattn.hf.load_llama2c``, one
    per test module (tests switch its attention); the model ships with the package, so this never
    skips for want of it (only without transformers)."""
    pytest.importorskip("transformers")
    import longattn.hf as hf

    return hf.load_llama2c()
