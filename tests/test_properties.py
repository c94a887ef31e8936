"""Property test: any exact method, shape, head ratio, cross length, padding and mask equals the
float64 oracle."""

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import longattn
from longattn import masks
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
