"""Gated linear attention, DeltaNet and Gated DeltaNet (``longattn.recurrent.gated`` / ``.delta``):
the chunked and step forms against the float64 token-by-token recurrence, gradients, prefill in
pieces, decoding after prefill, half-precision inputs, batch invariance and argument checks."""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import DEVICE, GATES, assert_close_scaled as assert_close, draw_gate, rel_rmse
from longattn.recurrent import delta, gated


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    chunked: Callable
    naive: Callable
    step: Callable
    state: type
    extras: tuple[str, ...]  # per-token inputs after q, k, v, in call order
    state_kv_first: bool  # GLA's state is [Dk, Dv], the delta rule's [Dv, Dk]

    def state_shape(self, b, hkv, dk, dv):
        return (b, hkv, dk, dv) if self.state_kv_first else (b, hkv, dv, dk)


GLA = Op("gla", gated.gla_attention, gated.gla_attention_naive, gated.gla_attention_step,
         gated.GLAState, ("log_gate",), True)
DELTA = Op("deltanet", delta.deltanet_attention, delta.deltanet_attention_naive, delta.deltanet_attention_step,
           delta.DeltaState, ("beta",), False)
GDELTA = Op("gated_deltanet", delta.gated_deltanet_attention, delta.gated_deltanet_attention_naive,
            delta.gated_deltanet_attention_step, delta.DeltaState, ("beta", "log_gate"), False)
OPS = [GLA, DELTA, GDELTA]
IDS = [op.name for op in OPS]


def make(op, *, b=2, h=4, hkv=2, t=40, dk=8, dv=6, dtype=torch.float32, gate="near0", seed=0, state=True):
    """Seeded ``(q, k, v, extras, initial_state)`` on the test device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q = torch.randn(b, h, t, dk, generator=g, dtype=f64)
    k = torch.randn(b, hkv, t, dk, generator=g, dtype=f64)
    v = torch.randn(b, hkv, t, dv, generator=g, dtype=f64)
    extras = []
    for name in op.extras:
        if name == "beta":
            extras.append(0.05 + 0.9 * torch.rand(b, hkv, t, generator=g, dtype=f64))
        else:
            shape = (b, hkv, t, dk) if op is GLA else (b, hkv, t)
            extras.append(draw_gate(shape, gate, g))
    s0 = torch.randn(*op.state_shape(b, hkv, dk, dv), generator=g, dtype=f64) * 0.5 if state else None

    def put(x):
        return x.to(DEVICE, dtype)

    return (put(q), put(k), put(v), tuple(put(x) for x in extras),
            None if s0 is None else op.state(put(s0)))


def run_steps(op, q, k, v, extras, state, **kw):
    """Feed the tokens one at a time through ``op.step``: ``(out, final_state)``."""
    outs = []
    for i in range(q.shape[2]):
        sl = slice(i, i + 1)
        o, state = op.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in extras), state, **kw)
        outs.append(o)
    return torch.cat(outs, dim=2), state


# -- the three forms agree ------------------------------------------------------------------

SIZES = [(64, 100), (16, 48), (7, 30), (1, 5), (128, 40)]  # (chunk, T): divides, does not, chunk > T


FORMS = [pytest.param(op, chunk, t, gate, id=f"{op.name}-C{chunk}-T{t}" + ("" if op is DELTA else f"-{gate}"))
         for op in OPS for chunk, t in SIZES for gate in (GATES if op is not DELTA else GATES[:1])]


@pytest.mark.parametrize("op,chunk,t,gate", FORMS)
def test_naive_chunked_and_steps_agree_fp32(op, chunk, t, gate):
    q, k, v, extras, s0 = make(op, t=t, gate=gate, seed=t + chunk)
    ref, ref_state = op.naive(q, k, v, *extras, initial_state=s0)
    out, state = op.chunked(q, k, v, *extras, chunk=chunk, initial_state=s0)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert state.s.dtype == torch.float32 and state.s.shape == ref_state.s.shape
    assert_close(out, ref)
    assert_close(state.s, ref_state.s)
    stepped, step_state = run_steps(op, q, k, v, extras, s0)
    assert_close(stepped, ref)
    assert_close(step_state.s, ref_state.s)


def test_gla_subchunks_stable_under_hard_gates():
    """−5 per step over a chunk of 64 (−320 across it) with sub-chunks of 16: nothing overflows."""
    q, k, v, (g,), s0 = make(GLA, t=128, gate="strong", seed=3)
    g = torch.full_like(g, -5.0)
    ref, _ = GLA.naive(q, k, v, g, initial_state=s0)
    out, state = GLA.chunked(q, k, v, g, chunk=64, initial_state=s0)
    assert_close(out, ref)
    assert torch.isfinite(state.s).all()


def _gla_path_gates(b, hkv, t, dk):
    """Log gates for 4 chunks of 64 (sub-chunks of 16) that send chunks and sub-chunks down every
    intra-chunk path: chunk 0 mild (factored whole), chunk 1 with a mild, a hard (−50 per step in
    one channel), a moderate (−1.5 per step: span 24, factored) and a very hard (−3000 once) sub-chunk,
    chunk 2 moderate throughout (span 64: sub-chunked, every sub-chunk factored), chunk 3 mild; the
    last batch row / head stays mild throughout, so rows of one group take different paths."""
    assert t == 256
    g = -0.01 * torch.rand(b, hkv, t, dk, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    g[:, :, 80:96, 0] = -50.0
    g[:, :, 96:112] = -1.5
    g[:, :, 120, 1:3] = -3000.0
    g[:, :, 128:192] = -1.0
    g[-1, -1] = -0.01
    return g


def test_gla_mixed_mild_and_hard_subchunks(monkeypatch):
    """The factored and per-pair intra-chunk paths, chosen per chunk and per sub-chunk from the gates,
    agree with the recurrence in one sequence, and every path runs."""
    q, k, v, _, s0 = make(GLA, t=256, seed=23)
    g = _gla_path_gates(2, 2, 256, 8).to(DEVICE, torch.float32)
    calls = {"factored": [], "subchunked": [], "pairs": 0}
    factored, subchunked, pair_sums = gated._intra_factored, gated._intra_subchunked, gated._pair_sums

    def spy_factored(q_in, *rest):
        calls["factored"].append(q_in.shape[:-3].numel())
        return factored(q_in, *rest)

    def spy_subchunked(qg, *rest):
        calls["subchunked"].append(qg.shape[:-3].numel())
        return subchunked(qg, *rest)

    def spy_pairs(gs):
        calls["pairs"] += gs.shape[0]
        return pair_sums(gs)

    monkeypatch.setattr(gated, "_intra_factored", spy_factored)
    monkeypatch.setattr(gated, "_intra_subchunked", spy_subchunked)
    monkeypatch.setattr(gated, "_pair_sums", spy_pairs)
    ref, ref_state = GLA.naive(q, k, v, g, initial_state=s0)
    out, state = GLA.chunked(q, k, v, g, chunk=64, initial_state=s0)
    assert_close(out, ref)
    assert_close(state.s, ref_state.s)
    # one group of 4 chunks x 4 rows: 2 mild chunks in 3 rows and all 4 in the mild row are factored
    assert calls["factored"] == [10] and calls["subchunked"] == [6]
    assert calls["pairs"] == 2 * 3  # the two hard sub-chunks of chunk 1, in the 3 rows that have them
    # every sub-chunk per pair (no factoring) gives the same answer
    monkeypatch.setattr(gated, "FACTOR_SPAN", 0.0)
    exact, exact_state = GLA.chunked(q, k, v, g, chunk=64, initial_state=s0)
    assert_close(exact, ref)
    assert_close(exact_state.s, ref_state.s)
    assert calls["factored"] == [10] and calls["subchunked"] == [6, 16]


def test_gla_mixed_paths_gradients(monkeypatch):
    """float64 gradients through both paths: chunks of 4 in sub-chunks of 2, gates of −0.1 … −1.6
    per step (the first chunk's scaled by 0.2) and FACTOR_SPAN 1.8: chunk spans 0.87, 3.5, 3.2 (the
    first factored whole), sub-chunk spans 2.0, 1.7 | 2.1, 1.1 (per pair, factored | per pair, factored)."""
    monkeypatch.setattr(gated, "SUB_CHUNK", 2)
    monkeypatch.setattr(gated, "FACTOR_SPAN", 1.8)
    q, k, v, extras, s0 = make(GLA, b=1, h=2, hkv=1, t=11, dk=3, dv=2, dtype=torch.float64, gate="grad", seed=29)
    extras[0][..., :4, :] *= 0.2  # the first chunk mild: factored whole
    leaves = tuple(x.requires_grad_(True) for x in (q, k, v, *extras, s0.s))

    def fn(*xs):
        *ins, s = xs
        out, state = GLA.chunked(*ins, chunk=4, initial_state=GLA.state(s))
        return out, state.s

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", [DELTA, GDELTA], ids=["deltanet", "gated_deltanet"])
def test_delta_unnormalised_keys_and_beta_up_to_two(op):
    q, k, v, extras, s0 = make(op, t=50, gate="near0", seed=5)
    k = 0.7 * k / k.norm(dim=-1, keepdim=True)  # β |k|² ≤ 2 · 0.49 < 2
    beta = 2.0 * torch.rand(k.shape[:3], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    extras = (beta, *extras[1:])
    for normalize in (False, True):
        ref, ref_state = op.naive(q, k, v, *extras, scale=0.3, normalize_keys=normalize, initial_state=s0)
        out, state = op.chunked(q, k, v, *extras, scale=0.3, normalize_keys=normalize, chunk=16, initial_state=s0)
        assert_close(out, ref)
        assert_close(state.s, ref_state.s)
        stepped, _ = run_steps(op, q, k, v, extras, s0, scale=0.3, normalize_keys=normalize)
        assert_close(stepped, ref)


def test_delta_rule_writes_the_value_under_a_unit_key():
    """β = 1 with a unit key stores exactly ``v`` under ``k``: reading with ``q = k`` returns ``v``."""
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 4), dim=-1).to(DEVICE)
    v = torch.randn(1, 1, 1, 3).to(DEVICE)
    s0 = delta.DeltaState(torch.randn(1, 1, 3, 4).to(DEVICE))
    out, _ = delta.deltanet_attention(k, k, v, torch.ones(1, 1, 1, device=DEVICE), scale=1.0,
                                      normalize_keys=False, initial_state=s0)
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_no_tokens_returns_the_initial_state(op):
    q, k, v, extras, s0 = make(op, t=0)
    out, state = op.chunked(q, k, v, *extras, initial_state=s0)
    assert out.shape == (2, 4, 0, 6)
    assert torch.equal(state.s, s0.s)


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_gradients_match_naive(op):
    """float64: gradients of the chunked form (sub-chunks and padding in play) equal the naive
    form's for every input and the initial state."""
    q, k, v, extras, s0 = make(op, t=45, gate="grad", dtype=torch.float64, seed=7)
    leaves = [q, k, v, *extras, s0.s]
    for x in leaves:
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    go = torch.randn(*q.shape[:3], v.shape[3], generator=g, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(s0.s.shape, generator=g, dtype=torch.float64).to(DEVICE)
    grads = []
    for fn, kw in ((op.naive, {}), (op.chunked, {"chunk": 32})):
        out, state = fn(q, k, v, *extras, initial_state=s0, **kw)
        loss = (out * go).sum() + (state.s * gs).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(("q", "k", "v", *op.extras, "initial_state"), *grads):
        assert torch.isfinite(b).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(1.0, a.abs().max().item()), f"{name}: max abs gradient error {err:.2e}"


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_gradcheck(op, monkeypatch):
    monkeypatch.setattr(gated, "SUB_CHUNK", 2)  # GLA: chunk 4 = two sub-chunks, so both paths run
    q, k, v, extras, s0 = make(op, b=1, h=2, hkv=1, t=7, dk=3, dv=2, dtype=torch.float64, gate="grad", seed=9)
    leaves = tuple(x.requires_grad_(True) for x in (q, k, v, *extras, s0.s))

    def fn(*xs):
        *ins, s = xs
        out, state = op.chunked(*ins, chunk=4, initial_state=op.state(s))
        return out, state.s

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


# -- prefill in pieces and decoding ---------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=IDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 36), max_size=4, unique=True), chunk=st.sampled_from([4, 8, 16]),
       seed=st.integers(0, 2**16))
def test_prefill_in_pieces_equals_one_pass(op, cuts, chunk, seed):
    q, k, v, extras, s0 = make(op, t=37, gate="mixed", seed=seed)
    whole, whole_state = op.chunked(q, k, v, *extras, chunk=8, initial_state=s0)
    bounds = [0, *sorted(cuts), 37]
    state, pieces = s0, []
    for lo, hi in zip(bounds, bounds[1:]):
        sl = slice(lo, hi)
        o, state = op.chunked(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in extras),
                              chunk=chunk, initial_state=state)
        pieces.append(o)
    assert_close(torch.cat(pieces, dim=2), whole)
    assert_close(state.s, whole_state.s)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_decode_after_prefill_equals_one_pass(op):
    q, k, v, extras, _ = make(op, t=70, gate="near0", seed=11, state=False)
    whole, whole_state = op.chunked(q, k, v, *extras)
    p = 61
    pre, state = op.chunked(q[:, :, :p], k[:, :, :p], v[:, :, :p], *(x[:, :, :p] for x in extras))
    tail = slice(p, None)
    dec, state = run_steps(op, q[:, :, tail], k[:, :, tail], v[:, :, tail],
                           tuple(x[:, :, tail] for x in extras), state)
    assert_close(torch.cat([pre, dec], dim=2), whole)
    assert_close(state.s, whole_state.s)


# -- dtypes and batch invariance ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_half_inputs(op, dtype):
    q, k, v, extras, s0 = make(op, t=100, gate="mixed", dtype=dtype, seed=13)
    ref, ref_state = op.naive(q, k, v, *extras, initial_state=s0)
    out, state = op.chunked(q, k, v, *extras, initial_state=s0)
    assert out.dtype == dtype and state.s.dtype == torch.float32
    assert rel_rmse(out, ref) <= 0.005
    assert rel_rmse(state.s, ref_state.s) <= 0.005
    sl = slice(0, 1)
    o, st1 = op.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in extras), s0)
    assert o.dtype == dtype and st1.s.dtype == torch.float32


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_batch_invariance_bitwise(op):
    q, k, v, extras, s0 = make(op, b=3, h=2, hkv=2, t=50, gate="mixed", seed=17)
    out, state = op.chunked(q, k, v, *extras, chunk=16, initial_state=s0)
    row = slice(1, 2)
    one, one_state = op.chunked(q[row], k[row], v[row], *(x[row] for x in extras), chunk=16,
                                initial_state=op.state(s0.s[row]))
    assert torch.equal(out[row], one)
    assert torch.equal(state.s[row], one_state.s)
    sl = slice(0, 1)
    o3, _ = op.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], *(x[:, :, sl] for x in extras), s0)
    o1, _ = op.step(q[row, :, sl], k[row, :, sl], v[row, :, sl], *(x[row, :, sl] for x in extras),
                    op.state(s0.s[row]))
    assert torch.equal(o3[row], o1)


def test_state_sizes():
    assert gated.gla_state_size(2, 16, 8) == 4 * 2 * 16 * 8
    assert delta.delta_state_size(4, 64, 32) == 4 * 4 * 64 * 32
    with pytest.raises(ValueError, match="heads_kv"):
        delta.delta_state_size(0, 4, 4)
    with pytest.raises(TypeError, match="head_dim_k"):
        gated.gla_state_size(1, 2.5, 4)


# -- bad arguments --------------------------------------------------------------------------


def _bad_cases():
    """``(id, op, mutate, form, error, match)``: ``mutate`` edits the dict of arguments."""

    def setitem(key, fn):
        def mutate(a):
            a[key] = fn(a[key])
        return mutate

    cases = []
    for op in OPS:
        n = op.name
        cases += [
            (f"{n}-q-rank", op, setitem("q", lambda x: x[0]), "chunked", ValueError, "q must have rank 4"),
            (f"{n}-q-int", op, setitem("q", lambda x: x.long()), "chunked", TypeError, "q has dtype"),
            (f"{n}-mixed-dtypes", op, setitem("k", lambda x: x.double()), "chunked", TypeError, "share one dtype"),
            (f"{n}-k-tokens", op, setitem("k", lambda x: x[:, :, :-1]), "chunked", ValueError, "k has shape"),
            (f"{n}-v-heads", op, setitem("v", lambda x: x[:, :1]), "chunked", ValueError, "v has shape"),
            (f"{n}-gqa", op, lambda a, op=op: a.update(**{e: torch.cat([a[e], a[e][:, :1]], dim=1)
                                                          for e in ("k", "v", *op.extras)}),
             "chunked", ValueError, "multiple of heads_kv"),  # 3 key/value heads for 4 query heads
            (f"{n}-chunk-zero", op, lambda a: a.update(chunk=0), "chunked", ValueError, "chunk"),
            (f"{n}-chunk-float", op, lambda a: a.update(chunk=2.5), "chunked", TypeError, "chunk"),
            (f"{n}-scale", op, lambda a: a.update(scale=-1.0), "chunked", ValueError, "scale"),
            (f"{n}-state-shape", op,
             lambda a, op=op: a.update(initial_state=op.state(a["initial_state"].s[:, :, :-1])),
             "chunked", ValueError, "initial_state.s has shape"),
            (f"{n}-state-type", op, lambda a: a.update(initial_state=a["initial_state"].s), "chunked", TypeError,
             "initial_state must be a"),
            (f"{n}-step-tokens", op, lambda a: None, "step", ValueError, "tokens == 1"),
        ]
        for e in op.extras:
            cases.append((f"{n}-{e}-shape", op, setitem(e, lambda x: x[:, :, :-1]), "chunked", ValueError,
                          f"{e} has shape"))
            cases.append((f"{n}-{e}-nan", op, setitem(e, lambda x: x.clone().fill_(float("nan"))), "naive",
                          ValueError, e))
            cases.append((f"{n}-{e}-not-tensor", op, setitem(e, lambda x: 0.5), "chunked", TypeError, e))
        if "log_gate" in op.extras:
            cases.append((f"{n}-gate-positive", op, setitem("log_gate", lambda x: x + 0.5), "chunked", ValueError,
                          "log_gate must be finite and <= 0" if op is GLA else r"log_gate .*<= 0"))
        if "beta" in op.extras:
            cases.append((f"{n}-beta-high", op, setitem("beta", lambda x: x + 2.0), "chunked", ValueError,
                          r"beta .*\[0, 2\]"))
            cases.append((f"{n}-beta-negative", op, setitem("beta", lambda x: -x), "step", ValueError, "beta"))
            cases.append((f"{n}-normalize-flag", op, lambda a: a.update(normalize_keys=1), "chunked", TypeError,
                          "normalize_keys must be a bool"))
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_name_the_argument(case):
    _, op, mutate, form, error, match = case
    q, k, v, extras, s0 = make(op, t=6, gate="near0")
    args = {"q": q, "k": k, "v": v, **dict(zip(op.extras, extras)), "initial_state": s0}
    mutate(args)
    pos = [args.pop(name) for name in ("q", "k", "v", *op.extras)]
    with pytest.raises(error, match=match):
        if form == "chunked":
            op.chunked(*pos, **args)
        elif form == "naive":
            args.pop("chunk", None)
            op.naive(*pos, **args)
        else:
            state = args.pop("initial_state")
            if "beta" in op.extras and match == "beta":  # a one-token step with a bad beta
                pos = [x[:, :, :1] for x in pos]
            op.step(*pos, state, **args)
