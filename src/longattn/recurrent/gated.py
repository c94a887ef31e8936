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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs (gradient checks) compute in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, log_gate, *, step: bool) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``,
    ``log_gate [B, Hkv, T, Dk]``; return ``(B, H, Hkv, T, Dk, Dv)``."""
    dims = {"q": "[batch, heads, tokens, head_dim_k]", "k": "[batch, heads_kv, tokens, head_dim_k]",
            "v": "[batch, heads_kv, tokens, head_dim_v]"}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 {dims[name]}, got shape {tuple(t.shape)}")
        if t.dtype not in validate.FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    b, h, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    if tuple(k.shape) != (b, hkv, t, dk):
        raise ValueError(
            f"k has shape {tuple(k.shape)}, expected [batch, heads_kv, tokens, head_dim_k] with "
            f"batch={b}, tokens={t}, head_dim_k={dk} as in q of shape {tuple(q.shape)}"
        )
    if tuple(v.shape[:3]) != (b, hkv, t):
        raise ValueError(
            f"v has shape {tuple(v.shape)}, expected [batch, heads_kv, tokens, head_dim_v] = "
            f"[{b}, {hkv}, {t}, head_dim_v] as in k of shape {tuple(k.shape)}"
        )
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k has {hkv} heads but q has {h}: heads must be a positive multiple of heads_kv")
    if dk == 0:
        raise ValueError(f"head_dim_k must be at least 1, got q of shape {tuple(q.shape)}")
    if step and t != 1:
        raise ValueError(f"a step takes one token: q, k and v must have tokens == 1, got {t}")
    _check_log_gate(log_gate, (b, hkv, t, dk), q.device)
    return b, h, hkv, t, dk, dv


def _check_log_gate(g, expected: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"log_gate must be a torch.Tensor, got {type(g).__name__}")
    if g.dtype not in validate.FLOAT_DTYPES:
        raise TypeError(f"log_gate has dtype {g.dtype}; expected a floating dtype")
    if tuple(g.shape) != expected:
        raise ValueError(
            f"log_gate has shape {tuple(g.shape)}, expected [batch, heads_kv, tokens, head_dim_k] = "
            f"{list(expected)} (one gate per key channel, following k)"
        )
    if g.device != device:
        raise ValueError(f"log_gate is on {g.device} but q is on {device}: they must match")
    with torch.no_grad():
        bad = ~(torch.isfinite(g) & (g <= 0))
        if bool(bad.any()):
            raise ValueError(
                "log_gate must be finite and <= 0 (the log of a forget gate in (0, 1]), got "
                f"{g[bad][0].item()!r} at index {tuple(bad.nonzero()[0].tolist())}"
            )


def _initial(state, b: int, hkv: int, dk: int, dv: int, device, dtype, name: str) -> torch.Tensor:
    """The state tensor to start from (zeros for None), in the compute dtype."""
    if state is None:
        return torch.zeros(b, hkv, dk, dv, dtype=dtype, device=device)
    if not isinstance(state, GLAState):
        raise TypeError(f"{name} must be a GLAState or None, got {type(state).__name__}")
    s = state.s
    if not isinstance(s, torch.Tensor) or s.dtype not in validate.FLOAT_DTYPES:
        raise TypeError(f"{name}.s must be a floating torch.Tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    if tuple(s.shape) != (b, hkv, dk, dv):
        raise ValueError(
            f"{name}.s has shape {tuple(s.shape)}, expected [batch, heads_kv, head_dim_k, head_dim_v] = "
            f"{[b, hkv, dk, dv]}"
        )
    if s.device != device:
        raise ValueError(f"{name}.s is on {s.device} but q is on {device}: they must match")
    return s.to(dtype)


# -- gate sums that keep every exponent <= 0 ------------------------------------------------


def _sums_after(g: torch.Tensor) -> torch.Tensor:
    """``[..., L, D] -> [..., L, D]``: ``Σ_{s>j} g_s`` along ``L`` (0 at the last position)."""
    rev = g.flip(-2).cumsum(-2).flip(-2)  # Σ_{s≥j}, summed from the end so short sums stay exact
    return F.pad(rev[..., 1:, :], (0, 0, 0, 1))


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``[..., L, D] -> [..., L(i), L(j), D]``: ``Σ_{j<s≤i} g_s`` (0 where ``i ≤ j``). Each entry sums
    only its own stretch of ``g`` (a 0/1 matrix product), so its rounding error scales with the
    entry itself, not with a prefix sum: near pairs keep exact weights under hard gates."""
    length = g.shape[-2]
    idx = torch.arange(length, device=g.device)
    i, j, s = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    stretch = ((j < s) & (s <= i)).to(g.dtype).view(length * length, length)  # [(i, j), s]
    return (stretch @ g).view(*g.shape[:-2], length, length, g.shape[-1])


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
    cdt = _compute_dtype(q.dtype)
    s = _initial(initial_state, b, hkv, dk, dv, q.device, cdt, "initial_state")
    if t == 0:
        return q.new_zeros(b, h, 0, dv), GLAState(s.clone())
    grp = h // hkv
    sub = _sub_chunk(chunk)
    n, m = -(-t // chunk), chunk // sub
    pad = n * chunk - t  # padded tokens: k = v = 0 and gate 1 leave the state as it is

    def chunked(x: torch.Tensor) -> torch.Tensor:
        x = x.to(cdt)
        return F.pad(x, (0, 0, 0, pad)) if pad else x

    qs = (chunked(q) * scale).view(b, hkv, grp, n, m, sub, dk)
    ks = chunked(k).view(b, hkv, n, m, sub, dk)
    vs = chunked(v).view(b, hkv, n, chunk, dv)
    gs = chunked(log_gate).view(b, hkv, n, m, sub, dk)

    # intra-chunk scores, sub-chunk I (rows) against sub-chunks J < I (columns): both sides decayed
    # to r_I, the last token before sub-chunk I
    local = gs.cumsum(-2)  # b_i - b_{r_I} for i in I
    total = local[..., -1, :]  # [b, hkv, n, m, dk]: a whole sub-chunk's log decay
    upto = total.cumsum(-2)  # Σ_{K≤J}
    before = F.pad(upto[..., :-1, :], (0, 0, 1, 0))  # Σ_{K<I}
    between = before[..., :, None, :] - upto[..., None, :, :]  # [.., m(I), m(J), dk]: Σ_{J<K<I}
    expo = between[..., None, :] + _sums_after(gs)[..., None, :, :, :]  # b_{r_I} - b_j, j in J
    mi = torch.arange(m, device=q.device)
    earlier = (mi[:, None] > mi[None, :])[:, :, None, None]  # J < I
    expo = torch.where(earlier, expo, expo.new_full((), -math.inf))
    k_off = (ks[..., None, :, :, :] * expo.exp()).reshape(b, hkv, n, m, chunk, dk)
    q_off = qs * local.exp()[:, :, None]
    scores = q_off @ k_off[:, :, None].transpose(-1, -2)  # [b, hkv, grp, n, m, sub, chunk]

    # inside a sub-chunk: pairwise decay per channel, exp(Σ_{j<s≤i} log α_s), masked after the sum
    # over channels (the exponent is 0, not positive, above the diagonal: nothing overflows)
    k_diag = ks[..., None, :, :] * _segment_sums(gs).exp()  # [b, hkv, n, m, sub(i), sub(j), dk]
    diag = (k_diag[:, :, None] @ qs[..., None]).squeeze(-1)  # [b, hkv, grp, n, m, sub(i), sub(j)]
    si = torch.arange(sub, device=q.device)
    diag = diag * (si[:, None] >= si[None, :]).to(cdt)
    eye = torch.eye(m, dtype=cdt, device=q.device)[:, None, :, None]
    scores = scores.view(b, hkv, grp, n, m, sub, m, sub) + diag.unsqueeze(-2) * eye
    out = scores.view(b, hkv, grp, n, chunk, chunk) @ vs[:, :, None]

    # across chunks: the incoming state, read with the decay since the chunk's start
    g_flat = gs.view(b, hkv, n, chunk, dk)
    cum = g_flat.cumsum(-2)  # b_i
    q_in = qs.view(b, hkv, grp, n, chunk, dk) * cum.exp()[:, :, None]
    k_out = ks.view(b, hkv, n, chunk, dk) * _sums_after(g_flat).exp()  # k_j ⊙ exp(b_C - b_j)
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
    cdt = _compute_dtype(q.dtype)
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
