"""LongHeads (per-head chunk selection with re-mapped rotary positions) and Recycled Attention
(top keys of a periodic full step reused by the queries in between), against the float64 oracle."""

import math

import pytest
import torch

import longattn
from longattn.core.positions import ALiBi, NoPE, RoPE
from longattn.methods.base import Call
from longattn.methods.longheads import remap_positions, remapped_attention
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.summaries import BlockSummaries
from conftest import assert_close_to_oracle, make_qkv


def needles(seed=0, tq=256, tk=256, hq=4, hk=2, d=32):
    """Queries that each strongly match a few random visible keys, so the selection matters."""
    q, k, v = make_qkv(b=1, hq=hq, hk=hk, tq=tq, tk=tk, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, tk, (tq,), generator=g)
    targets = torch.minimum(targets, torch.arange(tq) + tk - tq)
    for h in range(hq):
        q[0, h] += 3.0 * k[0, h // (hq // hk), targets]
    return q, k, v


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def rotated(rope, q, k):
    tq, tk = q.shape[2], k.shape[2]
    return rope.rotate(q, k, torch.arange(tq) + tk - tq, torch.arange(tk))


def longheads(window, chunk=16, local=16, score="mean"):
    return longattn.method("longheads", window=window, chunk=chunk, local=local, score=score)


def recycled(stride, budget, sinks=0):
    return longattn.method("recycled", stride=stride, budget=budget, sinks=sinks)


class RecordingRoPE(RoPE):
    """RoPE that remembers the largest position it was asked to rotate by."""

    def __init__(self, head_dim):
        super().__init__(head_dim)
        self.max_pos = -1

    def rotate(self, q, k, q_pos, k_pos):
        self.max_pos = max(self.max_pos, int(q_pos.max()), int(k_pos.max()))
        return super().rotate(q, k, q_pos, k_pos)


# -- LongHeads --------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["mean", "bound"])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_longheads_full_window_equals_exact_attention(causal, rope, score):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=1)
    pos = RoPE(16) if rope else None
    out, stats = longattn.attention(q, k, v, causal=causal, method=longheads(112, score=score), position=pos,
                                    return_stats=True)
    qr, kr = rotated(pos, q, k) if rope else (q, k)  # exact attention with RoPE at the original positions
    ref, ref_lse = longattn.reference_attention(qr, kr, v, causal=causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)
    assert stats.path == ("remapped" if rope else "sparse")


@pytest.mark.parametrize("rope", [False, True])
def test_longheads_full_window_exact_for_decode_and_padding(rope):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    pos = RoPE(16) if rope else None
    out = longattn.attention(q, k, v, causal=True, method=longheads(160), key_padding_mask=pad, position=pos)
    qr, kr = rotated(pos, q, k) if rope else (q, k)
    ref, _ = longattn.reference_attention(qr, kr, v, causal=True, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


def test_remap_positions_by_hand_identity_and_bound():
    # chunks of 4: kept chunks 0, 2, 5 (an unused slot first, as selections sort -1 to the front)
    key_pos = torch.tensor([-4, -3, -2, -1, 0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23])
    kept = key_pos >= 0
    q_pos = torch.tensor([20, 22, 23])
    k_new, q_new = remap_positions(key_pos, kept, q_pos)
    assert k_new.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert q_new.tolist() == [8, 10, 11]  # each query sits on its own key's new position
    # everything kept: the identity
    k_new, q_new = remap_positions(torch.arange(50), torch.ones(50, dtype=torch.bool), torch.arange(30, 50))
    assert k_new.tolist() == list(range(50)) and q_new.tolist() == list(range(30, 50))
    # any selection of at most W keys maps below W
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos = torch.randperm(1000, generator=g)[:64].sort().values
        queries = torch.randint(0, 1200, (10,), generator=g)
        k_new, q_new = remap_positions(pos, torch.ones(64, dtype=torch.bool), queries)
        assert int(k_new.max()) <= 63 and int(q_new.max()) <= 64 and int(q_new.min()) >= 0


def test_longheads_positions_stay_inside_the_window():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=256, tk=256, d=16, seed=2)
    rope = RecordingRoPE(16)
    out = longattn.attention(q, k, v, causal=True, method=longheads(64), position=rope)
    assert not torch.isnan(out).any()
    assert rope.max_pos == 63  # 4 chunks of 16 kept: positions 0..63, never the original ~255
    rope = RecordingRoPE(16)
    longattn.attention(q[:, :, -5:], k, v, causal=True, method=longheads(64), position=rope)
    assert rope.max_pos == 63


def test_longheads_decode_with_remapped_positions_matches_compacted_reference():
    """One query, small window: the output equals exact attention over the kept keys laid out
    contiguously with RoPE at 0..L-1 and the query at L-1 (an oracle built per head)."""
    q, k, v = needles(seed=3, tq=1, tk=200, d=16)
    rope = RoPE(16)
    m = longheads(64)
    out, st = longattn.attention(q, k, v, causal=True, method=m, position=rope, return_stats=True)
    chunks = st.extra["selected_blocks"][0, :, 0]  # [Hq, n_sel]
    for h in range(4):
        keep = torch.cat([torch.arange(c * 16, min(c * 16 + 16, 200)) for c in chunks[h].tolist() if c >= 0])
        assert keep[0] == 0 and keep[-1] == 199 and len(keep) <= 64  # first chunk, own chunk, in budget
        kk, vv = k[:, h // 2 : h // 2 + 1, keep], v[:, h // 2 : h // 2 + 1, keep]
        n = len(keep)
        qr, kr = rope.rotate(q[:, h : h + 1], kk, torch.tensor([n - 1]), torch.arange(n))
        ref, _ = longattn.reference_attention(qr, kr, vv, causal=True)
        assert_close_to_oracle(out[:, h : h + 1], ref)
    # and it differs from the same selection at the original (out-of-window) positions
    qr, kr = rotated(rope, q, k)
    plain = longattn.attention(qr, kr, v, causal=True, method=m)
    assert not torch.allclose(plain, out, atol=1e-3)


def test_remapped_kernel_without_rotation_equals_sparse_kernel():
    q, k, v = needles(seed=4, tq=96, tk=160, d=16)
    pad = torch.ones(1, 160, dtype=torch.bool)
    pad[0, 20:30] = False
    m = longheads(64)
    call = Call(causal=True, scale=0.25, key_padding_mask=pad)
    sel = m.select(q, k, call)
    a, la, pa = remapped_attention(q, k, v, sel, scale=0.25, causal=True, key_padding_mask=pad)
    b, lb, info = sparse_attention(q, k, v, sel, scale=0.25, causal=True, key_padding_mask=pad, count_pairs=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert pa == pytest.approx(info.visible_pairs)


@pytest.mark.parametrize("rope", [False, True])
def test_longheads_error_shrinks_as_window_grows(rope):
    q, k, v = needles(seed=5)
    pos = RoPE(32) if rope else None
    qr, kr = rotated(pos, q, k) if rope else (q, k)
    ref, _ = longattn.reference_attention(qr, kr, v, causal=True)
    errors = [rel_err(longattn.attention(q, k, v, causal=True, method=longheads(w), position=pos), ref)
              for w in (64, 96, 128, 192, 256)]
    assert errors[-1] < 1e-5, errors
    assert errors[0] > 10 * errors[-1] + 1e-3, errors
    for a, b in zip(errors, errors[1:]):
        assert b <= a * 1.05 + 1e-6, f"error grew with the window: {errors}"


@pytest.mark.parametrize("rope", [False, True])
def test_longheads_causal_per_query_block_and_deterministic(rope):
    q, k, v = needles(seed=6, tq=160, tk=160, d=16)
    pos = RoPE(16) if rope else None
    m = longheads(64)
    out, st = longattn.attention(q, k, v, causal=True, method=m, position=pos, return_stats=True)
    idx = st.extra["selected_blocks"]
    for i in range(idx.shape[2]):
        assert int(idx[:, :, i].max()) == i  # its own chunk, nothing later
        assert bool((idx[:, :, i] == 0).any(-1).all())  # the first chunk, every head
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 112:] = torch.randn_like(k2[:, :, 112:]) * 5
    v2[:, :, 112:] = torch.randn_like(v2[:, :, 112:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m, position=pos)
    torch.testing.assert_close(out2[:, :, :112], out[:, :, :112], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 112:], out[:, :, 112:])
    assert torch.equal(out, longattn.attention(q, k, v, causal=True, method=m, position=pos))
    assert st.density < 64 * 160 / (160 * 161 / 2)


def test_longheads_heads_choose_different_chunks():
    q, k, v = needles(seed=7, d=16)
    _, st = longattn.attention(q, k, v, causal=True, method=longheads(64), return_stats=True)
    idx = st.extra["selected_blocks"][0]  # [Hq, n_qb, n_sel]
    assert not torch.equal(idx[0], idx[1])  # heads 0 and 1 share key head 0 but not their chunks


def test_longheads_bound_score_finds_a_needle_cut_by_a_chunk_boundary():
    """One strong key on each side of the chunk boundary at 128 and a decoy chunk of uniformly
    moderate keys: the mean key of the decoy beats each needle chunk's diluted mean, Quest's bound
    does not dilute. The last query block may keep one free middle chunk beside the forced ones."""
    d, tk, chunk = 16, 256, 32
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    k = 0.1 * torch.randn(1, 1, tk, d, generator=g)
    k[0, 0, 127] += 8.0 * u  # chunk 3
    k[0, 0, 128] += 8.0 * u  # chunk 4
    k[0, 0, 64:96] += 0.5 * u  # chunk 2, the decoy: mean 0.5·u against the needles' 8/32 = 0.25·u
    q = u.expand(1, 1, chunk, d).clone()
    v = torch.randn(1, 1, tk, d, generator=g)
    # first chunk + the last two (local, own block) are forced; 5 chunks leave room for 2 middle ones
    picked = {}
    for score in ("mean", "bound"):
        _, st = longattn.attention(q, k, v, causal=True, return_stats=True,
                                   method=longheads(5 * chunk, chunk=chunk, local=chunk, score=score))
        picked[score] = set(st.extra["selected_blocks"][0, 0, -1].tolist()) - {-1}
    assert {3, 4} <= picked["bound"], picked
    assert 2 in picked["mean"] and not {3, 4} <= picked["mean"], picked


def test_longheads_bad_parameters_and_positions():
    with pytest.raises(ValueError, match="score must be one of 'mean', 'bound', got 'max'"):
        longattn.method("longheads", score="max")
    with pytest.raises(ValueError, match=r"window=48 holds 3 chunks of 16.*use window >= 64"):
        longattn.method("longheads", window=48, chunk=16, local=16)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        longattn.method("longheads", chunk=0)
    with pytest.raises(ValueError, match="local must be a non-negative int, got -1"):
        longattn.method("longheads", local=-1)
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=32, tk=32, d=16)
    with pytest.raises(ValueError, match="cannot take a score bias"):
        longattn.attention(q, k, v, causal=True, method=longheads(64), position=ALiBi(4))
    # NoPE: nothing to re-map, plain chunk selection
    a = longattn.attention(q, k, v, causal=True, method=longheads(64), position=NoPE())
    torch.testing.assert_close(a, longattn.attention(q, k, v, causal=True, method=longheads(64)))
    # a decode cache's chunk summaries are used when they fit, refused when they do not
    s = BlockSummaries.build(k, 16)
    torch.testing.assert_close(a, longattn.attention(q, k, v, causal=True, method=longheads(64), summaries=s))
    with pytest.raises(ValueError, match="summaries cover 32 keys in blocks of 8.*chunks of 16"):
        longattn.attention(q, k, v, causal=True, method=longheads(64), summaries=BlockSummaries.build(k, 8))


# -- Recycled Attention -----------------------------------------------------------------------


def recycled_mask(q, k, stride, budget, sinks, causal, scale=None):
    """The key set of every query by the paper's rule, built one query at a time (test oracle)."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    scale = scale or 1 / math.sqrt(d)
    off = tk - tq
    mask = torch.zeros(b, hq, tq, tk, dtype=torch.bool)
    for i in range(tq):
        f = i - i % stride
        vis_f = torch.arange(tk) <= f + off if causal else torch.ones(tk, dtype=torch.bool)
        if i == f:
            mask[:, :, i] = vis_f
            continue
        kk = k.repeat_interleave(hq // hk, 1)
        s = (q[:, :, f, None] @ kk.transpose(-1, -2))[:, :, 0].double() * scale  # [B, Hq, Tk]
        s = s.masked_fill(~vis_f, -math.inf)
        s = s.masked_fill((torch.arange(tk) < sinks) & vis_f, math.inf)
        top = s.topk(min(budget, tk), -1)
        mask[:, :, i].scatter_(-1, top.indices, ~torch.isneginf(top.values))
        if causal:
            mask[:, :, i, f + off + 1 : i + off + 1] = True
    return mask


@pytest.mark.parametrize("causal", [True, False])
def test_recycled_full_budget_or_stride_one_equals_exact_attention(causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=8)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal)
    for m in (longattn.method("recycled", stride=4, budget=100), longattn.method("recycled", stride=1, budget=3)):
        out, st = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
        assert_close_to_oracle(out, ref)
        torch.testing.assert_close(st.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
        assert st.density == pytest.approx(1.0)


@pytest.mark.parametrize("tq", [3, 7])
def test_recycled_full_budget_exact_for_decode_and_padding(tq):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=tq, tk=150, d=16, seed=9)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    pad[0, 148] = False  # a padded key among the new ones
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("recycled", stride=3, budget=150),
                             key_padding_mask=pad)
    ref, _ = longattn.reference_attention(q, k, v, causal=True, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq", [37, 40])
def test_recycled_attends_to_exactly_the_papers_key_sets(causal, tq):
    q, k, v = needles(seed=10, tq=tq, tk=40, d=16)
    mask = recycled_mask(q, k, stride=4, budget=8, sinks=2, causal=causal)
    ref, ref_lse = longattn.reference_attention(q, k, v, mask=mask)
    m = longattn.method("recycled", stride=4, budget=8, sinks=2)
    out, st = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(st.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    dense = tq * 40 if not causal else sum(min(40, i + 40 - tq + 1) for i in range(tq))
    assert st.density == pytest.approx(float(mask.sum()) / 4 / dense)
    assert st.extra["full_steps"] == math.ceil(tq / 4)


def test_recycled_error_shrinks_as_budget_grows():
    q, k, v = needles(seed=11)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    errors = [rel_err(longattn.attention(q, k, v, causal=True, method=recycled(8, n)), ref) for n in (4, 16, 64, 256)]
    assert errors[-1] < 1e-5 and errors[0] > 10 * errors[-1] + 1e-3, errors
    assert all(b <= a * 1.05 + 1e-6 for a, b in zip(errors, errors[1:])), errors


def test_recycled_is_accurate_while_queries_keep_their_focus():
    """The paper's premise: neighbouring queries attend alike. Queries whose needle persists for
    runs of 8 are served well by strides up to 8 and badly beyond; per-query needles are not."""

    def runs_of_needles(run, seed=12):
        q, k, v = make_qkv(b=1, hq=4, hk=2, tq=256, tk=256, d=32, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        t = torch.randint(0, 256, (256 // run,), generator=g).repeat_interleave(run)
        t = torch.minimum(t, torch.arange(256) // run * run)  # visible to the run's first query
        for h in range(4):
            q[0, h] += 3.0 * k[0, h // 2, t]
        return q, k, v

    def errors(q, k, v):
        ref, _ = longattn.reference_attention(q, k, v, causal=True)
        strides = (1, 4, 8, 16, 32)
        return [rel_err(longattn.attention(q, k, v, causal=True, method=recycled(s, 16)), ref) for s in strides]

    steady = errors(*runs_of_needles(8))
    assert steady[0] < 1e-5 and max(steady[1:3]) < 0.05 and min(steady[3:]) > 10 * max(steady[1:3]), steady
    jumpy = errors(*runs_of_needles(1))
    assert jumpy[2] > 10 * steady[2], (jumpy, steady)


def test_recycled_causal_per_token_and_deterministic():
    q, k, v = needles(seed=13, tq=160, tk=160, d=16)
    m = longattn.method("recycled", stride=8, budget=16, sinks=4)
    out = longattn.attention(q, k, v, causal=True, method=m)
    p = 101  # inside a group: per-token causality, not per group
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p:] = torch.randn_like(k2[:, :, p:]) * 5
    v2[:, :, p:] = torch.randn_like(v2[:, :, p:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :p], out[:, :, :p], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, p:], out[:, :, p:])
    assert torch.equal(out, longattn.attention(q, k, v, causal=True, method=m))


def test_recycled_fully_padded_rows_give_zero_and_bad_parameters_raise():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=12, tk=12, d=8)
    pad = torch.ones(1, 12, dtype=torch.bool)
    pad[0, :6] = False
    out, st = longattn.attention(q, k, v, causal=True, key_padding_mask=pad, return_stats=True,
                                 method=longattn.method("recycled", stride=4, budget=2))
    assert not torch.isnan(out).any()
    assert bool((out[:, :, :6] == 0).all()) and bool(torch.isneginf(st.lse[:, :, :6]).all())
    assert torch.isfinite(st.lse[:, :, 6:]).all()
    with pytest.raises(ValueError, match="stride must be a positive int, got 0"):
        longattn.method("recycled", stride=0)
    with pytest.raises(ValueError, match="budget must be a positive int, got -5"):
        longattn.method("recycled", budget=-5)
    with pytest.raises(ValueError, match="sinks=8 exceeds budget=4"):
        longattn.method("recycled", budget=4, sinks=8)
    with pytest.raises(ValueError, match="cannot take a score bias"):
        longattn.attention(q, k, v, causal=True, method="recycled", position=ALiBi(2))
