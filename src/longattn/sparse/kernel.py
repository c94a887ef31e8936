"""One exact kernel for any block selection.

For each query block the keys it may use split in two:

* *past* blocks — selected blocks that end before the query block's first query, so every query
  sees every key in them: gathered per query head as whole contiguous blocks (GQA heads gather
  from their shared key head; nothing else of the cache is copied) and attended with no mask;
* *present* keys — from the start of the query block's first key block up to its last query
  (forced by the selector under causality): one contiguous slice, masked per token.

Each part runs torch's fused CPU kernel (eager matmul + softmax elsewhere), which returns the
LSE; the parts merge exactly. A query block whose visible blocks all fit in the budget is dense
and takes the slice path for all of its keys. Key padding adds a mask to the gathered part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.kernels.sdpa import fused_cpu_available
from longattn.core.merge import merge_partials
from longattn.kernels.tiled import chunk_attention
from longattn.sparse.select import Selection


@dataclass
class SparseInfo:
    visible_pairs: float = 0.0  # (query, key) pairs attended, averaged over batch × heads


def _masked(q, k, v, scale, visible, fused):
    """Attention with a bool visibility ``[B|1, H|1, M, n]``; rows seeing nothing → 0, -inf."""
    add = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, -math.inf)
    o, l = chunk_attention(q, k, v, scale, add, fused)
    b, h, m = q.shape[:3]
    alive = visible.any(-1).expand(b, h, m)
    o = o.reshape(b, h, m, -1).masked_fill(~alive[..., None], 0.0)
    return o, l.reshape(b, h, m).float().masked_fill(~alive, -math.inf)


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
        selection: from ``longattn.sparse.select``; ``indices [B, Hq, n_q_blocks, n_sel]``
            (sorted, ``-1`` = unused slot).
        key_padding_mask: bool ``[B, Tk]``, True = real key.

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` (float32; rows with no visible key give 0 and
        -inf), and a ``SparseInfo``.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs, qbs = selection.block, selection.q_block
    n_blocks = math.ceil(tk / bs)
    off = tk - tq
    fused = fused_cpu_available(q)
    # whole blocks as rows of one flat table, so a gather copies contiguous blocks
    pad = n_blocks * bs - tk
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(b * hk * n_blocks, bs * d)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(b * hk * n_blocks, bs * d)
    row0 = ((torch.arange(b, device=q.device) * hk).view(b, 1) + torch.arange(hk, device=q.device).view(1, hk))
    row0 = (row0 * n_blocks).repeat_interleave(g, dim=1)  # [B, Hq]: first table row of each head's key head
    kpm = key_padding_mask
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    info = SparseInfo()
    for i in range(selection.indices.shape[2]):
        q0, q1 = i * qbs, min((i + 1) * qbs, tq)
        m = q1 - q0
        qlo, qhi = q0 + off, q1 - 1 + off
        qt = q[:, :, q0:q1]
        q_pos = torch.arange(qlo, qhi + 1, device=q.device)[:, None]
        idx = selection.indices[:, :, i]  # [B, Hq, n_sel]
        # the present part starts at the first block holding a key some query here cannot see
        present_start = (max(qlo, 0) // bs) * bs if causal else tk
        visible_blocks = math.ceil(min(qhi + 1, tk) / bs) if causal else n_blocks
        pieces = []
        if causal and visible_blocks <= selection.n_sel:
            present_start = 0  # every visible block is selected: dense slice
        else:
            past = idx.masked_fill(idx * bs + bs - 1 >= present_start, -1) if causal else idx
            n_past = int((past >= 0).sum(-1).max())
            if n_past:
                past = past.sort(-1, descending=True).values[..., :n_past]  # valid first
                valid = past >= 0
                rows = (row0[..., None] + past.clamp_min(0)).flatten()
                k_sel = k_blocks.index_select(0, rows).view(b, hq, n_past * bs, d)
                v_sel = v_blocks.index_select(0, rows).view(b, hq, n_past * bs, d)
                pos = (past.clamp_min(0)[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)
                ok = valid[..., None].expand(-1, -1, -1, bs).flatten(-2) & (pos < tk)
                if kpm is not None:
                    ok = ok & torch.gather(kpm[:, None, :].expand(b, hq, tk), 2, pos.clamp(max=tk - 1))
                if bool(ok.all()):
                    o_c, l_c = chunk_attention(qt, k_sel, v_sel, scale, None, fused)
                    pieces.append((o_c.reshape(b, hq, m, d), l_c.reshape(b, hq, m).float()))
                    if count_pairs:
                        info.visible_pairs += m * n_past * bs
                else:
                    vis = ok[:, :, None, :]
                    pieces.append(_masked(qt, k_sel, v_sel, scale, vis, fused))
                    if count_pairs:
                        info.visible_pairs += float(vis.expand(b, hq, m, -1).sum()) / (b * hq)
        if present_start < tk and (not causal or present_start <= qhi):
            hi = min(qhi + 1, tk) if causal else tk
            k_pos = torch.arange(present_start, hi, device=q.device)[None, :]
            vis = (k_pos <= q_pos) if causal else torch.ones(1, k_pos.numel(), dtype=torch.bool, device=q.device)
            vis = vis[None, None]
            if kpm is not None:
                vis = vis & kpm[:, None, None, present_start:hi]
            kg = k[:, :, present_start:hi]
            vg = v[:, :, present_start:hi]
            # GQA: stack the group's query heads along tokens (no copy of keys)
            qg = qt.reshape(b, hk, g * m, d)
            visg = vis.expand(vis.shape[0], 1, m, -1).repeat(1, 1, g, 1) if g > 1 else vis
            o_c, l_c = _masked(qg, kg, vg, scale, visg, fused)
            pieces.append((o_c.reshape(b, hq, m, d), l_c.reshape(b, hq, m)))
            if count_pairs:
                info.visible_pairs += float(vis.expand(b, 1, m, -1).sum()) / b
        if not pieces:
            out[:, :, q0:q1] = 0.0
            lse[:, :, q0:q1] = -math.inf
            continue
        o_run, l_run = merge_partials([o for o, _ in pieces], [l for _, l in pieces])
        out[:, :, q0:q1] = o_run
        lse[:, :, q0:q1] = l_run
    return out, lse, info
