"""Aaren: attention of one query over every prefix, as a recurrence (Feng, Tung, Ahmed, Bengio and
Hajimirsadeghi 2024, "Attention as an RNN").

Aaren's query ``q`` is a learned parameter of the layer (one vector per head), not a function of
the token, so the softmax attention of ``q`` over the prefix ``k_0 … k_t``

    o_t = Σ_{i≤t} exp(s_i) v_i / Σ_{i≤t} exp(s_i),        s_i = scale · q·k_i

is a many-to-many RNN: each step folds one key into a state ``(m, u, w)`` = (running max of the
scores, ``Σ exp(s_i − m)``, ``Σ exp(s_i − m) v_i``) and reads ``o_t = w / u``. Two states combine
with the associative operator

    (m_a, u_a, w_a) ⊕ (m_b, u_b, w_b) = (m, u_a e^{m_a−m} + u_b e^{m_b−m}, w_a e^{m_a−m} + w_b e^{m_b−m}),
    m = max(m_a, m_b),

which is what lets the paper compute every prefix at once with a parallel prefix scan. Here the
scan is chunked (the package's convention): within a chunk of ``C`` tokens the running max comes
from ``torch.cummax`` and each prefix's sums from a masked ``C × C`` matrix of weights
``exp(s_i − m_t)`` (``i ≤ t``, so the exponent is never positive: no overflow whatever the
scores); the state carried from the previous chunks joins through ``⊕``. No per-token loop.

Shapes: ``q [H, Dk]`` (shared by the batch) or ``[B, H, Dk]``; ``k [B, Hkv, T, Dk]``,
``v [B, Hkv, T, Dv]`` with ``H`` a multiple of ``Hkv`` (grouped heads); out ``[B, H, T, Dv]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from longattn.core import validate
from longattn.recurrent.common import (
    check_float_tensor,
    check_heads,
    check_kv,
    check_one_token,
    check_same_dtype_device,
    compute_dtype,
    initial_state_tuple,
)

__all__ = ["AarenState", "aaren_attention", "aaren_attention_naive", "aaren_attention_step", "aaren_state_size"]

class AarenState(NamedTuple):
    """Aaren's recurrent state, float32 (float64 when the inputs are float64).

    Fields:
        m: ``[B, H]`` the running max of the scores seen so far (``-inf`` before any token).
        u: ``[B, H]`` ``Σ exp(s_i − m)``, the softmax denominator relative to ``m``.
        w: ``[B, H, Dv]`` ``Σ exp(s_i − m) v_i``, the numerator relative to ``m``.

    The output after the tokens seen so far is ``w / u``.
    """

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor


def aaren_state_size(heads: int, dv: int) -> int:
    """Bytes of ``AarenState`` per sequence: ``heads · (2 + dv)`` float32 numbers, independent of
    the sequence length (Zoology's ``state_size`` convention, in bytes)."""
    heads = validate.check_positive_int("heads", heads)
    dv = validate.check_positive_int("dv", dv)
    return heads * (2 + dv) * 4


# -- argument checks ---------------------------------------------------------------------------


def _check_inputs(q, k, v, *, step: bool = False) -> tuple[torch.Tensor, int, int, int]:
    """Validate ``q [H, Dk]`` or ``[B, H, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` (``T == 1``
    with ``step``); return ``q`` as ``[B, H, Dk]`` and ``(B, H, Hkv)``. (Aaren's query has no token
    axis, so :func:`~longattn.recurrent.common.check_qkv` does not fit; its parts do.)"""
    check_float_tensor("q", q, "[heads, head_dim]", "[batch, heads, head_dim]")
    check_float_tensor("k", k, "[batch, heads_kv, tokens, head_dim]")
    check_float_tensor("v", v, "[batch, heads_kv, tokens, head_dim_v]")
    check_same_dtype_device(("q", q), ("k", k), ("v", v))
    b, hkv, t, dk = k.shape
    check_kv(k, v)
    if q.dim() == 2:
        q = q.unsqueeze(0).expand(b, *q.shape)
    elif q.shape[0] != b:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {b}: they must match")
    h = q.shape[1]
    if q.shape[2] != dk:
        raise ValueError(f"q has head_dim {q.shape[2]} but k has head_dim {dk}: they must match")
    check_heads(h, hkv)
    if step:
        check_one_token(t, "k and v")
    return q, b, h, hkv


def _check_state(state: object, b: int, h: int, dv: int, dtype: torch.dtype, device,
                 name: str = "initial_state") -> AarenState:
    """``None`` -> the empty state (``m = -inf``, ``u = w = 0``); else an ``AarenState`` of the right
    shapes, in ``dtype``."""
    return initial_state_tuple(  # type: ignore[return-value]
        name, state, AarenState, {"m": (b, h), "u": (b, h), "w": (b, h, dv)}, device, dtype,
        layouts={"m": "[batch, heads]", "u": "[batch, heads]", "w": "[batch, heads, head_dim_v]"},
        empty={"m": -math.inf},
    )


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q·k_i`` for every query head: q ``[B, H, D]``, k ``[B, Hkv, T, D]`` -> ``[B, H, T]``."""
    b, h, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)
    return (qg @ k.transpose(-1, -2)).reshape(b, h, k.shape[2]) * scale


def _grouped_matmul(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p [B, H, Tq, Tk] @ v [B, Hkv, Tk, Dv]`` where query head ``h`` reads value head ``h // (H / Hkv)``."""
    b, h, tq, tk = p.shape
    hkv = v.shape[1]
    return (p.reshape(b, hkv, h // hkv, tq, tk) @ v.unsqueeze(2)).reshape(b, h, tq, v.shape[-1])


def _decay(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """``exp(m_old − m_new)`` (``m_new ≥ m_old``), 0 where ``m_old`` is ``-inf`` (the empty state):
    never ``exp(-inf − -inf) = NaN``, and no NaN gradient through the branch not taken."""
    empty = torch.isneginf(m_old)
    diff = torch.where(empty, torch.zeros_like(m_old), m_old - m_new)
    return torch.where(empty, torch.zeros_like(diff), torch.exp(diff))


# -- the three forms ---------------------------------------------------------------------------


def aaren_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    chunk: int = 256,
    initial_state: AarenState | None = None,
) -> tuple[torch.Tensor, AarenState]:
    """Aaren, chunked parallel scan: the attention of ``q`` over every prefix of ``k, v``.

    Args:
        q: ``[H, Dk]`` (one query per head, shared by the batch: Aaren's learned query) or
            ``[B, H, Dk]``.
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``.
        v: ``[B, Hkv, T, Dv]``.
        scale: score scale, default ``1/sqrt(Dk)``.
        chunk: tokens per chunk; each chunk costs a ``chunk × chunk`` weight matrix per head.
        initial_state: an ``AarenState`` carried from earlier tokens (None: no earlier token).

    Returns:
        ``(out, state)``: ``out [B, H, T, Dv]`` in the input dtype, ``out[:, :, t]`` the softmax
        attention of ``q`` over tokens ``0 … t`` (the state's earlier tokens included), and the
        ``AarenState`` after the last token (float32; float64 for float64 inputs).
    """
    q, b, h, hkv = _check_inputs(q, k, v)
    scale = validate.check_scale(scale, k.shape[-1])
    chunk = validate.check_positive_int("chunk", chunk)
    in_dtype, cdt = k.dtype, compute_dtype(k.dtype)
    t, dv = k.shape[2], v.shape[3]
    m0, u0, w0 = _check_state(initial_state, b, h, dv, cdt, k.device)
    s = _scores(q.to(cdt), k.to(cdt), scale)  # [B, H, T]
    vc = v.to(cdt)
    outs = []
    for c0 in range(0, t, chunk):
        c1 = min(c0 + chunk, t)
        sc = s[..., c0:c1]  # [B, H, C]
        n = c1 - c0
        # the running max of each prefix, the carried state's max included
        m = torch.maximum(torch.cummax(sc, dim=-1).values, m0.unsqueeze(-1))  # [B, H, C]
        # weight of key i in prefix t: exp(s_i − m_t) for i ≤ t; s_i ≤ m_t there, so the exponent
        # is ≤ 0. Keys after t get exponent −inf before the exp (never exp of a positive number).
        later = torch.ones(n, n, dtype=torch.bool, device=k.device).triu(1)
        expo = (sc.unsqueeze(-2) - m.unsqueeze(-1)).masked_fill(later, -math.inf)
        p = torch.exp(expo)  # [B, H, C(t), C(i)]
        carry = _decay(m0.unsqueeze(-1), m)  # [B, H, C]: the earlier tokens' sums rescaled to m_t
        u = carry * u0.unsqueeze(-1) + p.sum(-1)  # [B, H, C]
        w = carry.unsqueeze(-1) * w0.unsqueeze(-2) + _grouped_matmul(p, vc[:, :, c0:c1])  # [B, H, C, Dv]
        outs.append(w / u.unsqueeze(-1))
        m0, u0, w0 = m[..., -1], u[..., -1], w[..., -1, :]
    out = torch.cat(outs, dim=2) if outs else torch.zeros(b, h, 0, dv, dtype=cdt, device=k.device)
    return out.to(in_dtype), AarenState(m0, u0, w0)


def aaren_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: AarenState | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, AarenState]:
    """One token of Aaren (decoding): ``state ⊕ (s, 1, v)``.

    Args:
        q: ``[H, Dk]`` or ``[B, H, Dk]``.
        k: ``[B, Hkv, 1, Dk]``, the new token's key.
        v: ``[B, Hkv, 1, Dv]``.
        scale: score scale, default ``1/sqrt(Dk)``.
        state: the ``AarenState`` before this token (None: none before it).

    Returns:
        ``(out [B, H, 1, Dv]`` in the input dtype, the ``AarenState`` after the token).
    """
    q, b, h, hkv = _check_inputs(q, k, v, step=True)
    scale = validate.check_scale(scale, k.shape[-1])
    in_dtype, cdt = k.dtype, compute_dtype(k.dtype)
    m0, u0, w0 = _check_state(state, b, h, v.shape[3], cdt, k.device, "state")
    s = _scores(q.to(cdt), k.to(cdt), scale)[..., 0]  # [B, H]
    m = torch.maximum(m0, s)
    carry, new = _decay(m0, m), torch.exp(s - m)
    vh = v.to(cdt)[:, :, 0].repeat_interleave(h // hkv, dim=1)  # [B, H, Dv]
    u = carry * u0 + new
    w = carry.unsqueeze(-1) * w0 + new.unsqueeze(-1) * vh
    return (w / u.unsqueeze(-1)).unsqueeze(2).to(in_dtype), AarenState(m, u, w)


def aaren_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: AarenState | None = None,
) -> tuple[torch.Tensor, AarenState]:
    """Aaren's recurrence in float64, one token at a time (the specification the other forms
    are tested against): for each token, ``(m, u, w) ← (m, u, w) ⊕ (s_t, 1, v_t)`` and
    ``o_t = w / u``.

    Same arguments as ``aaren_attention``; returns ``(out [B, H, T, Dv]`` float64,
    ``AarenState`` float64).
    """
    q, b, h, hkv = _check_inputs(q, k, v)
    scale = validate.check_scale(scale, k.shape[-1])
    f64 = torch.float64
    m, u, w = _check_state(initial_state, b, h, v.shape[3], f64, k.device)
    group = h // hkv
    k64 = k.to(f64).repeat_interleave(group, dim=1)  # [B, H, T, Dk]
    v64 = v.to(f64).repeat_interleave(group, dim=1)
    q64 = q.to(f64)
    outs = []
    for t in range(k.shape[2]):
        s = scale * (q64 * k64[:, :, t]).sum(-1)  # [B, H]
        m_new = torch.maximum(m, s)
        a = _decay(m, m_new)  # e^{m_a − m} (0 for the empty state)
        e = torch.exp(s - m_new)  # e^{m_b − m}, with (m_b, u_b, w_b) = (s_t, 1, v_t)
        u = a * u + e
        w = a.unsqueeze(-1) * w + e.unsqueeze(-1) * v64[:, :, t]
        m = m_new
        outs.append(w / u.unsqueeze(-1))
    out = torch.stack(outs, dim=2) if outs else torch.zeros(b, h, 0, v.shape[3], dtype=f64, device=k.device)
    return out, AarenState(m, u, w)
