"""Block-retrieval methods (landmark, quest, block_oracle) and their shared machinery."""

import math

import pytest
import torch

import longattn
from longattn.sparse.select import quest_bound_estimate, mean_key_estimate
from longattn.sparse.summaries import BlockSummaries
from conftest import assert_close_to_oracle, make_qkv

# "+pooled": the method scoring each query block once with its mean query
METHODS = ["landmark", "quest", "block_oracle", "landmark+pooled", "quest+pooled"]


def small(name, budget):
    base, _, variant = name.partition("+")
    return longattn.method(base, budget=budget, block=16, q_block=16, sinks=16, window=16, pooled=variant == "pooled")


def needles(seed=0, tq=256, tk=256, hq=4, hk=2, d=32):
    """Queries that each strongly match a few random keys, so which blocks are kept matters."""
    q, k, v = make_qkv(b=1, hq=hq, hk=hk, tq=tq, tk=tk, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, tk, (tq,), generator=g)
    targets = torch.minimum(targets, torch.arange(tq) + tk - tq)  # a visible key under causality
    for h in range(hq):
        q[0, h] += 3.0 * k[0, h // (hq // hk), targets]
    return q, k, v


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_equals_exact_attention(name, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16)
    out, stats = longattn.attention(q, k, v, causal=causal, method=small(name, 112), return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_exact_for_decode_cross_and_padding(name):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    out = longattn.attention(q, k, v, causal=True, method=small(name, 160), key_padding_mask=pad)
    ref, _ = longattn.reference_attention(q, k, v, causal=True, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("name", METHODS)
def test_error_shrinks_as_budget_grows(name):
    q, k, v = needles()
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    errors = []
    for budget in (80, 96, 128, 192, 256):
        out = longattn.attention(q, k, v, causal=True, method=small(name, budget))
        errors.append(float((out.double() - ref).norm() / ref.norm()))
    assert errors[-1] < 1e-5, errors
    assert errors[0] > 10 * errors[-1] + 1e-3, errors
    for a, b in zip(errors, errors[1:]):
        assert b <= a * 1.05 + 1e-6, f"error grew with budget: {errors}"


def test_oracle_is_at_least_as_good_as_the_estimators_on_needles():
    q, k, v = needles(seed=3)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    err = {}
    for name in METHODS[:3]:
        out = longattn.attention(q, k, v, causal=True, method=small(name, 96))
        err[name] = float((out.double() - ref).norm() / ref.norm())
    assert err["block_oracle"] <= min(err["landmark"], err["quest"]) * 1.05, err


@pytest.mark.parametrize("name", METHODS)
def test_causal_selection_never_touches_future_keys(name):
    q, k, v = needles(seed=5, tq=160, tk=160)
    m = small(name, 80)
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    idx = stats.extra["selected_blocks"]  # [B, Hq, n_qb, n_sel]
    for i in range(idx.shape[2]):
        assert int(idx[:, :, i].max()) <= i  # q block i ends at token 16i+15, key block i covers 16i..16i+15
    # changing keys after a query block changes none of its outputs. (A selection is shared by the
    # 16 queries of a block, so it may depend on any key up to the block's last query.)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 112:] = torch.randn_like(k2[:, :, 112:]) * 5
    v2[:, :, 112:] = torch.randn_like(v2[:, :, 112:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :112], out[:, :, :112], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 112:], out[:, :, 112:])


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(name):
    q, k, v = needles(seed=7)
    a = longattn.attention(q, k, v, causal=True, method=small(name, 96))
    b = longattn.attention(q, k, v, causal=True, method=small(name, 96))
    assert torch.equal(a, b)


def test_budget_is_honest():
    q, k, v = needles(seed=2, tq=256, tk=256)
    _, stats = longattn.attention(q, k, v, causal=True, method=small("quest", 96), return_stats=True)
    assert stats.extra["blocks_per_query_block"] * 16 <= 96
    assert stats.density < 96 * 256 / (256 * 257 / 2)


def test_summaries_append_equals_build():
    _, k, _ = make_qkv(b=1, hq=2, hk=2, tq=1, tk=70, d=8)
    s = BlockSummaries.build(k[:, :, :37], 16)
    s.append(k[:, :, 37:])
    full = BlockSummaries.build(k, 16)
    for name in ("sums", "kmin", "kmax", "count"):
        torch.testing.assert_close(getattr(s, name), getattr(full, name))
    assert s.tokens == 70


def test_quest_bound_is_an_upper_bound_and_mean_estimate_is_exact_for_constant_blocks():
    q, k, _ = make_qkv(b=1, hq=4, hk=2, tq=20, tk=64, d=8)
    s = BlockSummaries.build(k, 16)
    bound = quest_bound_estimate(q, s, 1.0) - math.log(16)  # [1, 4, 20, 4]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)).view(1, 4, 20, 4, 16)
    assert (scores.amax(-1) <= bound + 1e-5).all()
    const = k[:, :, :1].expand(-1, -1, 64, -1)
    est = mean_key_estimate(q, BlockSummaries.build(const, 16), 1.0)
    exact = torch.logsumexp((q @ const.repeat_interleave(2, 1).transpose(-1, -2)).view(1, 4, 20, 4, 16), -1)
    torch.testing.assert_close(est, exact, atol=1e-4, rtol=1e-5)


def test_budget_too_small_for_sinks_and_window_is_refused():
    with pytest.raises(ValueError, match=r"budget=64 keys gives 4 blocks of 16.*use budget >= 96"):
        longattn.method("landmark", budget=64, block=16, q_block=16, sinks=16, window=32)
    with pytest.raises(ValueError, match="budget must be a positive int, got 0"):
        longattn.method("quest", budget=0)


# -- token-level selection --------------------------------------------------------------------


@pytest.mark.parametrize("voting", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_tokenselect_full_budget_equals_exact(voting, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=70, tk=100, d=16) if not causal else make_qkv(b=2, hq=4, hk=2, tq=70, tk=100, d=16, seed=9)
    pad = torch.ones(2, 100, dtype=torch.bool)
    pad[0, :30] = False
    m = longattn.method("tokenselect", budget=100, voting=voting, chunk=32)
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("voting", [False, True])
def test_tokenselect_error_shrinks_and_stays_causal(voting):
    q, k, v = needles(seed=11)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    errors = []
    for budget in (8, 16, 64, 256):
        out = longattn.attention(q, k, v, causal=True, method=longattn.method("tokenselect", budget=budget, voting=voting))
        errors.append(float((out.double() - ref).norm() / ref.norm()))
    assert errors[-1] < 1e-5 and errors[0] > 10 * errors[-1], errors
    assert all(b <= a * 1.05 + 1e-6 for a, b in zip(errors, errors[1:])), errors
    m = longattn.method("tokenselect", budget=16, voting=voting)
    a = longattn.attention(q, k, v, causal=True, method=m)
    k2 = k.clone()
    k2[:, :, 120:] *= -3.0  # change the future only
    b = longattn.attention(q, k2, v, causal=True, method=m)
    torch.testing.assert_close(a[:, :, :120], b[:, :, :120], atol=1e-6, rtol=1e-5)
    assert torch.equal(a, longattn.attention(q, k, v, causal=True, method=m))  # deterministic


def test_tokenselect_budget_is_honest_and_voting_shares_keys_within_a_group():
    q, k, v = needles(seed=12, tq=64, tk=64, hq=4, hk=2)
    for voting in (False, True):
        _, st = longattn.attention(q, k, v, causal=True, return_stats=True,
                                   method=longattn.method("tokenselect", budget=8, voting=voting))
        assert st.density <= sum(min(i + 1, 8) for i in range(64)) / (64 * 65 / 2) + 1e-9
    # with v = identity the output row is the attention distribution: its support is the selection
    q, k, _ = needles(seed=13, tq=64, tk=64, hq=4, hk=2, d=64)
    eye = torch.eye(64).expand(1, 2, 64, 64)
    support = {}
    for voting in (False, True):
        w = longattn.attention(q, k, eye, causal=True, method=longattn.method("tokenselect", budget=8, voting=voting))
        support[voting] = w > 0
    assert torch.equal(support[True][:, 0], support[True][:, 1])  # heads 0 and 1 share key head 0
    assert torch.equal(support[True][:, 2], support[True][:, 3])
    assert not torch.equal(support[False][:, 0], support[False][:, 1])
    with pytest.raises(ValueError, match="sinks \\+ window = 12 exceeds budget=8"):
        longattn.method("tokenselect", budget=8, sinks=4, window=8)


def test_loki_at_full_rank_selects_like_tokenselect_and_full_budget_is_exact():
    q, k, v = needles(seed=14, hq=4, hk=2, d=16)
    a = longattn.attention(q, k, v, causal=True, method=longattn.method("loki", budget=24, rank_dims=16))
    b = longattn.attention(q, k, v, causal=True, method=longattn.method("tokenselect", budget=24))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("loki", budget=256, rank_dims=2))
    assert_close_to_oracle(out, longattn.reference_attention(q, k, v, causal=True)[0])


def test_loki_error_shrinks_with_budget():
    q, k, v = needles(seed=15)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    errors = [float((longattn.attention(q, k, v, causal=True, method=longattn.method("loki", budget=n, rank_dims=8))
                     .double() - ref).norm() / ref.norm()) for n in (8, 32, 128, 256)]
    assert errors[-1] < 1e-5 and errors[0] > 10 * errors[-1], errors
    assert all(b <= a * 1.05 + 1e-6 for a, b in zip(errors, errors[1:])), errors


def test_key_pca_append_equals_fit_and_basis_is_orthonormal():
    from longattn.sparse.lowrank import KeyPCA

    _, k, _ = make_qkv(b=1, hq=2, hk=2, tq=1, tk=90, d=8)
    pca = KeyPCA.fit(k[:, :, :40])
    pca.append(k[:, :, 40:])
    full = KeyPCA.fit(k)
    torch.testing.assert_close(pca.outer, full.outer)
    basis = full.basis(3)
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(3).expand(1, 2, 3, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rank must be in 1..head_dim=8, got 9"):
        full.basis(9)


def test_pooled_scoring_needs_an_estimator():
    with pytest.raises(ValueError, match="pooled=True"):
        longattn.method("block_oracle", pooled=True)
