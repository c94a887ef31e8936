"""hyper (HyperAttention), routing (Routing Transformer), linformer and cca (Core Context Aware)."""

import pytest
import torch

import longattn
from conftest import assert_close_to_oracle, make_qkv
from test_sparse import needles


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def hyper(**kw):
    return longattn.method("hyper", **{"block": 16, "samples": 16, "min_seq": 32, **kw})


# full budget per method: (name, params, causal)
FULL = [
    ("hyper", dict(block=128, samples=8), False),  # one block holds every key
    ("hyper", dict(block=128, samples=8, min_seq=128), True),  # tokens <= min_seq: exact causal
    ("hyper", dict(block=128, samples=8, min_seq=16), True),  # recursion whose pieces are all exact
    ("routing", dict(clusters=1, chunk=32), False),
    ("routing", dict(clusters=1, chunk=32), True),
    ("linformer", dict(proj=100), False),
    ("linformer", dict(proj=500), False),
    ("cca", dict(group=1, window=4, chunk=32), False),
    ("cca", dict(group=1, window=4, chunk=32), True),
    ("cca", dict(group=4, window=100, chunk=32), True),  # the window covers everything
]


@pytest.mark.parametrize("name,params,causal", FULL)
def test_full_budget_equals_exact_attention(name, params, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=100, tk=100, d=16, seed=1)
    out, stats = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params), return_stats=True)
    ref, ref_lse = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert stats.density == pytest.approx(1.0)


DECODE = [
    ("hyper", dict(block=256, min_seq=16), True),  # prefix piece (one block) + 3x3 causal square
    ("hyper", dict(block=256), False),
    ("routing", dict(clusters=1), True),
    ("routing", dict(clusters=1), False),
    ("linformer", dict(proj=150), False),
    ("cca", dict(group=1, window=8), True),
    ("cca", dict(group=1, window=8), False),
]


@pytest.mark.parametrize("name,params,causal", DECODE)
def test_full_budget_exact_for_decode_with_key_padding(name, params, causal):
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=3, tk=150, d=16, seed=4)
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :40] = False
    pad[0, 100:110] = False
    out = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params), key_padding_mask=pad)
    ref, _ = longattn.reference_attention(q, k, v, causal=causal, mask=pad[:, None, None, :])
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("name,params,causal", [
    ("hyper", dict(block=16, samples=8, min_seq=16), True),
    ("hyper", dict(block=16, samples=8), False),
    ("routing", dict(clusters=4, window=1), True),  # the window keeps real rows non-empty
    ("routing", dict(clusters=4, window=1), False),
    ("linformer", dict(proj=8), False),
    ("linformer", dict(proj=8, kind="random"), False),
    ("cca", dict(group=4, window=4), True),
    ("cca", dict(group=4, window=4), False),
])
def test_rows_with_only_padding_give_zero_and_minus_inf(name, params, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=64, tk=64, d=8, seed=2)
    pad = torch.ones(2, 64, dtype=torch.bool)
    pad[1] = False
    out, stats = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params),
                                    key_padding_mask=pad, return_stats=True)
    assert not torch.isnan(out).any() and not torch.isnan(stats.lse).any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(stats.lse[1]).all()
    assert torch.isfinite(stats.lse[0]).all() and out[0].abs().sum() > 0


# -- error shrinks as the budget grows --------------------------------------------------------


def _assert_shrinks(errors, exact_last=True):
    if exact_last:
        assert errors[-1] < 1e-5, errors
    assert errors[0] > 10 * errors[-1] + 1e-3, errors
    for a, b in zip(errors, errors[1:]):
        assert b <= a * 1.05 + 1e-6, f"error grew with budget: {errors}"


def _mean_errors(inputs, causal, methods):
    """Mean relative error of each method over a few inputs (hashing, sampling and k-means
    initialisation are random, so one draw can be unlucky)."""
    refs = [longattn.reference_attention(q, k, v, causal=causal)[0] for q, k, v in inputs]
    errors = []
    for make in methods:
        e = [rel(longattn.attention(q, k, v, causal=causal, method=make(seed)), ref)
             for seed, ((q, k, v), ref) in enumerate(zip(inputs, refs))]
        errors.append(sum(e) / len(e))
    return errors


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_error_shrinks_as_blocks_grow(causal):
    inputs = [needles(seed=seed) for seed in range(3)]
    errors = _mean_errors(inputs, causal, [lambda seed, b=b: hyper(block=b, min_seq=64, seed=seed)
                                           for b in (8, 32, 64, 128, 256)])
    _assert_shrinks(errors)


@pytest.mark.parametrize("causal", [False, True])
def test_routing_error_shrinks_as_clusters_get_fewer(causal):
    # random scores, peaked enough (q doubled) that the keys outside a cluster matter
    inputs = [(2 * q, k, v) for q, k, v in (make_qkv(b=1, hq=4, hk=2, tq=256, tk=256, d=16, seed=s) for s in range(3))]
    errors = _mean_errors(inputs, causal, [
        lambda seed, c=c: longattn.method("routing", clusters=c, window=1, chunk=64, seed=seed)
        for c in (16, 8, 4, 2, 1)
    ])
    _assert_shrinks(errors)


def test_linformer_pool_error_shrinks_as_proj_grows():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=256, tk=256, d=16, seed=3)
    ref, _ = longattn.reference_attention(q, k, v)
    errors = [rel(longattn.attention(q, k, v, method=longattn.method("linformer", proj=p)), ref)
              for p in (16, 32, 64, 128, 256)]
    _assert_shrinks(errors)


@pytest.mark.parametrize("causal", [False, True])
def test_cca_error_shrinks_as_window_grows_and_groups_shrink(causal):
    q, k, v = needles(seed=3)
    ref, _ = longattn.reference_attention(q, k, v, causal=causal)
    by_window = [rel(longattn.attention(q, k, v, causal=causal, method=longattn.method("cca", group=8, window=w)), ref)
                 for w in (8, 32, 64, 128, 256)]
    _assert_shrinks(by_window)
    by_group = [rel(longattn.attention(q, k, v, causal=causal, method=longattn.method("cca", group=g, window=16)), ref)
                for g in (8, 4, 2, 1)]
    _assert_shrinks(by_group)


# -- mechanism checks -------------------------------------------------------------------------


def test_hyper_sampled_denominator_is_unbiased():
    """Mean over seeds of exp(lse) / exact denominator is 1: the sampled columns carry weight
    tokens_k / samples and those already inside the query's block are not counted twice."""
    q, k, v = make_qkv(b=1, hq=2, hk=1, tq=64, tk=64, d=8, seed=5)
    _, ref_lse = longattn.reference_attention(q, k, v)
    # columns are drawn per batch row: 50 copies of one input are 50 independent draws per call
    qb, kb, vb = (t.expand(50, -1, -1, -1).contiguous() for t in (q, k, v))
    ratios = []
    for seed in range(4):
        _, st = longattn.attention(qb, kb, vb, method=hyper(block=16, samples=8, seed=seed), return_stats=True)
        ratios.append(torch.exp(st.lse.double() - ref_lse))
    mean = torch.cat(ratios).mean(0)
    assert abs(float(mean.mean()) - 1.0) < 0.02, float(mean.mean())
    assert float((mean - 1).abs().max()) < 0.1
    # without samples the block part alone sees only part of the mass
    _, st = longattn.attention(q, k, v, method=hyper(block=16, samples=0), return_stats=True)
    assert float(torch.exp(st.lse.double() - ref_lse).mean()) < 0.6


def test_hyper_density_counts_blocks_and_samples():
    q, k, v = make_qkv(b=1, hq=2, hk=1, tq=128, tk=128, d=8, seed=6)
    _, st = longattn.attention(q, k, v, method=hyper(block=16, samples=0), return_stats=True)
    assert st.density == pytest.approx(16 / 128)  # each query: exactly its block of 16 keys
    _, st = longattn.attention(q, k, v, method=hyper(block=16, samples=16), return_stats=True)
    assert 16 / 128 < st.density <= 32 / 128


def test_routing_queries_without_keys_get_zero_and_window_prevents_it():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=128, tk=128, d=8, seed=7)
    out, st = longattn.attention(q, k, v, causal=True, return_stats=True,
                                 method=longattn.method("routing", clusters=16, chunk=32, window=0))
    empty = torch.isneginf(st.lse)
    assert empty.any()  # some query's cluster has no key at or before it
    assert not torch.isnan(out).any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    out, st = longattn.attention(q, k, v, causal=True, return_stats=True,
                                 method=longattn.method("routing", clusters=16, chunk=32, window=1))
    assert torch.isfinite(st.lse).all()
    assert st.density < 0.5


def test_linformer_pool_is_exact_when_segment_keys_are_equal():
    """log(segment size) on the pooled score gives a segment the mass of all its keys."""
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=50, tk=100, d=16, seed=8)
    seg = torch.arange(100) * 24 // 100  # 24 contiguous segments of 4 or 5 keys
    first = torch.searchsorted(seg, seg)  # first position of each position's segment
    k = k[:, :, first]  # keys equal within a segment; values differ
    ref, ref_lse = longattn.reference_attention(q, k, v)
    out, st = longattn.attention(q, k, v, method=longattn.method("linformer", proj=24), return_stats=True)
    assert_close_to_oracle(out, ref)
    torch.testing.assert_close(st.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert st.density == pytest.approx(24 / 100)


@pytest.mark.parametrize("kind", ["pool", "random"])
def test_linformer_ignores_padded_keys_and_refuses_causal(kind):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=64, d=8, seed=9)
    pad = torch.ones(2, 64, dtype=torch.bool)
    pad[0, 10:30] = False
    m = longattn.method("linformer", proj=8, kind=kind)
    a = longattn.attention(q, k, v, method=m, key_padding_mask=pad)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 10:30] = 100.0
    v2[0, :, 10:30] = -50.0
    b = longattn.attention(q, k2, v2, method=m, key_padding_mask=pad)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="does not support causal=True"):
        longattn.attention(q, k, v, method=m, causal=True)


def test_cca_is_exact_when_group_keys_are_equal():
    """A core token of equal keys is their key and mean value; with log(group size) it is exact."""
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=96, tk=96, d=16, seed=10)
    k = k[:, :, ::4].repeat_interleave(4, 2)
    for causal in (True, False):
        ref, _ = longattn.reference_attention(q, k, v, causal=causal)
        out, st = longattn.attention(q, k, v, causal=causal, return_stats=True,
                                     method=longattn.method("cca", group=4, window=8, chunk=32))
        assert_close_to_oracle(out, ref)
        assert st.density < 0.5


# -- causality, determinism, arguments --------------------------------------------------------


def test_hyper_never_reads_future_keys():
    q, k, v = needles(seed=5, tq=256, tk=256)
    m = hyper(block=16, samples=8, min_seq=32)
    out = longattn.attention(q, k, v, causal=True, method=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 100:] = torch.randn_like(k2[:, :, 100:]) * 5
    v2[:, :, 100:] = torch.randn_like(v2[:, :, 100:]) * 5
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :100], out[:, :, :100], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, 100:], out[:, :, 100:])


@pytest.mark.parametrize("name,params", [
    ("routing", dict(clusters=4, chunk=32, window=4)),
    ("cca", dict(group=8, window=16, chunk=32)),
])
def test_token_level_causality_for_queries_keys_and_values(name, params):
    """Changing any token after p (its query, key and value) changes no output before p."""
    q, k, v = needles(seed=6, tq=192, tk=192)
    m = longattn.method(name, **params)
    out = longattn.attention(q, k, v, causal=True, method=m)
    p = 101  # not on a chunk or group boundary
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, p:] = torch.randn_like(t[:, :, p:]) * 3
    out2 = longattn.attention(q2, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :p], out[:, :, :p], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out2[:, :, p:], out[:, :, p:])


@pytest.mark.parametrize("name,params,causal,seeded", [
    ("hyper", dict(block=16, samples=16, min_seq=32), True, True),
    ("hyper", dict(block=16, samples=16), False, True),
    ("routing", dict(clusters=4, chunk=64), True, True),
    ("routing", dict(clusters=4), False, True),
    ("linformer", dict(proj=16, kind="random"), False, True),
    ("linformer", dict(proj=16), False, False),
    ("cca", dict(group=8, window=16), True, False),
])
def test_deterministic_and_seeded(name, params, causal, seeded):
    q, k, v = needles(seed=7, tq=128, tk=128)
    a = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params))
    b = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params))
    assert torch.equal(a, b)
    if seeded:
        c = longattn.attention(q, k, v, causal=causal, method=longattn.method(name, **params, seed=1))
        assert not torch.equal(a, c)  # the seed is used


@pytest.mark.parametrize("name,kw,message", [
    ("hyper", dict(lsh_bits=0), "lsh_bits must be a positive int, got 0"),
    ("hyper", dict(lsh_bits=40), "lsh_bits must be at most 31.*got 40"),
    ("hyper", dict(block=0), "block must be a positive int, got 0"),
    ("hyper", dict(samples=-1), "samples must be a non-negative int, got -1"),
    ("hyper", dict(min_seq=0), "min_seq must be a positive int, got 0"),
    ("routing", dict(clusters=0), "clusters must be a positive int, got 0"),
    ("routing", dict(iters=-1), "iters must be a non-negative int, got -1"),
    ("routing", dict(window=-2), "window must be a non-negative int, got -2"),
    ("routing", dict(chunk=0), "chunk must be a positive int, got 0"),
    ("linformer", dict(proj=0), "proj must be a positive int, got 0"),
    ("linformer", dict(kind="svd"), "kind must be one of 'pool', 'random', got 'svd'"),
    ("cca", dict(group=0), "group must be a positive int, got 0"),
    ("cca", dict(window=0), "window must be a positive int, got 0"),
])
def test_bad_parameters_are_refused(name, kw, message):
    with pytest.raises(ValueError, match=message):
        longattn.method(name, **kw)


def test_score_bias_is_refused():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=16, tk=16, d=8)
    for name in ("hyper", "routing", "linformer", "cca"):
        with pytest.raises(ValueError, match="cannot take a score bias"):
            longattn.attention(q, k, v, method=name, position=longattn.positions.ALiBi(2))
