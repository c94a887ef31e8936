"""Property test: any exact method, shape, head ratio, cross length, padding and mask equals the
float64 oracle."""

import math

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import longattn
from longattn import masks
from longattn.core import nonfinite
from conftest import assert_close_to_oracle, oracle_for


@st.composite
def problems(draw):
    hk = draw(st.sampled_from([1, 2, 3]))
    hq = hk * draw(st.sampled_from([1, 2, 4]))
    tk = draw(st.integers(1, 70))
    tq = draw(st.integers(1, tk)) if draw(st.booleans()) else tk
    d = draw(st.sampled_from([4, 8, 16]))
    b = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    block = draw(st.sampled_from([4, 8, 16, 32]))
    kind = draw(st.sampled_from(["dense", "dense_chunked", "window", "dilated", "streaming", "a_shape",
                                 "power", "lsg", "document", "block_map"] + ([] if causal else ["prefix_lm"])))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "streaming" and not causal:
        kind = "window"
    m = {
        "dense": lambda: longattn.method("dense"),
        "dense_chunked": lambda: longattn.method("dense_chunked", chunk=draw(st.sampled_from([8, 16, 64])), block=block),
        "window": lambda: longattn.method("window", window=draw(st.integers(1, 20)), block=block),
        "dilated": lambda: longattn.method("window", window=draw(st.integers(1, 8)), dilation=draw(st.integers(2, 4)), block=block),
        "streaming": lambda: longattn.method("streaming", sinks=draw(st.integers(1, 5)), window=draw(st.integers(1, 20)), block=block),
        "a_shape": lambda: longattn.method("pattern", mask=masks.a_shape(draw(st.integers(1, 5)), draw(st.integers(1, 20))), block=block),
        "power": lambda: longattn.method("pattern", mask=masks.power(draw(st.sampled_from([2, 4, 8])))),
        "lsg": lambda: longattn.method("pattern", mask=masks.lsg(draw(st.integers(1, 9)), 3, 2, 4), block=block),
        "document": lambda: longattn.method("pattern", mask=masks.document(torch.randint(0, 3, (tk,), generator=g).sort().values), block=block),
        "block_map": lambda: longattn.method("pattern", mask=masks.block_map(torch.rand(tq // 8 + 1, tk // 8 + 1, generator=g) > 0.5, 8, tk - tq)),
        "prefix_lm": lambda: longattn.method("pattern", mask=masks.prefix_lm(draw(st.integers(0, tk))), block=block),
    }[kind]()
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hk, tk, d, generator=g)
    v = torch.randn(b, hk, tk, d, generator=g)
    pad = None
    if draw(st.booleans()):
        pad = torch.rand(b, tk, generator=g) > 0.3
    return q, k, v, causal, m, pad


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_exact_methods_equal_oracle(problem):
    q, k, v, causal, m, pad = problem
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, return_stats=True)
    ref_out, ref_lse = oracle_for(m, q, k, v, causal=causal, key_padding_mask=pad)
    assert_close_to_oracle(out, ref_out)
    if stats.lse is not None:
        assert torch.equal(torch.isneginf(stats.lse), torch.isneginf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(stats.lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)


# -- every method, any memory layout, empty dimensions, NaN/Inf in keys a query may not see --------

LAYOUTS = ["contiguous", "expanded_last", "strided_last", "token_major"]


def _lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t [B, H, T, D]`` in another memory layout (what a user's views look like)."""
    if layout == "expanded_last":  # stride 0 in the head dim: every element of a head is equal
        return t[..., :1].expand(t.shape)
    if layout == "strided_last":  # every other element of a wider tensor
        wide = torch.stack([t, torch.full_like(t, 1e4)], -1).flatten(-2)
        return wide[..., ::2]
    if layout == "token_major":  # [B, T, H, D] storage, as a projection's output before transpose
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


@st.composite
def any_method_problems(draw):
    from conftest import FULL, full

    name = draw(st.sampled_from(sorted(FULL)))
    m = full(name)
    caps = m.capabilities
    causal = draw(st.sampled_from([c for c, ok in ((True, caps.causal), (False, caps.non_causal)) if ok]))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2]))
    b = draw(st.sampled_from([0, 1, 2]))
    tk = draw(st.integers(0, 48))
    tq = draw(st.integers(0, tk)) if caps.cross and draw(st.booleans()) else tk
    d = 16
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    if draw(st.booleans()):  # layouts change values for the expanded one: draw them before poisoning
        q, k, v = (_lay_out(t, draw(st.sampled_from(LAYOUTS))) for t in (q, k, v))
    pad = None
    if b and tk and draw(st.booleans()) and name not in ("linformer", "cca", "routing", "hyper", "recycled",
                                                         "loki", "tokenselect", "minference"):
        pad = torch.rand(b, tk, generator=g) > 0.3
    poison = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
    if poison is not None and b and tk:
        # a key/value nobody may see when it is padding or the last key under causality (the
        # earlier queries' future); one that some rows see otherwise: those rows must be NaN
        k, v = k.clone(), v.clone()
        j = int(torch.randint(0, tk, (1,), generator=g)) if pad is None else int((~pad[0]).nonzero()[0, 0]) \
            if bool((~pad[0]).any()) else tk - 1
        k[0, 0, j, 0] = poison
        if draw(st.booleans()):
            v[0, -1, j, 1] = poison
    return name, m, q, k, v, causal, pad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_method_problems())
def test_every_method_follows_the_oracle_on_any_layout_empty_or_non_finite_input(problem):
    name, m, q, k, v, causal, pad = problem
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad, return_stats=True)
    assert out.shape == (*q.shape[:3], v.shape[-1])
    ref, ref_lse = oracle_for(m, q, k, v, causal=causal, key_padding_mask=pad)
    # longattn's rule (longattn.core.nonfinite): a row that may see a key or value holding NaN/Inf
    # is NaN; every other row is the oracle's, whatever the keys it may not see hold
    b, hq, tq = q.shape[:3]
    tk = k.shape[2]
    vm = m.visible_mask(tq, tk, causal)
    vis = torch.ones(b, hq, tq, tk, dtype=torch.bool) if vm is None else vm.dense(b, hq, tq, tk).clone()
    if pad is not None:
        vis &= pad[:, None, None, :]
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    bad_kv = bad_kv.repeat_interleave(hq // k.shape[1], dim=1)
    poisoned = (vis & bad_kv[:, :, None, :]).any(-1) if tk else torch.zeros(b, hq, tq, dtype=torch.bool)
    nan_rows = torch.isnan(out).all(-1)
    if nonfinite.screen_before(tq, m.capabilities.exact, None):
        assert torch.equal(nan_rows, poisoned), f"{name}: NaN rows are not the rows that see NaN/Inf"
    else:
        # a few-query exact call checks its result instead of screening first: a row its kernel
        # found finite (an infinite key scoring exactly -inf, weight 0) is IEEE's finite answer
        assert not (nan_rows & ~poisoned).any(), f"{name}: NaN in a row that sees no NaN/Inf"
        finite = poisoned & ~nan_rows
        torch.testing.assert_close(out.double()[finite], ref[finite], atol=2e-5, rtol=1e-4)
    assert not torch.isnan(out[~poisoned]).any()
    torch.testing.assert_close(out.double()[~poisoned], ref[~poisoned], atol=2e-5, rtol=1e-4)
    if stats.lse is not None:
        assert torch.equal(torch.isneginf(stats.lse[~poisoned]), torch.isneginf(ref_lse[~poisoned]))
