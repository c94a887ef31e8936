"""The compiled FlexAttention path gives the oracle's answer (a few compiles: ~30 s)."""

import pytest
import torch

import longattn
from longattn import masks
from longattn.kernels import flex
from conftest import assert_close_to_oracle, make_qkv, oracle_for

pytestmark = [
    pytest.mark.flex,
    pytest.mark.skipif(flex.flex_unavailable_reason() is not None, reason=str(flex.flex_unavailable_reason())),
]


def test_flex_window_cross_gqa_with_padding_matches_oracle():
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=200, tk=300, d=16)
    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[1, :250] = False  # some causal rows of the second sequence see no real key
    m = longattn.method("window", window=40, backend="flex")
    out, stats = longattn.attention(q, k, v, causal=True, method=m, key_padding_mask=pad, return_stats=True)
    assert stats.path == "flex"
    ref, _ = oracle_for(m, q, k, v, causal=True, key_padding_mask=pad)
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("name,m,causal", [
    ("streaming", longattn.method("streaming", sinks=4, window=30, backend="flex"), True),
    ("document", longattn.method("pattern", mask=masks.document(torch.arange(256) // 70), backend="flex"), False),
])
def test_flex_patterns_match_oracle(name, m, causal):
    q, k, v = make_qkv(b=1, hq=4, hk=4, tq=256, tk=256, d=16)
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
    assert stats.path == "flex"
    ref, _ = oracle_for(m, q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)


def test_flex_self_attention_block_map_with_padding_matches_oracle():
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=256, tk=256, d=16, seed=2)
    pad = torch.ones(2, 256, dtype=torch.bool)
    pad[0, :90] = False
    blocks = torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) > 0.3
    m = longattn.method("pattern", mask=masks.block_map(blocks | torch.eye(2, dtype=torch.bool), 128), backend="flex")
    out, stats = longattn.attention(q, k, v, causal=True, method=m, key_padding_mask=pad, return_stats=True)
    assert stats.path == "flex"
    ref, _ = oracle_for(m, q, k, v, causal=True, key_padding_mask=pad)
    assert_close_to_oracle(out, ref)


def test_flex_refuses_content_bias_when_asked_explicitly():
    from longattn.methods.base import Call

    m = longattn.method("window", window=4, backend="flex")
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=8, tk=8, d=8)
    call = Call(causal=True, scale=0.3, row_bias=lambda a, b: torch.zeros(1, 2, b - a, 8))
    with pytest.raises(ValueError, match="backend='flex' cannot take a content-dependent bias"):
        m.run(q, k, v, call)


def test_flex_refuses_blocks_it_computes_wrongly_and_auto_falls_back(monkeypatch):
    # FlexAttention with BLOCK_SIZE 8 returned outputs off by ~3 (or NaN) with no error on torch 2.13's CPU
    q, k, v = (torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with pytest.raises(ValueError, match="block >= 16"):
        longattn.attention(q, k, v, causal=True, method=longattn.method("streaming", sinks=2, window=9, block=8,
                                                                        backend="flex"))
    import importlib

    monkeypatch.setattr(importlib.import_module("longattn.methods.masked"), "FLEX_MIN_TOKENS", 1)  # auto: flex here
    m = longattn.method("streaming", sinks=2, window=9, block=8)
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert stats.path == "tiled"
    ref, _ = longattn.reference_attention(q, k, v, mask=m.visible_mask(64, 64, True).dense(1, 2, 64, 64))
    assert (out - ref).abs().max() < 1e-5
