"""The block-sparse prefill selectors XAttention, AnchorAttention and PBS-Attn: exact at full
budget, their estimators against brute-force formulas written out here, selection behaviour
(threshold, margin, anchor blocks, PBS's permutation and causality), refused parameters and
half-precision inputs."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.methods.anchor import query_anchors
from longattn.methods.base import Call
from longattn.methods.pbs import attended_keys
from longattn.sparse.strided import antidiagonal_mass, sampled_rows, strided_row_mass
from conftest import assert_close_to_oracle, make_qkv, oracle_for

SMALL = dict(block=16, q_block=16, sinks=16, window=16)

#: (id, method at full budget): every estimate of every selector
FULL_BUDGET = [
    ("xattention-antidiagonal", longattn.method("xattention", budget=4096, threshold=1.0, **SMALL)),
    ("xattention-entries", longattn.method("xattention", budget=4096, threshold=1.0, estimate="antidiagonal_entries",
                                           **SMALL)),
    ("xattention-rows", longattn.method("xattention", budget=4096, threshold=1.0, estimate="rows", stride=4, **SMALL)),
    ("anchor", longattn.method("anchor", budget=4096, theta=math.inf, **SMALL)),
    ("anchor-nosinks", longattn.method("anchor", budget=4096, theta=math.inf, block=16, q_block=32, sinks=0,
                                       window=0)),
    ("pbs-pooled", longattn.method("pbs", budget=4096, segment=32, **SMALL)),
    ("pbs-rows", longattn.method("pbs", budget=4096, segment=32, estimate="rows", stride=4, **SMALL)),
    ("pbs-nosinks", longattn.method("pbs", budget=4096, segment=48, block=16, q_block=32, sinks=0, window=0)),
]

SHAPES = [(64, 64), (37, 61), (61, 61), (1, 50)]  # square, odd cross lengths, odd square, one query


def padding(b: int, tk: int) -> torch.Tensor:
    pad = torch.ones(b, tk, dtype=torch.bool)
    pad[1, :7] = False  # left padding
    pad[0, tk // 3: tk // 3 + 5] = False  # a hole
    return pad


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name,m", FULL_BUDGET, ids=[n for n, _ in FULL_BUDGET])
def test_full_budget_equals_the_float64_reference(name, m, causal, tq, tk, padded):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=tk, d=16, seed=3)
    pad = padding(2, tk) if padded else None
    out, st = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, return_stats=True)
    ref, ref_lse = oracle_for(m, q, k, v, causal=causal, key_padding_mask=pad)
    assert_close_to_oracle(out, ref)
    assert st.lse.dtype == torch.float32
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(st.lse), ~fin)
    torch.testing.assert_close(st.lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,m", FULL_BUDGET, ids=[n for n, _ in FULL_BUDGET])
def test_half_precision_inputs_run_and_match_the_reference(name, m, dtype):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=64, tk=64, d=16, dtype=dtype, seed=4)
    for causal in (True, False):
        out = longattn.attention(q, k, v, causal=causal, method=m)
        assert out.dtype == dtype
        ref, _ = oracle_for(m, q, k, v, causal=causal)  # the reference on the same rounded inputs
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["xattention", "anchor", "pbs"])
def test_half_precision_selection_equals_the_float32_one_on_the_same_values(name):
    """Estimates run in float32 whatever the dtype: the same (rounded) values in bf16 and in
    float32 select the same blocks, at a partial budget."""
    kw = dict(budget=96, **SMALL)
    m = longattn.method(name, **({"segment": 32} if name == "pbs" else {}), **kw)
    q, k, v = structured_qkv(t=192, seed=6)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    a, sa = longattn.attention(qb, kb, vb, causal=True, method=m, return_stats=True)
    b, sb = longattn.attention(qb.float(), kb.float(), vb.float(), causal=True, method=m, return_stats=True)
    assert torch.equal(sa.extra["selected_blocks"], sb.extra["selected_blocks"])
    torch.testing.assert_close(a.double(), b.double(), atol=1e-2, rtol=1e-2)


def structured_qkv(b=1, hq=4, hk=2, t=96, d=16, seed=0):
    """q/k with a few topics, so attention is peaked on some blocks (selection matters)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(6, d, generator=g)
    kt = torch.randint(0, 6, (b, hk, t), generator=g)
    qt = torch.randint(0, 6, (b, hq, t), generator=g)
    k = topics[kt] * 2 + 0.3 * torch.randn(b, hk, t, d, generator=g)
    q = topics[qt] * 2 + 0.3 * torch.randn(b, hq, t, d, generator=g)
    v = torch.randn(b, hk, t, d, generator=g)
    return q, k, v


# -- the estimators against brute force ----------------------------------------------------------


def full_scores(q, k, scale):
    g = q.shape[1] // k.shape[1]
    return (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale


def brute_antidiagonal_sum(q, k, *, stride, q_block, block, scale, causal, pad=None):
    """The paper's antidiagonal sums, one (query group, key group) square at a time."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    s_ = min(stride, tq, tk)
    off = tk - tq
    kz = k if pad is None else k.masked_fill(~pad[:, None, :, None], 0.0)
    f = full_scores(q, kz, scale)
    mq, mk = math.ceil(tq / s_), math.ceil(tk / s_)
    n_qb, n = math.ceil(tq / q_block), math.ceil(tk / block)
    out = torch.zeros(b, hq, n_qb, n, dtype=torch.float64)
    for a in range(mq):
        logits = torch.full((b, hq, mk), -math.inf, dtype=torch.float64)
        last_q = min(s_ * a + s_, tq) - 1
        for c in range(mk):
            last_k = min(s_ * c + s_, tk) - 1
            if causal and last_k > last_q + off:
                continue
            alive = pad is None or pad[:, s_ * c: s_ * c + s_].any(-1)
            total = torch.zeros(b, hq, dtype=torch.float64)
            for r in range(s_):
                i, j = s_ * a + s_ - 1 - r, s_ * c + r
                if i < tq and j < tk:
                    total += f[:, :, i, j]
            val = total / s_
            if pad is not None:
                val = torch.where(alive[:, None], val, torch.tensor(-math.inf, dtype=torch.float64))
            logits[:, :, c] = val
        p = torch.softmax(logits, -1).nan_to_num(0.0)
        for c in range(mk):
            out[:, :, last_q // q_block, (s_ * c) // block] += p[:, :, c]
    return out


def brute_antidiagonal_entries(q, k, *, stride, q_block, block, scale, causal, pad=None):
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    s_ = min(stride, tq, tk)
    off = tk - tq
    f = full_scores(q, k, scale)
    out = torch.zeros(b, hq, math.ceil(tq / q_block), math.ceil(tk / block), dtype=torch.float64)
    for i in range(tq):
        phase = s_ - 1 - i % s_
        keys = [j for j in range(phase, tk, s_) if not causal or j <= i + off]
        if not keys:
            continue
        row = f[:, :, i, keys]
        if pad is not None:
            row = row.masked_fill(~pad[:, None, keys], -math.inf)
        p = torch.softmax(row, -1).nan_to_num(0.0)
        for t, j in enumerate(keys):
            out[:, :, i // q_block, j // block] += p[:, :, t]
    return out


def brute_rows(q, k, *, stride, q_block, block, scale, causal, pad=None):
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    off = tk - tq
    f = full_scores(q, k, scale)
    out = torch.zeros(b, hq, math.ceil(tq / q_block), math.ceil(tk / block), dtype=torch.float64)
    for qb in range(math.ceil(tq / q_block)):
        rows = min(q_block, tq - qb * q_block)
        picks = list(range(stride - 1, rows, stride)) if rows >= stride else [rows - 1]
        for o in picks:
            i = qb * q_block + o
            row = f[:, :, i].clone()
            if causal:
                row[..., i + off + 1:] = -math.inf
            if pad is not None:
                row = row.masked_fill(~pad[:, None, :], -math.inf)
            p = torch.softmax(row, -1).nan_to_num(0.0)
            for j in range(tk):
                out[:, :, qb, j // block] += p[:, :, j]
    return out


ESTIMATORS = [
    ("sum", lambda q, k, **kw: antidiagonal_mass(q, k, mode="sum", **kw), brute_antidiagonal_sum),
    ("entries", lambda q, k, **kw: antidiagonal_mass(q, k, mode="entries", **kw), brute_antidiagonal_entries),
    ("rows", strided_row_mass, brute_rows),
]


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tq,tk,stride,q_block,block", [
    (32, 32, 4, 8, 8),  # aligned
    (29, 45, 4, 8, 12),  # odd lengths, query groups straddling nothing, key groups straddling blocks
    (21, 21, 5, 7, 10),  # stride dividing neither block
    (3, 40, 8, 16, 16),  # fewer queries than the stride
])
@pytest.mark.parametrize("kind,fast,brute", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_estimators_equal_their_brute_force_formula(kind, fast, brute, tq, tk, stride, q_block, block, causal, padded):
    q, k, _ = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=tk, d=8, seed=11)
    pad = padding(2, tk) if padded else None
    kw = dict(stride=stride, q_block=q_block, block=block, scale=0.35, causal=causal)
    got = fast(q, k, key_padding_mask=pad, **kw)
    want = brute(q, k, pad=pad, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sampled_rows_take_every_stride_th_query_of_each_block():
    assert sampled_rows(20, 8, 4, "cpu").tolist() == [3, 7, 11, 15, 19]
    assert sampled_rows(10, 8, 4, "cpu").tolist() == [3, 7, 9]  # the short last block: its last row
    assert sampled_rows(5, 8, 100, "cpu").tolist() == [4]
    assert sampled_rows(16, 8, 1, "cpu").tolist() == list(range(16))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", [0, 1, 20])
def test_query_anchors_are_the_max_over_the_first_block_and_the_forced_window(causal, window):
    q, k, _ = make_qkv(b=2, hq=4, hk=2, tq=45, tk=60, d=8, seed=12)
    pad = padding(2, 60)
    q_block, block = 8, 16
    got = query_anchors(q, k.float(), q_block=q_block, block=block, window=window, scale=0.4, causal=causal,
                        key_padding_mask=pad)
    f = full_scores(q, k, 0.4)
    off = 15
    before = max(window - 1, 0)
    want = torch.full((2, 4, 45), -math.inf, dtype=torch.float64)
    for i in range(45):
        blo = (i // q_block) * q_block + off
        bhi = min((i // q_block + 1) * q_block, 45) - 1 + off
        keys = set(range(block))
        keys |= set(range(max(0, blo - before), (i + off if causal else min(59, bhi + before)) + 1))
        keys = sorted(j for j in keys if (not causal or j <= i + off))
        row = f[:, :, i, keys].masked_fill(~pad[:, None, keys], -math.inf)
        want[:, :, i] = row.amax(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# -- selection behaviour -----------------------------------------------------------------------


def _call(q, causal=True, pad=None):
    return Call(causal=causal, scale=q.shape[-1] ** -0.5, key_padding_mask=pad)


def _sets(sel):
    idx = sel.indices
    return [[set(x for x in row.tolist() if x >= 0) for row in head] for head in idx.flatten(0, 1)]


@pytest.mark.parametrize("estimate", ["antidiagonal", "antidiagonal_entries", "rows"])
def test_xattention_higher_threshold_keeps_a_superset_of_blocks(estimate):
    q, k, _ = structured_qkv(t=128, seed=1)
    prev = None
    counts = []
    for tau in (0.2, 0.5, 0.8, 0.95, 1.0):
        m = longattn.method("xattention", budget=4096, threshold=tau, estimate=estimate, block=16, q_block=16,
                            sinks=0, window=0)
        cur = _sets(m.select(q, k, _call(q)))
        counts.append(sum(len(s) for h in cur for s in h))
        if prev is not None:
            assert all(p <= c for hp, hc in zip(prev, cur) for p, c in zip(hp, hc))
        prev = cur
    assert counts[0] < counts[-1]  # the threshold really binds below 1
    assert counts[-1] == sum(i + 1 for i in range(8)) * 4  # τ = 1: every visible block, 4 heads


def test_xattention_budget_caps_the_blocks_and_forces_sinks_window_and_diagonal():
    q, k, _ = structured_qkv(t=128, seed=2)
    m = longattn.method("xattention", budget=80, threshold=1.0, block=16, q_block=16, sinks=16, window=16)
    sel = m.select(q, k, _call(q))
    assert sel.n_sel == 5
    for head in _sets(sel):
        for i, s in enumerate(head):
            assert len(s) == min(5, i + 1) and 0 in s and i in s and (i == 0 or i - 1 in s)


def test_xattention_selection_depends_only_on_keys_up_to_the_query_block():
    """Prefix check at query-block granularity: a prefix of whole query blocks gives the same
    outputs for those blocks (the selection reads no later key)."""
    q, k, v = structured_qkv(t=160, seed=3)
    for est in ("antidiagonal", "antidiagonal_entries", "rows"):
        m = longattn.method("xattention", budget=96, threshold=0.7, estimate=est, stride=4, **SMALL)
        full = longattn.attention(q, k, v, causal=True, method=m)
        for end in (64, 112):
            pre = longattn.attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True, method=m)
            torch.testing.assert_close(pre, full[:, :, :end], atol=1e-5, rtol=1e-5)


def test_anchor_keeps_the_anchor_blocks_and_attends_the_anchor_keys():
    """With the strictest margin the forced blocks (the anchor's: first block, window, diagonal)
    are still kept, so every query's LSE is at least its anchor."""
    q, k, v = structured_qkv(t=128, seed=4)
    m = longattn.method("anchor", budget=4096, theta=0.0, **SMALL)
    sel = m.select(q, k, _call(q))
    for head in _sets(sel):
        for i, s in enumerate(head):
            assert {0, i, max(i - 1, 0)} <= s
    _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    anchors = query_anchors(q, k, q_block=16, block=16, window=16, scale=q.shape[-1] ** -0.5, causal=True)
    assert bool((st.lse >= anchors - 1e-4).all())


def test_anchor_wider_margin_keeps_more_blocks_and_a_superset_when_the_budget_does_not_bind():
    q, k, _ = structured_qkv(t=128, seed=5)
    prev = None
    counts = []
    for theta in (0.0, 2.0, 8.0, 32.0, math.inf):
        m = longattn.method("anchor", budget=4096, theta=theta, block=16, q_block=16, sinks=0, window=0)
        cur = _sets(m.select(q, k, _call(q)))
        counts.append(sum(len(s) for h in cur for s in h))
        if prev is not None:
            assert all(p <= c for hp, hc in zip(prev, cur) for p, c in zip(hp, hc))
        prev = cur
    assert counts[0] < counts[-1]
    # a binding budget: never more blocks than it allows, counts still non-decreasing in theta
    capped = [sum(len(s) for h in _sets(longattn.method("anchor", budget=48, theta=t, block=16, q_block=16,
                                                        sinks=0, window=0).select(q, k, _call(q))) for s in h)
              for t in (0.0, 2.0, 8.0, math.inf)]
    assert capped == sorted(capped)


def _pbs(**kw):
    return longattn.method("pbs", **{**dict(budget=96, segment=32, **SMALL), **kw})


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kw", [dict(), dict(estimate="rows", stride=4), dict(sinks=0, window=0, segment=48),
                                dict(q_block=32, segment=64, budget=112)], ids=["pooled", "rows", "bare", "wide"])
def test_pbs_at_a_partial_budget_is_attention_over_its_keys_in_the_original_order(kw, causal, padded):
    """The permuted computation (two partial results merged) equals plain attention over the same
    keys mapped back through the permutation: nothing is lost or double-counted by permuting."""
    q, k, v = structured_qkv(b=2, t=160, seed=7)
    tq = tk = 160
    pad = padding(2, tk) if padded else None
    m = _pbs(**kw)
    plan = m.plan(q, k, _call(q, causal, pad))
    mask = attended_keys(plan, tq, tk, causal, pad)
    vis = torch.ones(tq, tk, dtype=torch.bool).tril() if causal else torch.ones(tq, tk, dtype=torch.bool)
    vis = vis & (pad[:, None, None, :] if pad is not None else True)
    assert int(mask.sum()) < int(vis.expand_as(mask).sum())  # a real selection, not everything
    assert not bool((mask & ~vis).any())
    out, st = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, mask=mask)
    assert_close_to_oracle(out, ref)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(st.lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)
    assert st.density == pytest.approx(float(mask.sum()) / (2 * 4) / (tq * (tq + 1) / 2 if causal else tq * tk))


def test_pbs_permutes_within_segments_keeps_sinks_and_sorts_padding_last():
    q, k, _ = structured_qkv(b=2, t=100, seed=8)
    pad = padding(2, 100)
    m = _pbs(sinks=5, segment=32)
    plan = m.plan(q, k, _call(q, True, pad))
    order = plan.order
    assert order.shape == (2, 2, 100)
    for seg0 in range(0, 100, 32):
        part = order[..., seg0:seg0 + 32]
        assert torch.equal(part.sort(-1).values, torch.arange(seg0, min(seg0 + 32, 100)).expand_as(part))
    assert torch.equal(order[0, :, :5], torch.arange(5).expand(2, 5))  # sinks keep their place (row 0)
    assert set(order[1, :, 25:32].flatten().tolist()) == set(range(7))  # row 1's padded keys: last
    assert not torch.equal(order, torch.arange(100).expand_as(order))  # something moved
    # the permuted padding mask is the padding of the keys each slot holds, the same for every head
    slot_padding = torch.gather(pad[:, None, :].expand(2, 2, 100), 2, order)
    assert torch.equal(plan.key_padding_mask[:, None, :].expand(2, 2, 100), slot_padding)


def test_pbs_past_part_reads_only_whole_segments_before_the_local_region():
    """Causality: the unmasked permuted part of a query block holds only keys before its first
    query; the rest is in the original order under the causal mask."""
    q, k, _ = structured_qkv(t=128, seed=9)
    m = _pbs(budget=96, segment=32, sinks=0, window=20)
    plan = m.plan(q, k, _call(q))
    idx = plan.past.indices  # [B, Hq, n_qb, n]
    order_q = plan.order.repeat_interleave(2, dim=1)
    for qb in range(idx.shape[2]):
        qlo = qb * 16
        region = (max(0, qlo - 19) // 16) // 2 * 32  # the local region's first key (a segment start)
        blocks = idx[:, :, qb]
        for b_ in range(blocks.shape[0]):
            for h in range(blocks.shape[1]):
                for j in blocks[b_, h].tolist():
                    if j >= 0:
                        assert (j + 1) * 16 <= region  # a whole permuted block before the region
                        assert int(order_q[b_, h, j * 16:(j + 1) * 16].max()) < region
        present = plan.present.indices[:, :, qb]
        assert bool(((present < 0) | (present * 16 >= region)).all())


def test_pbs_rows_estimate_concentrates_mass_better_than_unpermuted_blocks():
    """On peaked attention the permuted layout lets the same budget hold more of the true mass
    than the block oracle on the original layout (recall = exp(lse − lse_exact))."""
    q, k, v = structured_qkv(t=256, seed=10)
    _, ref = longattn.attention(q, k, v, causal=True, return_stats=True)
    kw = dict(budget=64, block=16, q_block=16, sinks=0, window=0)
    recall = {}
    for name, m in {"oracle": longattn.method("block_oracle", **kw),
                    "pbs": longattn.method("pbs", segment=64, estimate="rows", stride=2, **kw)}.items():
        _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
        recall[name] = float(torch.exp(st.lse - ref.lse).clamp(max=1).mean())
    assert recall["pbs"] > recall["oracle"], recall


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw,err,match", [
    ("xattention", dict(threshold=0.0), ValueError, r"threshold must be a number in \(0, 1\], got 0.0"),
    ("xattention", dict(threshold=1.5), ValueError, r"threshold must be .* got 1.5"),
    ("xattention", dict(threshold=math.nan), ValueError, r"threshold must be .* got nan"),
    ("xattention", dict(threshold="high"), TypeError, r"threshold must be a number .* got str 'high'"),
    ("xattention", dict(threshold=True), TypeError, r"threshold must be a number .* got bool True"),
    ("xattention", dict(stride=0), ValueError, r"stride must be a positive int, got 0"),
    ("xattention", dict(stride=2.5), TypeError, r"stride must be an int, got float 2.5"),
    ("xattention", dict(estimate="diagonal"), ValueError, r"estimate must be one of .*'rows', got 'diagonal'"),
    ("xattention", dict(pooled=True), ValueError, r"pooled=True needs a block estimator"),
    ("xattention", dict(budget=64, block=64), ValueError, r"budget=64"),
    ("anchor", dict(theta=-1.0), ValueError, r"theta must be a non-negative number .* got -1.0"),
    ("anchor", dict(theta=math.nan), ValueError, r"theta must be .* got nan"),
    ("anchor", dict(theta="wide"), ValueError, r"theta must be .* got 'wide'"),
    ("pbs", dict(segment=0), ValueError, r"segment must be a positive int, got 0"),
    ("pbs", dict(segment=100), ValueError, r"segment=100 must be a multiple of block=64"),
    ("pbs", dict(estimate="exact"), ValueError, r"estimate must be one of 'pooled', 'rows', got 'exact'"),
    ("pbs", dict(stride=-2), ValueError, r"stride must be a positive int, got -2"),
    ("pbs", dict(backend="flex", q_block=64), ValueError, r"runs on the gather kernel only .* backend='flex'"),
])
def test_bad_parameters_are_refused_naming_the_argument(name, kw, err, match):
    with pytest.raises(err, match=match):
        longattn.method(name, **kw)


@pytest.mark.parametrize("name", ["xattention", "anchor", "pbs"])
def test_capability_sheets_are_honest(name):
    caps = longattn.method(name).capabilities
    assert not caps.exact and caps.causal and caps.non_causal and caps.differentiable and not caps.score_bias
    assert caps.paper and caps.cost
    spec = {s.name: s for s in longattn.methods()}[name]
    assert "2025" in spec.summary or "2025" in caps.paper


@pytest.mark.parametrize("name", ["xattention", "anchor", "pbs"])
def test_score_bias_is_refused(name):
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=16, tk=16, d=8)
    with pytest.raises(ValueError, match="cannot take a score bias"):
        longattn.attention(q, k, v, causal=True, method=name, position=longattn.positions.ALiBi(heads=2))
