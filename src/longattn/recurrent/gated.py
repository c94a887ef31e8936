"""Gated Linear Attention (GLA): linear attention whose state decays by a data-dependent,
per-key-channel forget gate.

Yang, Wang, Shen, Panda, Kim 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training". Per batch row and key/value head, with the state ``S`` of shape ``[Dk, Dv]``::

    S_t = Diag(α_t) S_{t-1} + k_t v_tᵀ          α_t = exp(log_gate_t) ∈ (0, 1]^Dk
    o_t = scale · S_tᵀ q_t

The output at ``t`` reads the state *after* token ``t`` is written (the token attends to itself).

Chunked form (the paper's §4, written here for stability in plain PyTorch). Split the sequence
into chunks of ``C`` tokens and each chunk into sub-chunks of ``c = 16`` tokens (the largest divisor
of ``C`` not above 16). With ``b_i = Σ_{s≤i} log α_s`` counted from the chunk's start, query ``i`` of a
chunk whose incoming state is ``S`` gets::

    o_i = (q_i ⊙ exp(b_i))ᵀ S  +  Σ_{j≤i in chunk} A_ij v_j,     A_ij = Σ_d q_id k_jd exp(b_id − b_jd)

and the state leaving the chunk is ``Diag(exp(b_C)) S + Σ_j (k_j ⊙ exp(b_C − b_j)) v_jᵀ``.
Every exponent above is a sum of log gates over a forward stretch of tokens, hence ≤ 0, so no
``exp`` overflows whatever the gates are:

* inside a sub-chunk (``i, j`` both in sub-chunk ``I``) ``A_ij`` is formed pairwise, with the
  exponent ``Σ_{j<s≤i} log α_s`` summed per pair and channel (a ``[c, c, Dk]`` tensor);
* across sub-chunks (``j`` in ``J < I``) both factors are taken relative to ``r``, the last token
  before sub-chunk ``I``: ``A_ij = (q_i ⊙ exp(b_i − b_r)) · (k_j ⊙ exp(b_r − b_j))``, one matmul, and
  both exponents are ≤ 0 (``j ≤ r < i``).

Exponents are built from sums over the stretch they span (per-pair sums, cumulative sums local to
a sub-chunk, suffix sums, sums of whole sub-chunks in between), never as the difference of two
long prefix sums, so in float32 the weights of near tokens stay accurate even where some channels
forget hard (e.g. −50 per step) and others hardly at all.

Grouped heads: ``k``, ``v`` and ``log_gate`` may have ``Hkv`` heads, each serving ``H / Hkv`` query
heads (query head ``h`` reads key/value head ``h // (H / Hkv)``). The state depends only on
``k, v, log_gate``, so it belongs to the key/value head and is ``[B, Hkv, Dk, Dv]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from longattn.core import validate
from longattn.recurrent.common import (
    check_per_token,
    check_qkv,
    compute_dtype,
    initial_state_tensor,
    pad_tokens,
    segment_sums,
    sums_after,
)

__all__ = [
    "GLAState",
    "gla_attention",
    "gla_attention_naive",
    "gla_attention_step",
    "gla_state_size",
]

#: the sub-chunk inside which intra-chunk scores are formed pairwise (the largest divisor of the
#: chunk not above this is used)
SUB_CHUNK = 16


class GLAState(NamedTuple):
    """The GLA recurrent state.

    Fields:
        s: ``[B, Hkv, Dk, Dv]`` float32 (float64 from the naive form, or when the inputs are
            float64): ``S`` in ``o_t = scale · S_tᵀ q_t``.
    """

    s: torch.Tensor


# -- argument checks ------------------------------------------------------------------------


def _check_inputs(q, k, v, log_gate, *, step: bool) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``,
    ``log_gate [B, Hkv, T, Dk]``; return ``(B, H, Hkv, T, Dk, Dv)``."""
    b, h, hkv, t, dk, dv = check_qkv(q, k, v, step=step)
    check_per_token("log_gate", log_gate, (b, hkv, t, dk), q.device, low=-math.inf, high=0.0,
                    what="finite and <= 0 (the log of a forget gate in (0, 1])",
                    layout="[batch, heads_kv, tokens, head_dim_k]", note=" (one gate per key channel, following k)")
    return b, h, hkv, t, dk, dv


def _initial(state, b: int, hkv: int, dk: int, dv: int, device, dtype, name: str) -> torch.Tensor:
    """The state tensor ``s [B, Hkv, Dk, Dv]`` to start from (zeros for None), in the compute dtype."""
    return initial_state_tensor(name, state, GLAState, (b, hkv, dk, dv), device, dtype,
                                layout="[batch, heads_kv, head_dim_k, head_dim_v]")


def _sub_chunk(chunk: int) -> int:
    return max(d for d in range(1, min(SUB_CHUNK, chunk) + 1) if chunk % d == 0)


# -- the three forms ------------------------------------------------------------------------


def gla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    scale: float | None = None,
    chunk: int = 64,
    initial_state: GLAState | None = None,
) -> tuple[torch.Tensor, GLAState]:
    """Gated linear attention, chunked parallel form (prefill and training).

    Args:
        q: ``[B, H, T, Dk]``.
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``.
        v: ``[B, Hkv, T, Dv]``.
        log_gate: ``[B, Hkv, T, Dk]``, finite and ``<= 0``: ``log α_t`` per key channel (in a model,
            e.g. ``logsigmoid(x W) / τ``).
        scale: multiplies ``q``; default ``1/sqrt(Dk)``.
        chunk: tokens per chunk (any positive int; it need not divide ``T``).
        initial_state: the state after an earlier part of the sequence; None starts from zeros.

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, ``GLAState(s [B, Hkv, Dk, Dv]))``. States and
        sums are float32 (float64 for float64 inputs).
    """
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_gate, step=False)
    scale = validate.check_scale(scale, dk)
    chunk = validate.check_positive_int("chunk", chunk)
    cdt = compute_dtype(q.dtype)
    s = _initial(initial_state, b, hkv, dk, dv, q.device, cdt, "initial_state")
    if t == 0:
        return q.new_zeros(b, h, 0, dv), GLAState(s.clone())
    grp = h // hkv
    sub = _sub_chunk(chunk)
    n, m = -(-t // chunk), chunk // sub
    pad = n * chunk - t  # padded tokens: k = v = 0 and gate 1 leave the state as it is

    qs = (pad_tokens(q, pad, cdt) * scale).view(b, hkv, grp, n, m, sub, dk)
    ks = pad_tokens(k, pad, cdt).view(b, hkv, n, m, sub, dk)
    vs = pad_tokens(v, pad, cdt).view(b, hkv, n, chunk, dv)
    gs = pad_tokens(log_gate, pad, cdt).view(b, hkv, n, m, sub, dk)

    # intra-chunk scores, sub-chunk I (rows) against sub-chunks J < I (columns): both sides decayed
    # to r_I, the last token before sub-chunk I
    local = gs.cumsum(-2)  # b_i - b_{r_I} for i in I
    total = local[..., -1, :]  # [b, hkv, n, m, dk]: a whole sub-chunk's log decay
    upto = total.cumsum(-2)  # Σ_{K≤J}
    before = F.pad(upto[..., :-1, :], (0, 0, 1, 0))  # Σ_{K<I}
    between = before[..., :, None, :] - upto[..., None, :, :]  # [.., m(I), m(J), dk]: Σ_{J<K<I}
    expo = between[..., None, :] + sums_after(gs)[..., None, :, :, :]  # b_{r_I} - b_j, j in J
    mi = torch.arange(m, device=q.device)
    earlier = (mi[:, None] > mi[None, :])[:, :, None, None]  # J < I
    expo = torch.where(earlier, expo, expo.new_full((), -math.inf))
    k_off = (ks[..., None, :, :, :] * expo.exp()).reshape(b, hkv, n, m, chunk, dk)
    q_off = qs * local.exp()[:, :, None]
    scores = q_off @ k_off[:, :, None].transpose(-1, -2)  # [b, hkv, grp, n, m, sub, chunk]

    # inside a sub-chunk: pairwise decay per channel, exp(Σ_{j<s≤i} log α_s); the exponent is -inf
    # above the diagonal (weight 0, the causal mask) and never positive: nothing overflows
    k_diag = ks[..., None, :, :] * segment_sums(gs).exp()  # [b, hkv, n, m, sub(i), sub(j), dk]
    diag = (k_diag[:, :, None] @ qs[..., None]).squeeze(-1)  # [b, hkv, grp, n, m, sub(i), sub(j)]
    eye = torch.eye(m, dtype=cdt, device=q.device)[:, None, :, None]
    scores = scores.view(b, hkv, grp, n, m, sub, m, sub) + diag.unsqueeze(-2) * eye
    out = scores.view(b, hkv, grp, n, chunk, chunk) @ vs[:, :, None]

    # across chunks: the incoming state, read with the decay since the chunk's start
    g_flat = gs.view(b, hkv, n, chunk, dk)
    cum = g_flat.cumsum(-2)  # b_i
    q_in = qs.view(b, hkv, grp, n, chunk, dk) * cum.exp()[:, :, None]
    k_out = ks.view(b, hkv, n, chunk, dk) * sums_after(g_flat).exp()  # k_j ⊙ exp(b_C - b_j)
    decay = cum[..., -1, :].exp()[..., None]  # [b, hkv, n, dk, 1]
    incoming = []
    for c in range(n):
        incoming.append(s)
        s = decay[:, :, c] * s + k_out[:, :, c].transpose(-1, -2) @ vs[:, :, c]
    out = out + q_in @ torch.stack(incoming, dim=2)[:, :, None]
    out = out.reshape(b, hkv, grp, n * chunk, dv)[:, :, :, :t].reshape(b, h, t, dv)
    return out.to(q.dtype), GLAState(s)


def gla_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: GLAState | None = None,
) -> tuple[torch.Tensor, GLAState]:
    """Gated linear attention as the paper's recurrence, one token at a time in float64 (the
    specification the other forms are tested against).

    Arguments as :func:`gla_attention`. Returns ``(out [B, H, T, Dv]`` float64,
    ``GLAState(s [B, Hkv, Dk, Dv]`` float64``))``.
    """
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_gate, step=False)
    scale = validate.check_scale(scale, dk)
    f64 = torch.float64
    s = _initial(initial_state, b, hkv, dk, dv, q.device, f64, "initial_state")
    q64 = q.to(f64).view(b, hkv, h // hkv, t, dk) * scale
    k64, v64, g64 = k.to(f64), v.to(f64), log_gate.to(f64)
    outs = []
    for i in range(t):
        alpha = g64[:, :, i].exp()  # [b, hkv, dk]
        s = torch.diag_embed(alpha) @ s + k64[:, :, i, :, None] @ v64[:, :, i, None, :]  # Diag(α) S + k vᵀ
        outs.append(s.transpose(-1, -2)[:, :, None] @ q64[:, :, :, i, :, None])  # Sᵀ q
    out = torch.stack(outs, dim=3).squeeze(-1) if t else q64.new_zeros(b, hkv, h // hkv, 0, dv)
    return out.reshape(b, h, t, dv), GLAState(s)


def gla_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    state: GLAState | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, GLAState]:
    """One decoding step of gated linear attention.

    Args:
        q: ``[B, H, 1, Dk]``; ``k [B, Hkv, 1, Dk]``; ``v [B, Hkv, 1, Dv]``;
        log_gate: ``[B, Hkv, 1, Dk]``, finite and ``<= 0``.
        state: the state so far (``GLAState(s [B, Hkv, Dk, Dv])``); None means zeros.
        scale: multiplies ``q``; default ``1/sqrt(Dk)``.

    Returns:
        ``(out [B, H, 1, Dv]`` in the input dtype, the next ``GLAState``).
    """
    b, h, hkv, _, dk, dv = _check_inputs(q, k, v, log_gate, step=True)
    scale = validate.check_scale(scale, dk)
    cdt = compute_dtype(q.dtype)
    s = _initial(state, b, hkv, dk, dv, q.device, cdt, "state")
    alpha = log_gate[:, :, 0].to(cdt).exp()[..., None]
    s = alpha * s + k[:, :, 0, :, None].to(cdt) * v[:, :, 0, None, :].to(cdt)
    qs = q.to(cdt).view(b, hkv, h // hkv, 1, dk) * scale
    out = (qs @ s[:, :, None]).view(b, h, 1, dv)
    return out.to(q.dtype), GLAState(s)


def gla_state_size(heads_kv: int, head_dim_k: int, head_dim_v: int) -> int:
    """Bytes of GLA state per sequence (one layer): ``heads_kv · Dk · Dv`` float32 values."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    head_dim_k = validate.check_positive_int("head_dim_k", head_dim_k)
    head_dim_v = validate.check_positive_int("head_dim_v", head_dim_v)
    return 4 * heads_kv * head_dim_k * head_dim_v
