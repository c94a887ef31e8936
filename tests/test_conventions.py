"""Conventions users bring from flash-attn and FlexAttention, each checked against that convention
written out here as a float64 formula: logit soft-capping as an argument of ``attention``,
per-row key lengths (``seqused_k`` / ``cache_seqlens``), top-left alignment for cross attention,
and packed variable-length sequences (``cu_seqlens``)."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from conftest import CASES, FULL, assert_close_to_oracle, full, make_qkv, oracle_for

EXACT = [(n, c) for n, c in CASES if full(n).capabilities.exact and not full(n).capabilities.own_positions]
APPROXIMATE = sorted({n for n, _ in CASES} - {n for n, _ in EXACT})


# -- softcap ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0.5, 3.0])
@pytest.mark.parametrize("name,causal", EXACT)
def test_softcap_follows_every_exact_method_and_its_mask(name, causal, cap):
    m = full(name)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=5)
    q = q * 3  # scores of several units, so that capping changes them
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[0, 30:] = False
    b, hq, tq, tk = 2, 4, 40, 40
    vm = m.visible_mask(tq, tk, causal)
    mask = pad[:, None, None, :] if vm is None else vm.dense(b, hq, tq, tk) & pad[:, None, None, :]
    ref, ref_lse = longattn.reference_attention(q, k, v, mask=mask, softcap=cap)
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, softcap=cap,
                                    return_stats=True)
    assert stats.path == "softcap"
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    plain, _ = longattn.reference_attention(q, k, v, mask=mask)
    assert float((ref - plain).abs().max()) > 1e-2  # the cap really changed the answer


def test_softcap_reference_is_the_gemma_formula():
    q, k, v = make_qkv(b=1, hq=1, hk=1, tq=3, tk=5, d=4, seed=1)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    s = 2.0 * torch.tanh(s / 2.0)
    want = torch.softmax(s, -1) @ v.double()
    got, _ = longattn.reference_attention(q, k, v, scale=0.5, softcap=2.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_softcap_is_refused_by_approximate_methods(name):
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=16, tk=16, d=16)
    causal = full(name).capabilities.causal
    with pytest.raises(ValueError, match=f"method '{name}' cannot apply logit soft-capping"):
        longattn.attention(q, k, v, causal=causal, method=full(name), softcap=5.0)


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-1.0, ValueError), (math.nan, TypeError), (True, TypeError),
                                     ("5", TypeError)])
def test_bad_softcap_values_are_refused(bad, err):
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=4, tk=4, d=8)
    with pytest.raises(err, match="softcap"):
        longattn.attention(q, k, v, softcap=bad)


def test_softcap_with_a_score_bias_is_refused_and_with_rotary_is_exact():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=8, tk=8, d=8)
    with pytest.raises(ValueError, match="softcap with a score bias"):
        longattn.attention(q, k, v, causal=True, softcap=2.0, position=longattn.positions.ALiBi(heads=2))
    rope = longattn.positions.RoPE(head_dim=8)
    pos = torch.arange(8)
    qr, kr = rope.rotate(q, k, pos, pos)
    ref, _ = longattn.reference_attention(qr, kr, v, causal=True, softcap=2.0)
    out = longattn.attention(q, k, v, causal=True, softcap=2.0, position=rope)
    assert_close_to_oracle(out, ref)


def test_softcap_gradients_equal_the_reference():
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, hq=4, hk=2, tq=12, tk=12, d=8, seed=2))
    out = longattn.attention(q, k, v, causal=True, softcap=1.5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = longattn.reference_attention(q64, k64, v64, causal=True, softcap=1.5)
    want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


# -- per-row key lengths (seqused_k / cache_seqlens) ---------------------------------------------


def flash_seqused_reference(q, k, v, lengths, causal):
    """flash-attn's rule, row by row: row b has lengths[b] real keys; causal query i sees keys
    j <= i + lengths[b] - tokens_q; keys at or past the length are never seen."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    mask = torch.zeros(b, 1, tq, tk, dtype=torch.bool)
    for r, n in enumerate(lengths.tolist()):
        row = j < n
        if causal:
            row = row & (j <= i + n - tq)
        mask[r, 0] = row
    return longattn.reference_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [1, 6, 20])
def test_seqlens_k_aligns_each_row_with_its_last_real_key(tq, causal):
    q, k, v = make_qkv(b=4, hq=4, hk=2, tq=tq, tk=20, d=16, seed=7)
    lengths = torch.tensor([20, 13, 0, 7])
    out, stats = longattn.attention(q, k, v, causal=causal, seqlens_k=lengths, return_stats=True)
    ref, ref_lse = flash_seqused_reference(q, k, v, lengths, causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert not out[2].any()  # a row with no key gives zeros


@pytest.mark.parametrize("name", ["window", "streaming", "landmark", "quest", "tokenselect"])
def test_seqlens_k_with_other_methods_equals_running_each_row_alone(name):
    q, k, v = make_qkv(b=3, hq=4, hk=2, tq=1, tk=48, d=16, seed=8)  # one decode step per row
    lengths = torch.tensor([48, 30, 17])
    m = full(name)
    out = longattn.attention(q, k, v, causal=True, method=m, seqlens_k=lengths)
    for r, n in enumerate(lengths.tolist()):
        alone = longattn.attention(q[r:r + 1], k[r:r + 1, :, :n], v[r:r + 1, :, :n], causal=True, method=m)
        torch.testing.assert_close(out[r:r + 1], alone)
        ref = oracle_for(m, q[r:r + 1], k[r:r + 1, :, :n], v[r:r + 1, :, :n], causal=True)[0]
        assert_close_to_oracle(out[r:r + 1], ref)


def test_seqlens_k_differs_from_a_padding_mask_in_alignment_only():
    """A padding mask hides the same keys but keeps the last query aligned with the last slot."""
    q, k, v = make_qkv(b=2, hq=2, hk=2, tq=4, tk=10, d=8, seed=3)
    lengths = torch.tensor([10, 6])
    a = longattn.attention(q, k, v, causal=True, seqlens_k=lengths)
    pad = torch.arange(10)[None, :] < lengths[:, None]
    b = longattn.attention(q, k, v, causal=True, key_padding_mask=pad)
    torch.testing.assert_close(a[0], b[0])  # the full row: identical
    assert float((a[1] - b[1]).abs().max()) > 1e-3  # the short row: realigned


@pytest.mark.parametrize("bad,err,match", [
    (torch.tensor([3.0, 2.0]), TypeError, "seqlens_k must hold integers"),
    (torch.tensor([3]), ValueError, r"seqlens_k has shape \(1,\), expected \[batch\] = \[2\]"),
    (torch.tensor([3, 11]), ValueError, r"seqlens_k must lie in \[0, tokens_k=10\]"),
    (torch.tensor([-1, 3]), ValueError, r"seqlens_k must lie in"),
    ([3, 4], TypeError, "seqlens_k must be an integer torch.Tensor"),
])
def test_bad_seqlens_k_is_refused(bad, err, match):
    q, k, v = make_qkv(b=2, hq=2, hk=2, tq=4, tk=10, d=8)
    with pytest.raises(err, match=match):
        longattn.attention(q, k, v, causal=True, seqlens_k=bad)


def test_seqlens_k_backpropagates():
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, hq=2, hk=2, tq=3, tk=9, d=8))
    out = longattn.attention(q, k, v, causal=True, seqlens_k=torch.tensor([9, 4]))
    out.sum().backward()
    assert not k.grad[1, :, 4:].any() and k.grad[1, :, :4].abs().sum() > 0


# -- top-left alignment ------------------------------------------------------------------------


def top_left_reference(q, k, v, rule):
    """FlexAttention's convention: query i at position i, key j at j; ``rule(i, j)`` a bool grid."""
    tq, tk = q.shape[2], k.shape[2]
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    return longattn.reference_attention(q, k, v, mask=rule(i, j))[0]


@pytest.mark.parametrize("tq,tk", [(6, 20), (20, 6), (12, 12)])
def test_top_left_causal_dense(tq, tk):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=tk, d=16, seed=9)
    out = longattn.attention(q, k, v, causal=True, align="top_left")
    assert_close_to_oracle(out, top_left_reference(q, k, v, lambda i, j: j <= i))


@pytest.mark.parametrize("name", ["window", "streaming", "landmark", "tokenselect", "dense_chunked"])
def test_top_left_causal_with_fewer_queries_holds_for_every_method(name):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=24, tk=40, d=16, seed=10)
    m = full(name)
    out = longattn.attention(q, k, v, causal=True, method=m, align="top_left")
    # the method's own pattern, at positions i (queries) and j (keys): its mask for a square of tq
    square = m.visible_mask(24, 24, True)
    rule = (lambda i, j: j <= i) if square is None else (
        lambda i, j: torch.nn.functional.pad(square.dense(1, 1, 24, 24)[0, 0], (0, 16)))
    assert_close_to_oracle(out, top_left_reference(q, k, v, rule))


def test_top_left_refuses_what_it_cannot_align():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=20, tk=6, d=8)
    with pytest.raises(ValueError, match="align='top_left' with method 'window'.*masks.from_mask_mod"):
        longattn.attention(q, k, v, causal=True, method=longattn.method("window", window=3), align="top_left")
    q2, k2, v2 = make_qkv(b=1, hq=2, hk=2, tq=6, tk=20, d=8)
    with pytest.raises(ValueError, match="align='top_left'"):
        longattn.attention(q2, k2, v2, causal=False, method=longattn.method("window", window=3), align="top_left")
    with pytest.raises(ValueError, match="align='top_left'"):
        longattn.attention(q, k, v, causal=True, align="top_left", position=longattn.positions.ALiBi(heads=2))
    with pytest.raises(ValueError, match="align must be 'bottom_right' or 'top_left', got 'left'"):
        longattn.attention(q, k, v, align="left")
    # non-causal without a positional pattern: alignment changes nothing
    out = longattn.attention(q2, k2, v2, align="top_left")
    torch.testing.assert_close(out, longattn.attention(q2, k2, v2))


# -- packed variable-length sequences (cu_seqlens) ------------------------------------------------


def _packed(lengths_q, lengths_k, hq=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), hq, d, generator=g)
    k = torch.randn(sum(lengths_k), hk, d, generator=g)
    v = torch.randn(sum(lengths_k), hk, d, generator=g)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["dense", "window", "landmark"])
def test_varlen_equals_each_sequence_alone(name, causal):
    lq, lk = [5, 17, 1, 9], [5, 17, 30, 9]
    q, k, v, cq, ck = _packed(lq, lk, seed=1)
    m = full(name)
    out, lse = longattn.varlen_attention(q, k, v, cq, ck, causal=causal, method=m, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    for s in range(len(lq)):
        a, b = int(cq[s]), int(cq[s + 1])
        c, d = int(ck[s]), int(ck[s + 1])
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:b], k[c:d], v[c:d]))
        ref, ref_lse = oracle_for(m, qs, ks, vs, causal=causal)
        assert_close_to_oracle(out[a:b].transpose(0, 1)[None], ref)
        torch.testing.assert_close(lse[:, a:b].double(), ref_lse[0], atol=2e-5, rtol=1e-5)


def test_varlen_sequences_do_not_see_each_other_and_backpropagate():
    q, k, v, cq, ck = _packed([4, 6], [4, 6], seed=2)
    k.requires_grad_()
    out = longattn.varlen_attention(q, k, v, cq, ck, causal=True)
    out[:4].sum().backward()  # the first sequence's queries
    assert k.grad[:4].abs().sum() > 0 and not k.grad[4:].any()


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 4, 9]), "cu_seqlens_q must start at 0 and end at the total token count 10"),
    (torch.tensor([1, 4, 10]), "cu_seqlens_q must start at 0"),
    (torch.tensor([0, 6, 4, 10]), "cu_seqlens_q must be non-decreasing"),
    (torch.tensor([0.0, 10.0]), "cu_seqlens_q must hold integers"),
    (torch.tensor([[0, 10]]), r"cu_seqlens_q must have shape \[n_sequences \+ 1\]"),
])
def test_bad_cu_seqlens_are_refused(cu, match):
    q, k, v, _, ck = _packed([4, 6], [4, 6])
    with pytest.raises((TypeError, ValueError), match=match):
        longattn.varlen_attention(q, k, v, cu, ck)


def test_varlen_refuses_mismatched_sequence_counts_and_wrong_ranks():
    q, k, v, cq, ck = _packed([4, 6], [4, 6])
    with pytest.raises(ValueError, match="cu_seqlens_q describes 2 sequences but cu_seqlens_k 1"):
        longattn.varlen_attention(q, k, v, cq, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"takes q of shape \[total_tokens, heads, head_dim\]"):
        longattn.varlen_attention(q[None], k, v, cq, ck)
