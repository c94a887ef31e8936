"""The native chunked linear-attention kernel (``longattn.kernels.native_linear``) behind
``linear_attention`` and ``lightning_attention``: against the float64 naive recurrences and the
torch chunked form over random shapes, chunks, GQA, dtypes, strided views, initial states, decays
and feature maps; thread and batch invariance; non-finite inputs reach only later tokens; the
paths it refuses (autograd, float64, large chunks) and its argument checks; a build without AVX."""

from __future__ import annotations

import ctypes
import platform
import subprocess
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longattn.kernels import native
from longattn.kernels import native_linear as nl
from longattn.recurrent.lightning import (
    LightningState,
    lightning_attention,
    lightning_attention_naive,
    transnormer_decays,
)
from longattn.recurrent.linear import LinearState, linear_attention, linear_attention_naive, performer_features

from conftest import rel_rmse, reload_kernel

needs_native = pytest.mark.skipif(nl.unavailable_reason() is not None,
                                  reason=f"native linear kernel unavailable: {nl.unavailable_reason()}")


def torch_form():
    """Within this context the ops take their torch chunked form."""
    return mock.patch.object(nl, "linear_chunked_applies", lambda *a, **kw: False)


def draw(g, b, h, hkv, t, f, dv, dtype=torch.float32, strided=False):
    """q [B, H, T, F], k [B, Hkv, T, F], v [B, Hkv, T, Dv] in ``dtype``; ``strided``: views of
    [B, T, heads, dim] tensors (token-major, as a projection lays them out)."""
    def one(heads, dim):
        x = torch.randn(b, t, heads, dim, generator=g).to(dtype)
        return x.transpose(1, 2) if strided else x.transpose(1, 2).contiguous()
    return one(h, f), one(hkv, f), one(hkv, dv)


def check(out, ref, tol):
    """max abs error <= tol on the reference's scale, and relative RMSE <= tol."""
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    if not ref.numel():
        return
    scale = max(1.0, float(ref.double().abs().max()))
    assert float((out.double() - ref.double()).abs().max()) <= tol * scale
    assert rel_rmse(out, ref) <= tol


OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@needs_native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), grp=st.integers(1, 3), t=st.integers(1, 150),
       f=st.sampled_from([1, 3, 8, 13, 16, 24]), dv=st.sampled_from([1, 5, 8, 16, 17]),
       chunk=st.sampled_from([1, 2, 5, 8, 16, 33, 64, 256]), dtype=st.sampled_from(list(OUT_TOL)),
       strided=st.booleans(), with_state=st.booleans(), fmap=st.sampled_from(["elu", "relu", "identity", "performer"]),
       normalize=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear_native_equals_naive_and_torch_form(b, hkv, grp, t, f, dv, chunk, dtype, strided, with_state, fmap,
                                                   normalize, seed):
    g = torch.Generator().manual_seed(seed)
    h = hkv * grp
    q, k, v = draw(g, b, h, hkv, t, f, dv, dtype, strided)
    normalize = normalize and fmap in ("elu", "performer")  # positive features: a denominator away from 0
    kw = dict(feature_map=fmap, normalize=normalize)
    if fmap == "performer":
        kw["features"] = performer_features(12, f, seed=seed)
    fdim = 12 if fmap == "performer" else f
    state = None
    if with_state:
        state = LinearState(torch.randn(b, hkv, fdim, dv, generator=g), torch.rand(b, hkv, fdim, generator=g) + 1.0)
    calls = []
    real = nl.linear_chunked
    with mock.patch.object(nl, "linear_chunked", lambda *a, **k2: calls.append(1) or real(*a, **k2)):
        out, st_out = linear_attention(q, k, v, chunk=chunk, initial_state=state, **kw)
    assert calls == [1] and out.dtype == dtype and st_out.s.dtype == torch.float32
    ref, ref_state = linear_attention_naive(q, k, v, initial_state=state, **kw)
    check(out, ref, OUT_TOL[dtype])
    check(st_out.s, ref_state.s, 1e-5)
    check(st_out.z, ref_state.z, 1e-5)
    with torch_form():
        out_t, st_t = linear_attention(q, k, v, chunk=chunk, initial_state=state, **kw)
    check(out.float(), out_t.float(), OUT_TOL[dtype])
    check(st_out.s, st_t.s, 1e-5)


@needs_native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), grp=st.integers(1, 3), t=st.integers(1, 150),
       f=st.sampled_from([1, 3, 8, 13, 16, 24]), dv=st.sampled_from([1, 5, 8, 16, 17]),
       chunk=st.sampled_from([1, 2, 5, 8, 16, 33, 64, 256]), dtype=st.sampled_from(list(OUT_TOL)),
       strided=st.booleans(), with_state=st.booleans(), norm=st.sampled_from(["off", "on", "weight"]),
       decays=st.sampled_from(["schedule", "random", "edges"]), seed=st.integers(0, 2 ** 16))
def test_lightning_native_equals_naive_and_torch_form(b, hkv, grp, t, f, dv, chunk, dtype, strided, with_state, norm,
                                                      decays, seed):
    g = torch.Generator().manual_seed(seed)
    h = hkv * grp
    q, k, v = draw(g, b, h, hkv, t, f, dv, dtype, strided)
    kw = dict(norm=norm != "off")
    if norm == "weight":
        kw["norm_weight"] = torch.rand(dv, generator=g) + 0.5
    if decays == "random":
        kw["decay"] = torch.rand(h, generator=g) * 0.9 + 0.1
    elif decays == "edges":  # λ = 1 (no decay), a tiny λ whose powers underflow, and ordinary ones
        kw["decay"] = torch.tensor(([1.0, 1e-30, 0.5, 0.99] * h)[:h])
    state = LightningState(torch.randn(b, h, f, dv, generator=g)) if with_state else None
    calls = []
    real = nl.linear_chunked
    with mock.patch.object(nl, "linear_chunked", lambda *a, **k2: calls.append(1) or real(*a, **k2)):
        out, st_out = lightning_attention(q, k, v, chunk=chunk, initial_state=state, **kw)
    assert calls == [1] and out.dtype == dtype
    ref, ref_state = lightning_attention_naive(q, k, v, initial_state=state, **kw)
    # RMSNorm divides by each row's own size, which amplifies the rounding of a small row: the
    # normalised output gets 4x the tolerance
    check(out, ref, OUT_TOL[dtype] * (4 if kw["norm"] else 1))
    check(st_out.s, ref_state.s, 1e-5)
    with torch_form():
        out_t, st_t = lightning_attention(q, k, v, chunk=chunk, initial_state=state, **kw)
    check(out.float(), out_t.float(), OUT_TOL[dtype] * (4 if kw["norm"] else 1))
    check(st_out.s, st_t.s, 1e-5)


@needs_native
@pytest.mark.parametrize("op", ["linear", "lightning"])
def test_results_do_not_depend_on_threads_or_batch(op):
    """One (batch, state head) is one work item computed in one order: the same bits with one
    thread or two, and a row alone equals that row in a batch."""
    fn = linear_attention if op == "linear" else lightning_attention
    g = torch.Generator().manual_seed(5)
    q, k, v = draw(g, 3, 4, 2, 200, 16, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, s_one = fn(q, k, v)
        torch.set_num_threads(2)
        two, s_two = fn(q, k, v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(s_one.s, s_two.s)
    alone, _ = fn(q[1:2], k[1:2], v[1:2])
    assert torch.equal(alone, one[1:2])


@needs_native
@pytest.mark.parametrize("op", ["linear", "lightning"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_reaches_only_its_token_and_later(op, where, value):
    """A NaN or inf at token j leaves every output before j as it was: causality holds whatever the
    inputs hold (in particular within j's chunk and micro-kernel row block)."""
    fn = linear_attention if op == "linear" else lightning_attention
    g = torch.Generator().manual_seed(9)
    q, k, v = draw(g, 1, 2, 2, 70, 8, 8)
    clean, _ = fn(q, k, v, chunk=16)
    for j in (0, 3, 17, 40, 69):  # chunk starts, ends and insides; micro-kernel row blocks of 6
        bad = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        bad[where][0, 0, j, 2] = value
        out, _ = fn(bad["q"], bad["k"], bad["v"], chunk=16)
        torch.testing.assert_close(out[:, :, :j], clean[:, :, :j], atol=1e-6, rtol=1e-6)
        assert not bool(torch.isfinite(out[:, :, j:]).all())
        if where == "q":  # a query enters only its own output
            keep = torch.ones(70, dtype=torch.bool)
            keep[j] = False
            torch.testing.assert_close(out[:, :, keep], clean[:, :, keep], atol=1e-6, rtol=1e-6)


@needs_native
def test_the_kernel_is_taken_only_where_it_applies():
    g = torch.Generator().manual_seed(1)
    q, k, v = draw(g, 1, 2, 2, 40, 8, 8)
    assert nl.linear_chunked_applies(q, k, v, 64)
    assert not nl.linear_chunked_applies(q, k, v, nl.MAX_CHUNK + 1)  # scratch grows as chunk²
    assert not nl.linear_chunked_applies(q.double(), k.double(), v.double(), 64)  # float64 computes in float64
    assert not nl.linear_chunked_applies(q[:, :, :0], k[:, :, :0], v[:, :, :0], 64)
    qg = q.clone().requires_grad_()
    assert not nl.linear_chunked_applies(qg, k, v, 64)
    with torch.no_grad():
        assert nl.linear_chunked_applies(qg, k, v, 64)
    w = torch.ones(8, requires_grad=True)
    assert not nl.linear_chunked_applies(q, k, v, 64, None, w)  # a gain that wants its gradient
    # autograd through the op takes the torch form and gets gradients
    out, _ = lightning_attention(qg, k, v, norm_weight=w)
    out.sum().backward()
    assert qg.grad is not None and w.grad is not None and bool(torch.isfinite(qg.grad).all())
    # a chunk over the limit: the torch form, the same answer
    big, _ = linear_attention(q, k, v, chunk=nl.MAX_CHUNK + 1)
    small, _ = linear_attention(q, k, v, chunk=nl.MAX_CHUNK)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=1e-5)


@needs_native
def test_a_last_dimension_with_a_stride_is_copied_not_misread():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    qs, ks, vs = q[..., ::2], k[..., ::2], v[..., ::2]
    out, _ = linear_attention(qs, ks, vs, chunk=8)
    ref, _ = linear_attention_naive(qs, ks, vs)
    check(out, ref, 1e-5)


@needs_native
def test_invalid_arguments_are_refused_with_what_was_expected():
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    s0, z0 = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4)
    call = nl.linear_chunked
    with pytest.raises(ValueError, match="q must be a 4-d CPU tensor"):
        call(q.double(), k, v, s0, z0, chunk=4)
    with pytest.raises(ValueError, match="do not fit"):
        call(q, k[:, :, :5], v, s0, z0, chunk=4)
    with pytest.raises(ValueError, match="heads must nest"):
        call(q, k, v, torch.zeros(1, 3, 4, 4), None, chunk=4)
    with pytest.raises(ValueError, match=f"chunk must be an int in 1..{nl.MAX_CHUNK}"):
        call(q, k, v, s0, z0, chunk=0)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        call(q, k, v, s0, z0, chunk=4, feature_map="performer")
    with pytest.raises(ValueError, match="normalize=True needs z0"):
        call(q, k, v, s0, None, chunk=4, normalize=True)
    with pytest.raises(ValueError, match=r"s0 must have shape \(1, 2, 4, 4\)"):
        call(q, k, v, torch.zeros(1, 2, 4, 3), None, chunk=4)
    with pytest.raises(ValueError, match=r"log_decay must have shape \(2,\)"):
        call(q, k, v, s0, None, chunk=4, log_decay=torch.zeros(3))
    with pytest.raises(ValueError, match="requires grad"):
        call(q.clone().requires_grad_(), k, v, s0, None, chunk=4)


def test_disabled_kernel_leaves_the_torch_form(monkeypatch):
    g = torch.Generator().manual_seed(2)
    q, k, v = draw(g, 1, 2, 2, 50, 8, 8)
    reload_kernel(monkeypatch, nl.KERNEL)
    monkeypatch.setenv("LONGATTN_NATIVE", "0")
    assert nl.unavailable_reason() == "disabled by LONGATTN_NATIVE=0"
    assert not nl.linear_chunked_applies(q, k, v, 64)
    out, _ = lightning_attention(q, k, v)
    check(out, lightning_attention_naive(q, k, v)[0], 1e-5)
    with pytest.raises(RuntimeError, match="LONGATTN_NATIVE=0"):
        nl.linear_chunked(q, k, v, torch.zeros(1, 2, 8, 8), None, chunk=64)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")
def test_portable_build_without_avx_gives_the_same_result(monkeypatch, tmp_path):
    """The source built with vectors lowered to SSE (no AVX, no FMA) agrees with the references
    too, so a machine without AVX is not untested."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    src = tmp_path / "linear_chunked.c"
    src.write_bytes(native.source_with_headers("linear_chunked.c"))
    so = tmp_path / "linear_chunked_portable.so"
    flags = ["-O2", "-mno-avx", "-mno-avx2", "-mno-fma", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]
    proc = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reload_kernel(monkeypatch, nl.KERNEL, nl._bind(ctypes.CDLL(str(so))))
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = draw(g, 2, 4, 2, 77, 12, 9, dtype)
        check(linear_attention(q, k, v, chunk=16)[0], linear_attention_naive(q, k, v)[0], OUT_TOL[dtype])
        decay = transnormer_decays(4)
        check(lightning_attention(q, k, v, chunk=16, decay=decay)[0],
              lightning_attention_naive(q, k, v, decay=decay)[0], OUT_TOL[dtype])
