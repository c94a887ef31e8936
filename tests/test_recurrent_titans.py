"""Titans' neural long-term memory (``longattn.recurrent.titans``), linear and MLP memory: the chunked
and step forms against the float64 token-by-token specification, the sequential recurrence, closed
forms, gradients, prefill in pieces (mid-chunk included), decoding after prefill, bf16 inputs, batch
invariance and argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import DEVICE, assert_close_scaled as assert_close, rel_rmse
from longattn.recurrent import titans
from longattn.recurrent.titans import TitansMLPState, TitansState

GATES = ("eta", "theta", "alpha")


def make(*, b=2, h=4, hkv=2, t=40, dk=8, dv=6, dtype=torch.float32, seed=0, state=True, position=0, chunk=16):
    """Seeded ``(q, k, v, (eta, theta, alpha), initial_state)`` on the test device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q = torch.randn(b, h, t, dk, generator=g, dtype=f64)
    k = torch.randn(b, hkv, t, dk, generator=g, dtype=f64)
    v = torch.randn(b, hkv, t, dv, generator=g, dtype=f64)
    eta = 0.9 * torch.rand(b, hkv, t, generator=g, dtype=f64)
    theta = 0.05 + 0.3 * torch.rand(b, hkv, t, generator=g, dtype=f64)
    alpha = 0.2 * torch.rand(b, hkv, t, generator=g, dtype=f64)
    s0 = None
    if state:
        mats = [0.5 * torch.randn(b, hkv, dv, dk, generator=g, dtype=f64) for _ in range(3)]
        s0 = TitansState(*(m.to(DEVICE, dtype if dtype == f64 else torch.float32) for m in mats),
                         torch.full((b,), position % chunk, dtype=torch.int64, device=DEVICE))

    def put(x):
        return x.to(DEVICE, dtype)

    return put(q), put(k), put(v), (put(eta), put(theta), put(alpha)), s0






def assert_state_close(a, ref, tol=1e-5):
    for name in ("w", "s", "w_chunk"):
        assert getattr(a, name).shape == getattr(ref, name).shape, name
        assert_close(getattr(a, name), getattr(ref, name), tol)
    assert torch.equal(a.position.cpu(), ref.position.cpu())


def run_steps(q, k, v, gates, state, **kw):
    outs = []
    for i in range(q.shape[2]):
        sl = slice(i, i + 1)
        o, state = titans.titans_memory_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in gates),
                                             state, **kw)
        outs.append(o)
    return torch.cat(outs, dim=2), state


# -- the forms agree ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("position", [0, 3], ids=["aligned", "mid-chunk-state"])
def test_naive_chunked_and_steps_agree_fp32(chunk, position):
    q, k, v, gates, s0 = make(t=37, seed=chunk + position, position=position, chunk=chunk)
    ref, ref_state = titans.titans_memory_naive(q, k, v, *gates, chunk_size=chunk, initial_state=s0)
    out, state = titans.titans_memory(q, k, v, *gates, chunk_size=chunk, initial_state=s0)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (2, 4, 37, 6)
    assert state.w.dtype == torch.float32 and state.position.dtype == torch.int64
    assert_close(out, ref)
    assert_state_close(state, ref_state)
    stepped, step_state = run_steps(q, k, v, gates, s0, chunk_size=chunk)
    assert_close(stepped, ref)
    assert_state_close(step_state, ref_state)


def test_chunk_size_one_is_the_sequential_recurrence():
    """Written out directly: ``S = η S − θ · 2 (W k − v) kᵀ``, ``W = (1 − α) W + S``, ``o = W q``."""
    q, k, v, (eta, theta, alpha), s0 = make(b=1, h=2, hkv=2, t=23, dtype=torch.float64, seed=4)
    kn = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    qn = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    w, s, outs = s0.w.clone(), s0.s.clone(), []
    for i in range(q.shape[2]):
        kt, vt = kn[:, :, i, :, None], v[:, :, i, :, None]
        s = eta[:, :, i, None, None] * s - theta[:, :, i, None, None] * 2 * (w @ kt - vt) @ kt.mT
        w = (1 - alpha[:, :, i, None, None]) * w + s
        outs.append((w @ qn[:, :, i, :, None])[..., 0])
    out, state = titans.titans_memory(q, k, v, eta, theta, alpha, chunk_size=1, initial_state=s0)
    assert_close(out, torch.stack(outs, dim=2), 1e-12)
    assert_close(state.w, w, 1e-12)
    assert_close(state.s, s, 1e-12)


def test_chunks_differ_from_sequential():
    """The chunk size is part of the definition: gradients at the chunk start change the result."""
    q, k, v, gates, s0 = make(t=20, seed=2)
    one, _ = titans.titans_memory(q, k, v, *gates, chunk_size=1, initial_state=s0)
    four, _ = titans.titans_memory(q, k, v, *gates, chunk_size=4, initial_state=s0)
    assert rel_rmse(four, one) > 1e-3


def test_closed_form_first_chunk():
    """η = 0, α = 0, θ constant, orthonormal keys, W_0 = 0: every gradient in the first chunk is
    ``−2 v_t k_tᵀ`` (taken at ``W_c = 0``), so ``W = Σ_t 2 θ v_t k_tᵀ`` and reading with ``q = k_j``
    after the chunk returns ``2 θ v_j``."""
    dk, dv, chunk, th = 8, 5, 8, 0.3
    keys = torch.linalg.qr(torch.randn(dk, dk, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    k = keys.T[None, None].to(DEVICE)  # [1, 1, 8, 8]: token t has key row t, orthonormal
    v = torch.randn(1, 1, chunk, dv, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(DEVICE)
    zeros = torch.zeros(1, 1, chunk, dtype=torch.float64, device=DEVICE)
    theta = torch.full_like(zeros, th)
    out, state = titans.titans_memory(k, k, v, zeros, theta, zeros, chunk_size=chunk, normalize_keys=False)
    expected = 2 * th * v[0, 0].T @ k[0, 0]
    torch.testing.assert_close(state.w[0, 0], expected, atol=1e-12, rtol=1e-12)
    # η = 0: the momentum is just the last token's step
    torch.testing.assert_close(state.s[0, 0], 2 * th * v[0, 0, -1:].T @ k[0, 0, -1:], atol=1e-12, rtol=1e-12)
    # o_t = W_t k_t = 2 θ v_t (keys orthonormal, the write of token t included)
    torch.testing.assert_close(out[0, 0], 2 * th * v[0, 0], atol=1e-12, rtol=1e-12)
    assert int(state.position[0]) == 0 and torch.equal(state.w_chunk, state.w)


def test_hard_resets_exact():
    """η = 0 and α = 1 (full resets) and θ = 0 (no write) are exact and finite."""
    q, k, v, (eta, theta, alpha), s0 = make(t=30, seed=8)
    eta[:, :, ::3] = 0.0
    alpha[:, :, 1::4] = 1.0
    theta[:, :, 2::5] = 0.0
    ref, ref_state = titans.titans_memory_naive(q, k, v, eta, theta, alpha, chunk_size=8, initial_state=s0)
    out, state = titans.titans_memory(q, k, v, eta, theta, alpha, chunk_size=8, initial_state=s0)
    assert_close(out, ref)
    assert_state_close(state, ref_state)


def test_no_tokens_returns_the_initial_state():
    q, k, v, gates, s0 = make(t=0, position=5)
    out, state = titans.titans_memory(q, k, v, *gates, initial_state=s0)
    assert out.shape == (2, 4, 0, 6)
    for name in TitansState._fields:
        assert torch.equal(getattr(state, name), getattr(s0, name)), name


# -- gradients ------------------------------------------------------------------------------


def test_gradients_match_naive():
    """float64, chunk 8 over 45 tokens from a mid-chunk state: gradients of the chunked form equal the
    naive form's for every input and every field of the initial state."""
    q, k, v, gates, s0 = make(t=45, dtype=torch.float64, seed=7, position=3, chunk=8)
    mats = [s0.w, s0.s, s0.w_chunk]
    leaves = [q, k, v, *gates, *mats]
    for x in leaves:
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    go = torch.randn(*q.shape[:3], v.shape[3], generator=g, dtype=torch.float64).to(DEVICE)
    gs = [torch.randn(s0.w.shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    grads = []
    for fn in (titans.titans_memory_naive, titans.titans_memory):
        out, state = fn(q, k, v, *gates, chunk_size=8, initial_state=TitansState(*mats, s0.position))
        loss = (out * go).sum() + sum((x * y).sum() for x, y in zip(state[:3], gs))
        grads.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(("q", "k", "v", *GATES, "w", "s", "w_chunk"), *grads):
        assert torch.isfinite(b).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, a.abs().max().item()), f"{name}: max abs gradient error {err:.2e}"


def test_gradcheck():
    q, k, v, gates, s0 = make(b=1, h=2, hkv=1, t=7, dk=3, dv=2, dtype=torch.float64, seed=9, position=1, chunk=4)
    leaves = tuple(x.requires_grad_(True) for x in (q, k, v, *gates, s0.w, s0.s, s0.w_chunk))

    def fn(*xs):
        out, state = titans.titans_memory(*xs[:6], chunk_size=4, initial_state=TitansState(*xs[6:], s0.position))
        return out, state.w, state.s, state.w_chunk

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


# -- prefill in pieces and decoding ---------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 36), max_size=4, unique=True), chunk=st.sampled_from([1, 4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_prefill_in_pieces_equals_one_pass(cuts, chunk, seed):
    q, k, v, gates, s0 = make(t=37, seed=seed)
    whole, whole_state = titans.titans_memory(q, k, v, *gates, chunk_size=chunk, initial_state=s0)
    bounds = [0, *sorted(cuts), 37]
    state, pieces = s0, []
    for lo, hi in zip(bounds, bounds[1:]):
        sl = slice(lo, hi)
        o, state = titans.titans_memory(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in gates),
                                        chunk_size=chunk, initial_state=state)
        pieces.append(o)
    assert_close(torch.cat(pieces, dim=2), whole)
    assert_state_close(state, whole_state)


def test_decode_after_prefill_equals_one_pass():
    q, k, v, gates, _ = make(t=70, seed=11, state=False)
    whole, whole_state = titans.titans_memory(q, k, v, *gates)
    p = 53  # mid-chunk (chunk 16)
    pre, state = titans.titans_memory(q[:, :, :p], k[:, :, :p], v[:, :, :p], *(x[:, :, :p] for x in gates))
    assert int(state.position[0]) == p % 16
    tail = slice(p, None)
    dec, state = run_steps(q[:, :, tail], k[:, :, tail], v[:, :, tail], tuple(x[:, :, tail] for x in gates), state)
    assert_close(torch.cat([pre, dec], dim=2), whole)
    assert_state_close(state, whole_state)


def test_step_rows_at_different_positions():
    """The step form takes one position per row; each row equals its own run."""
    q, k, v, gates, s0 = make(b=2, t=1, seed=12)
    s0 = s0._replace(position=torch.tensor([0, 5], device=DEVICE))
    out, state = titans.titans_memory_step(q, k, v, *gates, s0, chunk_size=6)
    for r in range(2):
        row = slice(r, r + 1)
        one_state = TitansState(*(x[row] for x in s0))
        o, st1 = titans.titans_memory_naive(q[row], k[row], v[row], *(x[row] for x in gates), chunk_size=6,
                                            initial_state=one_state)
        assert_close(out[row], o)
        assert_close(state.w[row], st1.w)
    assert state.position.tolist() == [1, 0]


# -- dtypes and batch invariance ------------------------------------------------------------


def test_bf16_inputs():
    q, k, v, gates, s0 = make(t=100, dtype=torch.bfloat16, seed=13)
    ref, ref_state = titans.titans_memory_naive(q, k, v, *gates, initial_state=s0)
    out, state = titans.titans_memory(q, k, v, *gates, initial_state=s0)
    assert out.dtype == torch.bfloat16 and state.w.dtype == torch.float32
    assert rel_rmse(out, ref) <= 0.005
    assert rel_rmse(state.w, ref_state.w) <= 0.005
    sl = slice(0, 1)
    o, st1 = titans.titans_memory_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in gates), s0)
    assert o.dtype == torch.bfloat16 and st1.w.dtype == torch.float32


def test_batch_invariance_bitwise():
    q, k, v, gates, s0 = make(b=3, h=2, hkv=2, t=50, seed=17, position=2)
    out, state = titans.titans_memory(q, k, v, *gates, chunk_size=16, initial_state=s0)
    row = slice(1, 2)
    one, one_state = titans.titans_memory(q[row], k[row], v[row], *(x[row] for x in gates), chunk_size=16,
                                          initial_state=TitansState(*(x[row] for x in s0)))
    assert torch.equal(out[row], one)
    for a, b in zip(state, one_state):
        assert torch.equal(a[row], b)
    sl = slice(0, 1)
    o3, _ = titans.titans_memory_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in gates), s0)
    o1, _ = titans.titans_memory_step(q[row, :, sl], k[row, :, sl], v[row, :, sl],
                                      *(x[row, :, sl] for x in gates), TitansState(*(x[row] for x in s0)))
    assert torch.equal(o3[row], o1)


def test_state_size():
    assert titans.titans_state_size(4, 64, 32) == 3 * 4 * 4 * 64 * 32 + 8
    assert titans.titans_state_size(4, 64, 32, hidden=16) == 3 * 4 * 4 * 16 * (64 + 32) + 8
    with pytest.raises(ValueError, match="hidden"):
        titans.titans_state_size(1, 2, 2, hidden=0)
    with pytest.raises(ValueError, match="heads_kv"):
        titans.titans_state_size(0, 4, 4)
    with pytest.raises(TypeError, match="head_dim_k"):
        titans.titans_state_size(1, 2.5, 4)


# -- bad arguments --------------------------------------------------------------------------


def _set(key, fn):
    def mutate(a):
        a[key] = fn(a[key])
    return mutate


def _state(fn):
    def mutate(a):
        a["initial_state"] = fn(a["initial_state"])
    return mutate


BAD = [
    ("q-rank", _set("q", lambda x: x[0]), "chunked", ValueError, "q must have rank 4"),
    ("q-int", _set("q", lambda x: x.long()), "chunked", TypeError, "q has dtype"),
    ("mixed-dtypes", _set("k", lambda x: x.double()), "chunked", TypeError, "share one dtype"),
    ("k-tokens", _set("k", lambda x: x[:, :, :-1]), "chunked", ValueError, "k has shape"),
    ("v-heads", _set("v", lambda x: x[:, :1]), "chunked", ValueError, "v has shape"),
    ("eta-one-plus", _set("eta", lambda x: x + 1.0), "chunked", ValueError, r"eta must be finite and in \[0, 1\]"),
    ("eta-nan", _set("eta", lambda x: x.clone().fill_(float("nan"))), "naive", ValueError, "eta"),
    ("theta-negative", _set("theta", lambda x: -x), "chunked", ValueError, "theta must be finite and >= 0"),
    ("theta-shape", _set("theta", lambda x: x[:, :, :-1]), "chunked", ValueError, "theta has shape"),
    ("alpha-high", _set("alpha", lambda x: x + 1.5), "step", ValueError, "alpha"),
    ("alpha-not-tensor", _set("alpha", lambda x: 0.5), "chunked", TypeError, "alpha"),
    ("chunk-zero", lambda a: a.update(chunk_size=0), "chunked", ValueError, "chunk_size"),
    ("chunk-float", lambda a: a.update(chunk_size=2.5), "chunked", TypeError, "chunk_size"),
    ("memory-unknown", lambda a: a.update(memory="deep"), "chunked", ValueError, "memory must be one of"),
    ("mlp-no-state", lambda a: a.update(memory="mlp", initial_state=None), "chunked", ValueError,
     "initial_state is required for memory='mlp'"),
    ("mlp-linear-state", lambda a: a.update(memory="mlp"), "naive", TypeError,
     "initial_state must be a TitansMLPState"),
    ("memory-type", lambda a: a.update(memory=1), "naive", TypeError, "memory must be a str"),
    ("normalize-flag", lambda a: a.update(normalize_keys=1), "chunked", TypeError, "normalize_keys must be a bool"),
    ("state-type", _state(lambda s: s.w), "chunked", TypeError, "initial_state must be a TitansState"),
    ("state-shape", _state(lambda s: s._replace(s=s.s[:, :, :-1])), "chunked", ValueError,
     "initial_state.s has shape"),
    ("position-float", _state(lambda s: s._replace(position=s.position.float())), "chunked", TypeError,
     "initial_state.position must be an integer"),
    ("position-range", _state(lambda s: s._replace(position=s.position + 16)), "chunked", ValueError,
     r"initial_state.position must be in \[0, chunk_size\)"),
    ("position-mixed", _state(lambda s: s._replace(position=torch.tensor([0, 1], device=DEVICE))), "chunked",
     ValueError, "same for every batch row"),
    ("step-tokens", lambda a: None, "step", ValueError, "tokens == 1"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_name_the_argument(case):
    _, mutate, form, error, match = case
    q, k, v, gates, s0 = make(t=6)
    args = {"q": q, "k": k, "v": v, **dict(zip(GATES, gates)), "initial_state": s0}
    mutate(args)
    pos = [args.pop(name) for name in ("q", "k", "v", *GATES)]
    with pytest.raises(error, match=match):
        if form == "chunked":
            titans.titans_memory(*pos, **args)
        elif form == "naive":
            titans.titans_memory_naive(*pos, **args)
        else:
            state = args.pop("initial_state")
            if match == "alpha":
                pos = [x[:, :, :1] for x in pos]
            titans.titans_memory_step(*pos, state, **args)


# -- the MLP memory -------------------------------------------------------------------------


def make_mlp(*, b=2, h=4, hkv=2, t=37, dk=8, dv=6, dh=12, dtype=torch.float32, seed=0, position=0, chunk=16):
    """As :func:`make`, with small learning rates (gradient descent on an MLP diverges at large ones) and
    a :class:`TitansMLPState` of random weights and momenta."""
    q, k, v, (eta, theta, alpha), _ = make(b=b, h=h, hkv=hkv, t=t, dk=dk, dv=dv, dtype=dtype, seed=seed, state=False)
    theta = theta / 8
    g = torch.Generator().manual_seed(seed + 1)
    sdt = dtype if dtype == torch.float64 else torch.float32
    first, second = (b, hkv, dh, dk), (b, hkv, dv, dh)
    mats = [torch.randn(shape, generator=g, dtype=torch.float64) * scale
            for shape, scale in ((first, 0.5), (second, 0.5), (first, 0.05), (second, 0.05), (first, 0.5),
                                 (second, 0.5))]
    state = TitansMLPState(*(m.to(DEVICE, sdt) for m in mats),
                           torch.full((b,), position % chunk, dtype=torch.int64, device=DEVICE))
    return q, k, v, (eta, theta.to(eta.dtype), alpha), state


def assert_mlp_state_close(a, ref, tol=1e-5):
    for name in TitansMLPState._fields[:6]:
        assert getattr(a, name).shape == getattr(ref, name).shape, name
        assert_close(getattr(a, name), getattr(ref, name), tol)
    assert torch.equal(a.position.cpu(), ref.position.cpu())


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("position", [0, 3], ids=["aligned", "mid-chunk-state"])
def test_mlp_naive_chunked_and_steps_agree_fp32(chunk, position):
    q, k, v, gates, s0 = make_mlp(seed=chunk + position, position=position, chunk=chunk)
    kw = {"chunk_size": chunk, "memory": "mlp"}
    ref, ref_state = titans.titans_memory_naive(q, k, v, *gates, initial_state=s0, **kw)
    out, state = titans.titans_memory(q, k, v, *gates, initial_state=s0, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (2, 4, 37, 6)
    assert isinstance(state, TitansMLPState) and state.w1.dtype == torch.float32
    assert_close(out, ref)
    assert_mlp_state_close(state, ref_state)
    stepped, step_state = run_steps(q, k, v, gates, s0, **kw)
    assert_close(stepped, ref)
    assert_mlp_state_close(step_state, ref_state)


def test_mlp_gradient_is_the_loss_gradient():
    """One token, η = α = 0, chunk 1: the update is ``−θ ∇‖W2 silu(W1 k) − v‖²`` as autograd takes it."""
    q, k, v, (eta, theta, alpha), s0 = make_mlp(b=1, h=1, hkv=1, t=1, dtype=torch.float64, seed=3)
    s0 = s0._replace(s1=torch.zeros_like(s0.s1), s2=torch.zeros_like(s0.s2))
    zero = torch.zeros_like(eta)
    _, state = titans.titans_memory(q, k, v, zero, theta, zero, chunk_size=1, memory="mlp", normalize_keys=False,
                                    initial_state=s0)
    w1, w2 = s0.w1.clone().requires_grad_(True), s0.w2.clone().requires_grad_(True)
    kt, vt = k[0, 0, 0], v[0, 0, 0]
    loss = (w2[0, 0] @ torch.nn.functional.silu(w1[0, 0] @ kt) - vt).square().sum()
    g1, g2 = torch.autograd.grad(loss, (w1, w2))
    th = theta[0, 0, 0]
    torch.testing.assert_close(state.w1, s0.w1 - th * g1, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(state.w2, s0.w2 - th * g2, atol=1e-12, rtol=1e-10)


def test_mlp_gradients_match_naive():
    q, k, v, gates, s0 = make_mlp(b=1, t=19, dtype=torch.float64, seed=7, position=2, chunk=4)
    mats = list(s0[:6])
    leaves = [q, k, v, *gates, *mats]
    for x in leaves:
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    go = torch.randn(*q.shape[:3], v.shape[3], generator=g, dtype=torch.float64).to(DEVICE)
    grads = []
    for fn in (titans.titans_memory_naive, titans.titans_memory):
        out, state = fn(q, k, v, *gates, chunk_size=4, memory="mlp", initial_state=TitansMLPState(*mats, s0.position))
        loss = (out * go).sum() + state.w1.sum() + (state.w2 * state.w2_chunk).sum() + state.s1.sum()
        grads.append(torch.autograd.grad(loss, leaves))
    names = ("q", "k", "v", *GATES, *TitansMLPState._fields[:6])
    for name, a, b in zip(names, *grads):
        assert torch.isfinite(b).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, a.abs().max().item()), f"{name}: max abs gradient error {err:.2e}"


def test_mlp_prefill_in_pieces_and_decode():
    q, k, v, gates, s0 = make_mlp(t=45, seed=19)
    kw = {"chunk_size": 8, "memory": "mlp"}
    whole, whole_state = titans.titans_memory(q, k, v, *gates, initial_state=s0, **kw)
    state, pieces = s0, []
    for lo, hi in ((0, 3), (3, 13), (13, 16), (16, 30)):
        sl = slice(lo, hi)
        o, state = titans.titans_memory(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in gates),
                                        initial_state=state, **kw)
        pieces.append(o)
    tail = slice(30, None)
    dec, state = run_steps(q[:, :, tail], k[:, :, tail], v[:, :, tail], tuple(x[:, :, tail] for x in gates), state,
                           **kw)
    assert_close(torch.cat([*pieces, dec], dim=2), whole)
    assert_mlp_state_close(state, whole_state)


def test_mlp_bf16_and_batch_invariance():
    q, k, v, gates, s0 = make_mlp(t=40, dtype=torch.bfloat16, seed=13)
    ref, _ = titans.titans_memory_naive(q, k, v, *gates, memory="mlp", initial_state=s0)
    out, state = titans.titans_memory(q, k, v, *gates, memory="mlp", initial_state=s0)
    assert out.dtype == torch.bfloat16 and state.w1.dtype == torch.float32
    assert rel_rmse(out, ref) <= 0.005
    q, k, v, gates, s0 = make_mlp(b=3, t=30, seed=17, position=5)
    out, state = titans.titans_memory(q, k, v, *gates, memory="mlp", chunk_size=8, initial_state=s0)
    row = slice(1, 2)
    one, one_state = titans.titans_memory(q[row], k[row], v[row], *(x[row] for x in gates), memory="mlp",
                                          chunk_size=8, initial_state=TitansMLPState(*(x[row] for x in s0)))
    assert torch.equal(out[row], one)
    for a, b in zip(state, one_state):
        assert torch.equal(a[row], b)


def test_hard_resets_gradients_finite_and_exact():
    """η = 0 and α = 1 inside chunks: the masked cumprod's gradients stay finite and equal the naive form's."""
    q, k, v, (eta, theta, alpha), s0 = make(b=1, t=21, dtype=torch.float64, seed=31)
    eta[:, :, 2::5] = 0.0
    alpha[:, :, 4::6] = 1.0
    leaves = [q, k, v, eta, theta, alpha]
    for x in leaves:
        x.requires_grad_(True)
    grads = []
    for fn in (titans.titans_memory_naive, titans.titans_memory):
        out, state = fn(q, k, v, eta, theta, alpha, chunk_size=8, initial_state=s0)
        grads.append(torch.autograd.grad(out.sum() + state.w.sum() + state.s.sum(), leaves))
    for name, a, b in zip(("q", "k", "v", *GATES), *grads):
        assert torch.isfinite(b).all(), name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item()), name
