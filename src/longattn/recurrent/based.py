"""Based: Taylor linear attention + a small exact sliding window (Arora, Eyuboglu, Zhang, Timalsina,
Alberti, Zinsley, Zou, Rudra and Ré 2024, "Simple linear attention language models balance the
recall-throughput tradeoff").

Linear part. ``exp(x)`` is replaced by its 2nd-order Taylor expansion ``1 + x + x²/2`` at
``x = q·k / c``, ``c = sqrt(Dk)``; that kernel is an inner product of features

    φ(x) = [1,  x / c^{1/2},  vec(x ⊗ x) / (sqrt(2) · c)]        (size F = 1 + Dk + Dk²)
    φ(q)·φ(k) = 1 + (q·k)/c + (q·k)² / (2c²),

so causal attention with it is a recurrence over ``S_t = Σ_{i≤t} φ(k_i) v_iᵀ`` ``[F, Dv]`` and
``z_t = Σ_{i≤t} φ(k_i)`` ``[F]``, read as ``o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t``. The kernel equals
``((x + 1)² + 1) / 2 ≥ 1/2``, so the denominator is positive. ``q, k`` are the small projections
the paper feeds the feature map (``Dk`` = 16 in its models): ``Dk`` is the dial that sets the
state size, ``F · Dv`` per head. (``x ⊗ x`` is symmetric, so its ``Dk(Dk+1)/2`` upper triangle,
the off-diagonal entries weighted by ``sqrt(2)``, gives the same inner product in about half the
size; the full outer product is kept here: simpler and exactly the kernel above.)

Window part. A sliding-window softmax attention over the last ``window`` tokens (the query's own
included) recovers the precise local recall the Taylor kernel blurs. It runs on
``longattn``'s exact ``window`` method (``longattn.method("window", window=window)`` with
``causal=True``: each query sees its last ``window`` keys) with its own ``q_window, k_window``
(default ``q, k``), the values ``v`` and the softmax scale ``1/sqrt(head_dim of k_window)``.

What this op returns is the SUM of the two: ``out = linear(q, k, v) + window(q_window, k_window,
v)``. (In the paper's models the two mixers are separate layers, interleaved with gated short
convolutions, each added to the residual stream; summing the outputs is what one layer holding
both mixers side by side on one residual contributes. ``window=0`` gives the linear part alone.)

Chunked form: within a chunk of ``chunk`` tokens the masked ``chunk × chunk`` matrix of kernel
values (computed as ``1 + x + x²/2`` from ``q·k``, never through the ``F``-sized features), across
chunks the state ``(S, z)``. The state also carries the window's KV cache (the last
``window − 1`` keys and values) so prefill in pieces and decoding continue exactly.

Shapes: ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` (``H`` a multiple of
``Hkv``: grouped heads read their key/value head's state), ``q_window [B, H, T, Dw]``,
``k_window [B, Hkv, T, Dw]``; out ``[B, H, T, Dv]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import longattn  # attributes looked up at call time: no import cycle whatever imports this module
from longattn.core import validate
from longattn.core.reference import reference_attention
from longattn.recurrent.common import (
    check_float_tensor,
    check_qkv,
    check_same_dtype_device,
    compute_dtype,
    initial_state_tuple,
)

__all__ = ["BasedState", "based_attention", "based_attention_naive", "based_attention_step", "based_feature_map",
           "based_state_size"]

class BasedState(NamedTuple):
    """Based's recurrent state, float32 (float64 when the inputs are float64).

    Fields:
        s: ``[B, Hkv, F, Dv]`` ``Σ φ(k_i) v_iᵀ``, ``F = 1 + Dk + Dk²``.
        z: ``[B, Hkv, F]`` ``Σ φ(k_i)``.
        k_window: ``[B, Hkv, n, Dw]`` the window's keys of the last ``n = min(window − 1, tokens
            seen)`` tokens, oldest first.
        v_window: ``[B, Hkv, n, Dv]`` their values.
    """

    s: torch.Tensor
    z: torch.Tensor
    k_window: torch.Tensor
    v_window: torch.Tensor


def based_feature_map(x: torch.Tensor) -> torch.Tensor:
    """The 2nd-order Taylor feature map ``[..., Dk] -> [..., 1 + Dk + Dk²]`` with
    ``φ(q)·φ(k) = 1 + q·k/c + (q·k)²/(2c²)``, ``c = sqrt(Dk)`` (computed in ``x``'s dtype)."""
    d = x.shape[-1]
    c = math.sqrt(d)
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * c)
    return torch.cat([torch.ones_like(x[..., :1]), x / math.sqrt(c), second], dim=-1)


def based_state_size(heads: int, feature_dim: int, dv: int, window: int, dtype: torch.dtype = torch.float32,
                     *, window_dim: int | None = None) -> int:
    """Bytes of ``BasedState`` per sequence (Zoology counts the window's cache too).

    Args:
        heads: key/value heads (``Hkv``: grouped query heads share one state).
        feature_dim: ``Dk``, the dimension q and k are projected to (the state dial);
            the feature size is ``F = 1 + Dk + Dk²``.
        dv: value head dim.
        window: the sliding window (0: none); the cache holds ``window − 1`` tokens.
        dtype: the dtype the window's KV cache is counted in (``BasedState`` keeps it in float32;
            a model keeping its KV cache in bfloat16 counts 2 bytes). ``S`` and ``z`` are float32
            accumulators whatever it is.
        window_dim: head dim of the window's keys (default ``feature_dim``).

    Returns:
        ``heads · ((F·dv + F) · 4 + (window − 1) · (window_dim + dv) · itemsize(dtype))``.
    """
    heads = validate.check_positive_int("heads", heads)
    feature_dim = validate.check_positive_int("feature_dim", feature_dim)
    dv = validate.check_positive_int("dv", dv)
    window = validate.check_positive_int("window", window, allow_zero=True)
    window_dim = feature_dim if window_dim is None else validate.check_positive_int("window_dim", window_dim)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    f = 1 + feature_dim + feature_dim**2
    cache = max(window - 1, 0) * (window_dim + dv) * dtype.itemsize
    return heads * ((f * dv + f) * 4 + cache)


# -- argument checks ---------------------------------------------------------------------------


def _check_inputs(q, k, v, q_window, k_window, *, step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the five inputs (``T == 1`` with ``step``); return ``(q_window, k_window)`` with their
    defaults filled in."""
    check_qkv(q, k, v, step=step)
    if q_window is not None:
        check_float_tensor("q_window", q_window, "[batch, heads, tokens, window_dim]")
    if k_window is not None:
        check_float_tensor("k_window", k_window, "[batch, heads_kv, tokens, window_dim]")
    q_window = q if q_window is None else q_window
    k_window = k if k_window is None else k_window
    check_same_dtype_device(("q", q), ("k", k), ("v", v), ("q_window", q_window), ("k_window", k_window))
    if tuple(q_window.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"q_window has shape {tuple(q_window.shape)}, expected [batch, heads, tokens] = "
                         f"{list(q.shape[:3])} like q")
    if tuple(k_window.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"k_window has shape {tuple(k_window.shape)}, expected [batch, heads_kv, tokens] = "
                         f"{list(k.shape[:3])} like k")
    if q_window.shape[3] != k_window.shape[3] or k_window.shape[3] == 0:
        raise ValueError(f"q_window has head_dim {q_window.shape[3]} and k_window {k_window.shape[3]}: "
                         "they must match and be at least 1")
    return q_window, k_window


def _check_state(state: object, k: torch.Tensor, v: torch.Tensor, dw: int, window: int,
                 dtype: torch.dtype, name: str = "initial_state") -> BasedState:
    """``None`` -> zeros and an empty cache; else a ``BasedState`` of the right shapes, in ``dtype``
    (the window caches of one length ``n <= window − 1``)."""
    b, hkv, _, dk = k.shape
    dv, f = v.shape[3], 1 + dk + dk * dk
    cached = getattr(state, "k_window", None)
    if state is None:
        n = 0
    elif isinstance(cached, torch.Tensor) and cached.dim() == 4:
        n = cached.shape[2]  # the caches' length is the state's own (<= window - 1, checked below)
    else:
        n = -1  # a bad cache: the shape check reports it
    state = initial_state_tuple(
        name, state, BasedState,
        {"s": (b, hkv, f, dv), "z": (b, hkv, f), "k_window": (b, hkv, n, dw), "v_window": (b, hkv, n, dv)},
        k.device, dtype,
        layouts={"s": "[batch, heads_kv, F, head_dim_v]", "z": "[batch, heads_kv, F]",
                 "k_window": "[batch, heads_kv, cached, window_dim]",
                 "v_window": "[batch, heads_kv, cached, head_dim_v]"},
        note=f" (feature size F = 1 + Dk + Dk² = {f}; the window caches of one length)",
    )
    if n > max(window - 1, 0):
        raise ValueError(f"{name}.k_window holds {n} tokens but window={window} keeps at most "
                         f"{max(window - 1, 0)} (window − 1)")
    return state  # type: ignore[return-value]


# -- the window part ---------------------------------------------------------------------------


def _window_part(qw, kw, v, state: BasedState, window: int):
    """The sliding-window softmax over the cache + the new tokens; returns ``(out in the compute
    dtype, new k cache, new v cache)``. ``out`` is None when ``window == 0``."""
    cdt = state.s.dtype
    keep = max(window - 1, 0)
    keys = torch.cat([state.k_window, kw.to(cdt)], dim=2)
    values = torch.cat([state.v_window, v.to(cdt)], dim=2)
    first = keys.shape[2] - min(keep, keys.shape[2])
    new_k, new_v = keys[:, :, first:], values[:, :, first:]
    if window == 0 or qw.shape[2] == 0:
        return None, new_k, new_v
    method = longattn.method("window", window=window)
    # the cache is kept in float32; it holds values of the input dtype, so the cast back is exact
    kk, vv = keys.to(qw.dtype), values.to(qw.dtype)
    dw, dv = qw.shape[3], vv.shape[3]
    # longattn's attention takes one head_dim for q, k and v: zero columns pad the narrower side
    # (zeros in q and k add nothing to a score, zeros in v give output columns that are dropped)
    if dv > dw:
        qw, kk = (torch.nn.functional.pad(x, (0, dv - dw)) for x in (qw, kk))
    elif dw > dv:
        vv = torch.nn.functional.pad(vv, (0, dw - dv))
    scale = 1.0 / math.sqrt(dw)
    if qw.dtype == torch.float64:
        # longattn.attention computes float64 inputs in float32, and checks (gradcheck) need
        # float64: the float64 reference on the window method's own mask (the same keys)
        tq, tk = qw.shape[2], kk.shape[2]
        mask = method.visible_mask(tq, tk, True).dense(qw.shape[0], qw.shape[1], tq, tk, device=qw.device)
        out, _ = reference_attention(qw, kk, vv, mask=mask, scale=scale)
    else:
        out = longattn.attention(qw, kk, vv, causal=True, method=method, scale=scale)
    return out[..., :dv].to(cdt), new_k, new_v


# -- the three forms ---------------------------------------------------------------------------


def based_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int = 64,
    q_window: torch.Tensor | None = None,
    k_window: torch.Tensor | None = None,
    chunk: int = 64,
    initial_state: BasedState | None = None,
) -> tuple[torch.Tensor, BasedState]:
    """Based, chunked: Taylor linear attention + sliding-window softmax attention, summed.

    Args:
        q: ``[B, H, T, Dk]`` queries for the feature map (the small projection, e.g. ``Dk = 16``).
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``.
        v: ``[B, Hkv, T, Dv]``, the values of both parts.
        window: the sliding window: each query sees its last ``window`` tokens, itself included
            (the ``window`` method's convention with ``causal=True``); 0: no window part.
        q_window: ``[B, H, T, Dw]`` the window attention's queries (default ``q``).
        k_window: ``[B, Hkv, T, Dw]`` its keys (default ``k``).
        chunk: tokens per chunk of the linear part.
        initial_state: a ``BasedState`` carried from earlier tokens (None: none).

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, the ``BasedState`` after the last token, float32;
        float64 for float64 inputs).
    """
    q_window, k_window = _check_inputs(q, k, v, q_window, k_window)
    window = validate.check_positive_int("window", window, allow_zero=True)
    chunk = validate.check_positive_int("chunk", chunk)
    in_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    state = _check_state(initial_state, k, v, k_window.shape[3], window, cdt)
    b, h, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g, c = h // hkv, math.sqrt(dk)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    s, z = state.s, state.z
    outs = []
    for c0 in range(0, t, chunk):
        c1 = min(c0 + chunk, t)
        n = c1 - c0
        qg = qc[:, :, c0:c1].reshape(b, hkv, g, n, dk)  # query heads grouped by their key/value head
        kb, vb = kc[:, :, c0:c1], vc[:, :, c0:c1]
        # earlier chunks through the state: φ(q)ᵀ S and φ(q)ᵀ z
        phi_q = based_feature_map(qg).reshape(b, hkv, g * n, -1)
        num = (phi_q @ s).reshape(b, hkv, g, n, dv)
        den = (phi_q @ z.unsqueeze(-1)).reshape(b, hkv, g, n)
        # this chunk: the kernel 1 + x + x²/2 on the causal triangle
        x = (qg @ kb.unsqueeze(2).transpose(-1, -2)) / c  # [B, Hkv, G, C, C]
        a = (1 + x + 0.5 * x * x).masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), 0.0)
        num = num + a @ vb.unsqueeze(2)
        den = den + a.sum(-1)
        outs.append((num / den.unsqueeze(-1)).reshape(b, h, n, dv))
        phi_k = based_feature_map(kb)  # [B, Hkv, C, F]
        s = s + phi_k.transpose(-1, -2) @ vb
        z = z + phi_k.sum(-2)
    out = torch.cat(outs, dim=2) if outs else torch.zeros(b, h, 0, dv, dtype=cdt, device=q.device)
    local, kw_cache, vw_cache = _window_part(q_window, k_window, v, state, window)
    if local is not None:
        out = out + local
    return out.to(in_dtype), BasedState(s, z, kw_cache, vw_cache)


def based_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: BasedState | None = None,
    *,
    window: int = 64,
    q_window: torch.Tensor | None = None,
    k_window: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BasedState]:
    """One token of Based (decoding): ``S += φ(k) vᵀ``, ``z += φ(k)``, read ``φ(q)ᵀS / φ(q)ᵀz``,
    plus softmax attention over the cached ``window − 1`` keys and the new one.

    Args: as ``based_attention``, with ``T = 1``, and ``state``: the ``BasedState`` before this
    token (None: none before it). Returns ``(out [B, H, 1, Dv]`` in the input
    dtype, the next ``BasedState``).
    """
    q_window, k_window = _check_inputs(q, k, v, q_window, k_window, step=True)
    window = validate.check_positive_int("window", window, allow_zero=True)
    in_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    state = _check_state(state, k, v, k_window.shape[3], window, cdt, "state")
    b, h, _, dk = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    phi_k = based_feature_map(k.to(cdt)[:, :, 0])  # [B, Hkv, F]
    vt = v.to(cdt)[:, :, 0]  # [B, Hkv, Dv]
    s = state.s + phi_k.unsqueeze(-1) * vt.unsqueeze(-2)
    z = state.z + phi_k
    phi_q = based_feature_map(q.to(cdt)[:, :, 0]).reshape(b, hkv, h // hkv, -1)  # [B, Hkv, G, F]
    out = (phi_q @ s) / (phi_q @ z.unsqueeze(-1))  # [B, Hkv, G, Dv]
    out = out.reshape(b, h, 1, dv)
    local, kw_cache, vw_cache = _window_part(q_window, k_window, v, state, window)
    if local is not None:
        out = out + local
    return out.to(in_dtype), BasedState(s, z, kw_cache, vw_cache)


def based_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int = 64,
    q_window: torch.Tensor | None = None,
    k_window: torch.Tensor | None = None,
    initial_state: BasedState | None = None,
) -> tuple[torch.Tensor, BasedState]:
    """Based in float64, one token at a time (the specification the other forms are tested
    against): ``S_t = S_{t−1} + φ(k_t) v_tᵀ``, ``z_t = z_{t−1} + φ(k_t)``,
    ``o_t = φ(q_t)ᵀS_t / φ(q_t)ᵀz_t + Σ_j softmax_j(q^w_t·k^w_j / sqrt(Dw)) v_j`` over the last
    ``window`` tokens ``j`` (the initial state's cached ones included).

    Same arguments as ``based_attention`` (no ``chunk``); returns float64 ``(out, BasedState)``.
    """
    q_window, k_window = _check_inputs(q, k, v, q_window, k_window)
    window = validate.check_positive_int("window", window, allow_zero=True)
    f64 = torch.float64
    state = _check_state(initial_state, k, v, k_window.shape[3], window, f64)
    b, h, t, _ = q.shape
    hkv, dv, dw = k.shape[1], v.shape[3], k_window.shape[3]
    g = h // hkv
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    qw64, kw64 = q_window.to(f64), k_window.to(f64)
    s, z = state.s, state.z
    keys, values = state.k_window, state.v_window  # every window key so far, oldest first
    outs = []
    for i in range(t):
        phi_k = based_feature_map(k64[:, :, i])  # [B, Hkv, F]
        s = s + phi_k.unsqueeze(-1) * v64[:, :, i].unsqueeze(-2)
        z = z + phi_k
        phi_q = based_feature_map(q64[:, :, i])  # [B, H, F]
        s_h, z_h = s.repeat_interleave(g, dim=1), z.repeat_interleave(g, dim=1)  # query head -> its kv head
        o = (phi_q.unsqueeze(-2) @ s_h).squeeze(-2) / (phi_q * z_h).sum(-1, keepdim=True)  # [B, H, Dv]
        keys = torch.cat([keys, kw64[:, :, i:i + 1]], dim=2)
        values = torch.cat([values, v64[:, :, i:i + 1]], dim=2)
        if window > 0:
            kw_last = keys[:, :, -window:].repeat_interleave(g, dim=1)  # [B, H, ≤W, Dw]
            vw_last = values[:, :, -window:].repeat_interleave(g, dim=1)
            scores = (kw_last @ qw64[:, :, i].unsqueeze(-1)).squeeze(-1) / math.sqrt(dw)  # [B, H, ≤W]
            p = torch.softmax(scores, dim=-1)
            o = o + (p.unsqueeze(-2) @ vw_last).squeeze(-2)
        outs.append(o)
    out = torch.stack(outs, dim=2) if outs else torch.zeros(b, h, 0, dv, dtype=f64, device=q.device)
    keep = max(window - 1, 0)
    n = min(keep, keys.shape[2])
    return out, BasedState(s, z, keys[:, :, keys.shape[2] - n:], values[:, :, values.shape[2] - n:])
