"""Linear attention (Katharopoulos et al. 2020, Performer features) and Lightning attention
(TransNormer / Lightning Attention-2): the chunked and one-step forms against the float64 naive
recurrence, gradients, prefill in pieces, decoding, half precision, batch invariance, GQA and
argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from longattn.kernels import native_linear
from longattn.recurrent.lightning import (
    LightningState,
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_step,
    lightning_state_size,
    transnormer_decays,
)
from longattn.recurrent.linear import (
    FEATURE_MAPS,
    LinearState,
    linear_attention,
    linear_attention_naive,
    linear_attention_step,
    linear_state_size,
    performer_features,
)

from conftest import DEVICE, assert_close_scaled as assert_close, rel_rmse

@pytest.fixture(autouse=True, params=["native", "torch"])
def chunked_path(request, monkeypatch):
    """Every test runs twice: with the native chunked kernel where it applies (CPU, no gradient;
    ``longattn.kernels.native_linear``) and with the torch chunked form alone."""
    if request.param == "torch":
        monkeypatch.setattr(native_linear, "linear_chunked_applies", lambda *a, **kw: False)
    return request.param


CHUNKS = (1, 5, 16, 64)  # 5 and 16 do not divide T = 37; 64 > T
T = 37


def draw(b=2, h=4, hkv=2, t=T, dk=8, dv=6, dtype=torch.float32, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dk, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, t, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, t, dv, generator=g, dtype=torch.float64)
    if positive:  # keeps identity features' denominator away from zero
        q, k = q.abs(), k.abs()
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v))






def linear_kwargs(fm: str, normalize: bool = True, dk: int = 8) -> dict:
    kw = dict(feature_map=fm, normalize=normalize)
    if fm == "performer":
        kw["features"] = performer_features(16, dk, seed=3).to(DEVICE)
    return kw


def run_steps(step, q, k, v, state, **kw):
    outs = []
    for i in range(q.shape[2]):
        o, state = step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state, **kw)
        outs.append(o)
    return torch.cat(outs, 2), state


LIGHTNING_DECAYS = {
    "near_one": [0.999, 0.99, 0.95, 0.9],
    "small": [0.5, 0.1, 1e-3, 1.0],
}


# -- linear attention: chunked == naive == step -------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_linear_forms_agree(fm, normalize):
    q, k, v = draw(positive=fm == "identity" and normalize)
    kw = linear_kwargs(fm, normalize)
    ref, ref_state = linear_attention_naive(q, k, v, **kw)
    assert ref.dtype == torch.float64 and ref.shape == (2, 4, T, 6)
    for chunk in CHUNKS:
        out, state = linear_attention(q, k, v, chunk=chunk, **kw)
        assert out.dtype == torch.float32 and state.s.dtype == torch.float32 and state.z.dtype == torch.float32
        assert_close(out, ref)
        assert_close(state.s, ref_state.s)
        assert_close(state.z, ref_state.z)
    out, state = run_steps(linear_attention_step, q, k, v, None, **kw)
    assert_close(out, ref)
    assert_close(state.s, ref_state.s)


def test_linear_with_initial_state():
    q, k, v = draw(seed=1)
    s0 = LinearState(torch.rand(2, 2, 8, 6, device=DEVICE), torch.rand(2, 2, 8, device=DEVICE) + 1)
    ref, ref_state = linear_attention_naive(q, k, v, initial_state=s0)
    for chunk in (4, 64):
        out, state = linear_attention(q, k, v, chunk=chunk, initial_state=s0)
        assert_close(out, ref)
        assert_close(state.s, ref_state.s)


def test_linear_empty_sequence_returns_initial_state():
    q, k, v = draw(t=0)
    out, state = linear_attention(q, k, v)
    assert out.shape == (2, 4, 0, 6)
    assert torch.equal(state.s, torch.zeros(2, 2, 8, 6, device=DEVICE))


# -- lightning: chunked == naive == step -------------------------------------------------------


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("decays", sorted(LIGHTNING_DECAYS))
def test_lightning_forms_agree(decays, norm):
    q, k, v = draw(seed=2)
    decay = torch.tensor(LIGHTNING_DECAYS[decays], device=DEVICE)
    kw = dict(decay=decay, norm=norm)
    if norm:
        kw["norm_weight"] = torch.linspace(0.5, 1.5, 6, device=DEVICE)
    ref, ref_state = lightning_attention_naive(q, k, v, **kw)
    assert ref.dtype == torch.float64
    for chunk in CHUNKS:
        out, state = lightning_attention(q, k, v, chunk=chunk, **kw)
        assert out.dtype == torch.float32 and state.s.dtype == torch.float32
        assert_close(out, ref)
        assert_close(state.s, ref_state.s)
    out, state = run_steps(lightning_attention_step, q, k, v, None, **kw)
    assert_close(out, ref)
    assert_close(state.s, ref_state.s)


def test_lightning_log_decay_and_default_schedule():
    q, k, v = draw(seed=3)
    decay = transnormer_decays(4).to(DEVICE)
    a, _ = lightning_attention(q, k, v, chunk=8)
    b, _ = lightning_attention(q, k, v, decay=decay, chunk=8)
    c, _ = lightning_attention(q, k, v, log_decay=decay.log(), chunk=8)
    ref, _ = lightning_attention_naive(q, k, v, decay=decay)
    assert_close(a, ref)
    assert_close(b, ref)
    assert_close(c, ref)


def test_lightning_long_chunk_tiny_decay_stays_finite():
    q, k, v = draw(b=1, h=2, hkv=2, t=300, seed=4)
    decay = torch.tensor([1e-6, 1.0], device=DEVICE)
    out, state = lightning_attention(q, k, v, decay=decay, chunk=256, norm=False)
    ref, ref_state = lightning_attention_naive(q, k, v, decay=decay, norm=False)
    assert torch.isfinite(out).all() and torch.isfinite(state.s).all()
    assert_close(out, ref)
    assert_close(state.s, ref_state.s)


def test_transnormer_decays():
    d = transnormer_decays(8, dtype=torch.float64)
    assert d.shape == (8,) and bool(((d > 0) & (d <= 1)).all())
    torch.testing.assert_close(d, torch.exp(-(2.0 ** (-torch.arange(1, 9, dtype=torch.float64)))))
    assert bool((d[1:] > d[:-1]).all())  # later heads remember longer
    assert transnormer_decays(6).shape == (6,)
    deep = transnormer_decays(8, layer=3, layers=4)
    assert bool((deep > 0.9999).all())  # the last layer barely decays
    with pytest.raises(ValueError, match="layer"):
        transnormer_decays(8, layer=4, layers=4)


# -- gradients ----------------------------------------------------------------------------------


def _grads(fn, tensors, cot):
    for t in tensors:
        t.grad = None
    out, state = fn()
    loss = (out * cot).sum() + sum((f.double() * (i + 1) * 0.1).sum() for i, f in enumerate(state))
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("fm", ["elu", "performer"])
def test_linear_gradients_chunked_equal_naive(fm):
    q, k, v = (x.requires_grad_() for x in draw(t=21, dtype=torch.float64, seed=5))
    s0 = torch.rand(2, 2, 16 if fm == "performer" else 8, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    z0 = (torch.rand(2, 2, s0.shape[2], dtype=torch.float64, device=DEVICE) + 1).requires_grad_()
    kw = linear_kwargs(fm, dk=8)
    if fm == "performer":
        kw["features"] = kw["features"].double()
    init = LinearState(s0, z0)
    cot = torch.randn(2, 4, 21, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    leaves = [q, k, v, s0, z0]
    g_ref = _grads(lambda: linear_attention_naive(q, k, v, initial_state=init, **kw), leaves, cot)
    g_fast = _grads(lambda: linear_attention(q, k, v, chunk=4, initial_state=init, **kw), leaves, cot)
    for name, a, b in zip("q k v s0 z0".split(), g_fast, g_ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_lightning_gradients_chunked_equal_naive():
    q, k, v = (x.requires_grad_() for x in draw(t=21, dtype=torch.float64, seed=6))
    s0 = torch.randn(2, 4, 8, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    decay = torch.tensor([0.99, 0.9, 0.5, 0.2], dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64, device=DEVICE).requires_grad_()
    init = LightningState(s0)
    cot = torch.randn(2, 4, 21, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaves = [q, k, v, s0, decay, w]
    kw = dict(decay=decay, norm_weight=w, initial_state=init)
    g_ref = _grads(lambda: lightning_attention_naive(q, k, v, **kw), leaves, cot)
    g_fast = _grads(lambda: lightning_attention(q, k, v, chunk=4, **kw), leaves, cot)
    for name, a, b in zip("q k v s0 decay norm_weight".split(), g_fast, g_ref):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


def test_gradcheck_tiny():
    q, k, v = (x.requires_grad_() for x in draw(b=1, h=2, hkv=1, t=5, dk=3, dv=2, dtype=torch.float64, seed=7))
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention(q, k, v, chunk=2)[0], (q, k, v))
    decay = torch.tensor([0.9, 0.6], dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, d: lightning_attention(q, k, v, decay=d, chunk=2)[0], (q, k, v, decay)
    )


# -- prefill in pieces and decoding -------------------------------------------------------------


def _pieces(cuts, t):
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < t)), t]
    return list(zip(bounds[:-1], bounds[1:]))


OPS = {
    "linear": (linear_attention, linear_attention_step, dict(feature_map="elu")),
    "linear_performer": (linear_attention, linear_attention_step, None),
    "lightning": (lightning_attention, lightning_attention_step, dict(decay=[0.99, 0.9, 0.7, 0.4])),
}


def _op_kwargs(name):
    fn, step, kw = OPS[name]
    if name == "linear_performer":
        kw = linear_kwargs("performer", normalize=False)
    if name == "lightning":
        kw = dict(decay=torch.tensor(kw["decay"], device=DEVICE))
    return fn, step, kw


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(OPS)),
    cuts=st.lists(st.integers(1, T - 1), max_size=4),
    chunk=st.integers(1, 20),
)
def test_prefill_in_pieces_equals_one_pass(name, cuts, chunk):
    fn, _, kw = _op_kwargs(name)
    q, k, v = draw(seed=8)
    whole, whole_state = fn(q, k, v, chunk=chunk, **kw)
    state, outs = None, []
    for a, b in _pieces(cuts, T):
        o, state = fn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], chunk=chunk, initial_state=state, **kw)
        outs.append(o)
    assert_close(torch.cat(outs, 2), whole)
    for got, ref in zip(state, whole_state):
        assert_close(got, ref)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(OPS)), prefill=st.integers(0, T - 1))
def test_decode_after_prefill_equals_one_pass(name, prefill):
    fn, step, kw = _op_kwargs(name)
    q, k, v = draw(seed=9)
    whole, whole_state = fn(q, k, v, chunk=16, **kw)
    first, state = fn(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], chunk=16, **kw)
    rest, state = run_steps(step, q[:, :, prefill:], k[:, :, prefill:], v[:, :, prefill:], state, **kw)
    assert_close(torch.cat([first, rest], 2), whole)
    for got, ref in zip(state, whole_state):
        assert_close(got, ref)


# -- half precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OPS))
def test_half_inputs(name, dtype):
    fn, step, kw = _op_kwargs(name)
    naive = linear_attention_naive if fn is linear_attention else lightning_attention_naive
    q, k, v = draw(t=70, dtype=dtype, seed=10)
    ref, ref_state = naive(q, k, v, **kw)  # the same rounded inputs, computed in float64
    out, state = fn(q, k, v, chunk=16, **kw)
    assert out.dtype == dtype
    assert all(f.dtype == torch.float32 for f in state)
    # the output is rounded once to the half dtype (bf16 unit roundoff 2^-8, relative RMSE ~1e-3)
    assert rel_rmse(out, ref) <= 0.005
    for got, want in zip(state, ref_state):
        assert rel_rmse(got, want) <= 1e-5  # the state never leaves float32
    o1, s1 = step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, **kw)
    assert o1.dtype == dtype and all(f.dtype == torch.float32 for f in s1)


# -- batch invariance and GQA ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPS))
def test_batch_invariance_bitwise(name):
    fn, step, kw = _op_kwargs(name)
    q, k, v = draw(b=3, seed=11)
    out, state = fn(q, k, v, chunk=8, **kw)
    alone, alone_state = fn(q[1:2], k[1:2], v[1:2], chunk=8, **kw)
    assert torch.equal(out[1:2], alone)
    for a, b in zip(state, alone_state):
        assert torch.equal(a[1:2], b)
    o, _ = step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, **kw)
    o1, _ = step(q[1:2, :, :1], k[1:2, :, :1], v[1:2, :, :1], None, **kw)
    assert torch.equal(o[1:2], o1)


@pytest.mark.parametrize("name", sorted(OPS))
def test_gqa_equals_repeated_heads(name):
    fn, step, kw = _op_kwargs(name)
    q, k, v = draw(h=4, hkv=2, seed=12)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    out, state = fn(q, k, v, chunk=8, **kw)
    ref, ref_state = fn(q, kr, vr, chunk=8, **kw)
    # float32 rounding may differ (a grouped head's rows share a product with their group), within
    # the package's 1e-5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(state, ref_state):
        if got.shape != want.shape:  # linear attention keeps one state per key/value head
            got = got.repeat_interleave(2, 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    o, _ = step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, **kw)
    o_ref, _ = step(q[:, :, :1], kr[:, :, :1], vr[:, :, :1], None, **kw)
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=1e-6)


# -- performer features, state sizes -----------------------------------------------------------


def test_performer_features():
    w = performer_features(20, 8, seed=1)
    assert w.shape == (20, 8) and w.dtype == torch.float32
    assert torch.equal(w, performer_features(20, 8, seed=1))
    assert not torch.equal(w, performer_features(20, 8, seed=2))
    block = w[:8].double()
    gram = block @ block.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 1e-4  # rows within a block are orthogonal
    assert performer_features(5, 8, seed=0, orthogonal=False).shape == (5, 8)


def test_performer_kernel_approximates_softmax():
    # φ(q)·φ(k) estimates exp(q·k/√Dk); averaged over many pairs the estimate is close
    g = torch.Generator().manual_seed(0)
    dk = 8
    q = torch.randn(1, 1, 64, dk, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(1, 1, 64, dk, generator=g, dtype=torch.float64) * 0.5
    w = performer_features(4096, dk, seed=0, dtype=torch.float64)
    v = torch.eye(64, dtype=torch.float64)[None, None]
    # unnormalised output with one-hot values reads out the kernel matrix row by row
    out, _ = linear_attention_naive(q, k, v, feature_map="performer", features=w, normalize=False)
    exact = torch.exp(q[0, 0] @ k[0, 0].T / math.sqrt(dk)).tril()
    assert rel_rmse(out[0, 0], exact) < 0.05


def test_state_sizes():
    assert linear_state_size(2, 8, 6) == 2 * (8 * 6 + 8) * 4
    assert linear_state_size(2, 8, 6, torch.float64) == 2 * (8 * 6 + 8) * 8
    assert lightning_state_size(4, 8, 6) == 4 * 8 * 6 * 4
    q, k, v = draw()
    _, state = linear_attention(q, k, v)
    assert sum(f[0].numel() * f.element_size() for f in state) == linear_state_size(2, 8, 6)
    _, lstate = lightning_attention(q, k, v)
    assert lstate.s[0].numel() * 4 == lightning_state_size(4, 8, 6)


# -- bad arguments ------------------------------------------------------------------------------


def _bad_cases():
    q, k, v = draw(t=4)
    s_ok = LinearState(torch.zeros(2, 2, 8, 6, device=DEVICE), torch.zeros(2, 2, 8, device=DEVICE))
    w = performer_features(4, 8).to(DEVICE)
    la, ls, li = linear_attention, linear_attention_step, lightning_attention
    out_of_range = r"decay must lie in \(0, 1\]"

    def vec(*xs):
        return torch.tensor(xs, device=DEVICE)

    cases = [
        (lambda: la(q[0], k, v), ValueError, "q must have rank 4"),
        (lambda: la(q, k[:, :, :3], v), ValueError, "tokens"),
        (lambda: la(q, k[:, :1].expand(2, 3, 4, 8), v[:, :1].expand(2, 3, 4, 6)), ValueError, "heads"),
        (lambda: la(q, k, v[:, :1]), ValueError, r"v has shape \(2, 1, 4, 6\) but k has \(2, 2, 4, 8\)"),
        (lambda: la(q, k[..., :4], v), ValueError, "head_dim"),
        (lambda: la(q.long(), k, v), TypeError, "q has dtype"),
        (lambda: la(q.double(), k, v), TypeError, "share one dtype"),
        (lambda: la(q, k, v, chunk=0), ValueError, "chunk must be a positive int"),
        (lambda: la(q, k, v, chunk=2.0), TypeError, "chunk must be an int"),
        (lambda: la(q, k, v, feature_map="softmax"), ValueError, "feature_map must be one of"),
        (lambda: la(q, k, v, feature_map="performer"), ValueError, "needs features"),
        (lambda: la(q, k, v, feature_map="performer", features=w[:, :3]), ValueError, "features has shape"),
        (lambda: la(q, k, v, features=w), ValueError, "features is used only by"),
        (lambda: la(q, k, v, eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda: la(q, k, v, scale=0.0), ValueError, "scale must be > 0"),
        (lambda: la(q, k, v, normalize=1), TypeError, "normalize must be a bool"),
        (lambda: la(q, k, v, initial_state=(s_ok.s, s_ok.z)), TypeError, "initial_state must be a LinearState"),
        (lambda: la(q, k, v, initial_state=LinearState(s_ok.s[:, :1], s_ok.z)), ValueError,
         r"initial_state\.s has shape"),
        (lambda: la(q, k, v, initial_state=LinearState(s_ok.s, s_ok.z[..., :3])), ValueError,
         r"initial_state\.z has shape"),
        (lambda: ls(q, k, v, s_ok), ValueError, "tokens == 1"),
        (lambda: ls(q[:, :, :1], k[:, :, :1], v[:, :, :1], LinearState(s_ok.s[..., :2], s_ok.z)), ValueError,
         r"state\.s has shape"),
        (lambda: li(q, k, v, decay=vec(0.5, 0.5, 1.5, 0.5)), ValueError, out_of_range),
        (lambda: li(q, k, v, decay=vec(0.5, 0.0, 0.5, 0.5)), ValueError, out_of_range),
        (lambda: li(q, k, v, decay=vec(0.5, 0.5, 0.5)), ValueError, "decay has shape"),
        (lambda: li(q, k, v, decay=[0.5, 0.5, 0.5]), ValueError, "decay has shape"),
        (lambda: li(q, k, v, decay="fast"), TypeError, "decay must be a float tensor"),
        (lambda: li(q, k, v, log_decay=vec(0.1, 0.1, 0.1, 0.1)), ValueError, "log_decay must be finite and <= 0"),
        (lambda: li(q, k, v, log_decay=vec(-math.inf, 0.0, 0.0, 0.0)), ValueError, "log_decay must be finite"),
        (lambda: li(q, k, v, decay=vec(0.5, 0.5, 0.5, 0.5), log_decay=vec(0.0, 0.0, 0.0, 0.0)), ValueError, "not both"),
        (lambda: li(q, k, v, norm_weight=torch.ones(5, device=DEVICE)), ValueError, "norm_weight has shape"),
        (lambda: li(q, k, v, norm=False, norm_weight=torch.ones(6, device=DEVICE)), ValueError, "norm=False"),
        (lambda: li(q, k, v, chunk=-3), ValueError, "chunk must be a positive int"),
        (lambda: li(q, k, v, initial_state=LightningState(torch.zeros(2, 2, 8, 6, device=DEVICE))), ValueError,
         r"initial_state\.s has shape"),
        (lambda: lightning_attention_step(q, k, v, None), ValueError, "tokens == 1"),
        (lambda: performer_features(0, 8), ValueError, "m must be a positive int"),
        (lambda: performer_features(4, 8, seed=-1), ValueError, "seed"),
        (lambda: linear_state_size(0, 8, 6), ValueError, "heads"),
        (lambda: transnormer_decays(0), ValueError, "heads"),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn()
