"""The recurrent ops as methods of ``longattn.attention`` (``longattn.methods.recurrent``).

Every registered method that is not softmax attention (capability ``softmax`` False) is listed in
``CONFIGS``; for each configuration, ``longattn.attention(..., method=m)`` gives what the op called
directly gives (to 1e-6 in float32) and agrees with the op's float64 recurrence (the tolerances of
the ops' own tests); bf16 inputs, grouped heads, prefill in pieces, decoding after prefill and
gradients work; bad arguments are refused naming the argument; and nothing that needs a softmax
LSE (merges, the benchmark's gate, varlen LSEs, the Hugging Face bridge) takes these methods.
"""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.bench import harness
from longattn.core.merge import merge_partials
from longattn.recurrent.based import BasedState, based_attention, based_attention_naive, based_attention_step
from longattn.recurrent.lightning import (
    LightningState,
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_step,
    transnormer_decays,
)
from longattn.recurrent.linear import (
    LinearState,
    linear_attention,
    linear_attention_naive,
    linear_attention_step,
    performer_features,
)
from longattn.recurrent.rat import RATState, rat_attention, rat_attention_naive, rat_attention_step
from conftest import DEVICE, assert_close_scaled, make_qkv, rel_rmse

#: every recurrent method, in the configurations the tests run (a new one must be added here)
CONFIGS: dict[str, list[dict]] = {
    "linear": [{}, dict(feature_map="performer", random_features=24), dict(feature_map="relu", normalize=False)],
    "lightning": [{}, dict(decay=0.9), dict(layer=1, layers=3, norm=False)],
    "based": [dict(feature_dim=8, window=8, chunk=16)],
    "rat": [dict(chunk_size=8, gate=0.7)],
}
CASES = [(name, kw) for name, kws in CONFIGS.items() for kw in kws]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]
STATES = {"linear": LinearState, "lightning": LightningState, "based": BasedState, "rat": RATState}

B, HQ, HK, T, D = 2, 4, 2, 37, 16


def qkv(t=T, dtype=torch.float32, seed=0, hk=HK):
    return make_qkv(b=B, hq=HQ, hk=hk, tq=t, tk=t, d=D, dtype=dtype, seed=seed)


def _op_args(name, kw, q, k):
    """The op's arguments for method ``name`` with fields ``kw``, written out independently of the method."""
    if name == "linear":
        fm = kw.get("feature_map", "elu")
        w = performer_features(kw["random_features"], q.shape[-1], 0, device=q.device) if fm == "performer" else None
        return (), dict(feature_map=fm, features=w, normalize=kw.get("normalize", True))
    if name == "lightning":
        if "decay" in kw:
            return (), dict(log_decay=torch.full((q.shape[1],), math.log(kw["decay"]), dtype=torch.float64,
                                                 device=q.device), norm=kw.get("norm", True))
        if "layer" in kw:
            lam = transnormer_decays(q.shape[1], layer=kw["layer"], layers=kw["layers"], dtype=torch.float64,
                                     device=q.device)
            return (), dict(log_decay=lam.log(), norm=kw.get("norm", True))
        return (), dict(norm=kw.get("norm", True))
    if name == "based":
        return (), dict(window=kw["window"])
    if name == "rat":
        dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        g = torch.full(k.shape, math.log(kw["gate"]), dtype=dtype, device=k.device)
        return (g, g), {}
    raise AssertionError(name)


def _feature_qk(name, kw, q, k):
    """Based's features read the first ``feature_dim`` channels; the window all of them."""
    if name == "based":
        f = min(kw["feature_dim"], q.shape[-1])
        return q[..., :f], k[..., :f], dict(q_window=q, k_window=k)
    return q, k, {}


def direct(name, kw, q, k, v, state=None):
    """The op's chunked form, called directly."""
    extra, opts = _op_args(name, kw, q, k)
    fq, fk, win = _feature_qk(name, kw, q, k)
    if name == "linear":
        return linear_attention(q, k, v, initial_state=state, **opts)
    if name == "lightning":
        return lightning_attention(q, k, v, initial_state=state, **opts)
    if name == "based":
        return based_attention(fq, fk, v, chunk=kw["chunk"], initial_state=state, **opts, **win)
    return rat_attention(q, k, v, *extra, chunk_size=kw["chunk_size"], initial_state=state)


def direct_step(name, kw, q, k, v, state=None):
    extra, opts = _op_args(name, kw, q, k)
    fq, fk, win = _feature_qk(name, kw, q, k)
    if name == "linear":
        return linear_attention_step(q, k, v, state, **opts)
    if name == "lightning":
        return lightning_attention_step(q, k, v, state, **opts)
    if name == "based":
        return based_attention_step(fq, fk, v, state, **opts, **win)
    return rat_attention_step(q, k, v, *extra, state, chunk_size=kw["chunk_size"])


def naive(name, kw, q, k, v):
    """The op's float64 recurrence, one token at a time."""
    extra, opts = _op_args(name, kw, q, k)
    fq, fk, win = _feature_qk(name, kw, q, k)
    if name == "linear":
        return linear_attention_naive(q, k, v, **opts)
    if name == "lightning":
        return lightning_attention_naive(q, k, v, **opts)
    if name == "based":
        return based_attention_naive(fq, fk, v, **opts, **win)
    return rat_attention_naive(q, k, v, *extra, chunk_size=kw["chunk_size"])


def run(name, kw, q, k, v, state=None, **extra):
    return longattn.attention(q, k, v, causal=True, method=longattn.method(name, **kw), initial_state=state,
                              return_state=True, **extra)


def assert_states_close(a, b, tol=1e-5):
    assert type(a).__name__ == type(b).__name__
    for x, y in zip(a, b):
        if x.dim() == 0:
            assert float(x) == float(y)
        else:
            assert_close_scaled(x, y, tol)


# -- the registry --------------------------------------------------------------------------------


def test_every_recurrent_method_is_covered_here():
    assert set(CONFIGS) == {s.name for s in longattn.methods() if not s.capabilities.softmax}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_capability_sheets(name):
    m = longattn.method(name)
    caps = m.capabilities
    assert not caps.softmax and caps.state and not caps.exact
    assert caps.causal and not caps.non_causal and not caps.cross and not caps.score_bias
    assert caps.prefill and caps.decode and caps.differentiable
    assert caps.takes_scale == (name == "rat")
    assert caps.paper and caps.cost
    assert m.state_type is STATES[name]
    assert all(s.capabilities.softmax for s in longattn.methods() if s.name in ("dense", "window", "quest"))


def test_cli_lists_them_as_recurrent():
    from typer.testing import CliRunner

    from longattn.cli import app

    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in CONFIGS:
        line = next(ln for ln in res.output.splitlines() if ln.strip().startswith(name + " "))
        assert "recurrent" in line, line


# -- the same numbers as the ops ---------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_attention_equals_the_op_and_its_float64_recurrence(name, kw):
    q, k, v = qkv()
    out, state = run(name, kw, q, k, v)
    want, want_state = direct(name, kw, q, k, v)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert type(state) is STATES[name]
    for got, exp in zip(state, want_state):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)
    ref, ref_state = naive(name, kw, q, k, v)
    assert_close_scaled(out, ref)
    assert_states_close(state, ref_state)


@pytest.mark.parametrize("name,kw", CASES[:1] + CASES[3:4] + CASES[-2:], ids=IDS[:1] + IDS[3:4] + IDS[-2:])
def test_float64_inputs_compute_in_float64(name, kw):
    q, k, v = qkv(dtype=torch.float64)
    out, state, stats = longattn.attention(q, k, v, causal=True, method=longattn.method(name, **kw),
                                           return_state=True, return_stats=True)
    assert out.dtype == torch.float64 and stats.compute_dtype == "float64"
    ref, _ = naive(name, kw, q, k, v)
    assert_close_scaled(out, ref, 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_half_inputs(name, dtype):
    kw = CONFIGS[name][0]
    q, k, v = qkv(dtype=dtype)
    out, state = run(name, kw, q, k, v)
    assert out.dtype == dtype and all(x.dtype == torch.float32 for x in state)
    want, _ = direct(name, kw, q, k, v)
    assert rel_rmse(out, want) <= 1e-3
    if dtype == torch.bfloat16:  # (the float64 recurrence is slow-ish: once per method)
        ref, _ = naive(name, kw, q, k, v)
        assert rel_rmse(out, ref) <= 0.005


@pytest.mark.parametrize("hk", [1, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grouped_and_full_heads(name, hk):
    kw = CONFIGS[name][0]
    q, k, v = qkv(hk=hk, t=20)
    out, _ = run(name, kw, q, k, v)
    ref, _ = naive(name, kw, q, k, v)
    assert_close_scaled(out, ref)


# -- state: pieces and decoding -----------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_prefill_in_pieces_equals_one_call(name, kw):
    q, k, v = qkv(seed=1)
    whole, whole_state = run(name, kw, q, k, v)
    outs, state = [], None
    for a, b in [(0, 13), (13, 30), (30, T)]:
        o, state = run(name, kw, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
        outs.append(o)
    assert_close_scaled(torch.cat(outs, 2), whole)
    assert_states_close(state, whole_state)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_decode_after_prefill_equals_the_long_pass(name, kw):
    q, k, v = qkv(seed=2)
    whole, _ = run(name, kw, q, k, v)
    m = longattn.method(name, **kw)
    out, state = run(name, kw, q[:, :, :30], k[:, :, :30], v[:, :, :30])
    outs = [out]
    for t in range(30, T):
        sl = slice(t, t + 1)
        before = state
        o, state, stats = longattn.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True, method=m,
                                             initial_state=state, return_state=True, return_stats=True)
        assert stats.path == "step" and stats.lse is None and stats.density is None
        # the step form, and the chunked form over one token, give the same
        want, _ = direct_step(name, kw, q[:, :, sl], k[:, :, sl], v[:, :, sl], before)
        torch.testing.assert_close(o, want, atol=1e-6, rtol=1e-6)
        one, one_state = direct(name, kw, q[:, :, sl], k[:, :, sl], v[:, :, sl], before)
        assert_close_scaled(o, one)
        assert_states_close(state, one_state)
        outs.append(o)
    assert_close_scaled(torch.cat(outs, 2), whole)


def test_rat_chunk_longer_than_the_call_is_the_same_without_padding():
    q, k, v = qkv(t=40, seed=3)
    kw = dict(chunk_size=1000, gate=0.7)
    out, state = run("rat", kw, q, k, v)
    want, want_state = direct("rat", kw, q, k, v)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert float(state.position) == 40 == float(want_state.position) and state.keys.shape[2] == 0
    more = qkv(t=10, seed=4)
    o2, _ = run("rat", kw, *more, state)
    both, _ = direct("rat", kw, *(torch.cat([a, b], 2) for a, b in zip((q, k, v), more)))
    assert_close_scaled(o2, both[:, :, 40:])


def test_empty_calls_pass_the_state_through():
    q, k, v = qkv()
    _, state = run("lightning", {}, q, k, v)
    out, same = run("lightning", {}, q[:, :, :0], k[:, :, :0], v[:, :, :0], state)
    assert out.shape == (B, HQ, 0, D)
    torch.testing.assert_close(same.s, state.s)
    out, same = run("linear", {}, q[:0], k[:0], v[:0])
    assert out.shape == (0, HQ, T, D) and same is None


def test_return_order_is_out_state_stats():
    q, k, v = qkv()
    out = longattn.attention(q, k, v, causal=True, method="linear")
    assert isinstance(out, torch.Tensor)
    out2, stats = longattn.attention(q, k, v, causal=True, method="linear", return_stats=True)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    assert stats.method == "linear" and stats.path == "chunked" and stats.lse is None
    assert stats.compute_dtype == "float32" and "kernel_s" in stats.extra
    _, state, stats = longattn.attention(q, k, v, causal=True, method="linear", return_state=True, return_stats=True)
    assert isinstance(state, LinearState) and stats.method == "linear"


# -- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_flow(name):
    q, k, v = (x.requires_grad_() for x in qkv(t=20))
    out, state = run(name, CONFIGS[name][0], q, k, v)
    (out.square().sum() + sum(x.sum() for x in state if x.requires_grad)).backward()
    for x in (q, k, v):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- refusals ------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_naming_the_argument():
    q, k, v = qkv()
    _, lin_state = run("linear", {}, q, k, v)
    _, light_state = run("lightning", {}, q, k, v)
    with pytest.raises(ValueError, match="supports only causal=True, got causal=False"):
        longattn.attention(q, k, v, causal=False, method="linear")
    with pytest.raises(ValueError, match="initial_state was given, but method 'dense' carries no recurrent state"):
        longattn.attention(q, k, v, causal=True, method="dense", initial_state=lin_state)
    with pytest.raises(ValueError, match="return_state was given, but method 'window'"):
        longattn.attention(q, k, v, causal=True, method="window", return_state=True)
    with pytest.raises(ValueError, match="initial_state must be a LightningState .* got LinearState"):
        longattn.attention(q, k, v, causal=True, method="lightning", initial_state=lin_state)
    with pytest.raises(ValueError, match="initial_state must be a LinearState .* got dict"):
        longattn.attention(q, k, v, causal=True, method="linear", initial_state={"s": lin_state.s})
    with pytest.raises(ValueError, match=r"initial_state\.s has shape"):
        longattn.attention(q[:1], k[:1], v[:1], causal=True, method="lightning", initial_state=light_state)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        longattn.attention(q, k, v, causal=True, method="linear", return_state=1)
    with pytest.raises(ValueError, match="cross attention .*new tokens only.*initial_state"):
        longattn.attention(q[:, :, -1:], k, v, causal=True, method="linear")
    with pytest.raises(ValueError, match="scale: method 'linear' is a recurrent mixer"):
        longattn.attention(q, k, v, causal=True, method="linear", scale=0.5)
    pad = torch.ones(B, T, dtype=torch.bool, device=q.device)
    refused = [("key_padding_mask", dict(key_padding_mask=pad)),
               ("position", dict(position=longattn.positions.RoPE(D))),
               ("softcap", dict(softcap=30.0)),
               ("seqlens_k", dict(seqlens_k=torch.full((B,), T, device=q.device))),
               ("summaries", dict(summaries=object()))]
    for arg, extra in refused:
        with pytest.raises(ValueError, match=f"{arg} is not supported: method 'rat' is a recurrent mixer"):
            longattn.attention(q, k, v, causal=True, method="rat", **extra)
    with pytest.raises(ValueError, match="cannot take a score bias"):
        longattn.attention(q, k, v, causal=True, method="based", position=longattn.positions.ALiBi(heads=HQ))


def test_scale_reaches_rat():
    q, k, v = qkv()
    out = longattn.attention(q, k, v, causal=True, method="rat", scale=0.3)
    g = torch.full(k.shape, math.log(0.9), device=k.device)
    want, _ = rat_attention(q, k, v, g, g, chunk_size=64, scale=0.3)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,kw,match", [
    ("linear", dict(feature_map="cosine"), "feature_map must be one of"),
    ("linear", dict(random_features=8), "random_features .* needs feature_map='performer'"),
    ("linear", dict(feature_scale=0.0), r"feature_scale must lie in \(0, inf\]"),
    ("linear", dict(normalize=1), "normalize must be a bool"),
    ("lightning", dict(decay=1.5), r"decay must lie in \(0, 1\]"),
    ("lightning", dict(decay=(0.5, 0.0)), r"decay\[1\] must lie in \(0, 1\]"),
    ("lightning", dict(layer=3, layers=3), r"layer must be in \[0, layers\)"),
    ("lightning", dict(decay=0.9, layers=2), "cannot be combined with decay"),
    ("rat", dict(gate=1.0), r"gate must lie in \(0, 1\)"),
    ("rat", dict(gate="0.5"), "gate must be a finite real number"),
])
def test_bad_fields_are_refused_at_construction(name, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        longattn.method(name, **kw)


def test_per_head_decays_must_match_the_heads():
    q, k, v = qkv()
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("lightning", decay=[0.5, 0.6, 0.7, 0.8]))
    lam = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64, device=q.device)
    torch.testing.assert_close(out, lightning_attention(q, k, v, log_decay=lam.log())[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="decay holds 2 values but q has 4 heads"):
        longattn.attention(q, k, v, causal=True, method=longattn.method("lightning", decay=(0.5, 0.6)))


# -- nothing that needs a softmax LSE takes them ---------------------------------------------------


def test_no_lse_merge_gate_or_bridge_takes_a_recurrent_method():
    q, k, v = qkv(t=16)
    out, stats = longattn.attention(q, k, v, causal=True, method="lightning", return_stats=True)
    with pytest.raises(ValueError, match=r"lses\[1\] is None"):
        merge_partials([out, out], [torch.zeros(out.shape[:-1], device=out.device), stats.lse])
    with pytest.raises(ValueError, match="not softmax attention"):
        harness.check_exact("lightning", q, k, v, True)
    rec = harness.run_attention_case("lightning", q, k, v, causal=True, repeats=1)
    assert rec["status"] == "ok" and rec["gate"] is None and "softmax" in rec["gate_note"]
    with pytest.raises(ValueError, match="return_lse: method 'linear' is not softmax attention"):
        longattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                  torch.tensor([0, 16]), torch.tensor([0, 16]), causal=True, method="linear",
                                  return_lse=True)
    packed = longattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                       torch.tensor([0, 9, 16]), torch.tensor([0, 9, 16]), causal=True,
                                       method="linear")
    first = longattn.attention(q[:1, :, :9], k[:1, :, :9], v[:1, :, :9], causal=True, method="linear")
    torch.testing.assert_close(packed[:9], first[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_the_hugging_face_bridge_refuses_them():
    pytest.importorskip("transformers")
    import longattn.hf as hf

    with pytest.raises(ValueError, match="method 'based' is not softmax attention"):
        hf.apply(object(), "based")
