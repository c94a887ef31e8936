"""Linear attention with a per-head decay and NormAttention: TransNormer (Qin et al. 2022, "The
Devil in Linear Transformer"), computed as Lightning Attention-2 (Qin et al. 2024, "Lightning
Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models").

No feature map and no denominator; each head ``h`` decays its state by a constant ``λ_h ∈ (0, 1]``::

    S_t = λ_h S_{t-1} + k_t v_tᵀ          S [Dk, Dv]
    o_t = q_tᵀ S_t
    out_t = RMSNorm(o_t) = o_t / sqrt(mean(o_t²) + eps) · w     (NormAttention; norm=False skips it)

The chunked form (Lightning Attention-2) splits the sequence into blocks of ``C`` tokens. With
positions ``i, j ∈ [0, C)`` inside a block and ``S`` the state before it::

    O     = (Q Kᵀ ⊙ M) V + Λ Q S            M_ij = λ^(i-j) for i >= j, else 0;  Λ_i = λ^(i+1)
    S_new = λ^C S + (λ^(C-1-j) K)ᵀ V

(unrolling the recurrence: the state seen by token ``i`` is ``λ^(i+1) S + Σ_{j<=i} λ^(i-j) k_j v_jᵀ``).
Every power is computed as ``exp(log λ · offset)`` with ``offset >= 0``, so long blocks and tiny
``λ`` underflow gracefully to 0 and never overflow. The norm acts on the output only, never on the
state, so prefill in pieces and decoding compose exactly.

The state is per query head (heads with one key/value head still decay at their own rates):
``LightningState(s [B, H, Dk, Dv])``. Compute dtype as in :mod:`longattn.recurrent.linear`: float32
for float32 / bfloat16 / float16 inputs (output cast back), float64 for float64 inputs; the naive
form computes in and returns float64.

As in :mod:`longattn.recurrent.linear`, the chunked form runs in the native kernel
:mod:`longattn.kernels.native_linear` on the CPU when no gradient is wanted (float32 / bfloat16 /
float16 inputs; k and v read per key/value head, the norm applied as rows are written), and as the
torch form below otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from longattn.core.validate import check_positive_int
from longattn.kernels import native_linear
from longattn.recurrent import common
from longattn.recurrent.common import (
    check_flag,
    check_nonneg,
    check_qkv,
    check_tensor_arg,
    compute_dtype,
    initial_state_tensor,
)

__all__ = [
    "LightningState",
    "lightning_attention",
    "lightning_attention_naive",
    "lightning_attention_step",
    "lightning_state_size",
    "transnormer_decays",
]


class LightningState(NamedTuple):
    """The recurrent state of Lightning attention (float32; float64 for float64 inputs and in the
    naive form): ``s [B, H, Dk, Dv]``, the decayed key-value memory ``Σ_j λ^(t-j) k_j v_jᵀ``."""

    s: torch.Tensor


def _alibi_slopes(heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022): ``2^(-8 (h+1) / n)`` for ``n`` a power of two; for
    other ``n``, the slopes of the power of two below, then every other slope of the one above."""
    if heads & (heads - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]
    below = 1 << (heads.bit_length() - 1)
    return _alibi_slopes(below) + _alibi_slopes(2 * below)[0::2][: heads - below]


def transnormer_decays(
    heads: int,
    *,
    layer: int = 0,
    layers: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The per-head decays ``λ [heads]`` of TransNormerLLM / Lightning Attention-2.

    ``λ_h = exp(-s_h · r_l)`` where ``s_h`` is ALiBi's slope for head ``h`` (``2^(-8 (h+1)/H)``
    when ``H`` is a power of two) and ``r_l = 1 - l / (L - 1) + 1e-5`` scales it by depth, so the
    first layer decays fastest and the last barely at all (TransNormerLLM, Qin et al. 2023, §3.1,
    "LRPE-d"; Lightning Attention-2 uses the same slopes). With ``layers=1``, ``r = 1``. For ``H = 8``
    at layer 0 this gives λ from ``exp(-1/2) ≈ 0.61`` to ``exp(-1/256) ≈ 0.996``.

    Note: this follows the authors' released code (``λ = exp(-slope)``); the paper's prose writes the
    rate as ``exp(-8h/H · (1 - l/L))``-style, which differs in detail. Pass ``decay=`` explicitly to
    use another schedule.
    """
    heads = check_positive_int("heads", heads)
    layers = check_positive_int("layers", layers)
    layer = check_positive_int("layer", layer, allow_zero=True)
    if layer >= layers:
        raise ValueError(f"layer must be in [0, layers) = [0, {layers}), got {layer}")
    depth = 1.0 if layers == 1 else 1.0 - layer / (layers - 1) + 1e-5
    slopes = torch.tensor(_alibi_slopes(heads), dtype=torch.float64)
    return torch.exp(-slopes * depth).to(device=device, dtype=dtype)


def _log_decay(decay: object, log_decay: object, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Check ``decay`` / ``log_decay`` and return ``log λ [H]`` in ``dtype`` (differentiable)."""
    if decay is not None and log_decay is not None:
        raise ValueError("give decay or log_decay, not both")
    if decay is None and log_decay is None:
        return transnormer_decays(heads, dtype=torch.float64, device=device).log().to(dtype)
    name, value = ("decay", decay) if decay is not None else ("log_decay", log_decay)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a float tensor [H], got {type(value).__name__}") from exc
    check_tensor_arg(name, value, (heads,), device, layout="[H]", note=" (one per query head)")
    v64 = value.detach().to(torch.float64)
    if name == "decay":
        if not bool(((v64 > 0) & (v64 <= 1)).all()):
            raise ValueError(f"decay must lie in (0, 1] for every head, got {v64.tolist()}")
        return torch.log(value.to(dtype))
    if not bool((torch.isfinite(v64) & (v64 <= 0)).all()):
        raise ValueError(f"log_decay must be finite and <= 0 for every head (λ in (0, 1]), got {v64.tolist()}")
    return value.to(dtype)


def _norm_weight(norm_weight: object, dv: int, device: torch.device) -> torch.Tensor | None:
    if norm_weight is None:
        return None
    return check_tensor_arg("norm_weight", norm_weight, (dv,), device, layout="[Dv]")


def _rms_norm(o: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    o = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + eps)
    return o if weight is None else o * weight.to(o.dtype)


def _checked(q, k, v, decay, log_decay, norm, norm_weight, eps, state, compute, state_name):
    """Every argument check: returns ``log λ [H]`` in ``compute`` dtype, the norm weight (or None)
    and ``s0 [B, H, Dk, Dv]``."""
    b, h, hkv, _, dk, dv = check_qkv(q, k, v)
    check_flag("norm", norm)
    check_nonneg("eps", eps)
    w = _norm_weight(norm_weight, dv, q.device)
    if w is not None and not norm:
        raise ValueError("norm_weight is given but norm=False: the weight would be ignored")
    logl = _log_decay(decay, log_decay, h, q.device, compute)
    s0 = initial_state_tensor(state_name, state, LightningState, (b, h, dk, dv), q.device, compute,
                              layout="[batch, heads, head_dim_k, head_dim_v]")
    return logl, w, s0


def _prepare(q, k, v, decay, log_decay, norm, norm_weight, eps, state, compute, state_name):
    """Shared checks: returns ``q, k, v`` with ``H`` heads in ``compute`` dtype, ``log λ [H]``, the
    norm weight (or None) and ``s0 [B, H, Dk, Dv]``."""
    logl, w, s0 = _checked(q, k, v, decay, log_decay, norm, norm_weight, eps, state, compute, state_name)
    return (*_widen(q, k, v, compute), logl, w, s0)


def _widen(q, k, v, compute):
    """``q, k, v`` in ``compute`` dtype, k and v repeated to one head per query head."""
    g = q.shape[1] // k.shape[1]
    k, v = k.to(compute), v.to(compute)
    if g > 1:  # key/value head j serves query heads j*g .. j*g+g-1
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return q.to(compute), k, v


def _chunks(q, k, v, logl, s, length):
    """``N`` whole blocks of ``length`` tokens (``T = N · length``): intra-block products and the
    state before every block, all at once (no loop; callers pass a group of blocks at a time)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    n = t // length
    q = q.reshape(b, h, n, length, dk)
    k = k.reshape(b, h, n, length, dk)
    v = v.reshape(b, h, n, length, dv)
    pos = torch.arange(length, device=q.device, dtype=q.dtype)
    lam = logl[:, None]  # [H, 1]
    q_decay = torch.exp(lam * (pos + 1))  # Λ_i = λ^(i+1)        [H, L]
    k_decay = torch.exp(lam * (length - 1 - pos))  # λ^(C-1-j)  [H, L]
    offset = pos[:, None] - pos[None, :]
    causal = offset >= 0
    mask = torch.where(causal, torch.exp(lam[:, :, None] * offset.clamp(min=0)), torch.zeros((), dtype=q.dtype))
    kv = (k * k_decay[None, :, None, :, None]).transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]
    # the state before block i: λ^(C·i) S + Σ_{j<i} λ^(C·(i-1-j)) kv_j — every block's at once, by a
    # [N, N+1] matrix of decay powers per head (exponents <= 0; column N carries S)
    blk = torch.arange(n + 1, device=q.device, dtype=q.dtype)
    gap = blk[:n, None] - 1 - blk[None, :n]  # i - 1 - j
    weights = torch.where(gap >= 0, torch.exp(logl[:, None, None] * length * gap.clamp(min=0)),
                          torch.zeros((), dtype=q.dtype, device=q.device))  # [H, N, N]
    carried = torch.exp(logl[:, None] * length * blk[None, :n])  # λ^(C·i)  [H, N]
    states = torch.einsum("hij,bhjkv->bhikv", weights, kv) + carried[None, :, :, None, None] * s[:, :, None]
    last = torch.exp(logl[:, None] * length * (n - 1 - blk[None, :n]))  # λ^(C·(N-1-j))  [H, N]
    s = torch.exp(logl * length * n)[None, :, None, None] * s + torch.einsum("hj,bhjkv->bhkv", last, kv)
    # fresh products are scaled and summed in place: at 32k tokens the temporaries are tens of MB
    scores = q @ k.transpose(-1, -2)  # [B, H, N, L, L]
    scores.mul_(mask[None, :, None])
    out = scores @ v
    out.addcmul_(q @ states, q_decay[None, :, None, :, None])  # Λ_i q_i S = λ^(i+1) (q_i S)
    return out.reshape(b, h, t, dv), s


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
    norm: bool = True,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    chunk: int = 64,
    initial_state: LightningState | None = None,
) -> tuple[torch.Tensor, LightningState]:
    """Decayed linear attention with NormAttention, chunked as Lightning Attention-2.

    Args:
        q: ``[B, H, T, Dk]``; k: ``[B, Hkv, T, Dk]``; v: ``[B, Hkv, T, Dv]`` (``H % Hkv == 0``).
        decay: ``λ [H]`` in ``(0, 1]`` (differentiable), or
        log_decay: ``log λ [H]``, finite and ``<= 0``. Neither: :func:`transnormer_decays` ``(H)``.
        norm: apply RMSNorm over ``Dv`` to the output (TransNormer's NormAttention).
        norm_weight: the norm's gain ``[Dv]`` (None: 1); only with ``norm=True``.
        eps: the norm's epsilon (inside the square root).
        chunk: tokens per block; the last block may be shorter.
        initial_state: a :class:`LightningState` (None: zeros).

    Returns:
        ``out [B, H, T, Dv]`` in q's dtype and the final :class:`LightningState` ``(s [B, H, Dk, Dv])``.
    """
    chunk = check_positive_int("chunk", chunk)
    compute = compute_dtype(q.dtype) if isinstance(q, torch.Tensor) else torch.float32
    logl, w, s = _checked(q, k, v, decay, log_decay, norm, norm_weight, eps, initial_state, compute, "initial_state")
    if native_linear.linear_chunked_applies(q, k, v, chunk, s, logl, w):
        # the native kernel (longattn.kernels.native_linear): no gradient wanted, CPU, float32/16;
        # it reads k and v per key/value head (no repeat) and applies the norm as it writes
        out, s, _ = native_linear.linear_chunked(q, k, v, s, None, chunk=chunk, log_decay=logl, rms_norm=norm,
                                                 norm_weight=w, norm_eps=eps)
        return out.to(q.dtype), LightningState(s)
    qc, kc, vc = _widen(q, k, v, compute)
    t = qc.shape[2]
    outs = []
    whole = (t // chunk) * chunk
    step = max(1, common.GROUP_TOKENS // chunk) * chunk  # whole chunks a group at a time (common.GROUP_TOKENS)
    for a in range(0, whole, step):
        e = min(a + step, whole)
        o, s = _chunks(qc[:, :, a:e], kc[:, :, a:e], vc[:, :, a:e], logl, s, chunk)
        outs.append(o)
    if t > whole:
        o, s = _chunks(qc[:, :, whole:], kc[:, :, whole:], vc[:, :, whole:], logl, s, t - whole)
        outs.append(o)
    out = torch.cat(outs, 2) if outs else vc.new_zeros(qc.shape[0], qc.shape[1], 0, vc.shape[-1])
    if norm:
        out = _rms_norm(out, w, eps)
    return out.to(q.dtype), LightningState(s)


def lightning_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
    norm: bool = True,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    initial_state: LightningState | None = None,
) -> tuple[torch.Tensor, LightningState]:
    """The specification: ``S_t = λ S_{t-1} + k_t v_tᵀ``, ``o_t = q_tᵀ S_t``, then RMSNorm, one token
    at a time in float64. Same arguments as :func:`lightning_attention` (no ``chunk``); returns
    float64 ``out [B, H, T, Dv]`` and :class:`LightningState`."""
    q64, k64, v64, logl, w, s = _prepare(q, k, v, decay, log_decay, norm, norm_weight, eps, initial_state,
                                         torch.float64, "initial_state")
    lam = torch.exp(logl)[None, :, None, None]
    outs = []
    for i in range(q64.shape[2]):
        s = lam * s + k64[:, :, i, :, None] * v64[:, :, i, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q64[:, :, i], s))
    out = torch.stack(outs, 2) if outs else v64.new_zeros(q64.shape[0], q64.shape[1], 0, v64.shape[-1])
    if norm:
        out = _rms_norm(out, w, eps)
    return out, LightningState(s)


def lightning_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LightningState | None,
    *,
    decay: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
    norm: bool = True,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LightningState]:
    """One decoding step: ``q [B, H, 1, Dk]``, ``k [B, Hkv, 1, Dk]``, ``v [B, Hkv, 1, Dv]`` and the state
    (None: zeros) in; ``out [B, H, 1, Dv]`` (q's dtype) and the next :class:`LightningState` out."""
    check_qkv(q, k, v, step=True)
    qc, kc, vc, logl, w, s = _prepare(q, k, v, decay, log_decay, norm, norm_weight, eps, state,
                                      compute_dtype(q.dtype), "state")
    s = torch.exp(logl)[None, :, None, None] * s + kc[:, :, 0, :, None] * vc[:, :, 0, None, :]
    out = (qc[:, :, 0, None, :] @ s)  # [B, H, 1, Dv]
    if norm:
        out = _rms_norm(out, w, eps)
    return out.to(q.dtype), LightningState(s)


def lightning_state_size(heads: int, dk: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of :class:`LightningState` per sequence: ``heads · Dk · Dv`` elements of ``dtype``
    (``heads`` = query heads: each decays at its own rate)."""
    heads = check_positive_int("heads", heads)
    dk = check_positive_int("dk", dk)
    dv = check_positive_int("dv", dv)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return heads * dk * dv * torch.empty((), dtype=dtype).element_size()

