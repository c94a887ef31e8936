"""Eager block-sparse attention with an online softmax: the portable exact kernel.

For each query block it visits only the key blocks the layout marks as non-empty, evaluates the
mask only on partial blocks, and folds key chunks into a running (max, sum, accumulator) as in
FlashAttention — so memory is ``O(block × key_chunk)`` per step and never ``O(N²)``. Used for
``dense_chunked`` and as the fallback for every masked method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.core.masks import Mask
from longattn.kernels.layout import BlockLayout

#: ``bias(h, q_pos, k_pos) -> [1|B, H, bq, nk]`` float added to scaled scores (ALiBi, T5 ...).
ScoreBias = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TiledInfo:
    visited_blocks: int = 0
    partial_blocks: int = 0


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    layout: BlockLayout,
    mask: Mask | None,
    bias: ScoreBias | None = None,
    row_bias: Callable[[int, int], torch.Tensor] | None = None,
    key_chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, TiledInfo]:
    """Exact attention over the blocks of ``layout``.

    Args:
        q: ``[B, Hq, Tq, D]`` float32; k, v: ``[B, Hkv, Tk, D]`` float32.
        layout: block classification of ``mask`` (see ``kernels.layout.build_layout``).
        mask: token-level rule applied on partial blocks (None: every visited pair is visible).
        bias: optional positional score bias.
        row_bias: optional ``(q0, q1) -> [B, Hq, q1-q0, Tk]`` content-dependent bias (CoPE),
            computed once per query block (memory ``O(block × Tk)``).
        key_chunk: keys folded into the online softmax per step.

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` (float32; rows with no visible key give
        0 and -inf) and a ``TiledInfo``.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs = layout.block
    dev = q.device
    out = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=dev)
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float32, device=dev)
    info = TiledInfo()
    b_idx = torch.arange(b, device=dev).view(b, 1, 1, 1)
    h_idx = torch.arange(hq, device=dev).view(1, hq, 1, 1)
    # a block is visited if any batch/head needs it, and unmasked only if it is full for all.
    visit = layout.any.flatten(0, 1).any(0).cpu()  # [nqb, nkb]
    full = layout.all.flatten(0, 1).all(0).cpu()
    per_step_blocks = max(1, key_chunk // bs)

    for qi in range(layout.n_q_blocks):
        q0, q1 = qi * bs, min((qi + 1) * bs, tq)
        row = visit[qi]
        if not bool(row.any()):
            continue
        # Full blocks need no mask and partial blocks do; softmax does not care about key order,
        # so fold them in separate chunks: full runs are sliced without a copy and the mask is
        # evaluated only on the (few) partial blocks.
        full_blocks = (row & full[qi]).nonzero().flatten().tolist()
        partial_blocks = (row & ~full[qi]).nonzero().flatten().tolist()
        info.visited_blocks += len(full_blocks) + len(partial_blocks)
        info.partial_blocks += len(partial_blocks)
        chunks = [(full_blocks[c : c + per_step_blocks], False) for c in range(0, len(full_blocks), per_step_blocks)]
        chunks += [(partial_blocks[c : c + per_step_blocks], True) for c in range(0, len(partial_blocks), per_step_blocks)]
        qt = q[:, :, q0:q1].reshape(b, hk, g * (q1 - q0), d)
        q_pos = (torch.arange(q0, q1, device=dev) + layout.q_offset).view(-1, 1)
        m_run = torch.full((b, hq, q1 - q0), -math.inf, device=dev)
        l_run = torch.zeros(b, hq, q1 - q0, device=dev)
        acc = torch.zeros(b, hq, q1 - q0, d, device=dev)
        rows = row_bias(q0, q1) if row_bias is not None else None
        for chunk, is_partial in chunks:
            k_sel, v_sel, k_pos = _gather_blocks(k, v, chunk, bs, tk)
            s = torch.matmul(qt, k_sel.transpose(-1, -2)).view(b, hq, q1 - q0, -1)
            s.mul_(scale)
            if bias is not None:
                s = s + bias(h_idx, q_pos, k_pos.view(1, -1))
            if rows is not None:
                s = s + rows.index_select(-1, k_pos)
            if is_partial and mask is not None:
                allowed = mask.mask_mod(b_idx, h_idx, q_pos, k_pos.view(1, -1))
                s = s.masked_fill(~allowed, -math.inf)
            m_new = torch.maximum(m_run, s.amax(-1))
            # rows that have seen no visible key yet keep m = -inf; shift by 0 there to avoid NaN.
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
            p = s.sub_(m_safe[..., None]).exp_()  # s is a fresh buffer: reuse it
            alpha = torch.exp(m_run - m_safe)
            l_run = l_run * alpha + p.sum(-1)
            pv = torch.matmul(p.view(b, hk, g * (q1 - q0), -1), v_sel).view(b, hq, q1 - q0, d)
            acc = acc * alpha[..., None] + pv
            m_run = m_new
        seen = l_run > 0
        out[:, :, q0:q1] = torch.where(seen[..., None], acc / l_run.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, q0:q1] = torch.where(seen, m_run + torch.log(l_run.clamp_min(1e-30)), -math.inf)
    return out, lse, info


def _gather_blocks(k, v, blocks: list[int], bs: int, tk: int):
    """Keys/values of the given blocks, sliced where blocks are consecutive, and their positions."""
    runs: list[tuple[int, int]] = []
    for j in blocks:
        lo, hi = j * bs, min((j + 1) * bs, tk)
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    if len(runs) == 1:
        lo, hi = runs[0]
        return k[:, :, lo:hi], v[:, :, lo:hi], torch.arange(lo, hi, device=k.device)
    pos = torch.cat([torch.arange(lo, hi, device=k.device) for lo, hi in runs])
    return k.index_select(2, pos), v.index_select(2, pos), pos
