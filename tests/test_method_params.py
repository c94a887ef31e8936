"""Bad method parameters and mismatched block summaries get clear errors, early.

* every int field of every registered method refuses 0 (where 0 means nothing), negatives,
  floats, bools and strings at construction, naming the field and the value;
* a huge value (10**12) either means the same as the largest value the input allows (and is
  clamped to it: the result is the same) or gets a ValueError naming the parameter and the input
  size, in well under a second and without trying to allocate for it;
* block summaries passed with ``attention(..., summaries=...)`` that do not describe ``k``
  (batch, heads, head_dim, tokens, block size, type) are refused with a ValueError/TypeError that
  says what the summaries have and what ``k`` has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time

import pytest
import torch

import longattn
from longattn import masks
from longattn.methods.base import registered
from longattn.sparse.representatives import RepresentativeSummaries
from longattn.sparse.summaries import BlockSummaries
from conftest import assert_close_to_oracle, make_qkv

HUGE = 10**12

#: parameters a method cannot be built without
REQUIRED = {"pattern": {"mask": masks.a_shape(4, 16)}}


def build(name, **kw):
    return longattn.method(name, **{**REQUIRED.get(name, {}), **kw})


def int_fields():
    """(method name, field name, allows None) for every int-typed field of every registered method."""
    out = []
    for name, cls in sorted(registered().items()):
        for f in dataclasses.fields(cls):
            t = str(f.type)
            if re.match(r"int\b", t):  # "int" or "int | None" (not a Callable[[int, int], ...])
                out.append((name, f.name, "None" in t))
    return out


INT_FIELDS = int_fields()

#: fields for which 0 is a meaningful value (no sinks, no window, no samples, seed 0, ...)
ZERO_OK = {
    **{(m, f): True for m in ("landmark", "quest", "block_oracle", "hip", "infllm", "flexprefill")
       for f in ("sinks", "window")},
    **{(m, f): True for m in ("tokenselect", "loki", "dsa_indexer") for f in ("sinks", "window")},
    **{(m, f): True for m in ("xattention", "anchor", "pbs") for f in ("sinks", "window")},
    ("hyper", "samples"): True, ("hyper", "seed"): True,
    ("linformer", "seed"): True,
    ("longheads", "local"): True, ("landmark_trained", "local"): True,
    ("minference", "sinks"): True, ("minference", "window"): True, ("minference", "layer"): True,
    ("recycled", "sinks"): True, ("head_windows", "sinks"): True,
    ("routing", "iters"): True, ("routing", "window"): True, ("routing", "sinks"): True, ("routing", "seed"): True,
    ("linear", "seed"): True, ("lightning", "layer"): True, ("based", "window"): True,
}


def test_every_method_with_int_fields_is_covered():
    names = {n for n, _, _ in INT_FIELDS}
    # every registered method but dense and lowrank_mha (its rank lives in its learned factors) has
    # int size fields; a new one must show up here
    assert names == set(registered()) - {"dense", "lowrank_mha"}
    assert ("window", "block", True) in INT_FIELDS and ("streaming", "block", True) in INT_FIELDS
    assert ("pattern", "block", True) in INT_FIELDS
    assert all((m, f) in {(n, g) for n, g, _ in INT_FIELDS} for m, f in ZERO_OK)


BAD = [(n, f, bad) for n, f, _ in INT_FIELDS for bad in (0, -1, 2.5, True, "8")
       if not (bad == 0 and not isinstance(bad, bool) and ZERO_OK.get((n, f)))]


@pytest.mark.parametrize("name,field,bad", BAD, ids=[f"{n}-{f}-{b!r}" for n, f, b in BAD])
def test_bad_int_field_is_refused_at_construction(name, field, bad):
    with pytest.raises((TypeError, ValueError)) as info:
        build(name, **{field: bad})
    msg = str(info.value)
    assert re.search(rf"\b{field}\b", msg), msg
    assert str(bad) in msg, msg
    if isinstance(bad, (bool, float, str)):
        assert info.type is TypeError and "must be an int" in msg, msg


@pytest.mark.parametrize("name,field", [(n, f) for n, f, _ in INT_FIELDS if ZERO_OK.get((n, f))])
def test_zero_is_accepted_where_it_means_none(name, field):
    build(name, **{field: 0})


@pytest.mark.parametrize("name", [n for n, f, none_ok in INT_FIELDS if none_ok and f == "block"])
def test_block_none_means_default_and_positive_blocks_are_accepted(name):
    assert build(name, block=None).block is None
    assert build(name, block=16).block == 16


@pytest.mark.parametrize("name", ["window", "streaming", "pattern"])
def test_message_style_for_block(name):
    with pytest.raises(ValueError, match="block must be a positive int, got 0"):
        build(name, block=0)
    with pytest.raises(TypeError, match="block must be an int, got bool True"):
        build(name, block=True)
    with pytest.raises(ValueError, match="block must be a positive int, got -1"):
        build(name, block=-1)
    with pytest.raises(TypeError, match="block must be an int, got float 2.5"):
        build(name, block=2.5)


@pytest.mark.parametrize("name", ["hyper", "linformer", "routing"])
def test_seed_beyond_torch_range_is_refused_at_construction(name):
    with pytest.raises(ValueError, match=r"seed must be .* 2\*\*64.*got 18446744073709551616"):
        build(name, seed=2**64)
    build(name, seed=2**64 - 1)


# -- huge values -------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_cap(extra_bytes: int = 3 << 30):
    """Cap this process' address space at its current size + ``extra_bytes`` (Linux), so a test
    that regresses fails on an allocation error instead of exhausting a shared machine."""
    try:
        import resource

        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, StopIteration, ValueError):
        yield
        return
    cap = vm + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def call(m, tq=64, tk=64, **kw):
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=tq, tk=tk, d=8, seed=5)
    causal = m.capabilities.causal
    return longattn.attention(q, k, v, causal=causal, method=m, **kw), (q, k, v, causal)


def run_quickly(make, tq=64, tk=64):
    """Build and call; returns (output or None, the exception or None), after checking the time."""
    t0 = time.perf_counter()
    out, err = None, None
    with memory_cap():
        try:
            out = call(make(), tq=tq, tk=tk)
        except (TypeError, ValueError) as e:  # a clear refusal
            err = e
    assert time.perf_counter() - t0 < 0.5, "took too long"
    return out, err


#: one value of 10**12 per int field, plus companions that make the method constructible
HUGE_CASES = [(n, {f: HUGE}) for n, f, _ in INT_FIELDS] + [
    *[(n, dict(block=HUGE, budget=10 * HUGE))
      for n in ("landmark", "quest", "block_oracle", "hip", "infllm", "flexprefill")],
    *[(n, dict(block=HUGE, q_block=HUGE, budget=10 * HUGE))
      for n in ("landmark", "quest", "block_oracle", "hip", "infllm", "flexprefill")],
    ("landmark", dict(q_block=HUGE, budget=100 * HUGE, sinks=0, window=0)),
    ("minference", dict(block=HUGE, budget=3 * HUGE)),
    ("longheads", dict(chunk=HUGE, window=10 * HUGE, local=0)),
    ("linformer", dict(proj=HUGE, kind="random")),
    ("recycled", dict(stride=HUGE, budget=HUGE)),
    ("window", dict(window=HUGE, dilation=HUGE)),
    ("streaming", dict(window=HUGE, sinks=HUGE, block=HUGE)),
    ("routing", dict(iters=HUGE, chunk=16)),
    ("tokenselect", dict(budget=HUGE, chunk=HUGE)),
    ("hyper", dict(block=HUGE, samples=HUGE, min_seq=1)),
]


def _huge_id(case):
    name, kw = case
    return name + "-" + "-".join(kw)


@pytest.mark.parametrize("name,kw", HUGE_CASES, ids=[_huge_id(c) for c in HUGE_CASES])
def test_huge_value_is_clamped_or_refused_quickly(name, kw):
    got, err = run_quickly(lambda: build(name, **kw))
    if err is not None:
        msg = str(err)
        assert any(re.search(rf"\b{f}\b", msg) for f in kw), msg
        return
    out, _ = got
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tq", [64, 1])
@pytest.mark.parametrize("name", ["landmark", "quest", "block_oracle", "hip", "infllm", "flexprefill"])
def test_block_longer_than_the_input_is_one_block(name, tq):
    """A block (and query block) longer than the input holds all of it: same result as a block of
    exactly the input, i.e. every visible key."""
    if name == "flexprefill" and tq == 1:
        pytest.skip("flexprefill is a prefill method")
    got, err = run_quickly(lambda: build(name, block=HUGE, q_block=HUGE, budget=10 * HUGE, sinks=0, window=0),
                           tq=tq)
    assert err is None, err
    out, (q, k, v, causal) = got
    ref, _ = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)


def test_longheads_chunk_longer_than_the_input_is_one_chunk():
    got, err = run_quickly(lambda: build("longheads", chunk=HUGE, window=10 * HUGE, local=0))
    assert err is None, err
    out, (q, k, v, causal) = got
    ref, _ = longattn.reference_attention(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref)


def test_recycled_stride_longer_than_the_queries_is_clamped_exactly():
    got, err = run_quickly(lambda: build("recycled", stride=HUGE, budget=8), tq=48)
    assert err is None, err
    out, _ = got
    same, _ = call(build("recycled", stride=48, budget=8), tq=48)
    torch.testing.assert_close(out, same, atol=0, rtol=0)


def test_window_and_dilation_beyond_the_input_are_clamped_exactly():
    got, err = run_quickly(lambda: build("window", window=HUGE, dilation=HUGE, backend="tiled"))
    assert err is None, err
    out, (q, k, v, causal) = got
    # dilation beyond every distance: each query sees only itself
    torch.testing.assert_close(out, v)
    got, err = run_quickly(lambda: build("window", window=HUGE, dilation=3, backend="tiled"))
    assert err is None, err
    out, _ = got
    same, _ = call(build("window", window=64, dilation=3, backend="tiled"))
    torch.testing.assert_close(out, same, atol=0, rtol=0)


def test_routing_more_clusters_than_keys_is_refused():
    m = build("routing", clusters=65)
    with pytest.raises(ValueError, match="clusters=65 exceeds .*tokens_k=64"):
        call(m)
    _, err = run_quickly(lambda: build("routing", clusters=HUGE))
    assert isinstance(err, ValueError) and f"clusters={HUGE}" in str(err) and "tokens_k=64" in str(err)
    call(build("routing", clusters=64))  # one cluster per key is allowed


def test_routing_iterations_stop_once_assignments_settle():
    """Lloyd steps after the assignments repeat change nothing: many iterations cost no more."""
    a, _ = call(build("routing", clusters=4, iters=50, chunk=16))
    got, err = run_quickly(lambda: build("routing", clusters=4, iters=HUGE, chunk=16))
    assert err is None, err
    torch.testing.assert_close(got[0], a, atol=0, rtol=0)


def test_linformer_random_projection_longer_than_the_keys_is_refused():
    with pytest.raises(ValueError, match="proj=65 exceeds tokens_k=64"):
        call(build("linformer", proj=65, kind="random"))
    call(build("linformer", proj=64, kind="random"))
    call(build("linformer", proj=HUGE))  # pooled: at most one segment per key, documented clamp


# -- summaries ---------------------------------------------------------------------------------

SUMMARY_USERS = [
    ("landmark", dict(block=16, budget=128, sinks=16, window=16)),
    ("quest", dict(block=16, budget=128, sinks=16, window=16)),
    ("block_oracle", dict(block=16, budget=128, sinks=16, window=16)),
    ("hip", dict(block=16, budget=128, sinks=16, window=16)),
    ("infllm", dict(block=16, budget=128, sinks=16, window=16)),
    ("longheads", dict(chunk=16, window=128, local=16)),
]


def _qkv(b=2, hk=2, tk=64, d=8, tq=64):
    return make_qkv(b=b, hq=4, hk=hk, tq=tq, tk=tk, d=d, seed=9)


def _mismatched(kind):
    """Block summaries (of blocks of 16) that differ from the call's k [2, 2, 64, 8] in ``kind``."""
    _, k, _ = _qkv()
    if kind == "batch":
        return BlockSummaries.build(k[:1], 16)
    if kind == "heads":
        return BlockSummaries.build(k.repeat_interleave(2, 1), 16)
    if kind == "head_dim":
        return BlockSummaries.build(k[..., :4], 16)
    if kind == "tokens":
        return BlockSummaries.build(k[:, :, :48], 16)
    if kind == "block":
        return BlockSummaries.build(k, 8)
    raise AssertionError(kind)


MISMATCHES = ["batch", "heads", "head_dim", "tokens", "block"]


@pytest.mark.parametrize("tq", [64, 1])
@pytest.mark.parametrize("kind", MISMATCHES)
@pytest.mark.parametrize("name,kw", SUMMARY_USERS, ids=[n for n, _ in SUMMARY_USERS])
def test_mismatched_summaries_are_refused(name, kw, kind, tq):
    q, k, v = _qkv(tq=tq)
    s = _mismatched(kind)
    with pytest.raises(ValueError, match="summaries") as info:
        longattn.attention(q, k, v, causal=True, method=build(name, **kw), summaries=s)
    msg = str(info.value)
    if kind in ("batch", "heads", "head_dim"):
        assert kind in msg and "k has" in msg, msg


@pytest.mark.parametrize("name,kw", SUMMARY_USERS, ids=[n for n, _ in SUMMARY_USERS])
def test_matching_summaries_are_used(name, kw):
    q, k, v = _qkv()
    m = build(name, **kw)
    a = longattn.attention(q, k, v, causal=True, method=m)
    b = longattn.attention(q, k, v, causal=True, method=m, summaries=BlockSummaries.build(k, 16))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,kw", SUMMARY_USERS, ids=[n for n, _ in SUMMARY_USERS])
def test_summaries_of_the_wrong_type_are_refused(name, kw):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="summaries must be a .*BlockSummaries.*got Tensor"):
        longattn.attention(q, k, v, causal=True, method=build(name, **kw), summaries=k)


def test_representative_summaries_only_for_infllm():
    q, k, v = _qkv()
    rs = RepresentativeSummaries.build(k, 16, 4, q=q)
    with pytest.raises(TypeError, match="summaries must be a .*BlockSummaries.*got RepresentativeSummaries"):
        longattn.attention(q, k, v, causal=True, method=build("landmark", **SUMMARY_USERS[0][1]), summaries=rs)


@pytest.mark.parametrize("kind", ["batch", "heads", "head_dim", "tokens"])
def test_mismatched_representative_summaries_are_refused(kind):
    q, k, v = _qkv()
    kk, qq = k, q
    if kind == "batch":
        kk, qq = k[:1], q[:1]
    elif kind == "heads":
        kk = k.repeat_interleave(2, 1)
    elif kind == "head_dim":
        kk, qq = k[..., :4], q[..., :4]
    else:
        kk, qq = k[:, :, :48], q[:, :, :48]
    rs = RepresentativeSummaries.build(kk, 16, 4, q=qq)
    m = build("infllm", **SUMMARY_USERS[4][1])
    with pytest.raises(ValueError, match="summaries"):
        longattn.attention(q, k, v, causal=True, method=m, summaries=rs)
    good = RepresentativeSummaries.build(k, 16, 4, q=q)
    longattn.attention(q, k, v, causal=True, method=m, summaries=good)
