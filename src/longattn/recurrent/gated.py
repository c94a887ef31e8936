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

* a chunk whose decay span ``−b_C`` (in its hardest channel) is at most ``FACTOR_SPAN`` (30) is
  factored whole: ``A = (q ⊙ exp(b)) (k ⊙ exp(−b))ᵀ`` masked causally, two matmuls; the key-side
  exponents are ≥ 0 but at most 30, so nothing overflows and the factors' relative rounding stays
  ~``30 ε``. Gates as a model learns them (``logsigmoid(·) / 16``) take this path;
* wider chunks go by sub-chunks. Across sub-chunks (``j`` in ``J < I``) both factors are taken
  relative to ``r``, the last token before sub-chunk ``I``: ``A_ij = (q_i ⊙ exp(b_i − b_r)) ·
  (k_j ⊙ exp(b_r − b_j))``, one matmul, both exponents ≤ 0 (``j ≤ r < i``). Inside a sub-chunk
  (``i, j`` both in ``I``) ``A_ij`` is factored the same way relative to ``r`` where the sub-chunk's
  span is at most ``FACTOR_SPAN``, and otherwise formed pairwise, with the exponent
  ``Σ_{j<s≤i} log α_s`` summed per pair and channel (a ``[c, c, Dk]`` tensor). Both choices are made
  per chunk and per sub-chunk from the gates, so hard gates stay exact and mild ones go fast.

Exponents are built from sums over the stretch they span (per-pair sums, cumulative sums local to
a chunk or sub-chunk, suffix sums, sums of whole sub-chunks or chunks in between), never as the
difference of two long prefix sums, so in float32 the weights of near tokens stay accurate even
where some channels forget hard (e.g. −50 per step) and others hardly at all. Exponents ≤ 0 are
raised to ``EXP_FLOOR`` (−60) before ``exp``: such weights are 0 to float32 and float64 alike, and
``exp`` of far smaller exponents (subnormal results) is many times slower on CPUs.

Whole chunks are processed ``common.GROUP_TOKENS`` (512) tokens at a time, carrying the state from
group to group, so per-chunk intermediates stay in cache; within a group the state before every
chunk comes at once from ``S`` and the chunks' ``Σ_j (k_j ⊙ exp(b_C − b_j)) v_jᵀ``, weighted by
``exp`` of the whole-chunk decays in between (exponents ≤ 0): no loop over chunks.

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
from longattn.recurrent import common
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

#: the widest decay span (``−Σ log α`` over a chunk or a sub-chunk, in its hardest key channel) for
#: which the intra-chunk scores are factored as ``(q ⊙ exp(b_i)) · (k ⊙ exp(−b_j))`` (matmuls);
#: wider ones are formed from per-pair sums. ``exp(30) ≈ 1e13`` stays far from float32's range and
#: the factors' relative rounding stays ~``30 ε``.
FACTOR_SPAN = 30.0

#: decay exponents are raised to at least this before ``exp``: a weight below ``exp(-60) ≈ 9e-27``
#: (against 1 for the token itself) is as good as 0 in float32 and float64 alike, and exponents far
#: below it (hard gates sum to -1e5 over a chunk) make ``exp`` return subnormals or 0, which the CPU
#: computes up to ten times slower.
EXP_FLOOR = -60.0


def _decay(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for decay exponents ``x <= 0``, with ``x`` raised to ``EXP_FLOOR`` first."""
    return x.clamp(min=EXP_FLOOR).exp()


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


def _pair_sums(g: torch.Tensor) -> torch.Tensor:
    """``g [.., L, D] -> [.., L(i), L(j), D]``: ``Σ_{j<s≤i} g_s`` for ``i ≥ j``, 0 above the diagonal
    (callers mask the products there).

    Each pair is summed over its own stretch, as in :func:`longattn.recurrent.common.segment_sums`,
    here as one matmul with the 0/1 matrix ``E[(i, j), s] = [j < s ≤ i]``: the products are exact and
    the summed terms share one sign, so each sum's rounding scales with the sum itself (and the
    matmul runs several times faster than a cumulative sum over a masked ``[L, L, D]`` tensor)."""
    length = g.shape[-2]
    idx = torch.arange(length, device=g.device)
    stretch = (idx[None, None, :] > idx[None, :, None]) & (idx[None, None, :] <= idx[:, None, None])
    sums = torch.einsum("xs,...sd->...xd", stretch.to(g.dtype).reshape(length * length, length), g)
    return sums.unflatten(-2, (length, length))


def _intra_factored(q_in: torch.Tensor, k: torch.Tensor, cum: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Intra-chunk part for chunks whose decay span is at most ``FACTOR_SPAN``: ``q_in [.., grp, C, Dk]``
    (``q ⊙ exp(b_i)``), ``k [.., C, Dk]``, ``cum [.., C, Dk]`` (``b_i``), ``v [.., C, Dv]`` ->
    ``[.., grp · C, Dv]``. ``A = (q ⊙ exp(b)) (k ⊙ exp(−b))ᵀ`` masked causally: two matmuls."""
    grp, c = q_in.shape[-3], q_in.shape[-2]
    k_fac = k * (-cum).exp()  # exponents in [0, FACTOR_SPAN]
    scores = q_in.flatten(-3, -2) @ k_fac.transpose(-1, -2)  # [.., grp·C, C]
    scores = scores.unflatten(-2, (grp, c)).tril().flatten(-3, -2)
    return scores @ v


def _intra_subchunked(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, v: torch.Tensor, sub: int) -> torch.Tensor:
    """Intra-chunk part for chunks whose decay span exceeds ``FACTOR_SPAN``: ``q [.., grp, C, Dk]``
    (scaled), ``k, g [.., C, Dk]``, ``v [.., C, Dv]`` -> ``[.., grp · C, Dv]``, in sub-chunks of ``sub``
    (see the module docstring)."""
    *lead, grp, c, dk = q.shape
    m = c // sub
    qs = q.reshape(*lead, grp, m, sub, dk)
    ks = k.reshape(*lead, m, sub, dk)
    gs = g.reshape(*lead, m, sub, dk)

    # sub-chunk I (rows) against sub-chunks J < I (columns): both sides decayed to r_I, the last
    # token before sub-chunk I
    local = gs.cumsum(-2)  # b_i - b_{r_I} for i in I
    total = local[..., -1, :]  # [.., m, dk]: a whole sub-chunk's log decay
    mi = torch.arange(m, device=q.device)
    inside = ((mi[None, None, :] > mi[None, :, None]) & (mi[:, None, None] > mi[None, None, :]))[..., None]  # J<K<I
    between = torch.where(inside, total[..., None, None, :, :], total.new_zeros(())).sum(-2)  # Σ_{J<K<I}
    expo = between[..., None, :] + sums_after(gs)[..., None, :, :, :]  # b_{r_I} - b_j, j in J
    k_off = (ks[..., None, :, :, :] * _decay(expo)).reshape(*lead, m, c, dk)  # J ≥ I: masked below
    q_off = qs * _decay(local)[..., None, :, :, :]
    scores = q_off @ k_off[..., None, :, :, :].transpose(-1, -2)  # [.., grp, m, sub, C]

    # inside a sub-chunk: factored as above (q_off against k ⊙ exp(−(b_j − b_{r_I}))) where the
    # sub-chunk's span is at most FACTOR_SPAN, else pairwise per channel, exp(Σ_{j<s≤i} log α_s)
    # (a [sub, sub, Dk] exponent, never positive; the products above the diagonal are masked)
    soft = -total.amin(-1) <= FACTOR_SPAN  # [.., m]
    k_fac = ks * torch.where(soft[..., None, None], -local, local.new_zeros(())).exp()
    diag = (q_off @ k_fac[..., None, :, :, :].transpose(-1, -2)).tril()  # [.., grp, m, sub(i), sub(j)]
    if not bool(soft.all()):
        hard = ~soft
        diag_m = diag.movedim(-4, -3)  # [.., m, grp, sub, sub]
        k_pair = ks[hard][:, None] * _decay(_pair_sums(gs[hard]))  # [P, sub(i), sub(j), dk]
        pair = torch.einsum("pijd,pgid->pgij", k_pair, qs.movedim(-4, -3)[hard]).tril()
        diag = diag_m.index_put((hard,), pair).movedim(-3, -4)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)[:, None, :, None]
    earlier = (mi[:, None] > mi[None, :])[:, None, :, None]  # [m(I), 1, m(J), 1]: J < I
    scores = torch.where(earlier, scores.view(*lead, grp, m, sub, m, sub), diag.unsqueeze(-2) * eye)
    return scores.reshape(*lead, grp * c, c) @ v


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
    n_all = -(-t // chunk)
    pad = n_all * chunk - t  # padded tokens: k = v = 0 and gate 1 leave the state as it is

    # [B, Hkv, N, grp, C, Dk]: the query heads of a key/value head next to each other per chunk
    qs = (pad_tokens(q, pad, cdt) * scale).view(b, hkv, grp, n_all, chunk, dk).transpose(2, 3).contiguous()
    ks = pad_tokens(k, pad, cdt).view(b, hkv, n_all, chunk, dk)
    vs = pad_tokens(v, pad, cdt).view(b, hkv, n_all, chunk, dv)
    gs = pad_tokens(log_gate, pad, cdt).view(b, hkv, n_all, chunk, dk)

    outs = []
    step = max(1, common.GROUP_TOKENS // chunk)  # whole chunks a group at a time
    for a in range(0, n_all, step):
        e = min(a + step, n_all)
        qg, kg, vg, gg = qs[:, :, a:e], ks[:, :, a:e], vs[:, :, a:e], gs[:, :, a:e]
        cum = gg.cumsum(-2)  # b_i from the chunk's start [b, hkv, n, C, dk]
        tot = cum[..., -1, :]  # b_C [b, hkv, n, dk]
        q_in = qg * _decay(cum)[:, :, :, None]  # q_i ⊙ exp(b_i)
        kv = (kg * _decay(sums_after(gg))).transpose(-1, -2) @ vg  # Σ_j (k_j ⊙ exp(b_C − b_j)) v_jᵀ

        # the state before every chunk of the group and after the last, at once: the decay between
        # chunks is exp of sums of whole-chunk totals over the chunks in between (exponents <= 0)
        between = segment_sums(F.pad(tot, (0, 0, 1, 0))).exp()  # [b, hkv, n+1, n+1, dk]
        states = torch.einsum("bhijd,bhjde->bhide", between, torch.cat([s[:, :, None], kv], dim=2))
        s = states[:, :, -1]
        out = q_in.flatten(-3, -2) @ states[:, :, :-1]  # [b, hkv, n, grp·C, dv]

        fast = -tot.amin(-1) <= FACTOR_SPAN  # [b, hkv, n]: the chunk's widest decay span
        if bool(fast.all()):
            intra = _intra_factored(q_in, kg, cum, vg)
        elif not bool(fast.any()):
            intra = _intra_subchunked(qg, kg, gg, vg, sub)
        else:
            slow = ~fast
            intra = out.new_empty(out.shape)
            intra = intra.index_put((fast,), _intra_factored(q_in[fast], kg[fast], cum[fast], vg[fast]))
            intra = intra.index_put((slow,), _intra_subchunked(qg[slow], kg[slow], gg[slow], vg[slow], sub))
        outs.append(out + intra)
    out = torch.cat(outs, dim=2).view(b, hkv, n_all, grp, chunk, dv).transpose(2, 3)
    out = out.reshape(b, hkv, grp, n_all * chunk, dv)[:, :, :, :t].reshape(b, h, t, dv)
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
