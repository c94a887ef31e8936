"""RAT (``longattn.recurrent.rat``): the parallel and step forms against the float64 token-by-token
recurrence, exact special cases against softmax attention, gradients, prefill in pieces, decoding
after prefill, half-precision inputs, batch invariance, grouped heads and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import DEVICE, GATES, assert_close_scaled as assert_close, draw_gate, rel_rmse
from longattn import reference_attention
from longattn.recurrent import rat
from longattn.recurrent.rat import RATState


def make(*, b=2, h=4, hkv=2, t=40, dk=8, dv=6, dtype=torch.float32, gate="mixed", seed=0, prefix=13, chunk=8):
    """Seeded ``(q, k, v, log_key_gate, log_value_gate, initial_state)`` on the test device; the
    initial state is that of the naive form after ``prefix`` random tokens with ``chunk`` (None for
    ``prefix=None``), so it holds summaries and, for most chunk sizes, ends mid-chunk."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def draw(tokens):
        return (torch.randn(b, h, tokens, dk, generator=g, dtype=f64),
                torch.randn(b, hkv, tokens, dk, generator=g, dtype=f64),
                torch.randn(b, hkv, tokens, dv, generator=g, dtype=f64),
                draw_gate((b, hkv, tokens, dk), gate, g), draw_gate((b, hkv, tokens, dv), gate, g))

    xs = [x.to(DEVICE, dtype) for x in draw(t)]
    state = None
    if prefix is not None:
        pre = [x.to(DEVICE) for x in draw(prefix)]
        _, s64 = rat.rat_attention_naive(*pre, chunk_size=chunk)
        state = RATState(*(x.to(torch.float32 if dtype != f64 else f64) for x in s64))
    return (*xs, state)


def assert_states_close(s, ref, tol=1e-5):
    assert s.keys.shape == ref.keys.shape and s.values.shape == ref.values.shape
    for name in ("keys", "values", "k_run", "v_run"):
        assert_close(getattr(s, name), getattr(ref, name), tol)
    assert float(s.position) == float(ref.position)


def run_steps(q, k, v, gk, gv, state, chunk):
    outs = []
    for i in range(q.shape[2]):
        sl = slice(i, i + 1)
        o, state = rat.rat_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], gk[:, :, sl], gv[:, :, sl], state,
                                          chunk_size=chunk)
        outs.append(o)
    return torch.cat(outs, dim=2), state


# -- the three forms agree ------------------------------------------------------------------

SIZES = [(8, 40), (16, 36), (5, 37), (1, 9), (64, 30)]  # (chunk, T): divides, does not, L = 1, L > T


FORMS = [pytest.param(chunk, t, gate, fresh, id=f"L{chunk}-T{t}-{gate}-{'fresh' if fresh else 'carried'}")
         for chunk, t in SIZES for gate in GATES for fresh in (True, False) if fresh or gate == "mixed"]


@pytest.mark.parametrize("chunk,t,gate,fresh", FORMS)
def test_naive_parallel_and_steps_agree_fp32(chunk, t, gate, fresh):
    q, k, v, gk, gv, s0 = make(t=t, gate=gate, seed=t + chunk, prefix=None if fresh else 13, chunk=chunk)
    ref, ref_state = rat.rat_attention_naive(q, k, v, gk, gv, chunk_size=chunk, initial_state=s0)
    out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=chunk, initial_state=s0)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (2, 4, t, 6)
    assert all(x.dtype == torch.float32 for x in state)
    assert_close(out, ref)
    assert_states_close(state, ref_state)
    n_before = 0 if fresh else 13 // chunk
    assert state.keys.shape[2] == n_before + ((0 if fresh else 13 % chunk) + t) // chunk
    stepped, step_state = run_steps(q, k, v, gk, gv, s0, chunk)
    assert_close(stepped, ref)
    assert_states_close(step_state, ref_state)


def test_shared_gate_for_keys_and_values():
    """One forget gate for keys and values (``Dk == Dv``): the same tensor passed twice."""
    q, k, v, gk, _, _ = make(dv=8, t=33, prefix=None)
    ref, _ = rat.rat_attention_naive(q, k, v, gk, gk, chunk_size=8)
    out, _ = rat.rat_attention(q, k, v, gk, gk, chunk_size=8)
    assert_close(out, ref)


def test_no_tokens_returns_the_initial_state():
    q, k, v, gk, gv, s0 = make(t=0)
    out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=8, initial_state=s0)
    assert out.shape == (2, 4, 0, 6)
    for a, b in zip(state, s0):
        assert torch.equal(a, b)


# -- exact special cases --------------------------------------------------------------------


def test_chunk_one_is_causal_softmax_attention_over_gated_tokens():
    """``L = 1``: every token is its own chunk, its summary ``((1 − a) ⊙ k, (1 − f) ⊙ v)``; each query
    attends causally over all of them: softmax attention over the scaled keys and values."""
    q, k, v, gk, gv, _ = make(t=23, dk=8, dv=8, dtype=torch.float64, prefix=None)
    ref, _ = reference_attention(q, -torch.expm1(gk) * k, -torch.expm1(gv) * v, causal=True)
    for fn in (rat.rat_attention, rat.rat_attention_naive):
        out, state = fn(q, k, v, gk, gv, chunk_size=1)
        assert_close(out, ref, 1e-12)
        assert state.keys.shape[2] == 23 and float(state.position) == 0


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_forgetting_gates_give_strided_attention(chunk):
    """Gates ``a = f = 0`` (log gate −1e4: ``exp`` is exactly 0) make ``k̃_t = k_t``, ``ṽ_t = v_t``:
    query ``t`` attends to itself and to the last token of every earlier chunk — softmax attention
    with that mask."""
    q, k, v, gk, gv, _ = make(t=30, dk=8, dv=8, dtype=torch.float64, prefix=None)
    hard = torch.full_like(gk, -1e4)
    i = torch.arange(30, device=DEVICE)
    ends = (i % chunk == chunk - 1)[None, :] & (i[None, :] // chunk < i[:, None] // chunk)
    mask = ends | (i[None, :] == i[:, None])
    ref, _ = reference_attention(q, k, v, mask=mask)
    out, _ = rat.rat_attention(q, k, v, hard, hard, chunk_size=chunk)
    assert_close(out, ref, 1e-12)
    out32, _ = rat.rat_attention(q.float(), k.float(), v.float(), hard.float(), hard.float(), chunk_size=chunk)
    assert_close(out32, ref)


def test_one_chunk_is_the_value_recurrence():
    """``L ≥ T``: one chunk, no summaries, one key per query, so ``o_t = ṽ_t`` whatever ``q`` and ``k``:
    ``ṽ_t = Σ_{j≤t} (Π_{j<s≤t} f_s)(1 − f_j) v_j``, written here as a weight matrix."""
    q, k, v, gk, gv, _ = make(t=20, dtype=torch.float64, gate="near0", prefix=None)
    gv = gv * 30  # −0.3 … 0 per step
    cum = gv.cumsum(2)  # [B, Hkv, T, Dv]
    expo = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # Σ_{j<s≤t} log f_s at [t, j]
    causal = torch.ones(20, 20, dtype=torch.bool, device=DEVICE).tril()[:, :, None]
    weights = torch.where(causal, expo.exp(), 0.0) * -torch.expm1(gv)[:, :, None]
    v_tilde = (weights * v[:, :, None]).sum(3).repeat_interleave(2, dim=1)
    for chunk in (20, 64):
        out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=chunk)
        assert_close(out, v_tilde, 1e-12)
        assert state.keys.shape[2] == (20 // chunk)


# -- gradients ------------------------------------------------------------------------------


def test_gradients_match_naive():
    """float64: gradients of the parallel form (groups, padding and a carried mid-chunk state in
    play) equal the naive form's for q, k, v, both gates and every field of the initial state."""
    q, k, v, gk, gv, s0 = make(t=45, gate="grad", dtype=torch.float64, seed=7, prefix=13, chunk=8)
    s0 = RATState(*(x.clone() for x in s0))
    leaves = [q, k, v, gk, gv, s0.keys, s0.values, s0.k_run, s0.v_run]
    for x in leaves:
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    go = torch.randn(2, 4, 45, 6, generator=g, dtype=torch.float64).to(DEVICE)
    grads = []
    for fn in (rat.rat_attention_naive, rat.rat_attention):
        out, state = fn(q, k, v, gk, gv, chunk_size=8, initial_state=s0)
        loss = (out * go).sum() + state.keys.square().sum() + (state.v_run * 0.5).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    names = ("q", "k", "v", "log_key_gate", "log_value_gate", "keys", "values", "k_run", "v_run")
    for name, a, b in zip(names, *grads):
        assert torch.isfinite(b).all(), name
        assert a.abs().max() > 0, name
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, a.abs().max().item()), f"{name}: max abs gradient error {err:.2e}"


def test_gradcheck():
    q, k, v, gk, gv, s0 = make(b=1, h=2, hkv=1, t=6, dk=2, dv=2, dtype=torch.float64, gate="grad", seed=9,
                               prefix=5, chunk=3)
    leaves = tuple(x.clone().requires_grad_(True) for x in (q, k, v, gk, gv, s0.keys, s0.values, s0.k_run, s0.v_run))

    def fn(*xs):
        *ins, keys, values, k_run, v_run = xs
        out, state = rat.rat_attention(*ins, chunk_size=3,
                                       initial_state=RATState(keys, values, k_run, v_run, s0.position))
        return out, state.keys, state.v_run

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


# -- prefill in pieces and decoding ---------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 36), max_size=4, unique=True), chunk=st.sampled_from([3, 4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_prefill_in_pieces_equals_one_pass(cuts, chunk, seed):
    q, k, v, gk, gv, _ = make(t=37, seed=seed, prefix=None)
    whole, whole_state = rat.rat_attention(q, k, v, gk, gv, chunk_size=chunk)
    bounds = [0, *sorted(cuts), 37]
    state, pieces = None, []
    for lo, hi in zip(bounds, bounds[1:]):
        sl = slice(lo, hi)
        o, state = rat.rat_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], gk[:, :, sl], gv[:, :, sl],
                                     chunk_size=chunk, initial_state=state)
        pieces.append(o)
    assert_close(torch.cat(pieces, dim=2), whole)
    assert_states_close(state, whole_state)


def test_decode_after_prefill_equals_one_pass():
    q, k, v, gk, gv, _ = make(t=150, seed=11, prefix=None)
    whole, whole_state = rat.rat_attention(q, k, v, gk, gv, chunk_size=16)
    p = 61  # mid-chunk
    pre, state = rat.rat_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], gk[:, :, :p], gv[:, :, :p], chunk_size=16)
    tail = slice(p, None)
    dec, state = run_steps(q[:, :, tail], k[:, :, tail], v[:, :, tail], gk[:, :, tail], gv[:, :, tail], state, 16)
    assert_close(torch.cat([pre, dec], dim=2), whole)
    assert_states_close(state, whole_state)
    assert state.keys.shape[2] == 150 // 16 and float(state.position) == 150 % 16


def test_int_position_accepted():
    q, k, v, gk, gv, s0 = make(t=10, prefix=13, chunk=8)
    ref, _ = rat.rat_attention(q, k, v, gk, gv, chunk_size=8, initial_state=s0)
    out, _ = rat.rat_attention(q, k, v, gk, gv, chunk_size=8, initial_state=s0._replace(position=5))
    assert torch.equal(out, ref)


# -- dtypes, batch invariance and grouped heads ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(dtype):
    q, k, v, gk, gv, s0 = make(t=100, dtype=dtype, seed=13, prefix=13, chunk=16)
    ref, ref_state = rat.rat_attention_naive(q, k, v, gk, gv, chunk_size=16, initial_state=s0)
    out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=16, initial_state=s0)
    assert out.dtype == dtype and all(x.dtype == torch.float32 for x in state)
    assert rel_rmse(out, ref) <= 0.005
    assert rel_rmse(state.keys, ref_state.keys) <= 0.005
    sl = slice(0, 1)
    o, st1 = rat.rat_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], gk[:, :, sl], gv[:, :, sl], s0,
                                    chunk_size=16)
    assert o.dtype == dtype and all(x.dtype == torch.float32 for x in st1)


def test_batch_invariance_bitwise():
    q, k, v, gk, gv, s0 = make(b=3, h=2, hkv=2, t=50, seed=17, prefix=13, chunk=8)
    out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=8, initial_state=s0)
    row = slice(1, 2)
    s_row = RATState(*(x[row] for x in s0[:4]), s0.position)
    one, one_state = rat.rat_attention(q[row], k[row], v[row], gk[row], gv[row], chunk_size=8, initial_state=s_row)
    assert torch.equal(out[row], one)
    for a, b in zip(state[:4], one_state[:4]):
        assert torch.equal(a[row], b)
    sl = slice(0, 1)
    o3, _ = rat.rat_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], gk[:, :, sl], gv[:, :, sl], s0, chunk_size=8)
    o1, _ = rat.rat_attention_step(q[row, :, sl], k[row, :, sl], v[row, :, sl], gk[row, :, sl], gv[row, :, sl],
                                   s_row, chunk_size=8)
    assert torch.equal(o3[row], o1)


def test_grouped_heads_equal_repeated_heads():
    q, k, v, gk, gv, _ = make(h=6, hkv=2, t=41, seed=19, prefix=None)
    out, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=8)
    rep = [x.repeat_interleave(3, dim=1) for x in (k, v, gk, gv)]
    full, full_state = rat.rat_attention(q, *rep, chunk_size=8)
    assert_close(out, full, 1e-6)
    assert_close(state.keys.repeat_interleave(3, dim=1), full_state.keys, 1e-6)


def test_state_size():
    assert rat.rat_state_size(2, 16, 8, 100, 16) == 4 * (2 * (6 + 1) * 24 + 1)
    q, k, v, gk, gv, _ = make(t=37, prefix=None)
    _, state = rat.rat_attention(q, k, v, gk, gv, chunk_size=8)
    assert sum(x[0].numel() if x.dim() else 1 for x in state) * 4 == rat.rat_state_size(2, 8, 6, 37, 8)
    with pytest.raises(ValueError, match="heads_kv"):
        rat.rat_state_size(0, 4, 4, 10, 2)
    with pytest.raises(TypeError, match="chunk_size"):
        rat.rat_state_size(1, 4, 4, 10, 2.5)


# -- bad arguments --------------------------------------------------------------------------


def _set(key, fn):
    def mutate(a):
        a[key] = fn(a[key])
    return mutate


def _set_state(field, fn):
    def mutate(a):
        s = a["initial_state"]
        a["initial_state"] = s._replace(**{field: fn(getattr(s, field))})
    return mutate


BAD = [
    ("q-rank", _set("q", lambda x: x[0]), "parallel", ValueError, "q must have rank 4"),
    ("q-int", _set("q", lambda x: x.long()), "parallel", TypeError, "q has dtype"),
    ("mixed-dtypes", _set("k", lambda x: x.double()), "parallel", TypeError, "share one dtype"),
    ("k-tokens", _set("k", lambda x: x[:, :, :-1]), "parallel", ValueError, "k has shape"),
    ("v-heads", _set("v", lambda x: x[:, :1]), "parallel", ValueError, "v has shape"),
    ("gqa", lambda a: a.update(**{n: torch.cat([a[n], a[n][:, :1]], dim=1) for n in ("k", "v", "log_key_gate",
                                                                                     "log_value_gate")}),
     "parallel", ValueError, "multiple of heads_kv"),
    ("key-gate-shape", _set("log_key_gate", lambda x: x[..., :-1]), "parallel", ValueError, "log_key_gate has shape"),
    ("value-gate-shape", _set("log_value_gate", lambda x: x[:, :, :-1]), "naive", ValueError,
     "log_value_gate has shape"),
    ("key-gate-positive", _set("log_key_gate", lambda x: x + 0.5), "parallel", ValueError,
     "log_key_gate must be finite and <= 0"),
    ("value-gate-nan", _set("log_value_gate", lambda x: x.clone().fill_(float("nan"))), "step", ValueError,
     "log_value_gate"),
    ("gate-not-tensor", _set("log_key_gate", lambda x: 0.5), "parallel", TypeError, "log_key_gate"),
    ("chunk-zero", lambda a: a.update(chunk_size=0), "parallel", ValueError, "chunk_size"),
    ("chunk-float", lambda a: a.update(chunk_size=2.5), "naive", TypeError, "chunk_size"),
    ("scale", lambda a: a.update(scale=-1.0), "parallel", ValueError, "scale"),
    ("state-type", lambda a: a.update(initial_state=a["initial_state"].keys), "parallel", TypeError,
     "initial_state must be a RATState"),
    ("state-run-shape", _set_state("k_run", lambda x: x[..., :-1]), "parallel", ValueError,
     "initial_state.k_run has shape"),
    ("state-values-count", _set_state("values", lambda x: x[:, :, :-1]), "naive", ValueError,
     "initial_state.values has shape"),
    ("state-position-range", _set_state("position", lambda x: x + 8), "parallel", ValueError,
     r"initial_state.position must be an integer in \[0, chunk_size\)"),
    ("state-position-fraction", _set_state("position", lambda x: x + 0.5), "step", ValueError, "state.position"),
    ("state-chunk-mismatch", lambda a: a.update(chunk_size=4), "parallel", ValueError, "initial_state.position"),
    ("step-tokens", lambda a: None, "step-many", ValueError, "tokens == 1"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_name_the_argument(case):
    _, mutate, form, error, match = case
    q, k, v, gk, gv, s0 = make(t=6, prefix=13, chunk=8)  # the state ends at position 5
    args = {"q": q, "k": k, "v": v, "log_key_gate": gk, "log_value_gate": gv, "initial_state": s0, "chunk_size": 8}
    mutate(args)
    pos = [args.pop(n) for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]
    with pytest.raises(error, match=match):
        if form == "parallel":
            rat.rat_attention(*pos, **args)
        elif form == "naive":
            rat.rat_attention_naive(*pos, **args)
        else:
            state = args.pop("initial_state")
            if form == "step":
                pos = [x[:, :, :1] for x in pos]
            rat.rat_attention_step(*pos, state, **args)


def test_gates_must_not_be_positive_in_the_step():
    q, k, v, gk, gv, s0 = make(t=1, prefix=None)
    with pytest.raises(ValueError, match="log_key_gate"):
        rat.rat_attention_step(q, k, v, -gk, gv, None)
    assert math.isfinite(float(rat.rat_attention_step(q, k, v, gk, gv, None)[0].abs().max()))
