"""InfLLM (representative tokens) and HiP (hierarchical pruning): block retrieval methods, and
their machinery in ``longattn.sparse.representatives`` and ``longattn.sparse.hierarchy``."""

import math

import pytest
import torch

import longattn
from longattn.sparse.hierarchy import HierarchyStats, hierarchical_select, mean_key_gathered
from longattn.sparse.representatives import RepresentativeSummaries, representative_estimate
from longattn.sparse.select import estimated_mass_scores, mean_key_estimate, select_blocks
from longattn.sparse.summaries import BlockSummaries
from conftest import assert_close_to_oracle, make_qkv
from test_sparse import needles

METHODS = ["infllm", "hip"]


def small(name, budget):
    return longattn.method(name, budget=budget, block=16, q_block=16, sinks=16, window=16)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_equals_exact_attention(name, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=1)
    out, stats = longattn.attention(q, k, v, causal=causal, method=small(name, 112), return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("causal", [True, False])
def test_infllm_pooled_full_budget_is_exact_and_pooling_changes_the_selection(causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=2)
    m = longattn.method("infllm", budget=112, block=16, q_block=16, sinks=16, window=16, pooled=True)
    assert_close_to_oracle(longattn.attention(q, k, v, causal=causal, method=m),
                           longattn.reference_attention(q, k, v, causal=causal)[0])
    q, k, v = needles(seed=10)
    per_query = longattn.method("infllm", budget=80, block=16, q_block=16, sinks=16, window=16)
    pooled = longattn.method("infllm", budget=80, block=16, q_block=16, sinks=16, window=16, pooled=True)
    a = longattn.attention(q, k, v, causal=causal, method=per_query, return_stats=True)[1].extra["selected_blocks"]
    b = longattn.attention(q, k, v, causal=causal, method=pooled, return_stats=True)[1].extra["selected_blocks"]
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_exact_for_decode_and_padding(name, causal):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    out = longattn.attention(q, k, v, causal=causal, method=small(name, 160), key_padding_mask=pad)
    ref, _ = longattn.reference_attention(q, k, v, causal=causal, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("name", METHODS)
def test_error_shrinks_as_budget_grows(name):
    q, k, v = needles()
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    errors = [rel_err(longattn.attention(q, k, v, causal=True, method=small(name, n)), ref)
              for n in (80, 96, 128, 192, 256)]
    assert errors[-1] < 1e-5, errors
    assert errors[0] > 10 * errors[-1] + 1e-3, errors
    for a, b in zip(errors, errors[1:]):
        assert b <= a * 1.05 + 1e-6, f"error grew with budget: {errors}"


@pytest.mark.parametrize("name", METHODS)
def test_causal_selection_never_touches_future_keys_or_queries(name):
    q, k, v = needles(seed=5, tq=160, tk=160)
    m = small(name, 80)
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    idx = stats.extra["selected_blocks"]  # [B, Hq, n_qb, n_sel]
    for i in range(idx.shape[2]):
        assert int(idx[:, :, i].max()) <= i
    assert int((idx[:, :, 4:] >= 0).sum(-1).min()) == 5  # once 5 blocks are visible, all slots are used
    # keys, values and queries after token 112 (a query block boundary) change none of the
    # earlier outputs; InfLLM's representatives are built from queries, so those are perturbed too
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(99)
    for t in (q2, k2, v2):
        t[:, :, 112:] = torch.randn(t[:, :, 112:].shape, generator=g) * 5
    out2 = longattn.attention(q2, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :112], out[:, :, :112], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 112:], out[:, :, 112:])


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(name):
    q, k, v = needles(seed=7)
    a = longattn.attention(q, k, v, causal=True, method=small(name, 96))
    b = longattn.attention(q, k, v, causal=True, method=small(name, 96))
    assert torch.equal(a, b)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="reps must be a positive int, got 0"):
        longattn.method("infllm", reps=0)
    with pytest.raises(ValueError, match="reps must be <= block .*got reps=32 and block=16"):
        longattn.method("infllm", reps=32, block=16, budget=256, q_block=16, sinks=16, window=16)
    with pytest.raises(ValueError, match=r"budget=64 keys gives 4 blocks of 16.*use budget >= 96"):
        longattn.method("hip", budget=64, block=16, q_block=16, sinks=16, window=32)
    with pytest.raises(ValueError, match="pooled=True needs a block estimator, which method 'hip' does not have"):
        longattn.method("hip", pooled=True)
    with pytest.raises(ValueError, match="q_block must be a positive int, got -1"):
        longattn.method("hip", q_block=-1)


# -- representatives (InfLLM) -----------------------------------------------------------------


def test_representatives_are_the_most_attended_keys_of_a_hand_made_block():
    # one block of 4 keys; every query points along +x, key 1 matches it, key 3 has the largest
    # norm but points away
    k = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [-20.0, 0.0]]).view(1, 1, 4, 2)
    q = torch.tensor([[1.0, 0.0]]).expand(4, 2).reshape(1, 1, 4, 2)
    s = RepresentativeSummaries.build(k, 4, 2, q=q, scale=1.0)
    # key 1 gets ~all attention of queries 1-3; key 0 all of query 0 (it sees only key 0): 1/4 per receiver
    assert s.index[0, 0, 0].tolist() == [1, 0]
    torch.testing.assert_close(s.keys[0, 0, 0], k[0, 0, [1, 0]])
    # without queries the block falls back to its largest-norm keys
    assert RepresentativeSummaries.build(k, 4, 2).index[0, 0, 0].tolist() == [3, 1]


def test_representatives_append_equals_build():
    q, k, _ = make_qkv(b=2, hq=4, hk=2, tq=70, tk=70, d=8, seed=3)
    full = RepresentativeSummaries.build(k, 16, 3, q=q, scale=0.3)
    for cut in (37, 48):  # mid-block and on a block boundary
        s = RepresentativeSummaries.build(k[:, :, :cut], 16, 3, q=q[:, :, :cut], scale=0.3)
        s.append(k[:, :, cut:cut + 5], q[:, :, cut:cut + 5])
        s.append(k[:, :, cut + 5:], q[:, :, cut + 5:])
        assert s.tokens == 70 and s.n_blocks == 5
        assert torch.equal(s.index, full.index)
        torch.testing.assert_close(s.keys, full.keys)
        assert torch.equal(s.count, full.count)
    short = RepresentativeSummaries.build(k[:, :, :66], 16, 3, q=q[:, :, :66])  # last block: 2 keys
    assert short.index[:, :, -1, 2].eq(-1).all() and short.index[:, :, -1, :2].sort(-1).values.eq(torch.tensor([0, 1])).all()
    assert short.keys[:, :, -1, 2].eq(0).all() and short.valid[-1].tolist() == [True, True, False]
    # decode keys with only the last queries (a cache without its prefill queries)
    part = RepresentativeSummaries.build(k, 16, 3, q=q[:, :, 40:], scale=0.3)
    s = RepresentativeSummaries.build(k[:, :, :40], 16, 3, scale=0.3)
    s.append(k[:, :, 40:], q[:, :, 40:])
    assert torch.equal(s.index, part.index)
    assert torch.equal(part.index[:, :, :2], RepresentativeSummaries.build(k[:, :, :32], 16, 3).index)  # norms


def test_representative_estimate_scores_by_the_mean_representative():
    q, k, _ = make_qkv(b=1, hq=4, hk=2, tq=20, tk=56, d=8, seed=6)
    # every key a representative: the mean representative is the mean key (landmark's score)
    est = representative_estimate(q, RepresentativeSummaries.build(k, 16, 16, q=q), 0.5)
    torch.testing.assert_close(est, mean_key_estimate(q, BlockSummaries.build(k, 16), 0.5), atol=1e-5, rtol=1e-5)
    # two representatives: InfLLM's mean of q·rep over them (+ log block size)
    s = RepresentativeSummaries.build(k, 16, 2, q=q)
    reps = s.keys.repeat_interleave(2, 1)  # [1, 4, n, 2, 8] per query head
    by_hand = torch.einsum("bhtd,bhnrd->bhtnr", q, reps).mean(-1) * 0.5 + torch.log(s.count.float())
    torch.testing.assert_close(representative_estimate(q, s, 0.5), by_hand, atol=1e-5, rtol=1e-5)


def test_infllm_uses_representative_summaries_passed_by_a_decode_loop():
    q, k, v = needles(seed=8, tq=200, tk=200)
    m = small("infllm", 80)
    s = RepresentativeSummaries.build(k[:, :, :150], 16, m.reps, q=q[:, :, :150], scale=q.shape[-1] ** -0.5)
    s.append(k[:, :, 150:], q[:, :, 150:])
    a = longattn.attention(q, k, v, causal=True, method=m)
    b = longattn.attention(q, k, v, causal=True, method=m, summaries=s)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # decode step: the summaries (built with every query) steer the selection of the last query
    last = longattn.attention(q[:, :, -1:], k, v, causal=True, method=m, summaries=s)
    alone = longattn.attention(q[:, :, -1:], k, v, causal=True, method=m)  # norms stand in for queries
    assert not torch.allclose(last, alone)
    with pytest.raises(ValueError, match="summaries keep 2 representatives per block but method 'infllm' uses reps=4"):
        longattn.attention(q, k, v, causal=True, method=m,
                           summaries=RepresentativeSummaries.build(k, 16, 2, q=q))


# -- hierarchical selection (HiP) -------------------------------------------------------------


def _smooth_keys(tk, d=8, seed=0):
    """Keys that turn slowly with position (as RoPE keys do), so attention is locally coherent."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.rand(d // 2, generator=g) * 3.0 + 0.5
    angle = torch.arange(tk)[:, None] / tk * 2 * math.pi * freqs[None, :]
    return torch.cat([angle.cos(), angle.sin()], -1).view(1, 1, tk, d)


def test_hierarchy_scores_few_blocks_and_finds_the_top_blocks_on_coherent_keys():
    tk, block, n_sel = 512, 2, 4
    k = _smooth_keys(tk)
    q = 6.0 * k[:, :, torch.tensor([40, 300, 470, 130])]  # four queries aimed at far-apart keys
    summaries = BlockSummaries.build(k, block)
    stats = HierarchyStats()
    sel = hierarchical_select(q, tk, mean_key_gathered(summaries, 1, 1.0), q_block=1, block=block, n_sel=n_sel,
                              sinks=0, window=0, causal=False, stats=stats)
    n_blocks = tk // block
    assert stats.candidates_per_query_block == n_blocks
    # log2(256 / 4) = 6 rounds of 2·4 halves: 48 scored instead of 256
    assert stats.rounds == 6 and stats.scored_per_query_block <= 48
    assert stats.scored_per_query_block < n_blocks / 5
    full = select_blocks(q, tk, estimated_mass_scores(q, summaries, mean_key_estimate, 1.0, False),
                         q_block=1, block=block, n_sel=n_sel, sinks=0, window=0, causal=False)
    assert (sel.indices >= 0).all()
    for i, target in enumerate((40, 300, 470, 130)):
        assert target // block in sel.indices[0, 0, i].tolist()
        # on coherent keys the pruned search ends where scoring every block does
        assert len(set(sel.indices[0, 0, i].tolist()) & set(full.indices[0, 0, i].tolist())) >= n_sel - 1


def test_hierarchy_keeps_forced_blocks_and_fills_the_budget():
    q, k, _ = make_qkv(b=2, hq=4, hk=2, tq=96, tk=160, d=8, seed=9)
    s = BlockSummaries.build(k, 16)
    for causal in (True, False):
        sel = hierarchical_select(q, 160, mean_key_gathered(s, 4, 0.3), q_block=16, block=16, n_sel=6,
                                  sinks=16, window=16, causal=causal)
        idx = sel.indices
        for i in range(6):  # every slot is used once 6 blocks are visible (10 blocks in all)
            visible = min(6, 5 + i) if causal else 6
            assert ((idx[:, :, i] >= 0).sum(-1) == visible).all()
        rows = [r[r >= 0].tolist() for r in idx.reshape(-1, 6)]
        assert torch.equal(idx.sort(-1).values, idx) and all(len(set(r)) == len(r) for r in rows)
        assert ((idx == 0).any(-1)).all()  # the sink block
        for i in range(6):  # query block i (positions 64+16i ...) forces its own and the window's blocks
            own = (64 + 16 * i) // 16
            assert (idx[:, :, i] == own).any(-1).all() and (idx[:, :, i] == own - 1).any(-1).all()
            if causal:
                assert int(idx[:, :, i].max()) == own
