"""One exact kernel for any block selection.

For each query block it gathers, per query head, the keys of its selected blocks
(``[B, Hq, n_sel·block, D]``; GQA heads gather from their shared key head without copying the
cache), hides what a query may not see (future keys under causality, unused slots, past-the-end
positions) with an additive mask, and runs torch's fused CPU kernel (eager matmul + softmax
elsewhere), which also returns the LSE — so the result merges exactly with other pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.kernels.tiled import chunk_attention
from longattn.kernels.sdpa import fused_cpu_available
from longattn.sparse.select import Selection


@dataclass
class SparseInfo:
    visible_pairs: float = 0.0  # (query, key) pairs attended, averaged over batch × heads


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    count_pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, SparseInfo]:
    """Exact attention of each query over the keys of its query block's selected blocks.

    Args:
        q: ``[B, Hq, Tq, D]`` float32; k, v: ``[B, Hkv, Tk, D]`` float32.
        selection: from ``longattn.sparse.select``; ``indices [B, Hq, n_q_blocks, n_sel]``.
        key_padding_mask: bool ``[B, Tk]``, True = real key.

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` (float32; rows with no visible key give 0 and
        -inf), and a ``SparseInfo``.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs, qbs = selection.block, selection.q_block
    off = tk - tq
    fused = fused_cpu_available(q)
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    info = SparseInfo()
    within = torch.arange(bs, device=q.device)
    for i in range(selection.indices.shape[2]):
        q0, q1 = i * qbs, min((i + 1) * qbs, tq)
        idx = selection.indices[:, :, i]  # [B, Hq, n_sel]
        pos = (idx.clamp_min(0)[..., None] * bs + within).flatten(-2)  # [B, Hq, L]
        ok = (idx >= 0)[..., None].expand(-1, -1, -1, bs).flatten(-2) & (pos < tk)
        pos = pos.clamp(max=tk - 1)
        if key_padding_mask is not None:
            ok = ok & torch.gather(key_padding_mask[:, None, :].expand(b, hq, tk), 2, pos)
        # gather per query head from its key head: [B, Hkv, G·L] indices, no copy of the cache
        gidx = pos.reshape(b, hk, g * pos.shape[-1])[..., None].expand(-1, -1, -1, d)
        k_sel = torch.gather(k, 2, gidx).view(b, hq, -1, d)
        v_sel = torch.gather(v, 2, gidx).view(b, hq, -1, d)
        visible = ok[:, :, None, :]  # [B, Hq, 1|bq, L]
        if causal:
            q_pos = torch.arange(q0, q1, device=q.device)[:, None] + off
            visible = visible & (pos[:, :, None, :] <= q_pos)
        add = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, -math.inf)
        o_c, l_c = chunk_attention(q[:, :, q0:q1], k_sel, v_sel, scale, add, fused)
        alive = visible.any(-1).expand(b, hq, q1 - q0)
        out[:, :, q0:q1] = o_c.reshape(b, hq, q1 - q0, d).masked_fill(~alive[..., None], 0.0)
        lse[:, :, q0:q1] = l_c.reshape(b, hq, q1 - q0).float().masked_fill(~alive, -math.inf)
        if count_pairs:
            info.visible_pairs += float(visible.expand(b, hq, q1 - q0, -1).sum()) / (b * hq)
    return out, lse, info
