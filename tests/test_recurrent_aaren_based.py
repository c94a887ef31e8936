"""Aaren (attention as an RNN) and Based (Taylor linear attention + sliding window): the float64
references written from the papers' equations, then naive == chunked == step, prefill in pieces
and decoding, gradients, half dtypes, batch invariance and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.recurrent.aaren import (
    AarenState,
    aaren_attention,
    aaren_attention_naive,
    aaren_attention_step,
    aaren_state_size,
)
from longattn.recurrent.based import (
    BasedState,
    based_attention,
    based_attention_naive,
    based_attention_step,
    based_feature_map,
    based_state_size,
)

from conftest import rel_rmse

F64 = torch.float64


def randn(*shape, seed=0, dtype=torch.float32, mul=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * mul).to(dtype)




def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).abs().max()) if a.numel() else 0.0


def assert_states_close(a, b, tol):
    for name, x, y in zip(type(a)._fields, a, b):
        assert x.shape == y.shape, name
        scale = max(1.0, float(y.to(F64).abs().max())) if y.numel() else 1.0
        assert max_err(x, y) <= tol * scale, (name, max_err(x, y))


# -- Aaren ---------------------------------------------------------------------------------------


def aaren_inputs(b=2, h=4, hkv=2, t=40, d=8, dv=6, dtype=torch.float32, seed=0, batched_q=False, kmul=1.0):
    q = randn(*((b, h, d) if batched_q else (h, d)), seed=seed, dtype=dtype)
    k = randn(b, hkv, t, d, seed=seed + 1, dtype=dtype, mul=kmul)
    v = randn(b, hkv, t, dv, seed=seed + 2, dtype=dtype)
    return q, k, v


def prefix_softmax_reference(q, k, v, scale):
    """For every t, softmax over s_0 … s_t of the one query, in float64, from scratch."""
    b, hkv, t, d = k.shape
    h = q.shape[-2]
    q64 = q.to(F64).expand(b, h, d)
    k64 = k.to(F64).repeat_interleave(h // hkv, dim=1)
    v64 = v.to(F64).repeat_interleave(h // hkv, dim=1)
    s = scale * torch.einsum("bhd,bhtd->bht", q64, k64)
    out = torch.empty(b, h, t, v.shape[-1], dtype=F64)
    for i in range(t):
        out[:, :, i] = torch.einsum("bht,bhtd->bhd", torch.softmax(s[:, :, : i + 1], dim=-1), v64[:, :, : i + 1])
    return out


@pytest.mark.parametrize("batched_q", [False, True])
@pytest.mark.parametrize("mul", [1.0, 50.0])
def test_aaren_is_softmax_over_every_prefix(batched_q, mul):
    q, k, v = aaren_inputs(batched_q=batched_q, kmul=4.0 if mul > 1 else 1.0)
    scale = mul / math.sqrt(q.shape[-1])  # × 50 on keys × 4: scores in the hundreds, exp would overflow
    ref = prefix_softmax_reference(q, k, v, scale)
    naive, _ = aaren_attention_naive(q, k, v, scale=scale)
    assert max_err(naive, ref) <= 1e-12
    out64, _ = aaren_attention(q.to(F64), k.to(F64), v.to(F64), scale=scale, chunk=16)
    assert max_err(out64, ref) <= 1e-12
    out, state = aaren_attention(q, k, v, scale=scale, chunk=16)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.isfinite(x).all() for x in state)
    # fp32 rounding of scores in the hundreds moves the weights by ~|s|·1e-7
    assert max_err(out, ref) <= (1e-5 if mul == 1.0 else 2e-4)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_aaren_naive_chunked_step_agree_fp32(chunk):
    q, k, v = aaren_inputs(t=48)
    naive, s_naive = aaren_attention_naive(q, k, v)
    out, state = aaren_attention(q, k, v, chunk=chunk)
    assert out.shape == (2, 4, 48, 6) and out.dtype == torch.float32
    assert max_err(out, naive) <= 1e-5
    assert_states_close(state, s_naive, 1e-5)
    assert all(x.dtype == torch.float32 for x in state)
    st_, steps = None, []
    for t in range(k.shape[2]):
        o, st_ = aaren_attention_step(q, k[:, :, t:t + 1], v[:, :, t:t + 1], st_)
        steps.append(o)
    assert max_err(torch.cat(steps, dim=2), naive) <= 1e-5
    assert_states_close(st_, s_naive, 1e-5)


def test_aaren_initial_state_is_empty_and_nan_free():
    q, k, v = aaren_inputs(b=1, t=3)
    zero = AarenState(torch.full((1, 4), -math.inf), torch.zeros(1, 4), torch.zeros(1, 4, 6))
    a, _ = aaren_attention(q, k, v, initial_state=zero)
    b_, _ = aaren_attention(q, k, v)
    assert torch.equal(a, b_)
    empty, st0 = aaren_attention(q, k[:, :, :0], v[:, :, :0])
    assert empty.shape == (1, 4, 0, 6) and torch.isneginf(st0.m).all() and not any(x.isnan().any() for x in st0)
    # gradients through the empty state are finite
    qg = q.to(F64).requires_grad_()
    out, _ = aaren_attention(qg, k.to(F64), v.to(F64), initial_state=zero)
    out.sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_aaren_gradients_match_naive_and_gradcheck():
    q, k, v = aaren_inputs(b=2, h=4, hkv=2, t=21, d=5, dv=3, dtype=F64, batched_q=True)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    w = randn(2, 4, 21, 3, seed=9, dtype=F64)
    out, st_ = aaren_attention(*ins, chunk=8)
    ((out * w).sum() + st_.w.sum()).backward()
    fast = [x.grad for x in ins]
    ins2 = [x.clone().requires_grad_() for x in (q, k, v)]
    out2, st2 = aaren_attention_naive(*ins2)
    ((out2 * w).sum() + st2.w.sum()).backward()
    for a, b_ in zip(fast, (x.grad for x in ins2)):
        assert max_err(a, b_) <= 1e-5
    small = [x.requires_grad_() for x in aaren_inputs(b=1, h=2, hkv=1, t=5, d=3, dv=2, dtype=F64, seed=3)]
    assert torch.autograd.gradcheck(lambda q_, k_, v_: aaren_attention(q_, k_, v_, chunk=2)[0], small)


@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.integers(0, 37), max_size=3), chunk=st.sampled_from([4, 5, 16]))
def test_aaren_prefill_in_pieces_equals_one_pass(cuts, chunk):
    q, k, v = aaren_inputs(t=37, seed=5)
    whole, s_whole = aaren_attention(q, k, v, chunk=chunk)
    bounds = [0, *sorted(cuts), 37]
    state, parts = None, []
    for a, b_ in zip(bounds, bounds[1:]):
        o, state = aaren_attention(q, k[:, :, a:b_], v[:, :, a:b_], chunk=chunk, initial_state=state)
        parts.append(o)
    assert max_err(torch.cat(parts, dim=2), whole) <= 1e-5
    assert_states_close(state, s_whole, 1e-5)


def test_aaren_decode_after_prefill_equals_one_pass():
    q, k, v = aaren_inputs(t=30, seed=7)
    whole, _ = aaren_attention(q, k, v, chunk=8)
    out, state = aaren_attention(q, k[:, :, :19], v[:, :, :19], chunk=8)
    outs = [out]
    for t in range(19, 30):
        o, state = aaren_attention_step(q, k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    assert max_err(torch.cat(outs, dim=2), whole) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aaren_half_inputs(dtype):
    q, k, v = aaren_inputs(t=64, dtype=dtype)
    out, state = aaren_attention(q, k, v, chunk=16)
    assert out.dtype == dtype and all(x.dtype == torch.float32 for x in state)
    ref, _ = aaren_attention_naive(q, k, v)
    assert rel_rmse(out, ref) <= 0.005
    o, _ = aaren_attention_step(q, k[:, :, :1], v[:, :, :1])
    assert o.dtype == dtype


def test_aaren_batch_invariance_bitwise():
    q, k, v = aaren_inputs(b=3, t=33, batched_q=True)
    out, state = aaren_attention(q, k, v, chunk=8)
    for i in range(3):
        oi, si = aaren_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], chunk=8)
        assert torch.equal(oi, out[i:i + 1])
        assert all(torch.equal(a, b_[i:i + 1]) for a, b_ in zip(si, state))


def test_aaren_state_size():
    assert aaren_state_size(8, 64) == 8 * 66 * 4
    q, k, v = aaren_inputs(b=1, h=4, t=5, dv=6)
    _, state = aaren_attention(q, k, v)
    assert sum(x.numel() * x.element_size() for x in state) == aaren_state_size(4, 6)


def test_aaren_bad_arguments():
    q, k, v = aaren_inputs(t=4)
    with pytest.raises(ValueError, match=r"q must have rank 2 \[heads, head_dim\] or rank 3"):
        aaren_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have rank 4"):
        aaren_attention(q, k[0], v)
    with pytest.raises(ValueError, match="q has head_dim 7 but k has head_dim 8"):
        aaren_attention(q[:, :7], k, v)
    with pytest.raises(ValueError, match="k has 2 heads but q has 3"):
        aaren_attention(q[:3], k, v)
    with pytest.raises(ValueError, match="v has shape"):
        aaren_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="q has batch 5 but k has batch 2"):
        aaren_attention(q.expand(5, 4, 8), k, v)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        aaren_attention(q.half(), k, v)
    with pytest.raises(TypeError, match="k has dtype torch.int64"):
        aaren_attention(q, k.long(), v)
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        aaren_attention(q, k, v, chunk=0)
    with pytest.raises(TypeError, match="chunk must be an int"):
        aaren_attention(q, k, v, chunk=2.5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        aaren_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match=r"initial_state.w has shape \(2, 4, 5\)"):
        aaren_attention(q, k, v, initial_state=AarenState(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, 5)))
    with pytest.raises(TypeError, match="initial_state must be an AarenState"):
        aaren_attention(q, k, v, initial_state=torch.zeros(3))
    with pytest.raises(ValueError, match="tokens == 1"):
        aaren_attention_step(q, k, v)
    with pytest.raises(ValueError, match=r"state.m has shape \(3, 4\)"):
        aaren_attention_step(q, k[:, :, :1], v[:, :, :1], AarenState(torch.zeros(3, 4), torch.zeros(2, 4),
                                                                     torch.zeros(2, 4, 6)))
    with pytest.raises(ValueError, match="heads must be a positive int"):
        aaren_state_size(0, 4)


# -- Based ---------------------------------------------------------------------------------------


def based_inputs(b=2, h=4, hkv=2, t=40, dk=4, dv=6, dw=None, dtype=torch.float32, seed=0):
    q = randn(b, h, t, dk, seed=seed, dtype=dtype)
    k = randn(b, hkv, t, dk, seed=seed + 1, dtype=dtype)
    v = randn(b, hkv, t, dv, seed=seed + 2, dtype=dtype)
    if dw is None:
        return q, k, v, {}
    qw = randn(b, h, t, dw, seed=seed + 3, dtype=dtype)
    kw = randn(b, hkv, t, dw, seed=seed + 4, dtype=dtype)
    return q, k, v, dict(q_window=qw, k_window=kw)


def based_reference(q, k, v, window, q_window=None, k_window=None):
    """Straight from the paper's equations, in float64, without features or state: the Taylor
    kernel 1 + x + x²/2 (x = q·k/sqrt(Dk)) normalised over the causal prefix, plus softmax over
    the last ``window`` keys (scale 1/sqrt(Dw))."""
    q_window = q if q_window is None else q_window
    k_window = k if k_window is None else k_window
    g = q.shape[1] // k.shape[1]
    q64, qw64 = q.to(F64), q_window.to(F64)
    k64, v64, kw64 = (x.to(F64).repeat_interleave(g, dim=1) for x in (k, v, k_window))
    t = q.shape[2]
    x = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    kern = (1 + x + x * x / 2) * causal
    out = (kern @ v64) / kern.sum(-1, keepdim=True)
    if window:
        pos = torch.arange(t)
        near = causal & (pos[:, None] - pos[None, :] < window)
        scores = (qw64 @ kw64.transpose(-1, -2) / math.sqrt(qw64.shape[-1])).masked_fill(~near, -math.inf)
        out = out + torch.softmax(scores, dim=-1) @ v64
    return out


def test_based_feature_map_is_the_taylor_kernel():
    x, y = randn(5, 16, seed=1, dtype=F64), randn(5, 16, seed=2, dtype=F64)
    fx, fy = based_feature_map(x), based_feature_map(y)
    assert fx.shape == (5, 1 + 16 + 256)
    d = (x * y).sum(-1) / 4.0
    assert max_err((fx * fy).sum(-1), 1 + d + d * d / 2) <= 1e-12


@pytest.mark.parametrize("window,dw", [(0, None), (1, None), (5, None), (16, 3), (64, 9)])
def test_based_matches_its_equations(window, dw):
    q, k, v, wkw = based_inputs(t=40, dw=dw)
    ref = based_reference(q, k, v, window, **wkw)
    naive, _ = based_attention_naive(q, k, v, window=window, **wkw)
    assert max_err(naive, ref) <= 1e-12
    out, _ = based_attention(q, k, v, window=window, chunk=16, **wkw)
    assert out.dtype == torch.float32
    assert max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("window", [0, 5, 16])
def test_based_naive_chunked_step_agree_fp32(chunk, window):
    q, k, v, wkw = based_inputs(t=48, dw=5)
    naive, s_naive = based_attention_naive(q, k, v, window=window, **wkw)
    out, state = based_attention(q, k, v, window=window, chunk=chunk, **wkw)
    assert out.shape == (2, 4, 48, 6)
    assert max_err(out, naive) <= 1e-5
    assert_states_close(state, s_naive, 1e-5)
    assert state.k_window.shape == (2, 2, max(window - 1, 0), 5)
    assert all(x.dtype == torch.float32 for x in state)
    st_, steps = None, []
    for t in range(48):
        sl = slice(t, t + 1)
        o, st_ = based_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], st_, window=window,
                                      **{n: x[:, :, sl] for n, x in wkw.items()})
        steps.append(o)
    assert max_err(torch.cat(steps, dim=2), naive) <= 1e-5
    assert_states_close(st_, s_naive, 1e-5)


def test_based_gradients_match_naive_and_gradcheck():
    q, k, v, wkw = based_inputs(t=19, dk=3, dv=4, dw=2, dtype=F64)
    names = ["q", "k", "v", "q_window", "k_window"]
    w = randn(2, 4, 19, 4, seed=9, dtype=F64)

    def grads(fn, **kw):
        ins = [x.clone().requires_grad_() for x in (q, k, v, wkw["q_window"], wkw["k_window"])]
        out, st_ = fn(*ins[:3], q_window=ins[3], k_window=ins[4], window=6, **kw)
        ((out * w).sum() + st_.s.sum() + st_.v_window.sum()).backward()
        return [x.grad for x in ins]

    for name, a, b_ in zip(names, grads(based_attention, chunk=8), grads(based_attention_naive)):
        assert max_err(a, b_) <= 1e-5, name
    small = [x.requires_grad_() for x in based_inputs(b=1, h=2, hkv=1, t=5, dk=2, dv=3, dtype=F64, seed=3)[:3]]
    assert torch.autograd.gradcheck(lambda q_, k_, v_: based_attention(q_, k_, v_, window=3, chunk=2)[0], small)


@settings(max_examples=6, deadline=None)
@given(cuts=st.lists(st.integers(0, 37), max_size=3), chunk=st.sampled_from([4, 5, 16]),
       window=st.sampled_from([0, 2, 6, 40]))
def test_based_prefill_in_pieces_equals_one_pass(cuts, chunk, window):
    q, k, v, wkw = based_inputs(t=37, dw=3, seed=5)
    whole, s_whole = based_attention(q, k, v, window=window, chunk=chunk, **wkw)
    bounds = [0, *sorted(cuts), 37]
    state, parts = None, []
    for a, b_ in zip(bounds, bounds[1:]):
        sl = slice(a, b_)
        o, state = based_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], window=window, chunk=chunk,
                                   initial_state=state, **{n: x[:, :, sl] for n, x in wkw.items()})
        parts.append(o)
    assert max_err(torch.cat(parts, dim=2), whole) <= 1e-5
    assert_states_close(state, s_whole, 1e-5)


@pytest.mark.parametrize("prefill", [0, 3, 12])
def test_based_decode_after_prefill_crosses_the_window(prefill):
    window = 8  # prefill 3 < window − 1 ≤ 12: decoding fills the cache, then slides it
    q, k, v, wkw = based_inputs(t=30, dw=4, seed=7)
    whole, _ = based_attention(q, k, v, window=window, chunk=8, **wkw)
    ref = based_reference(q, k, v, window, **wkw)
    sl = slice(0, prefill)
    out, state = based_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], window=window, chunk=8,
                                 **{n: x[:, :, sl] for n, x in wkw.items()})
    outs = [out]
    for t in range(prefill, 30):
        sl = slice(t, t + 1)
        o, state = based_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, window=window,
                                        **{n: x[:, :, sl] for n, x in wkw.items()})
        assert state.k_window.shape[2] == min(t + 1, window - 1)
        outs.append(o)
    got = torch.cat(outs, dim=2)
    assert max_err(got, whole) <= 1e-5 and max_err(got, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_based_half_inputs(dtype):
    q, k, v, wkw = based_inputs(t=64, dk=16, dv=16, dw=16, dtype=dtype)
    out, state = based_attention(q, k, v, window=8, chunk=16, **wkw)
    assert out.dtype == dtype and all(x.dtype == torch.float32 for x in state)
    ref, _ = based_attention_naive(q, k, v, window=8, **wkw)
    assert rel_rmse(out, ref) <= 0.005
    o, _ = based_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, window=8,
                                **{n: x[:, :, :1] for n, x in wkw.items()})
    assert o.dtype == dtype


def test_based_batch_invariance_bitwise():
    q, k, v, wkw = based_inputs(b=3, t=33, dw=5)
    out, state = based_attention(q, k, v, window=6, chunk=8, **wkw)
    for i in range(3):
        oi, si = based_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], window=6, chunk=8,
                                 **{n: x[i:i + 1] for n, x in wkw.items()})
        assert torch.equal(oi, out[i:i + 1])
        assert all(torch.equal(a, b_[i:i + 1]) for a, b_ in zip(si, state))


def test_based_state_size():
    f = 1 + 16 + 256
    assert based_state_size(2, 16, 64, 64) == 2 * ((f * 64 + f) * 4 + 63 * (16 + 64) * 4)
    assert based_state_size(2, 16, 64, 64, torch.bfloat16) == 2 * ((f * 64 + f) * 4 + 63 * 80 * 2)
    assert based_state_size(2, 16, 64, 0) == 2 * (f * 64 + f) * 4
    q, k, v, wkw = based_inputs(b=1, t=20, dk=4, dv=6, dw=3)
    _, state = based_attention(q, k, v, window=8, **wkw)
    assert sum(x.numel() * x.element_size() for x in state) == based_state_size(2, 4, 6, 8, window_dim=3)


def test_based_bad_arguments():
    q, k, v, wkw = based_inputs(t=6, dw=3)
    with pytest.raises(ValueError, match="q must have rank 4"):
        based_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k has shape .* but q has"):
        based_attention(q[..., :3], k, v)
    with pytest.raises(ValueError, match="k has 2 heads but q has 3"):
        based_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="v has shape"):
        based_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="q_window has shape"):
        based_attention(q, k, v, q_window=wkw["q_window"][:, :, :2], k_window=wkw["k_window"])
    with pytest.raises(ValueError, match="q_window has head_dim 3 and k_window 4"):
        based_attention(q, k, v, q_window=wkw["q_window"])
    with pytest.raises(TypeError, match="must share one dtype"):
        based_attention(q, k, v.half())
    with pytest.raises(TypeError, match="k_window must be a torch.Tensor"):
        based_attention(q, k, v, k_window=[1, 2])
    with pytest.raises(ValueError, match="window must be a non-negative int, got -1"):
        based_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        based_attention(q, k, v, chunk=0)
    _, state = based_attention(q, k, v, window=8)
    with pytest.raises(ValueError, match="initial_state.k_window holds 6 tokens but window=4"):
        based_attention(q, k, v, window=4, initial_state=state)
    with pytest.raises(ValueError, match=r"initial_state.s has shape"):
        based_attention(q, k, v, window=8, initial_state=state._replace(s=state.s[..., :2]))
    with pytest.raises(TypeError, match="initial_state must be a BasedState"):
        based_attention(q, k, v, initial_state=(1, 2))
    with pytest.raises(ValueError, match="tokens == 1"):
        based_attention_step(q, k, v)
    with pytest.raises(TypeError, match="state must be a BasedState"):
        based_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], "nope")
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        based_state_size(2, 0, 4, 8)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        based_state_size(2, 4, 4, 8, dtype="bf16")
    assert isinstance(state, BasedState)
