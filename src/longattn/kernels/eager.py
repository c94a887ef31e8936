"""Attention over per-pair visibility: the pieces of methods that decide per (query, key) pair
what is visible (token-level selection, clusters, projections, gathered key sets).

* ``attend_scores`` — softmax from explicit scores (``-inf`` = hidden);
* ``attend_visible`` — a bool visibility through torch's fused kernel (CPU or CUDA);
* ``gather_tokens`` — the keys/values each query head reads, from a view of the cache.

The one rule all of them keep: a row that sees nothing gives output 0 and LSE ``-inf`` (never
NaN, which a softmax of an all ``-inf`` row would give).
"""

from __future__ import annotations

import math

import torch

from longattn.core.merge import row_logsumexp
from longattn.kernels.tiled import chunk_attention


def attend_scores(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores) @ v`` with its log-sum-exp.

    Args:
        scores: ``[B, Hq, M, N]`` float32, already scaled; ``-inf`` where a key is hidden.
        v: ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (the query heads of a group share a value head).

    Returns:
        ``out [B, Hq, M, D]``, ``lse [B, Hq, M]``; rows with every score ``-inf`` give 0 and ``-inf``.
    """
    b, hq, m, n = scores.shape
    hk, d = v.shape[1], v.shape[-1]
    lse = row_logsumexp(scores)
    p = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # hidden → 0, dead rows → 0
    out = torch.matmul(p.reshape(b, hk, (hq // hk) * m, n), v).view(b, hq, m, d)
    return out, lse


def attend_visible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor,
                   fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q [B, H, M, D]`` over ``k, v [B, H|Hkv, n, D]`` where ``visible``
    (bool, broadcastable to ``[B, H, M, n]``) says which pairs count, through torch's fused
    kernel when ``fused`` (``longattn.kernels.tiled.chunk_attention``).

    Returns ``out [B, H, M, D]``, ``lse [B, H, M]`` float32; rows seeing nothing give 0 and ``-inf``.
    """
    add = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, -math.inf)
    o, l = chunk_attention(q, k, v, scale, add, fused)
    b, h, m = q.shape[:3]
    alive = visible.any(-1).expand(b, h, m)
    o = o.reshape(b, h, m, -1).masked_fill(~alive[..., None], 0.0)
    return o, l.reshape(b, h, m).float().masked_fill(~alive, -math.inf)


def gather_tokens(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values each query head reads: ``k, v [B, Hkv, T, D]``, ``positions`` int
    ``[B, Hq, ..., L]`` (in ``[0, T)``; query head ``h`` reads key-value head ``h // (Hq/Hkv)``)
    → ``k_sel, v_sel [B, Hq, ..., L, D]``. The cache is indexed as a view; only the chosen rows
    are copied, into ``out`` (two flat buffers of at least ``positions.numel()·D`` elements, of
    ``k``'s dtype) when given — a caller that gathers every step reuses its buffers rather than
    paying a fresh multi-MB allocation (and its page faults) each time. ``out`` does not record
    autograd history."""
    b, hk, t, d = k.shape
    hq = positions.shape[1]
    base = (torch.arange(b * hk, device=k.device).view(b, hk) * t).repeat_interleave(hq // hk, dim=1)
    rows = (base.view(b, hq, *([1] * (positions.dim() - 2))) + positions).flatten()
    shape = (*positions.shape, d)
    k_flat, v_flat = k.reshape(b * hk * t, d), v.reshape(b * hk * t, d)
    if out is None:
        return k_flat.index_select(0, rows).view(shape), v_flat.index_select(0, rows).view(shape)
    size = rows.numel() * d
    k_out = torch.index_select(k_flat, 0, rows, out=out[0][:size].view(-1, d))
    v_out = torch.index_select(v_flat, 0, rows, out=out[1][:size].view(-1, d))
    return k_out.view(shape), v_out.view(shape)


def visible_rows(q0: int, q1: int, tokens_q: int, tokens_k: int, causal: bool,
                 key_padding_mask: torch.Tensor | None, device=None) -> torch.Tensor:
    """Which keys queries ``q0 … q1-1`` may see at all: bool ``[B|1, 1, q1-q0, Tk]`` from
    causality (query ``i`` at position ``i + Tk - Tq``) and key padding (True = real key)."""
    k_pos = torch.arange(tokens_k, device=device)
    if causal:
        q_pos = torch.arange(q0, q1, device=device)[:, None] + (tokens_k - tokens_q)
        vis = (k_pos[None, :] <= q_pos)[None, None]
    else:
        vis = torch.ones(1, 1, q1 - q0, tokens_k, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    return vis
