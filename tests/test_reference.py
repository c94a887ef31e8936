import math

import torch

import longattn
from conftest import make_qkv


def naive(q, k, v, mask, scale):
    """A second, loop-based oracle: one softmax per (batch, head, query)."""
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                s = (k[bi, h // g].double() @ q[bi, h, i].double()) * scale
                s = s.masked_fill(~mask[i], -math.inf)
                out[bi, h, i] = torch.softmax(s, 0) @ v[bi, h // g].double()
    return out


def test_reference_matches_loop_oracle_causal_cross_gqa():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=5, tk=9, d=8)
    out, lse = longattn.reference_attention(q, k, v, causal=True)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    torch.testing.assert_close(out, naive(q, k, v, mask, 8 ** -0.5))
    assert lse.dtype == torch.float64 and lse.shape == (1, 4, 5)


def test_reference_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=4, tk=6, d=8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, lse = longattn.reference_attention(q, k, v, mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isneginf(lse[:, :, 2]).all()
    assert torch.isfinite(lse[:, :, [0, 1, 3]]).all()
    assert not torch.isnan(out).any()


def test_reference_bias_is_added_to_scaled_scores():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=3, tk=3, d=4)
    bias = torch.randn(1, 2, 3, 3)
    out, _ = longattn.reference_attention(q, k, v, scale=0.3, bias=bias)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3 + bias.double()
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v.double())


def test_a_partly_non_finite_value_row_keeps_its_finite_elements_exact():
    """One NaN element in a visible value row makes that output column NaN; the row's finite
    elements count once, as in a plain softmax-weighted sum."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    v_bad = v.clone()
    v_bad[0, 0, 1, 2] = float("nan")
    out, _ = longattn.reference_attention(q, k, v_bad, causal=True)
    clean, _ = longattn.reference_attention(q, k, v, causal=True)
    assert torch.equal(out[0, 0, 0], clean[0, 0, 0])  # row 0 does not see key 1
    assert torch.isnan(out[0, 0, 1:, 2]).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(out[0, 0, 1:, keep], clean[0, 0, 1:, keep], rtol=1e-12, atol=1e-12)
