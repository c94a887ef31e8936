"""DeltaNet and Gated DeltaNet: linear attention whose state is written by the delta rule.

* DeltaNet — Schlag, Irie, Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight
  Programmers"; parallelised over the sequence by Yang, Wang, Zhang, Shen, Kim 2024,
  "Parallelizing Linear Transformers with the Delta Rule over Sequence Length". Per batch row and
  key/value head, with the state ``S`` of shape ``[Dv, Dk]``::

      S_t = S_{t-1} − β_t (S_{t-1} k_t − v_t) k_tᵀ  =  S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ
      o_t = scale · S_t q_t

  Each token replaces (a ``β_t`` share of) the value the state stored under ``k_t`` by ``v_t``.

* Gated DeltaNet — Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with
  Delta Rule"; a scalar forget gate ``α_t = exp(log_gate_t) ∈ (0, 1]`` per head and token::

      S_t = α_t S_{t-1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ

The output at ``t`` reads the state after token ``t`` is written.

``normalize_keys=True`` (the default, as in both papers) L2-normalises ``k`` *and* ``q`` per head
vector inside the op, ``x / sqrt(|x|² + 1e-6)``, before ``scale`` is applied; with unit keys and
``0 < β ≤ 1`` each write ``I − β k kᵀ`` is a contraction, so the state stays bounded. ``beta`` may be
in ``[0, 2]``: up to 1 is the papers' sigmoid range, up to 2 lets ``I − β k kᵀ`` have the negative
eigenvalue ``1 − β`` (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"). With ``normalize_keys=False`` the caller is responsible for ``β |k|² ≤ 2``.

Chunked form (the WY / UT-transform representation of Yang et al. 2024, with the gate folded in
as in Gated DeltaNet). Within a chunk of ``C`` tokens with incoming state ``S``, let
``g_i = Σ_{s≤i} log α_s`` from the chunk's start, ``γ_i = exp(g_i)``, and write each token's
update as ``S_i = α_i S_{i−1} + δ_i k_iᵀ`` with the *pseudo-value*
``δ_i = β_i (v_i − α_i S_{i−1} k_i)``. Unrolling, ``S_i = γ_i S + Σ_{j≤i} exp(g_i − g_j) δ_j k_jᵀ``, so::

    δ_i + β_i Σ_{j<i} exp(g_i − g_j) (k_i · k_j) δ_j = β_i (v_i − γ_i S k_i)

a unit lower-triangular system. With ``L = tril(diag(β) (K Kᵀ ⊙ Γ), −1)``, ``Γ_ij = exp(g_i − g_j)``
for ``i ≥ j`` (0 above the diagonal), and ``T = (I + L)⁻¹ diag(β)``::

    U = T V,   W = T diag(γ) K,   Δ = U − W Sᵀ              (rows δ_i)
    O = diag(γ) Q Sᵀ + (Q Kᵀ ⊙ Γ) Δ                          (Γ includes the diagonal)
    S ← γ_C S + Δᵀ (diag(exp(g_C − g)) K)

``U`` and ``W`` do not depend on the state, so every chunk's triangular solve runs at once
(``torch.linalg.solve_triangular``, unit diagonal). Substituting ``Δ``, everything but one small
matmul per chunk is independent of ``S`` too::

    O = (diag(γ) Q − (Q Kᵀ ⊙ Γ) W) Sᵀ + (Q Kᵀ ⊙ Γ) U
    S ← S (γ_C I − Wᵀ K̃) + Uᵀ K̃                              (K̃ = diag(exp(g_C − g)) K)

so the chunks of a group (``common.GROUP_TOKENS`` = 512 tokens, the state carried from group to
group so that intermediates stay in cache) compute all of it at once, and the state recursion, a
``[Dv, Dk] @ [Dk, Dk]`` matmul plus an add (one ``baddbmm``), is the only step run chunk after
chunk; the outputs then read the stacked states in one matmul. Every decay exponent is a sum of log gates over a forward stretch of tokens (≤ 0),
summed per pair from the nearer end, so nothing overflows and near tokens keep exact weights.
Without a gate ``Γ`` is the causal mask and ``γ = 1``.

Grouped heads: ``k``, ``v``, ``beta`` and ``log_gate`` may have ``Hkv`` heads, each serving
``H / Hkv`` query heads (query head ``h`` reads key/value head ``h // (H / Hkv)``). The state is
written by ``k, v, β, α`` only, so it belongs to the key/value head (``[B, Hkv, Dv, Dk]``) and the
query heads of a group read the same state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from longattn.core import validate
from longattn.recurrent import common
from longattn.recurrent.common import (
    check_flag,
    check_per_token,
    check_qkv,
    compute_dtype,
    initial_state_tensor,
    pad_tokens,
    segment_sums,
    sums_after,
)

__all__ = [
    "DeltaState",
    "deltanet_attention",
    "deltanet_attention_naive",
    "deltanet_attention_step",
    "gated_deltanet_attention",
    "gated_deltanet_attention_naive",
    "gated_deltanet_attention_step",
    "delta_state_size",
]

#: added to ``|x|²`` before the square root when ``normalize_keys`` normalises ``q`` and ``k``
NORM_EPS = 1e-6

#: decay exponents are raised to at least this before ``exp`` (Gated DeltaNet): a weight below
#: ``exp(-60) ≈ 9e-27`` is as good as 0 in float32 and float64, and far smaller exponents make
#: ``exp`` return subnormals or 0, which the CPU computes many times slower
EXP_FLOOR = -60.0


class DeltaState(NamedTuple):
    """The DeltaNet / Gated DeltaNet recurrent state.

    Fields:
        s: ``[B, Hkv, Dv, Dk]`` float32 (float64 from the naive forms, or when the inputs are
            float64): ``S`` in ``o_t = scale · S_t q_t``.
    """

    s: torch.Tensor


# -- argument checks ------------------------------------------------------------------------


def _check_inputs(q, k, v, beta, log_gate, *, gated: bool, step: bool) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``, ``beta [B, Hkv, T]``
    and (gated) ``log_gate [B, Hkv, T]``; return ``(B, H, Hkv, T, Dk, Dv)``."""
    b, h, hkv, t, dk, dv = check_qkv(q, k, v, step=step)
    per_token = {"layout": "[batch, heads_kv, tokens]", "note": " (one value per key/value head and token)"}
    check_per_token("beta", beta, (b, hkv, t), q.device, low=0.0, high=2.0,
                    what="finite and in [0, 2] (the write strength; (0, 1] in the papers)", **per_token)
    if gated:
        check_per_token("log_gate", log_gate, (b, hkv, t), q.device, low=-math.inf, high=0.0,
                        what="finite and <= 0 (the log of a forget gate in (0, 1])", **per_token)
    return b, h, hkv, t, dk, dv


def _initial(state, b: int, hkv: int, dk: int, dv: int, device, dtype, name: str) -> torch.Tensor:
    """The state tensor ``s [B, Hkv, Dv, Dk]`` to start from (zeros for None), in the compute dtype."""
    return initial_state_tensor(name, state, DeltaState, (b, hkv, dv, dk), device, dtype,
                                layout="[batch, heads_kv, head_dim_v, head_dim_k]")


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(|x|² + NORM_EPS)`` over the last dim: smooth at 0, zero stays zero."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + NORM_EPS)


# -- chunked, step and naive forms shared by both ops (log_gate None: DeltaNet) -------------


def _chunked(q, k, v, beta, log_gate, scale, normalize_keys, chunk, initial_state):
    gated = log_gate is not None
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, beta, log_gate, gated=gated, step=False)
    scale = validate.check_scale(scale, dk)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    chunk = validate.check_positive_int("chunk", chunk)
    cdt = compute_dtype(q.dtype)
    s = _initial(initial_state, b, hkv, dk, dv, q.device, cdt, "initial_state")
    if t == 0:
        return q.new_zeros(b, h, 0, dv), DeltaState(s.clone())
    grp = h // hkv
    n = -(-t // chunk)
    pad = n * chunk - t  # padded tokens: k = v = β = 0 and gate 1 leave the state as it is
    qc, kc = q.to(cdt), k.to(cdt)
    if normalize_keys:
        qc, kc = _l2norm(qc), _l2norm(kc)

    # [B, Hkv, N, grp, C, Dk]: the query heads of a key/value head next to each other per chunk
    qs = (pad_tokens(qc, pad, cdt) * scale).view(b, hkv, grp, n, chunk, dk).transpose(2, 3).contiguous()
    ks = pad_tokens(kc, pad, cdt).view(b, hkv, n, chunk, dk)
    vs = pad_tokens(v, pad, cdt).view(b, hkv, n, chunk, dv)
    bs = F.pad(beta.to(cdt), (0, pad)).view(b, hkv, n, chunk)
    gs = F.pad(log_gate.to(cdt), (0, pad)).view(b, hkv, n, chunk) if gated else None
    eye = torch.eye(dk, dtype=cdt, device=q.device)

    outs = []
    step = max(1, common.GROUP_TOKENS // chunk)  # whole chunks a group at a time
    for a in range(0, n, step):
        e = min(a + step, n)
        qg, kg, vg, bg = qs[:, :, a:e], ks[:, :, a:e], vs[:, :, a:e], bs[:, :, a:e]
        kb = kg * bg[..., None]  # diag(β) K
        kk = kb @ kg.transpose(-1, -2)  # diag(β) K Kᵀ
        qk = (qg.flatten(-3, -2) @ kg.transpose(-1, -2)).unflatten(-2, (grp, chunk))  # [b, hkv, n, grp, C, C]
        if gated:
            gg = gs[:, :, a:e]
            # Γ [b, hkv, n, C, C], 0 above the diagonal; exponents raised to EXP_FLOOR (see there)
            decay = segment_sums(gg[..., None])[..., 0].clamp(min=EXP_FLOOR).exp().tril()
            gamma = gg.cumsum(-1).clamp(min=EXP_FLOOR).exp()  # γ_i [b, hkv, n, C]
            k_out = kg * sums_after(gg[..., None]).clamp(min=EXP_FLOOR).exp()  # k_j ⊙ exp(g_C − g_j)
            lower = (kk * decay).tril(-1)
            attn = (qk * decay[:, :, :, None]).flatten(-3, -2)  # (Q Kᵀ ⊙ Γ) [b, hkv, n, grp·C, C]
            rhs = torch.cat([vg * bg[..., None], kb * gamma[..., None]], dim=-1)
            q_in = (qg * gamma[:, :, :, None, :, None]).flatten(-3, -2)  # diag(γ) Q
        else:
            k_out = kg
            lower = kk.tril(-1)
            attn = qk.tril().flatten(-3, -2)
            rhs = torch.cat([vg * bg[..., None], kb], dim=-1)
            q_in = qg.flatten(-3, -2)

        # the UT transform, [U | W] = T [V | diag(γ) K] with T = (I + L)⁻¹ diag(β), every chunk at once
        uw = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)  # [.., C, dv + dk]
        # everything that does not need the state, at once: with Δ = U − W Sᵀ,
        #   O = diag(γ) Q Sᵀ + (Q Kᵀ ⊙ Γ) Δ = (diag(γ) Q − (Q Kᵀ ⊙ Γ) W) Sᵀ + (Q Kᵀ ⊙ Γ) U
        #   S ← γ_C S + Δᵀ K̃ = S (γ_C I − Wᵀ K̃) + Uᵀ K̃        (K̃ = diag(exp(g_C − g)) K)
        a_u, a_w = (attn @ uw).split([dv, dk], dim=-1)
        u_k, w_k = (uw.transpose(-1, -2) @ k_out).split([dv, dk], dim=-2)  # Uᵀ K̃ [.., dv, dk], Wᵀ K̃
        carry = (gamma[..., -1, None, None] * eye if gated else eye) - w_k  # [b, hkv, n, dk, dk]
        # the state before every chunk: one small matmul per chunk, [B·Hkv] at a time
        carry = carry.movedim(2, 0).reshape(e - a, b * hkv, dk, dk)
        u_k = u_k.movedim(2, 0).reshape(e - a, b * hkv, dv, dk)
        states = []
        for c in range(e - a):
            states.append(s)
            s = torch.baddbmm(u_k[c], s.reshape(b * hkv, dv, dk), carry[c]).view(b, hkv, dv, dk)
        before = torch.stack(states, dim=2)  # [b, hkv, n, dv, dk]
        outs.append((q_in - a_w) @ before.transpose(-1, -2) + a_u)  # [b, hkv, n, grp·C, dv]
    out = torch.cat(outs, dim=2).view(b, hkv, n, grp, chunk, dv).transpose(2, 3)
    out = out.reshape(b, hkv, grp, n * chunk, dv)[:, :, :, :t].reshape(b, h, t, dv)
    return out.to(q.dtype), DeltaState(s)


def _step(q, k, v, beta, log_gate, state, scale, normalize_keys):
    gated = log_gate is not None
    b, h, hkv, _, dk, dv = _check_inputs(q, k, v, beta, log_gate, gated=gated, step=True)
    scale = validate.check_scale(scale, dk)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    cdt = compute_dtype(q.dtype)
    s = _initial(state, b, hkv, dk, dv, q.device, cdt, "state")
    qt, kt, vt = q[:, :, 0].to(cdt), k[:, :, 0].to(cdt), v[:, :, 0].to(cdt)
    if normalize_keys:
        qt, kt = _l2norm(qt), _l2norm(kt)
    if gated:
        s = log_gate[:, :, 0].to(cdt).exp()[..., None, None] * s
    bt = beta[:, :, 0].to(cdt)[..., None]
    delta = bt * (vt - (s @ kt[..., None]).squeeze(-1))  # β (v − α S k)
    s = s + delta[..., :, None] * kt[..., None, :]
    out = s[:, :, None] @ (qt.view(b, hkv, h // hkv, dk, 1) * scale)  # S q [b, hkv, grp, dv, 1]
    return out.view(b, h, 1, dv).to(q.dtype), DeltaState(s)


def _naive(q, k, v, beta, log_gate, scale, normalize_keys, initial_state):
    gated = log_gate is not None
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, beta, log_gate, gated=gated, step=False)
    scale = validate.check_scale(scale, dk)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    f64 = torch.float64
    s = _initial(initial_state, b, hkv, dk, dv, q.device, f64, "initial_state")
    q64, k64, v64, b64 = q.to(f64), k.to(f64), v.to(f64), beta.to(f64)
    if normalize_keys:
        q64, k64 = _l2norm(q64), _l2norm(k64)
    q64 = q64.view(b, hkv, h // hkv, t, dk) * scale
    eye = torch.eye(dk, dtype=f64, device=q.device)
    outs = []
    for i in range(t):
        kt, vt, bt = k64[:, :, i, :, None], v64[:, :, i, :, None], b64[:, :, i, None, None]
        alpha = log_gate[:, :, i].to(f64).exp()[..., None, None] if gated else 1.0
        s = alpha * s @ (eye - bt * kt @ kt.transpose(-1, -2)) + bt * vt @ kt.transpose(-1, -2)
        outs.append(s[:, :, None] @ q64[:, :, :, i, :, None])  # S q
    out = torch.stack(outs, dim=3).squeeze(-1) if t else q64.new_zeros(b, hkv, h // hkv, 0, dv)
    return out.reshape(b, h, t, dv), DeltaState(s)


# -- DeltaNet -------------------------------------------------------------------------------


def deltanet_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
    chunk: int = 64,
    initial_state: DeltaState | None = None,
) -> tuple[torch.Tensor, DeltaState]:
    """DeltaNet, chunked parallel form (prefill and training).

    Args:
        q: ``[B, H, T, Dk]``.
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``.
        v: ``[B, Hkv, T, Dv]``.
        beta: ``[B, Hkv, T]`` in ``[0, 2]`` (a sigmoid output in the paper): the write strength.
        scale: multiplies ``q`` (after normalisation); default ``1/sqrt(Dk)``.
        normalize_keys: L2-normalise ``k`` and ``q`` inside (see the module docstring).
        chunk: tokens per chunk (any positive int; it need not divide ``T``).
        initial_state: the state after an earlier part of the sequence; None starts from zeros.

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, ``DeltaState(s [B, Hkv, Dv, Dk]))``. States and
        sums are float32 (float64 for float64 inputs).
    """
    return _chunked(q, k, v, beta, None, scale, normalize_keys, chunk, initial_state)


def deltanet_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
    initial_state: DeltaState | None = None,
) -> tuple[torch.Tensor, DeltaState]:
    """DeltaNet as the recurrence ``S_t = S_{t-1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, one token at a
    time in float64 (the specification). Arguments as :func:`deltanet_attention`; returns
    ``(out [B, H, T, Dv]`` float64, ``DeltaState(s [B, Hkv, Dv, Dk]`` float64``))``."""
    return _naive(q, k, v, beta, None, scale, normalize_keys, initial_state)


def deltanet_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: DeltaState | None = None,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
) -> tuple[torch.Tensor, DeltaState]:
    """One DeltaNet decoding step: ``q [B, H, 1, Dk]``, ``k [B, Hkv, 1, Dk]``, ``v [B, Hkv, 1, Dv]``,
    ``beta [B, Hkv, 1]`` and the state so far (None: zeros) in; ``(out [B, H, 1, Dv]`` in the input
    dtype, the next ``DeltaState)`` out."""
    return _step(q, k, v, beta, None, state, scale, normalize_keys)


# -- Gated DeltaNet -------------------------------------------------------------------------


def gated_deltanet_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
    chunk: int = 64,
    initial_state: DeltaState | None = None,
) -> tuple[torch.Tensor, DeltaState]:
    """Gated DeltaNet, chunked parallel form (prefill and training).

    Args:
        q, k, v, beta, scale, normalize_keys, chunk, initial_state: as :func:`deltanet_attention`.
        log_gate: ``[B, Hkv, T]``, finite and ``<= 0``: ``log α_t``, one scalar forget gate per
            key/value head and token.

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, ``DeltaState(s [B, Hkv, Dv, Dk]))``.
    """
    return _chunked(q, k, v, beta, log_gate, scale, normalize_keys, chunk, initial_state)


def gated_deltanet_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
    initial_state: DeltaState | None = None,
) -> tuple[torch.Tensor, DeltaState]:
    """Gated DeltaNet as the recurrence ``S_t = α_t S_{t-1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, one
    token at a time in float64 (the specification). Arguments as
    :func:`gated_deltanet_attention`; returns float64 ``out`` and state."""
    return _naive(q, k, v, beta, log_gate, scale, normalize_keys, initial_state)


def gated_deltanet_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor,
    state: DeltaState | None = None,
    *,
    scale: float | None = None,
    normalize_keys: bool = True,
) -> tuple[torch.Tensor, DeltaState]:
    """One Gated DeltaNet decoding step: as :func:`deltanet_attention_step` plus
    ``log_gate [B, Hkv, 1]``."""
    return _step(q, k, v, beta, log_gate, state, scale, normalize_keys)


def delta_state_size(heads_kv: int, head_dim_k: int, head_dim_v: int) -> int:
    """Bytes of (Gated) DeltaNet state per sequence (one layer): ``heads_kv · Dv · Dk`` float32 values."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    head_dim_k = validate.check_positive_int("head_dim_k", head_dim_k)
    head_dim_v = validate.check_positive_int("head_dim_v", head_dim_v)
    return 4 * heads_kv * head_dim_k * head_dim_v
