"""Titans' neural long-term memory — Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize at
Test Time".

The memory ``M`` is a model that is trained *while it reads*: each token takes a gradient step on the
associative loss ``ℓ(M; k_t, v_t) = ‖M(k_t) − v_t‖²``, with momentum (the "surprise" ``S``) and weight
decay (the "forgetting")::

    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t)
    M_t = (1 − α_t) M_{t−1} + S_t
    o_t = M_t(q_t)

with per-token, data-dependent ``η_t ∈ [0, 1]`` (momentum decay), ``θ_t ≥ 0`` (learning rate) and
``α_t ∈ [0, 1]`` (forgetting), given per key/value head and token as ``eta, theta, alpha [B, Hkv, T]``.

Two memory models:

* ``memory="linear"`` (the default): ``M`` is a matrix ``W [Dv, Dk]``, ``M(x) = W x`` and
  ``∇ℓ(W; k, v) = 2 (W k − v) kᵀ``; state :class:`TitansState`.
* ``memory="mlp"``: the paper's deep memory with two layers, ``M(x) = W2 silu(W1 x)``,
  ``W1 [Dh, Dk]``, ``W2 [Dv, Dh]`` (the hidden size ``Dh`` is the initial state's); each weight has
  its own momentum, with the same ``η, θ, α``. The gradients in closed form, with ``a = silu(W1 k)``,
  ``r = 2 (W2 a − v)``: ``∇W2 = r aᵀ``, ``∇W1 = ((W2ᵀ r) ⊙ silu'(W1 k)) kᵀ``. State
  :class:`TitansMLPState`; ``initial_state`` is required (the MLP's initial weights: from zero
  weights every gradient is 0). The chunked form takes each chunk's gradients at the chunk-start
  weights in one batch; they are rank one per token, so the unrolled scan below applies per layer,
  and the read-out ``W2_i silu(W1_i q_i)`` of each token follows from it (the chunks run one after
  the other, as the gradients need the chunk-start weights).

**Mini-batch gradient descent is the definition.** As in the paper's parallel training, the sequence
is cut into chunks of ``b = chunk_size`` tokens on a grid fixed from the sequence's first token, and
every gradient in a chunk is taken with respect to the memory at the chunk's start, ``W_c``::

    ∇_t = 2 (W_c k_t − v_t) k_tᵀ                     (t in the chunk that starts at c)
    S_t = η_t S_{t−1} − θ_t ∇_t,   W_t = (1 − α_t) W_{t−1} + S_t,   o_t = W_t q_t

``chunk_size = 1`` is the fully sequential recurrence above; the result depends on ``chunk_size``
(it is part of the model, not an implementation detail), so prefill, decoding and every piece of a
sequence must use the same one. The state records the chunk-start memory and the position within the
chunk, so a sequence may be split anywhere (mid-chunk included) and continued exactly.

Chunked form (linear memory). Within a chunk (tokens ``i, j = 1..b``) with incoming ``W_0, S_0``
and chunk-start memory ``W_c`` (``= W_0`` unless the chunk was entered mid-way), let
``A_ij = Π_{j<s≤i} (1 − α_s)`` and ``E_ij = Π_{j<s≤i} η_s`` (``i ≥ j``, 0 above the diagonal),
``a_i = Π_{s≤i} (1 − α_s)``, ``e_i = Π_{s≤i} η_s``, ``G = A E`` and ``g = A e``. All gradients are
known up front, ``θ_j ∇_j = u_j k_jᵀ`` with ``u_j = 2 θ_j (W_c k_j − v_j)``, so unrolling the scan::

    S_i = e_i S_0 − Σ_{j≤i} E_ij u_j k_jᵀ
    W_i = a_i W_0 + g_i S_0 − Σ_{j≤i} G_ij u_j k_jᵀ
    O   = (diag(a) Q − M K) W_0ᵀ + diag(g) Q S_0ᵀ + M V − M K (W_c − W_0)ᵀ,   M = 2 (G ⊙ Q Kᵀ) diag(θ)

and, with ``P = W_c Kᵀ [Dv, b]``, ``K_G = 2 diag(θ ⊙ G_b) K`` and ``K_E = 2 diag(θ ⊙ E_b) K``
(``G_b, E_b``: the last rows), the end-of-chunk state is::

    W ← a_b W_0 + g_b S_0 − P K_G + Vᵀ K_G,   S ← e_b S_0 − P K_E + Vᵀ K_E

Everything but ``P`` and the two rank-``b`` products per chunk (low rank: cheaper than a
``[2Dk, 2Dk]`` transition matrix for ``b < Dk``) runs for a group of chunks at once
(``common.GROUP_TOKENS`` tokens), as in :mod:`longattn.recurrent.delta`; the outputs then read the
stacked chunk-start states in one matmul.

Decays are products of factors in ``[0, 1]`` taken directly (a masked ``cumprod`` per pair, not
``exp`` of log sums): every weight is ``≤ 1``, nothing overflows, and ``η = 0`` or ``α = 1`` (a
full reset) is exact, with finite gradients (``log 0`` would make them NaN). A sequence that starts
mid-chunk or ends before a chunk is full is padded with neutral tokens (``θ = 0``, ``η = 1``,
``α = 0``, zero ``q, k, v``) whose momentum is not added to ``W`` (``G = A diag(live) E``).

``normalize_keys=True`` (the default) L2-normalises ``k`` and ``q`` per head vector,
``x / sqrt(|x|² + 1e-6)``, as :mod:`longattn.recurrent.delta` does; the read-out is ``W q`` with no
extra scale (the paper's ``M(q)``).

Grouped heads: ``k, v, eta, theta, alpha`` may have ``Hkv`` heads; the memory belongs to the
key/value head (``[B, Hkv, Dv, Dk]``) and query head ``h`` reads memory ``h // (H / Hkv)``.

Combinations with attention. The paper builds three architectures on this memory: memory as a
context (MAC: the memory's read-out for a segment is prepended, with persistent memory tokens, to
the segment's attention context), memory as a gate (MAG: sliding-window attention and the memory
branch combined by a gate) and memory as a layer (MAL). They need projections, persistent tokens and a
gate, so they come with the layers (MAC and MAG: :mod:`longattn.recurrent.titans_combined`); this
module is the memory op, and :func:`titans_memory_read` the read ``M*(q)`` without an update that MAC
retrieves with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from longattn.core import validate
from longattn.recurrent import common
from longattn.recurrent.common import (
    check_flag,
    check_float_tensor,
    check_per_token,
    check_qkv,
    compute_dtype,
    initial_state_tuple,
)

__all__ = [
    "MEMORIES",
    "TitansMLPState",
    "TitansState",
    "titans_memory",
    "titans_memory_naive",
    "titans_memory_read",
    "titans_memory_step",
    "titans_state_size",
]

#: added to ``|x|²`` before the square root when ``normalize_keys`` normalises ``q`` and ``k``
NORM_EPS = 1e-6

#: the memory models implemented
MEMORIES = ("linear", "mlp")

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class TitansState(NamedTuple):
    """The Titans linear-memory state.

    Fields (float32; float64 from the naive form or for float64 inputs):
        w: ``[B, Hkv, Dv, Dk]``: the memory ``W_t`` after the last token read.
        s: ``[B, Hkv, Dv, Dk]``: the momentum ("surprise") ``S_t``.
        w_chunk: ``[B, Hkv, Dv, Dk]``: the memory at the start of the current chunk, which the
            gradients of the chunk's remaining tokens are taken at. Equal to ``w`` when
            ``position`` is 0 (and ignored then).
        position: ``[B]`` int64: tokens of the current chunk already read, in ``[0, chunk_size)``.
            The chunked form needs one position for the whole batch; the step form allows one per row.
    """

    w: torch.Tensor
    s: torch.Tensor
    w_chunk: torch.Tensor
    position: torch.Tensor


class TitansMLPState(NamedTuple):
    """The Titans MLP-memory state (``memory="mlp"``: ``M(x) = W2 silu(W1 x)``, hidden size ``Dh``).

    Fields (float32; float64 from the naive form or for float64 inputs):
        w1: ``[B, Hkv, Dh, Dk]`` and w2: ``[B, Hkv, Dv, Dh]``: the memory's weights after the last token.
        s1: ``[B, Hkv, Dh, Dk]`` and s2: ``[B, Hkv, Dv, Dh]``: their momentum.
        w1_chunk, w2_chunk: the weights at the start of the current chunk (gradients are taken there;
            equal to ``w1, w2`` and ignored when ``position`` is 0).
        position: ``[B]`` int64, as in :class:`TitansState`.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    w1_chunk: torch.Tensor
    w2_chunk: torch.Tensor
    position: torch.Tensor


class _MLPMats(NamedTuple):
    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    w1_chunk: torch.Tensor
    w2_chunk: torch.Tensor


class _Mats(NamedTuple):
    w: torch.Tensor
    s: torch.Tensor
    w_chunk: torch.Tensor


# -- argument checks ------------------------------------------------------------------------


def _check_inputs(q, k, v, eta, theta, alpha, *, step: bool) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` and ``eta, theta,
    alpha [B, Hkv, T]``; return ``(B, H, Hkv, T, Dk, Dv)``."""
    b, h, hkv, t, dk, dv = check_qkv(q, k, v, step=step)
    per_token = {"layout": "[batch, heads_kv, tokens]", "note": " (one value per key/value head and token)"}
    check_per_token("eta", eta, (b, hkv, t), q.device, low=0.0, high=1.0,
                    what="finite and in [0, 1] (the momentum decay η_t)", **per_token)
    check_per_token("theta", theta, (b, hkv, t), q.device, low=0.0, high=float("inf"),
                    what="finite and >= 0 (the learning rate θ_t)", **per_token)
    check_per_token("alpha", alpha, (b, hkv, t), q.device, low=0.0, high=1.0,
                    what="finite and in [0, 1] (the forgetting α_t)", **per_token)
    return b, h, hkv, t, dk, dv


def _check_memory(memory: object) -> str:
    if not isinstance(memory, str):
        raise TypeError(f"memory must be a str, got {type(memory).__name__} {memory!r}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    return memory


def _position(pos, name: str, b: int, chunk: int, device) -> torch.Tensor:
    """``{name}.position``: an integer tensor ``[B]`` on ``device`` in ``[0, chunk)``, as int64."""
    if not isinstance(pos, torch.Tensor) or pos.dtype not in _INT_DTYPES:
        got = f"dtype {pos.dtype}" if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise TypeError(f"{name}.position must be an integer torch.Tensor [batch], got {got}")
    if tuple(pos.shape) != (b,):
        raise ValueError(f"{name}.position has shape {tuple(pos.shape)}, expected [batch] = [{b}]")
    if pos.device != device:
        raise ValueError(f"{name}.position is on {pos.device} but q is on {device}: they must match")
    if bool(((pos < 0) | (pos >= chunk)).any()):
        raise ValueError(f"{name}.position must be in [0, chunk_size) = [0, {chunk}), got {pos.tolist()}")
    return pos.to(torch.int64)


def _shared_position(pos: torch.Tensor) -> int:
    """The chunked forms run one chunk grid for the whole batch: one position for every row."""
    p = int(pos[0]) if pos.numel() else 0
    if pos.numel() and bool((pos != p).any()):
        raise ValueError(f"initial_state.position must be the same for every batch row in the chunked form "
                         f"(use titans_memory_step for rows at different positions), got {pos.tolist()}")
    return p


def _initial(state, name: str, b: int, hkv: int, dk: int, dv: int, chunk: int, device, dtype):
    """``(w, s, w_chunk, position)`` to start from (zeros for None), matrices in ``dtype``,
    ``position [B]`` int64 in ``[0, chunk)``; ``w_chunk`` is replaced by ``w`` where the position is 0."""
    shape = (b, hkv, dv, dk)
    if state is None:
        w = torch.zeros(shape, dtype=dtype, device=device)
        return w, w.clone(), w.clone(), torch.zeros(b, dtype=torch.int64, device=device)
    if not isinstance(state, TitansState):
        raise TypeError(f"{name} must be a TitansState or None, got {type(state).__name__}")
    layout = "[batch, heads_kv, head_dim_v, head_dim_k]"
    w, s, wc = initial_state_tuple(name, _Mats(*state[:3]), _Mats, dict.fromkeys(_Mats._fields, shape), device,
                                   dtype, layouts=dict.fromkeys(_Mats._fields, layout))
    pos = _position(state.position, name, b, chunk, device)
    wc = torch.where((pos == 0)[:, None, None, None], w, wc)
    return w, s, wc, pos


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(|x|² + NORM_EPS)`` over the last dim: smooth at 0, zero stays zero."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + NORM_EPS)


def _decays(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f [..., C]`` factors in ``[0, 1]`` -> ``(D [..., C(i), C(j)], d [..., C])`` with
    ``D_ij = Π_{j<s≤i} f_s`` (1 on the diagonal, 0 above it) and ``d_i = Π_{s≤i} f_s``."""
    length = f.shape[-1]
    idx = torch.arange(length, device=f.device)
    later = idx[:, None] > idx[None, :]  # [s, j]: s > j
    pairs = torch.where(later, f[..., :, None], f.new_ones(())).cumprod(-2)  # [..., i, j]: Π_{j<s≤i}
    return pairs.tril(), f.cumprod(-1)


# -- the MLP memory ------------------------------------------------------------------------


def _mlp_initial(state, name: str, b: int, hkv: int, dk: int, dv: int, chunk: int, device, dtype):
    """``(w1, w2, s1, s2, w1_chunk, w2_chunk, position)``; the hidden size is ``state.w1``'s. There is no
    default: from zero weights every gradient of the MLP is 0 (``silu(0) = 0``) and it never learns."""
    if state is None:
        raise ValueError(f"{name} is required for memory='mlp': a TitansMLPState with the MLP's initial weights "
                         "(from zero weights its gradients are 0 and the memory never learns)")
    if not isinstance(state, TitansMLPState):
        raise TypeError(f"{name} must be a TitansMLPState for memory='mlp', got {type(state).__name__}")
    w1 = state.w1
    if not isinstance(w1, torch.Tensor) or w1.dim() != 4 or w1.shape[2] == 0:
        got = tuple(w1.shape) if isinstance(w1, torch.Tensor) else type(w1).__name__
        raise ValueError(f"{name}.w1 must be [batch, heads_kv, hidden, head_dim_k] with hidden >= 1, got {got}")
    dh = w1.shape[2]
    first, second = (b, hkv, dh, dk), (b, hkv, dv, dh)
    shapes = {"w1": first, "w2": second, "s1": first, "s2": second, "w1_chunk": first, "w2_chunk": second}
    layouts = {f: "[batch, heads_kv, hidden, head_dim_k]" if shapes[f] == first and f.startswith(("w1", "s1"))
               else "[batch, heads_kv, head_dim_v, hidden]" for f in shapes}
    w1, w2, s1, s2, w1c, w2c = initial_state_tuple(name, _MLPMats(*state[:6]), _MLPMats, shapes, device, dtype,
                                                   layouts=layouts)
    pos = _position(state.position, name, b, chunk, device)
    start = (pos == 0)[:, None, None, None]
    return w1, w2, s1, s2, torch.where(start, w1, w1c), torch.where(start, w2, w2c), pos


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    """``silu'(x) = σ(x) (1 + x (1 − σ(x)))``."""
    sig = torch.sigmoid(x)
    return sig * (1.0 + x * (1.0 - sig))


def _mlp_token(mats, qt, kt, vt, et, tht, al):
    """One token of the MLP memory (the literal rule): gradients of ``‖W2 silu(W1 k) − v‖²`` at the chunk-start
    weights, then momentum, forgetting and the read-out ``W2 silu(W1 q)``. ``qt [B, Hkv, grp, Dk]``,
    ``kt [B, Hkv, Dk]``, ``vt [B, Hkv, Dv]``, gates ``[B, Hkv]``; returns ``(out [B, Hkv, grp, Dv], mats)``."""
    w1, w2, s1, s2, w1c, w2c = mats
    et, tht, al = (x[..., None, None] for x in (et, tht, al))
    hk = w1c @ kt[..., None]  # [B, Hkv, Dh, 1]
    r = 2.0 * (w2c @ F.silu(hk) - vt[..., None])  # ∂ℓ/∂y, [B, Hkv, Dv, 1]
    grad2 = r @ F.silu(hk).transpose(-1, -2)  # ∇_{W2} = r silu(h)ᵀ
    grad1 = ((w2c.transpose(-1, -2) @ r) * _silu_grad(hk)) @ kt[..., None, :]  # ∇_{W1} = (W2ᵀ r ⊙ silu'(h)) kᵀ
    s1, s2 = et * s1 - tht * grad1, et * s2 - tht * grad2
    w1, w2 = (1.0 - al) * w1 + s1, (1.0 - al) * w2 + s2
    out = w2[:, :, None] @ F.silu(w1[:, :, None] @ qt[..., None])  # [B, Hkv, grp, Dv, 1]
    return out[..., 0], (w1, w2, s1, s2, w1c, w2c)


def _mlp_step(q, k, v, eta, theta, alpha, state, chunk, normalize_keys, dims):
    b, h, hkv, _, dk, dv = dims
    cdt = compute_dtype(q.dtype)
    *mats, pos = _mlp_initial(state, "state", b, hkv, dk, dv, chunk, q.device, cdt)
    qt, kt, vt = q[:, :, 0].to(cdt), k[:, :, 0].to(cdt), v[:, :, 0].to(cdt)
    if normalize_keys:
        qt, kt = _l2norm(qt), _l2norm(kt)
    out, (w1, w2, s1, s2, w1c, w2c) = _mlp_token(mats, qt.view(b, hkv, h // hkv, dk), kt, vt,
                                                 *(x[:, :, 0].to(cdt) for x in (eta, theta, alpha)))
    pos = (pos + 1) % chunk
    start = (pos == 0)[:, None, None, None]
    state = TitansMLPState(w1, w2, s1, s2, torch.where(start, w1, w1c), torch.where(start, w2, w2c), pos)
    return out.reshape(b, h, 1, dv).to(q.dtype), state


def _mlp_naive(q, k, v, eta, theta, alpha, initial_state, chunk, normalize_keys, dims):
    b, h, hkv, t, dk, dv = dims
    f64 = torch.float64
    w1, w2, s1, s2, w1c, w2c, pos = _mlp_initial(initial_state, "initial_state", b, hkv, dk, dv, chunk, q.device,
                                                 f64)
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    if normalize_keys:
        q64, k64 = _l2norm(q64), _l2norm(k64)
    q64 = q64.view(b, hkv, h // hkv, t, dk)
    outs = []
    for i in range(t):
        start = (pos == 0)[:, None, None, None]
        w1c, w2c = torch.where(start, w1, w1c), torch.where(start, w2, w2c)  # a chunk starts: freeze the weights
        o, (w1, w2, s1, s2, w1c, w2c) = _mlp_token((w1, w2, s1, s2, w1c, w2c), q64[:, :, :, i], k64[:, :, i],
                                                   v64[:, :, i], *(x[:, :, i].to(f64) for x in (eta, theta, alpha)))
        outs.append(o)
        pos = (pos + 1) % chunk
    start = (pos == 0)[:, None, None, None]
    w1c, w2c = torch.where(start, w1, w1c), torch.where(start, w2, w2c)
    out = torch.stack(outs, dim=3) if t else q64.new_zeros(b, hkv, h // hkv, 0, dv)
    return out.reshape(b, h, t, dv), TitansMLPState(w1, w2, s1, s2, w1c, w2c, pos)


def _mlp_chunked(q, k, v, eta, theta, alpha, initial_state, chunk, normalize_keys, dims):
    """The MLP memory chunk by chunk: the decay matrices of every chunk at once; per chunk the gradients at
    the chunk-start weights (rank one per token: ``∇W1_j = δ_j k_jᵀ``, ``∇W2_j = r_j a_jᵀ``), then the
    hidden read-out ``W1_i q_i`` and the output ``W2_i silu(·)`` of every token from the unrolled scan
    (the linear memory's algebra, once per layer) and the end-of-chunk weights."""
    b, h, hkv, t, dk, dv = dims
    cdt = compute_dtype(q.dtype)
    w1, w2, s1, s2, w1c0, w2c0, pos = _mlp_initial(initial_state, "initial_state", b, hkv, dk, dv, chunk,
                                                   q.device, cdt)
    p = _shared_position(pos)
    if t == 0:
        return q.new_zeros(b, h, 0, dv), TitansMLPState(*(x.clone() for x in (w1, w2, s1, s2, w1c0, w2c0, pos)))
    grp = h // hkv
    total = p + t
    n = -(-total // chunk)
    back = n * chunk - total
    qc, kc = q.to(cdt), k.to(cdt)
    if normalize_keys:
        qc, kc = _l2norm(qc), _l2norm(kc)

    def pad(x, value=0.0):
        return F.pad(x.to(cdt), (0, 0, p, back) if x.dim() == 4 else (p, back), value=value)

    qs = pad(qc).view(b, hkv, grp, n, chunk, dk)
    ks, vs = pad(kc).view(b, hkv, n, chunk, dk), pad(v).view(b, hkv, n, chunk, dv)
    ths = pad(theta).view(b, hkv, n, chunk)
    big_a, a0 = _decays(pad(1.0 - alpha.to(cdt), 1.0).view(b, hkv, n, chunk))
    big_e, e0 = _decays(pad(eta, 1.0).view(b, hkv, n, chunk))
    live = torch.zeros(n * chunk, dtype=cdt, device=q.device)
    live[p:total] = 1.0
    live = live.view(n, chunk)
    gm = big_a @ (live[:, :, None] * big_e)  # G = A diag(live) E
    gv = (big_a @ (live * e0)[..., None])[..., 0]  # g = A (live ⊙ e)
    outs = []
    w1c, w2c = w1c0, w2c0
    for c in range(n):
        qt, kt, vt, th = qs[:, :, :, c], ks[:, :, c], vs[:, :, c], ths[:, :, c]  # qt [b, hkv, grp, C, Dk]
        if c:
            w1c, w2c = w1, w2
        hk = kt @ w1c.transpose(-1, -2)  # [b, hkv, C, Dh]: gradients at the chunk-start weights
        ak = F.silu(hk)
        r = 2.0 * (ak @ w2c.transpose(-1, -2) - vt)  # [b, hkv, C, Dv]
        dl = (r @ w2c) * _silu_grad(hk)  # δ [b, hkv, C, Dh]
        gt = (gm[:, :, c] * th[..., None, :])[:, :, None]  # G diag(θ) [b, hkv, 1, C, C]
        ai, gi = a0[:, :, c, None, :, None], gv[:, :, c, None, :, None]  # [b, hkv, 1, C, 1]
        hq = (ai * (qt @ w1[:, :, None].transpose(-1, -2)) + gi * (qt @ s1[:, :, None].transpose(-1, -2))
              - (gt * (qt @ kt[:, :, None].transpose(-1, -2))) @ dl[:, :, None])  # W1_i q_i [b, hkv, grp, C, Dh]
        aq = F.silu(hq)
        out = (ai * (aq @ w2[:, :, None].transpose(-1, -2)) + gi * (aq @ s2[:, :, None].transpose(-1, -2))
               - (gt * (aq @ ak[:, :, None].transpose(-1, -2))) @ r[:, :, None])  # [b, hkv, grp, C, Dv]
        outs.append(out)
        tg = (th * gm[:, :, c, -1])[..., None]  # θ ⊙ G_b [b, hkv, C, 1]
        te = (th * big_e[:, :, c, -1])[..., None]
        ab, gb, eb = (x[:, :, c, -1, None, None] for x in (a0, gv, e0))
        dlt, rt = dl.transpose(-1, -2), r.transpose(-1, -2)
        w1, s1 = ab * w1 + gb * s1 - dlt @ (tg * kt), eb * s1 - dlt @ (te * kt)
        w2, s2 = ab * w2 + gb * s2 - rt @ (tg * ak), eb * s2 - rt @ (te * ak)
    out = torch.stack(outs, dim=3).reshape(b, hkv, grp, n * chunk, dv)[:, :, :, p:total].reshape(b, h, t, dv)
    position = total % chunk
    if position == 0:
        w1c, w2c = w1, w2
    return out.to(q.dtype), TitansMLPState(w1, w2, s1, s2, w1c, w2c, torch.full_like(pos, position))


# -- the forms ------------------------------------------------------------------------------


def titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    normalize_keys: bool = True,
    initial_state: TitansState | None = None,
) -> tuple[torch.Tensor, TitansState]:
    """Titans' long-term memory, chunked parallel form (prefill and training).

    Args:
        q: ``[B, H, T, Dk]``: the read-out queries.
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``: the keys the memory is trained on.
        v: ``[B, Hkv, T, Dv]``: the values it is trained to return.
        eta: ``[B, Hkv, T]`` in ``[0, 1]``: momentum decay ``η_t``.
        theta: ``[B, Hkv, T]``, ``>= 0``: learning rate ``θ_t``.
        alpha: ``[B, Hkv, T]`` in ``[0, 1]``: forgetting ``α_t`` (weight decay of the memory).
        chunk_size: ``b``, tokens per mini-batch: gradients in a chunk are taken at the chunk-start
            memory (1: the sequential recurrence). Part of the definition: the same value must be
            used for every piece of a sequence and for decoding.
        memory: ``"linear"`` (a matrix memory, :class:`TitansState`) or ``"mlp"`` (``W2 silu(W1 x)``,
            :class:`TitansMLPState`; needs ``initial_state``).
        normalize_keys: L2-normalise ``k`` and ``q`` inside (see the module docstring).
        initial_state: the state after an earlier part of the sequence; None starts from zeros
            (linear memory only: the MLP memory needs its initial weights). Its ``position`` must be
            the same for every batch row.

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, ``TitansState`` or ``TitansMLPState)``; states are
        float32 (float64 for float64 inputs).
    """
    dims = _check_inputs(q, k, v, eta, theta, alpha, step=False)
    b, h, hkv, t, dk, dv = dims
    memory = _check_memory(memory)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    chunk = validate.check_positive_int("chunk_size", chunk_size)
    if memory == "mlp":
        return _mlp_chunked(q, k, v, eta, theta, alpha, initial_state, chunk, normalize_keys, dims)
    cdt = compute_dtype(q.dtype)
    w, s, wc0, pos = _initial(initial_state, "initial_state", b, hkv, dk, dv, chunk, q.device, cdt)
    p = _shared_position(pos)
    if t == 0:
        return q.new_zeros(b, h, 0, dv), TitansState(w.clone(), s.clone(), wc0.clone(), pos.clone())
    grp = h // hkv
    total = p + t
    n = -(-total // chunk)
    back = n * chunk - total  # neutral tokens: p in front (to the chunk grid), `back` at the end
    qc, kc = q.to(cdt), k.to(cdt)
    if normalize_keys:
        qc, kc = _l2norm(qc), _l2norm(kc)

    def pad(x, value=0.0):
        return F.pad(x.to(cdt), (0, 0, p, back) if x.dim() == 4 else (p, back), value=value)

    qs = pad(qc).view(b, hkv, grp, n, chunk, dk).transpose(2, 3).contiguous()  # [B, Hkv, N, grp, C, Dk]
    ks = pad(kc).view(b, hkv, n, chunk, dk)
    vs = pad(v).view(b, hkv, n, chunk, dv)
    ths = pad(theta).view(b, hkv, n, chunk)
    ets = pad(eta, 1.0).view(b, hkv, n, chunk)
    kps = pad(1.0 - alpha.to(cdt), 1.0).view(b, hkv, n, chunk)  # keep factors 1 − α
    live = torch.zeros(n * chunk, dtype=cdt, device=q.device)
    live[p:total] = 1.0
    live = live.view(n, chunk)

    bh = b * hkv
    w, s = w.reshape(bh, dv, dk), s.reshape(bh, dv, dk)  # carried chunk to chunk, [B·Hkv] at a time
    shift = wc0 - w.view(b, hkv, dv, dk)  # W_c − W_0 for the first chunk (0 unless it is entered mid-way)
    outs = []
    w_chunk_last = wc0
    group = max(1, common.GROUP_TOKENS // chunk)
    for a in range(0, n, group):
        e = min(a + group, n)
        qg, kg, vg, thg = qs[:, :, a:e], ks[:, :, a:e], vs[:, :, a:e], ths[:, :, a:e]
        big_a, a0 = _decays(kps[:, :, a:e])  # A [b, hkv, n, C, C], a [b, hkv, n, C]
        big_e, e0 = _decays(ets[:, :, a:e])
        lv = live[a:e]
        gm = big_a @ (lv[:, :, None] * big_e)  # G = A diag(live) E
        gv = (big_a @ (lv * e0)[..., None])[..., 0]  # g = A (live ⊙ e)
        qk = (qg.flatten(-3, -2) @ kg.transpose(-1, -2)).unflatten(-2, (grp, chunk))  # [b, hkv, n, grp, C, C]
        m = (2.0 * qk * (gm * thg[..., None, :])[:, :, :, None]).flatten(-3, -2)  # M [.., grp·C, C]
        mk, mv = (m @ torch.cat([kg, vg], dim=-1)).split([dk, dv], dim=-1)
        q_w = (qg * a0[:, :, :, None, :, None]).flatten(-3, -2) - mk  # O = q_w W_0ᵀ + q_s S_0ᵀ + M V
        q_s = (qg * gv[:, :, :, None, :, None]).flatten(-3, -2)
        # end of chunk, low rank: with P = W_c Kᵀ [Dv, C], K_G = 2 diag(θ ⊙ G_b) K, K_E = 2 diag(θ ⊙ E_b) K,
        #   W ← a_b W_0 + g_b S_0 − P K_G + Vᵀ K_G,   S ← e_b S_0 − P K_E + Vᵀ K_E
        # (W_c = W_0 but for a first chunk entered mid-way; wc0 is w itself when the position is 0)
        kk = 2.0 * torch.cat([kg * (thg * gm[..., -1, :])[..., None], kg * (thg * big_e[..., -1, :])[..., None]],
                             dim=-1)  # [K_G | K_E] [.., C, 2Dk]
        y = vg.transpose(-1, -2) @ kk  # [Vᵀ K_G | Vᵀ K_E] [.., Dv, 2Dk]

        def per_chunk(x):  # [b, hkv, n, ...] -> [n, b·hkv, ...]
            return x.movedim(2, 0).reshape(e - a, bh, *x.shape[3:])

        kt, kk_g, kk_e = per_chunk(kg.transpose(-1, -2)), per_chunk(kk[..., :dk]), per_chunk(kk[..., dk:])
        y_g, y_e = per_chunk(y[..., :dk]), per_chunk(y[..., dk:])
        ends = per_chunk(torch.stack([a0[..., -1], gv[..., -1], e0[..., -1]], dim=-1))[..., None, None]
        ws, ss = [], []
        for c in range(e - a):
            ws.append(w)
            ss.append(s)
            wc = wc0.reshape(bh, dv, dk) if a + c == 0 else w
            pk = torch.bmm(wc, kt[c])  # P = W_c Kᵀ
            nw = torch.baddbmm(y_g[c], pk, kk_g[c], alpha=-1.0).addcmul_(ends[c, :, 0], w).addcmul_(ends[c, :, 1], s)
            s = torch.baddbmm(y_e[c], pk, kk_e[c], alpha=-1.0).addcmul_(ends[c, :, 2], s)
            w = nw
        before_w = torch.stack(ws, dim=1).view(b, hkv, e - a, dv, dk)
        before_s = torch.stack(ss, dim=1).view(b, hkv, e - a, dv, dk)
        out = q_w @ before_w.transpose(-1, -2) + q_s @ before_s.transpose(-1, -2) + mv  # [b, hkv, n, grp·C, Dv]
        if a == 0 and p:
            first = out[:, :, :1] - mk[:, :, :1] @ shift[:, :, None].transpose(-1, -2)
            out = torch.cat([first, out[:, :, 1:]], dim=2)
        if e == n and n > 1:
            w_chunk_last = before_w[:, :, -1]
        outs.append(out)
    w, s = w.view(b, hkv, dv, dk), s.view(b, hkv, dv, dk)
    out = torch.cat(outs, dim=2).view(b, hkv, n, grp, chunk, dv).transpose(2, 3)
    out = out.reshape(b, hkv, grp, n * chunk, dv)[:, :, :, p:total].reshape(b, h, t, dv)
    position = total % chunk
    w_chunk = w if position == 0 else w_chunk_last
    return out.to(q.dtype), TitansState(w, s, w_chunk, torch.full_like(pos, position))


def titans_memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    state: TitansState | None = None,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    normalize_keys: bool = True,
) -> tuple[torch.Tensor, TitansState]:
    """One decoding step: ``q [B, H, 1, Dk]``, ``k [B, Hkv, 1, Dk]``, ``v [B, Hkv, 1, Dv]``,
    ``eta, theta, alpha [B, Hkv, 1]`` and the state so far (None: zeros) in; ``(out [B, H, 1, Dv]``
    in the input dtype, the next ``TitansState)`` out. ``chunk_size`` must be the one the state was
    built with; rows may be at different positions within their chunks."""
    dims = _check_inputs(q, k, v, eta, theta, alpha, step=True)
    b, h, hkv, _, dk, dv = dims
    memory = _check_memory(memory)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    chunk = validate.check_positive_int("chunk_size", chunk_size)
    if memory == "mlp":
        return _mlp_step(q, k, v, eta, theta, alpha, state, chunk, normalize_keys, dims)
    cdt = compute_dtype(q.dtype)
    w, s, wc, pos = _initial(state, "state", b, hkv, dk, dv, chunk, q.device, cdt)
    qt, kt, vt = q[:, :, 0].to(cdt), k[:, :, 0].to(cdt), v[:, :, 0].to(cdt)
    if normalize_keys:
        qt, kt = _l2norm(qt), _l2norm(kt)
    et, tht, al = (x[:, :, 0].to(cdt)[..., None, None] for x in (eta, theta, alpha))
    u = 2.0 * tht * ((wc @ kt[..., None]) - vt[..., None])  # θ · 2 (W_c k − v)  [b, hkv, Dv, 1]
    s = et * s - u * kt[..., None, :]
    w = (1.0 - al) * w + s
    out = w[:, :, None] @ qt.view(b, hkv, h // hkv, dk, 1)  # W q [b, hkv, grp, Dv, 1]
    pos = (pos + 1) % chunk
    wc = torch.where((pos == 0)[:, None, None, None], w, wc)
    return out.view(b, h, 1, dv).to(q.dtype), TitansState(w, s, wc, pos)


def titans_memory_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    normalize_keys: bool = True,
    initial_state: TitansState | None = None,
) -> tuple[torch.Tensor, TitansState]:
    """The specification, one token at a time in float64: at each chunk start the memory ``W_c`` is
    frozen, each token's gradient ``∇_t = 2 (W_c k_t − v_t) k_tᵀ`` is taken at it, then
    ``S_t = η_t S_{t−1} − θ_t ∇_t``, ``W_t = (1 − α_t) W_{t−1} + S_t``, ``o_t = W_t q_t``. Arguments
    as :func:`titans_memory`; returns float64 ``out`` and state."""
    dims = _check_inputs(q, k, v, eta, theta, alpha, step=False)
    b, h, hkv, t, dk, dv = dims
    memory = _check_memory(memory)
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    chunk = validate.check_positive_int("chunk_size", chunk_size)
    if memory == "mlp":
        return _mlp_naive(q, k, v, eta, theta, alpha, initial_state, chunk, normalize_keys, dims)
    f64 = torch.float64
    w, s, wc, pos = _initial(initial_state, "initial_state", b, hkv, dk, dv, chunk, q.device, f64)
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    if normalize_keys:
        q64, k64 = _l2norm(q64), _l2norm(k64)
    q64 = q64.view(b, hkv, h // hkv, t, dk)
    outs = []
    for i in range(t):
        start = (pos == 0)[:, None, None, None]
        wc = torch.where(start, w, wc)  # a chunk starts: freeze the memory its gradients are taken at
        kt, vt = k64[:, :, i, :, None], v64[:, :, i, :, None]
        et, tht, al = (x[:, :, i].to(f64)[..., None, None] for x in (eta, theta, alpha))
        grad = 2.0 * (wc @ kt - vt) @ kt.transpose(-1, -2)  # ∇‖W k − v‖² at W = W_c
        s = et * s - tht * grad
        w = (1.0 - al) * w + s
        outs.append(w[:, :, None] @ q64[:, :, :, i, :, None])  # W q
        pos = (pos + 1) % chunk
    wc = torch.where((pos == 0)[:, None, None, None], w, wc)
    out = torch.stack(outs, dim=3).squeeze(-1) if t else q64.new_zeros(b, hkv, h // hkv, 0, dv)
    return out.reshape(b, h, t, dv), TitansState(w, s, wc, pos)


def titans_memory_read(q: torch.Tensor, memory_weights, *, normalize_keys: bool = True) -> torch.Tensor:
    """Read the memory without updating it (the paper's ``M*(q)``): ``W q`` (linear) or
    ``W2 silu(W1 q)`` (MLP), ``q`` L2-normalised first when ``normalize_keys`` (as the other forms do).

    Args:
        q: ``[B, H, T, Dk]``; query head ``h`` reads key/value head ``h // (H / Hkv)``'s memory.
        memory_weights: a :class:`TitansState` (reads ``w``), a :class:`TitansMLPState` (reads
            ``w1, w2``), or the weights alone: ``(w,)`` with ``w [B, Hkv, Dv, Dk]`` or ``(w1, w2)``
            with ``w1 [B, Hkv, Dh, Dk]``, ``w2 [B, Hkv, Dv, Dh]``.
        normalize_keys: as :func:`titans_memory` (the same value the memory was written with).

    Returns:
        ``[B, H, T, Dv]`` in ``q``'s dtype (computed in float32; float64 for float64 ``q``).
    """
    check_float_tensor("q", q, "[batch, heads, tokens, head_dim_k]")
    normalize_keys = check_flag("normalize_keys", normalize_keys)
    if isinstance(memory_weights, TitansState):
        mats = (memory_weights.w,)
    elif isinstance(memory_weights, TitansMLPState):
        mats = (memory_weights.w1, memory_weights.w2)
    elif isinstance(memory_weights, tuple) and len(memory_weights) in (1, 2):
        mats = memory_weights
    else:
        raise TypeError("memory_weights must be a TitansState, a TitansMLPState or a tuple (w,) / (w1, w2), got "
                        f"{type(memory_weights).__name__}")
    b, h, t, dk = q.shape
    for name, m in zip(("w", "w2") if len(mats) == 1 else ("w1", "w2"), mats):
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != b or m.shape[1] == 0 \
                or h % m.shape[1] != 0:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"memory_weights.{name} must be [batch = {b}, heads_kv (dividing heads = {h}), ., .], "
                             f"got {got}")
        if m.device != q.device:
            raise ValueError(f"memory_weights.{name} is on {m.device} but q is on {q.device}: they must match")
    first = mats[0]
    if first.shape[-1] != dk or (len(mats) == 2 and (mats[1].shape[:2] != first.shape[:2]
                                                      or mats[1].shape[-1] != first.shape[2])):
        raise ValueError(f"memory_weights have shapes {[tuple(m.shape) for m in mats]}, which do not read "
                         f"q of head_dim_k {dk} (w [B, Hkv, Dv, Dk], or w1 [B, Hkv, Dh, Dk] and w2 [B, Hkv, Dv, Dh])")
    cdt = compute_dtype(q.dtype)
    hkv = first.shape[1]
    qc = q.to(cdt)
    if normalize_keys:
        qc = _l2norm(qc)
    qc = qc.reshape(b, hkv, h // hkv, t, dk)
    mats = [m.to(cdt)[:, :, None] for m in mats]  # [B, Hkv, 1, ., .]
    out = qc @ mats[0].transpose(-1, -2)
    if len(mats) == 2:
        out = F.silu(out) @ mats[1].transpose(-1, -2)
    return out.reshape(b, h, t, -1).to(q.dtype)


def titans_state_size(heads_kv: int, head_dim_k: int, head_dim_v: int, *, hidden: int | None = None) -> int:
    """Bytes of Titans memory state per sequence (one layer), float32 values plus the int64 position.

    ``hidden=None``: the linear memory, ``w``, ``s`` and ``w_chunk`` of ``heads_kv · Dv · Dk`` values each.
    ``hidden=Dh``: the MLP memory, weights, momenta and chunk-start weights of
    ``heads_kv · (Dh · Dk + Dv · Dh)`` values each."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    head_dim_k = validate.check_positive_int("head_dim_k", head_dim_k)
    head_dim_v = validate.check_positive_int("head_dim_v", head_dim_v)
    if hidden is None:
        return 3 * 4 * heads_kv * head_dim_k * head_dim_v + 8
    hidden = validate.check_positive_int("hidden", hidden)
    return 3 * 4 * heads_kv * hidden * (head_dim_k + head_dim_v) + 8
