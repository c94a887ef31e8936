"""The native block-sparse prefill kernel (``longattn.kernels.native_prefill``) against the float64
reference on the visibility a selection means, and against the torch paths of
``sparse_attention`` (batched gather + fused kernel, per-query-block loop): random layouts, GQA,
odd lengths, unused slots, empty selections, half-precision inputs, strided views, NaN."""

from __future__ import annotations

import ctypes
import itertools
import math
import platform
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longattn
import longattn.sparse.kernel as kernel
from longattn.kernels import native
from longattn.kernels import native_prefill as npf
from longattn.sparse.select import Selection

from conftest import reload_kernel

needs_native = pytest.mark.skipif(npf.unavailable_reason() is not None,
                                  reason=f"native prefill kernel unavailable: {npf.unavailable_reason()}")


def random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal, *, force_present=True, sort=True):
    """Random block indices per (batch, head, query block), some slots -1. Under causality only
    blocks holding a key some query of the block may see are drawn (as selectors do), and with
    ``force_present`` the blocks from the present start on are always in. Sorted like
    ``select_blocks`` (the -1 slots first) or, with ``sort=False``, in random slot order."""
    off = tk - tq
    n_blocks, n_qb = math.ceil(tk / block), math.ceil(tq / q_block)
    idx = torch.full((b, hq, n_qb, n_sel), -1, dtype=torch.long)
    for bb, h, i in itertools.product(range(b), range(hq), range(n_qb)):
        qlo, qhi = i * q_block + off, min((i + 1) * q_block, tq) - 1 + off
        visible = max(0, min(n_blocks, math.ceil((qhi + 1) / block))) if causal else n_blocks
        forced = list(range(max(qlo, 0) // block, visible)) if causal and force_present else []
        others = [j for j in range(visible) if j not in forced]
        take = max(0, n_sel - len(forced) - int(torch.randint(0, 2, (), generator=g)))
        chosen = torch.tensor(others, dtype=torch.long)[torch.randperm(len(others), generator=g)][:take]
        pick = (forced + chosen.tolist())[:n_sel]
        row = torch.full((n_sel,), -1, dtype=torch.long)
        row[:len(pick)] = torch.tensor(pick, dtype=torch.long)
        idx[bb, h, i] = row.sort().values if sort else row[torch.randperm(n_sel, generator=g)]
    return Selection(idx, q_block, block)


def visibility(selection, tq, tk, causal):
    """``[B, Hq, Tq, Tk]`` bool: what ``sparse_attention`` attends for a selection, written out
    directly: non-causal, every key of the selected blocks; causal, the selected blocks that end
    before the query block's present start ``ps`` plus the keys from ``ps`` on, up to each query."""
    b, hq, n_qb, _ = selection.indices.shape
    bs, qbs = selection.block, selection.q_block
    off = tk - tq
    vis = torch.zeros(b, hq, tq, tk, dtype=torch.bool)
    for bb, h, i in itertools.product(range(b), range(hq), range(n_qb)):
        q0, q1 = i * qbs, min((i + 1) * qbs, tq)
        ps = (max(q0 + off, 0) // bs) * bs if causal else tk
        for j in selection.indices[bb, h, i].tolist():
            if j >= 0 and (not causal or (j + 1) * bs <= ps):
                vis[bb, h, q0:q1, j * bs:(j + 1) * bs] = True
        if causal:
            vis[bb, h, q0:q1, ps:] = True
    if causal:
        vis &= torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return vis


def reference(q, k, v, selection, scale, causal):
    return longattn.reference_attention(q, k, v, mask=visibility(selection, q.shape[2], k.shape[2], causal),
                                        scale=scale)


def assert_matches(out, lse, ref, ref_lse, atol=1e-5):
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-5, equal_nan=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=atol, rtol=1e-5)


def torch_path(monkeypatch, q, k, v, selection, scale, causal, count_pairs=True):
    """``sparse_attention`` with the native kernel turned off (batched or loop path)."""
    with monkeypatch.context() as mp:
        mp.setattr(kernel, "sparse_prefill_applies", lambda *a, **kw: False)
        return kernel.sparse_attention(q, k, v, selection, scale=scale, causal=causal, count_pairs=count_pairs)


def layout(trial):
    """A varied layout per trial: GQA, q_block a multiple of the block or not, blocks and tiles
    longer than the kernel's chunk (64) and tile (64), odd head dims, Tq < Tk, non-causal."""
    g = torch.Generator().manual_seed(1000 + trial)
    causal = trial % 4 != 0
    hk, grp = 1 + trial % 2, (1, 2, 3)[trial % 3]
    hq, b = hk * grp, 1 + (trial // 3) % 2
    d = (16, 64, 7, 33, 1, 96)[trial % 6]
    block = (8, 16, 5, 64, 100, 3)[trial % 6]
    q_block = (block, 2 * block, 13, 100, 1, 150, 4 * block)[trial % 7]
    tk = int(torch.randint(1, 420, (), generator=g))
    if causal:
        tq = tk if trial % 3 == 0 else int(torch.randint(1, tk + 1, (), generator=g))
    else:
        tq = int(torch.randint(1, 300, (), generator=g))
    n_blocks = math.ceil(tk / block)
    n_sel = int(torch.randint(0, n_blocks + 2, (), generator=g))
    return g, causal, b, hq, hk, tq, tk, d, block, q_block, n_sel


@needs_native
@pytest.mark.parametrize("trial", range(36))
def test_native_matches_reference_and_torch_paths(trial, monkeypatch):
    g, causal, b, hq, hk, tq, tk, d, block, q_block, n_sel = layout(trial)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    sel = random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal, force_present=trial % 5 != 0,
                           sort=trial % 3 != 1)
    scale = 0.3
    assert npf.sparse_prefill_applies(q, k, v, sel, causal, None)
    out, lse = npf.sparse_prefill(q, k, v, sel, scale=scale, causal=causal)
    assert_matches(out, lse, *reference(q, k, v, sel, scale, causal))

    # sparse_attention takes the native kernel; its pair count is the torch paths' count
    out_k, lse_k, info = kernel.sparse_attention(q, k, v, sel, scale=scale, causal=causal, count_pairs=True)
    assert torch.equal(out_k, out) and torch.equal(lse_k, lse)
    out_t, lse_t, info_t = torch_path(monkeypatch, q, k, v, sel, scale, causal)
    torch.testing.assert_close(out, out_t, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(lse_t)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], lse_t[finite], atol=1e-5, rtol=1e-5)
    vis = visibility(sel, tq, tk, causal)
    assert info.visible_pairs == pytest.approx(float(vis.sum()) / (b * hq), rel=1e-12, abs=1e-9)
    assert info.visible_pairs == pytest.approx(info_t.visible_pairs, rel=1e-12, abs=1e-9)


@needs_native
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_identical_to_the_batched_path(causal, monkeypatch):
    g = torch.Generator().manual_seed(7)
    b, hq, hk, tq, tk, d, block, q_block = 2, 4, 2, 192, 256, 16, 16, 32
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    sel = random_selection(g, b, hq, tq, tk, q_block, block, 7, causal)
    assert kernel.batched_path_applies(sel, tq, tk, causal, None, True)
    _, _, info = kernel.sparse_attention(q, k, v, sel, scale=0.25, causal=causal, count_pairs=True)
    _, _, info_t = torch_path(monkeypatch, q, k, v, sel, 0.25, causal)
    assert info.visible_pairs == info_t.visible_pairs  # to the bit
    _, _, no_count = kernel.sparse_attention(q, k, v, sel, scale=0.25, causal=causal, count_pairs=False)
    assert no_count.visible_pairs == 0.0


@needs_native
def test_rows_that_see_nothing_give_zero_and_minus_inf():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, t, 8, generator=g) for t in (40, 30, 30))
    # non-causal, nothing selected anywhere; and one query block with only unused slots
    empty = Selection(torch.full((1, 2, 3, 4), -1, dtype=torch.long), 16, 8)
    out, lse = npf.sparse_prefill(q, k, v, empty, scale=0.5, causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    some = empty.indices.clone()
    some[:, :, 1, 0] = 2
    out, lse = npf.sparse_prefill(q, k, v, Selection(some, 16, 8), scale=0.5, causal=False)
    assert bool((out[:, :, 16:32] != 0).any()) and bool(torch.isfinite(lse[:, :, 16:32]).all())
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16])) and bool(torch.isneginf(lse[:, :, 32:]).all())
    # causal with Tq > Tk: queries before the first key see nothing; n_sel = 0 still sees the present keys
    zero = Selection(torch.zeros(1, 2, 3, 0, dtype=torch.long), 16, 8)
    out, lse = npf.sparse_prefill(q, k, v, zero, scale=0.5, causal=True)
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10])) and bool(torch.isneginf(lse[:, :, :10]).all())
    assert_matches(out, lse, *reference(q, k, v, zero, 0.5, True))
    # no keys at all
    k0, v0 = k[:, :, :0], v[:, :, :0]
    out, lse = npf.sparse_prefill(q, k0, v0, Selection(torch.full((1, 2, 3, 1), -1), 16, 8), scale=0.5, causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_half_inputs_are_read_as_stored_and_computed_in_float32(dtype, causal):
    g = torch.Generator().manual_seed(11)
    b, hq, hk, tq, tk, d, block, q_block = 2, 4, 2, 150, 230, 40, 16, 64
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    # a few values beyond the range where a shortcut conversion would break (fp16 subnormals)
    k[0, 0, 3, :4] = torch.tensor([6e-8, -3e-6, 1e-5, 0.0]).to(dtype)
    sel = random_selection(g, b, hq, tq, tk, q_block, block, 6, causal)
    out, lse = npf.sparse_prefill(q, k, v, sel, scale=0.2, causal=causal)
    # the reference sees the same rounded inputs, so only float32 compute error remains
    assert_matches(out, lse, *reference(q, k, v, sel, 0.2, causal))
    out32, lse32 = npf.sparse_prefill(q.float(), k.float(), v.float(), sel, scale=0.2, causal=causal)
    torch.testing.assert_close(out, out32, atol=1e-6, rtol=1e-6)


@needs_native
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_float32_queries_read_a_half_cache_as_stored(kv_dtype, monkeypatch):
    """The usual half-precision case: queries in the float32 compute dtype, keys and values kept
    in bf16/fp16 and read as stored; equals the reference on the stored values and the torch path
    (which converts what it reads to float32)."""
    g = torch.Generator().manual_seed(17)
    b, hq, hk, tq, tk, d, block, q_block = 1, 4, 2, 130, 250, 32, 16, 64
    q = torch.randn(b, hq, tq, d, generator=g)
    k, v = (torch.randn(b, hk, tk, d, generator=g).to(kv_dtype) for _ in range(2))
    for causal in (True, False):
        sel = random_selection(g, b, hq, tq, tk, q_block, block, 6, causal)
        assert npf.sparse_prefill_applies(q, k, v, sel, causal, None)
        out, lse = npf.sparse_prefill(q, k, v, sel, scale=0.2, causal=causal)
        assert_matches(out, lse, *reference(q, k, v, sel, 0.2, causal))
        out_t, lse_t, _ = torch_path(monkeypatch, q, k.float(), v.float(), sel, 0.2, causal)
        torch.testing.assert_close(out, out_t, atol=1e-5, rtol=1e-5)
        out_kv, _ = npf.sparse_prefill(q, k, v.float(), sel, scale=0.2, causal=causal)  # k and v differ too
        torch.testing.assert_close(out_kv, out, atol=1e-6, rtol=1e-6)


@needs_native
def test_strided_views_are_read_in_place_and_nothing_outside_them():
    g = torch.Generator().manual_seed(5)
    b, hq, hk, tq, tk, d, block, q_block = 2, 4, 2, 70, 200, 24, 16, 32
    nan = float("nan")
    # k, v: a slice of a larger cache (heads and tokens cut, [B, T, H, D] storage); everything
    # outside the view is NaN, so any read past it would show in the output
    cache = torch.full((b + 1, tk + 37, hk + 2, 2 * d), nan)
    cache[:b, 5:5 + tk, 1:1 + hk, :d] = torch.randn(b, tk, hk, d, generator=g)
    k = cache[:b, 5:5 + tk, 1:1 + hk, :d].transpose(1, 2)
    vcache = torch.full_like(cache, nan)
    vcache[:b, 5:5 + tk, 1:1 + hk, d:] = torch.randn(b, tk, hk, d, generator=g)
    v = vcache[:b, 5:5 + tk, 1:1 + hk, d:].transpose(1, 2)
    qstore = torch.full((b, tq, hq + 1, d + 3), nan)
    qstore[:, :, :hq, :d] = torch.randn(b, tq, hq, d, generator=g)
    q = qstore[:, :, :hq, :d].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for causal in (True, False):
        sel = random_selection(g, b, hq, tq, tk, q_block, block, 5, causal)
        out, lse = npf.sparse_prefill(q, k, v, sel, scale=0.3, causal=causal)
        assert bool(torch.isfinite(out).all())
        assert_matches(out, lse, *reference(q.contiguous(), k.contiguous(), v.contiguous(), sel, 0.3, causal))


@needs_native
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_keys_reach_exactly_the_rows_that_see_them(causal, which, value):
    """A NaN / inf in a key or value reaches the rows that see that key (past selected block or
    present keys at or before the query) and no other row: not the queries before it in its causal
    square (its score is hidden by assignment, its value skipped), not query blocks that did not
    select its block."""
    g = torch.Generator().manual_seed(9)
    b, hq, hk, tq, tk, d, block, q_block = 1, 2, 1, 128, 128, 16, 16, 32
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    idx = torch.tensor([[2, 3, -1], [-1, -1, -1], [0, 4, 5], [1, 6, 7]]).expand(b, hq, 4, 3).contiguous()
    sel = Selection(idx, q_block, block)
    clean, clean_lse = npf.sparse_prefill(q, k, v, sel, scale=0.3, causal=causal)
    vis = visibility(sel, tq, tk, causal)[0, 0]
    for key in (11, 40, 100):
        kk, vv = k.clone(), v.clone()
        (kk if which == "k" else vv)[:, :, key, 2] = value
        out, lse = npf.sparse_prefill(q, kk, vv, sel, scale=0.3, causal=causal)
        sees = vis[:, key]
        assert bool(sees.any()) and bool((~sees).any())
        torch.testing.assert_close(out[:, :, ~sees], clean[:, :, ~sees], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[:, :, ~sees], clean_lse[:, :, ~sees], atol=1e-6, rtol=1e-6)
        if which == "v":
            # one bad value element: only that output column of the rows that see it changes
            others = [c for c in range(d) if c != 2]
            assert not bool(torch.isfinite(out[:, :, sees, 2]).any())
            torch.testing.assert_close(out[..., others], clean[..., others], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lse, clean_lse, atol=1e-6, rtol=1e-6)
            # the whole value row bad, against the reference (with one bad element in a row, the
            # reference counts the row's finite elements twice: see the report to the lead)
            vv[:, :, key] = value
            out, lse = npf.sparse_prefill(q, kk, vv, sel, scale=0.3, causal=causal)
        ref, ref_lse = reference(q, kk, vv, sel, 0.3, causal)
        if which == "k" and math.isinf(value):
            # an infinite key scores +-inf: -inf drops the key, +inf makes the row NaN; the LSE
            # is then +inf in the reference and NaN here (l = exp(inf - inf)), both non-finite
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)
            assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
        else:
            assert bool((~torch.isfinite(out[:, :, sees])).any(-1).all())
            assert_matches(out, lse, ref, ref_lse)
    # a block nobody attends may hold anything
    kk, vv = k.clone(), v.clone()
    kk[:, :, 16 * 6:], vv[:, :, 16 * 6:] = value, value
    if causal:
        sel_early = Selection(torch.tensor([[0, -1], [0, 1], [2, 3]]).expand(b, hq, 3, 2).contiguous(), q_block, block)
        clean, clean_lse = npf.sparse_prefill(q[:, :, :96], k, v, sel_early, scale=0.3, causal=True)
        out, lse = npf.sparse_prefill(q[:, :, :96], kk, vv, sel_early, scale=0.3, causal=True)
        # Tq = 96 < Tk = 128: the queries sit at positions 32..127, block 6 onwards is present for
        # the last query block only
        assert torch.equal(out[:, :, :64], clean[:, :, :64]) and torch.equal(lse[:, :, :64], clean_lse[:, :, :64])
    else:
        sel_early = Selection(torch.tensor([[0, 2], [-1, 1], [5, -1], [3, 4]]).expand(b, hq, 4, 2).contiguous(),
                              q_block, block)
        clean, clean_lse = npf.sparse_prefill(q, k, v, sel_early, scale=0.3, causal=False)
        out, lse = npf.sparse_prefill(q, kk, vv, sel_early, scale=0.3, causal=False)
        assert torch.equal(out, clean) and torch.equal(lse, clean_lse)


@needs_native
def test_the_kernels_exp_is_accurate_to_a_float32_ulp():
    """The polynomial exp behind every probability: relative error under 1.5e-7 (an ulp is 1.2e-7)
    over [-87, 0], exactly 0 for -inf and deep underflow, 1 at 0, NaN kept."""
    x = torch.cat([torch.linspace(-87.0, 0.0, 2_000_001), -torch.rand(200_000) * 1e-3,
                   torch.tensor([0.0, -0.0, -88.0, -100.0, -1e30, float("-inf"), float("nan")])])
    y = torch.empty_like(x)
    npf.KERNEL.lib.sparse_prefill_exp(x.data_ptr(), y.data_ptr(), x.numel() - 3)  # a tail shorter than a vector too
    npf.KERNEL.lib.sparse_prefill_exp(x[-3:].data_ptr(), y[-3:].data_ptr(), 3)
    ref = torch.exp(x.double())
    body = x > -87.0
    assert float(((y.double() - ref).abs() / ref)[body].max()) < 1.5e-7
    assert y[-7:-1].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and bool(torch.isnan(y[-1]))


@needs_native
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), grp=st.integers(1, 3), d=st.integers(1, 40),
    tk=st.integers(1, 200), tq_frac=st.floats(0.0, 1.0), causal=st.booleans(),
    block=st.integers(1, 80), q_block=st.integers(1, 140), n_sel=st.integers(0, 12), seed=st.integers(0, 2 ** 16),
    force=st.booleans(), sort=st.booleans(),
)
def test_property_native_equals_reference(b, hk, grp, d, tk, tq_frac, causal, block, q_block, n_sel, seed, force,
                                          sort):
    g = torch.Generator().manual_seed(seed)
    tq = max(1, round(tk * tq_frac)) if causal else max(1, round(200 * tq_frac))
    hq = hk * grp
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    sel = random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal, force_present=force, sort=sort)
    out, lse = npf.sparse_prefill(q, k, v, sel, scale=1 / math.sqrt(d), causal=causal)
    assert_matches(out, lse, *reference(q, k, v, sel, 1 / math.sqrt(d), causal))


@needs_native
def test_sparse_attention_uses_the_native_kernel_only_where_it_applies(monkeypatch):
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    sel = Selection(torch.arange(4).expand(1, 2, 4, 4).contiguous(), 16, 16)
    calls = []
    real = kernel.sparse_prefill
    monkeypatch.setattr(kernel, "sparse_prefill", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kernel.sparse_attention(q, k, v, sel, scale=0.3, causal=True)
    assert calls == [1]
    kernel.sparse_attention(q, k, v, sel, scale=0.3, causal=True, key_padding_mask=torch.ones(1, 64, dtype=torch.bool))
    qg = q.clone().requires_grad_()
    out, _, _ = kernel.sparse_attention(qg, k, v, sel, scale=0.3, causal=True)
    assert out.requires_grad
    with torch.no_grad():
        kernel.sparse_attention(qg, k, v, sel, scale=0.3, causal=True)
    assert calls == [1, 1]
    # what the kernel does not take
    applies = npf.sparse_prefill_applies
    assert not applies(q, k, v, sel, True, torch.ones(1, 64, dtype=torch.bool))
    assert not applies(q.double(), k.double(), v.double(), sel, True, None)
    assert applies(q, k.half(), v.bfloat16(), sel, True, None)  # a float32 query over a half cache
    assert not applies(q[..., ::2], k[..., ::2], v[..., ::2], sel, True, None)
    assert not applies(q, k, v, Selection(sel.indices[:, :, :3], 16, 16), True, None)
    assert not applies(qg, k, v, sel, True, None)
    assert not applies(q[:, :, :0], k, v, Selection(sel.indices[:, :, :0], 16, 16), True, None)


@needs_native
def test_invalid_arguments_are_refused_with_what_was_expected():
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    sel = Selection(torch.arange(4).expand(1, 2, 4, 4).contiguous(), 16, 16)
    call = npf.sparse_prefill
    with pytest.raises(ValueError, match=r"selection.indices must lie in -1 \(unused\) \.\. 3.*got values in 1 \.\. 4"):
        call(q, k, v, Selection(sel.indices + 1, 16, 16), scale=0.3, causal=True)
    with pytest.raises(ValueError, match=r"got values in -2"):
        call(q, k, v, Selection(sel.indices - 2, 16, 16), scale=0.3, causal=True)
    with pytest.raises(ValueError, match=r"\[1, 2, 4, n_sel\], got \(1, 2, 3, 4\)"):
        call(q, k, v, Selection(sel.indices[:, :, :3], 16, 16), scale=0.3, causal=True)
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        call(q, k, v, Selection(sel.indices.float(), 16, 16), scale=0.3, causal=True)
    with pytest.raises(ValueError, match="positive ints"):
        call(q, k, v, Selection(sel.indices, 16, 0), scale=0.3, causal=True)
    with pytest.raises(ValueError, match="q must be float32, bfloat16 or float16, got torch.float64"):
        call(q.double(), k, v, sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match="k's last dimension must be contiguous"):
        call(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match=r"v must have k's shape \(1, 2, 64, 8\), got \(1, 2, 63, 8\)"):
        call(q, k, v[:, :, :63], sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match="same batch and head_dim"):
        call(q, k[..., :4], v[..., :4], sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match=r"heads \(2\) must be a multiple of k's heads \(3\)"):
        call(q, torch.randn(1, 3, 64, 8), torch.randn(1, 3, 64, 8), sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match="must be 4-d"):
        call(q[0], k, v, sel, scale=0.3, causal=True)
    with pytest.raises(ValueError, match="requires grad"):
        call(q.requires_grad_(), k, v, sel, scale=0.3, causal=True)
    q = q.detach()
    with pytest.raises(ValueError, match=r"scale must be a number \(int or float\), got None"):
        call(q, k, v, sel, scale=None, causal=True)
    with pytest.raises(ValueError, match="causal must be a bool"):
        call(q, k, v, sel, scale=0.3, causal=1)
    with pytest.raises(ValueError, match="must be a Selection"):
        call(q, k, v, sel.indices, scale=0.3, causal=True)
    with pytest.raises(ValueError, match=f"head_dim must be in 1..{npf.MAX_HEAD_DIM}"):
        big = torch.randn(1, 2, 4, npf.MAX_HEAD_DIM + 1)
        call(big, big, big, Selection(torch.zeros(1, 2, 1, 1, dtype=torch.long), 4, 4), scale=0.3, causal=True)


def test_disabled_kernel_leaves_the_torch_path(monkeypatch):
    """LONGATTN_NATIVE=0: the reason is stated, applies is False, sparse_attention still answers
    (the torch path) and the kernel itself refuses with the reason."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    sel = random_selection(g, 1, 2, 96, 96, 32, 16, 4, True)
    reload_kernel(monkeypatch, npf.KERNEL)
    monkeypatch.setenv("LONGATTN_NATIVE", "0")
    assert npf.unavailable_reason() == "disabled by LONGATTN_NATIVE=0"
    assert not npf.sparse_prefill_applies(q, k, v, sel, True, None)
    out, lse, _ = kernel.sparse_attention(q, k, v, sel, scale=0.3, causal=True)
    assert_matches(out, lse, *reference(q, k, v, sel, 0.3, True))
    with pytest.raises(RuntimeError, match="LONGATTN_NATIVE=0"):
        npf.sparse_prefill(q, k, v, sel, scale=0.3, causal=True)


def test_prefill_kernel_builds_into_the_cache_dir(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    reload_kernel(monkeypatch, npf.KERNEL)
    monkeypatch.delenv("LONGATTN_NATIVE", raising=False)
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    assert npf.unavailable_reason() is None, npf.unavailable_reason()
    built = list((tmp_path / "native").glob("sparse_prefill-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.c"))
    q, k, v = (torch.randn(1, 1, 20, 4) for _ in range(3))
    sel = Selection(torch.tensor([[[[0, 1]]]]), 32, 16)
    out, lse = npf.sparse_prefill(q, k, v, sel, scale=0.5, causal=True)
    assert_matches(out, lse, *reference(q, k, v, sel, 0.5, True))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")
def test_portable_build_without_avx_gives_the_same_result(monkeypatch, tmp_path):
    """The source's portable branch (no AVX: the generic vector max, vectors lowered to SSE) is
    built here too and must agree with the reference, so a machine without AVX is not untested."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    src = tmp_path / "sparse_prefill.c"
    src.write_bytes(native.source_with_headers("sparse_prefill.c"))  # with its vec8.h, as the build does
    so = tmp_path / "sparse_prefill_portable.so"
    flags = ["-O2", "-mno-avx", "-mno-avx2", "-mno-fma", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]
    proc = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reload_kernel(monkeypatch, npf.KERNEL, npf._bind(ctypes.CDLL(str(so))))
    for trial in range(8):
        g, causal, b, hq, hk, tq, tk, d, block, q_block, n_sel = layout(trial)
        q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
        sel = random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal)
        q16, k16, v16 = q.to(torch.float16), k.to(torch.float16), v.to(torch.float16)
        out, lse = npf.sparse_prefill(q, k, v, sel, scale=0.3, causal=causal)
        assert_matches(out, lse, *reference(q, k, v, sel, 0.3, causal))
        out, lse = npf.sparse_prefill(q16, k16, v16, sel, scale=0.3, causal=causal)
        assert_matches(out, lse, *reference(q16, k16, v16, sel, 0.3, causal))
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        out, lse = npf.sparse_prefill(q, kb, vb, sel, scale=0.3, causal=causal)
        assert_matches(out, lse, *reference(q, kb, vb, sel, 0.3, causal))
    # the portable max keeps the exp's edge cases
    x = torch.tensor([0.0, -1.5, -87.5, -88.0, -1e30, float("-inf"), float("nan"), -20.0, -3.0])
    y = torch.empty_like(x)
    npf.KERNEL.lib.sparse_prefill_exp(x.data_ptr(), y.data_ptr(), x.numel())
    expected = torch.exp(x.double()).masked_fill(x <= -88.0, 0.0).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=2e-7, equal_nan=True)
