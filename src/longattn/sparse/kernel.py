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

When query blocks are whole key blocks and aligned with them (prefill; no key padding), the
present part of every query block is the same causal square, so all query blocks run *batched*
(``_batched_sparse_attention``): one fused causal call over all diagonal squares, and the past
parts in groups of query blocks stacked along the batch axis. Small fused calls lose to per-call
overhead and cache misses on this CPU (a 64-query call reaches ~60% of SDPA's FLOP rate, a
256-query call ~85%), so batching and larger query blocks are what make sparsity pay.
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
    if batched_path_applies(selection, tq, tk, causal, key_padding_mask, fused):
        return _batched_sparse_attention(q, k, v, selection, scale=scale, causal=causal, count_pairs=count_pairs)
    # keys as token rows of one flat table (a view, no copy of the cache: decoding must not pay
    # O(cache) per step); a gather copies only the selected blocks' rows
    k_rows = k.reshape(b * hk * tk, d)
    v_rows = v.reshape(b * hk * tk, d)
    row0 = ((torch.arange(b, device=q.device) * hk).view(b, 1) + torch.arange(hk, device=q.device).view(1, hk))
    row0 = (row0 * tk).repeat_interleave(g, dim=1)  # [B, Hq]: first table row of each head's key head
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
        if causal and visible_blocks <= selection.n_sel and bool(((idx >= 0).sum(-1) == visible_blocks).all()):
            present_start = 0  # every visible block is selected: dense slice
        else:
            past = idx.masked_fill(idx * bs + bs - 1 >= present_start, -1) if causal else idx
            n_past = int((past >= 0).sum(-1).max())
            if n_past:
                past = past.sort(-1, descending=True).values[..., :n_past]  # valid first
                valid = past >= 0
                pos = (past.clamp_min(0)[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)
                rows = (row0[..., None] + pos.clamp(max=tk - 1)).flatten()
                k_sel = k_rows.index_select(0, rows).view(b, hq, n_past * bs, d)
                v_sel = v_rows.index_select(0, rows).view(b, hq, n_past * bs, d)
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


#: past-part gathers are batched over this many keys × query blocks (bounds the gathered copy)
GATHER_KEYS = 1 << 15


def batched_path_applies(selection: Selection, tq: int, tk: int, causal: bool, key_padding_mask, fused: bool) -> bool:
    """The batched kernel needs the fused CPU op, no key padding, several query blocks, and under
    causality query blocks made of whole key blocks that start on a key-block boundary."""
    if not fused or key_padding_mask is not None or selection.indices.shape[2] < 2:
        return False
    if not causal:
        return True
    return selection.q_block % selection.block == 0 and (tk - tq) % selection.block == 0


def _blocks_of(x: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """``[B, H, T, D]`` → ``[B·n, H, size, D]``: consecutive blocks of ``size`` tokens stacked on the
    batch axis (zero-padded at the end)."""
    b, h, t, d = x.shape
    pad = n * size - t
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(b, h, n, size, d).transpose(1, 2).reshape(b * n, h, size, d)


def _batched_sparse_attention(q, k, v, selection: Selection, *, scale: float, causal: bool, count_pairs: bool):
    """``sparse_attention`` with all query blocks batched (see the module docstring)."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs, qbs = selection.block, selection.q_block
    n_blocks = math.ceil(tk / bs)
    n_qb = selection.indices.shape[2]
    off = tk - tq
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    info = SparseInfo()
    q_blocks = _blocks_of(q, n_qb, qbs)  # [B·n_qb, Hq, qbs, D]
    pieces_o, pieces_l = [], []
    idx = selection.indices  # [B, Hq, n_qb, n_sel]
    if causal:
        # the present part: each query block against its own square of keys, causal (GQA native)
        o_d, l_d = op(q_blocks, _blocks_of(k[:, :, off:], n_qb, qbs), _blocks_of(v[:, :, off:], n_qb, qbs),
                      0.0, True, scale=scale)
        pieces_o.append(o_d)
        pieces_l.append(l_d)
        first_key_block = (off + torch.arange(n_qb, device=q.device) * qbs) // bs  # [n_qb]
        past = idx.masked_fill(idx >= first_key_block.view(1, 1, n_qb, 1), -1)
        if count_pairs:
            rows = torch.clamp(tq - torch.arange(n_qb, device=q.device) * qbs, max=qbs).double()
            info.visible_pairs += float((rows * (rows + 1) / 2).sum())
    else:
        past = idx
    valid = past >= 0
    n_valid = valid.sum(-1)  # [B, Hq, n_qb]
    if count_pairs:
        rows = torch.clamp(tq - torch.arange(n_qb, device=q.device) * qbs, max=qbs).double()
        key_counts = _valid_key_counts(past, bs, tk)  # [B, Hq, n_qb]
        info.visible_pairs += float((key_counts * rows).sum()) / (b * hq)
    if int(n_valid.max()) > 0:
        # valid slots first, so a group needs only as many slots as its fullest query block
        past = past.sort(-1, descending=True).values
        k_table = torch.nn.functional.pad(k, (0, 0, 0, n_blocks * bs - tk)).reshape(b * hk * n_blocks, bs * d)
        v_table = torch.nn.functional.pad(v, (0, 0, 0, n_blocks * bs - tk)).reshape(b * hk * n_blocks, bs * d)
        row0 = (torch.arange(b * hk, device=q.device).view(b, hk) * n_blocks).repeat_interleave(g, dim=1)
        o_p = torch.zeros(b, n_qb, hq, qbs, d, dtype=torch.float32, device=q.device)
        l_p = torch.full((b, n_qb, hq, qbs), -math.inf, dtype=torch.float32, device=q.device)
        q_view = q_blocks.view(b, n_qb, hq, qbs, d)
        per_group = max(1, GATHER_KEYS // max(1, selection.n_sel * bs))
        for a in range(0, n_qb, per_group):
            z = min(a + per_group, n_qb)
            n = int(n_valid[:, :, a:z].max())
            if n == 0:
                continue
            sel = past[:, :, a:z, :n]  # [B, Hq, m, n]
            ok = sel >= 0
            rows_ = (row0[:, :, None, None] + sel.clamp_min(0)).permute(0, 2, 1, 3).reshape(-1)
            m = z - a
            k_sel = k_table.index_select(0, rows_).view(b * m, hq, n * bs, d)
            v_sel = v_table.index_select(0, rows_).view(b * m, hq, n * bs, d)
            mask = None
            alive = None
            if not bool(ok.all()):
                hidden = ~ok.permute(0, 2, 1, 3)  # [B, m, Hq, n]
                mask = torch.zeros(b, m, hq, 1, n, bs, device=q.device).masked_fill_(hidden[:, :, :, None, :, None], -math.inf)
                mask = mask.view(b * m, hq, 1, n * bs)
                alive = ok.any(-1).permute(0, 2, 1)  # [B, m, Hq]
            # the last key block may run past tk: its padding must be hidden too
            if n_blocks * bs != tk and bool((sel == n_blocks - 1).any()):
                tail = (sel == n_blocks - 1).permute(0, 2, 1, 3)[..., None] & (
                    torch.arange(bs, device=q.device) >= tk - (n_blocks - 1) * bs)
                if mask is None:
                    mask = torch.zeros(b, m, hq, 1, n, bs, device=q.device)
                    alive = torch.ones(b, m, hq, dtype=torch.bool, device=q.device)
                mask = mask.view(b, m, hq, 1, n, bs).masked_fill_(tail[:, :, :, None], -math.inf).view(b * m, hq, 1, n * bs)
            o_c, l_c = op(q_view[:, a:z].reshape(b * m, hq, qbs, d), k_sel, v_sel, 0.0, False, attn_mask=mask, scale=scale)
            o_c, l_c = o_c.view(b, m, hq, qbs, d), l_c.view(b, m, hq, qbs)
            if alive is not None:
                o_c = o_c.masked_fill(~alive[..., None, None], 0.0)
                l_c = l_c.masked_fill(~alive[..., None], -math.inf)
            o_p[:, a:z] = o_c
            l_p[:, a:z] = l_c
        pieces_o.append(o_p.view(b * n_qb, hq, qbs, d))
        pieces_l.append(l_p.view(b * n_qb, hq, qbs))
    if len(pieces_o) == 1:
        o_all, l_all = pieces_o[0], pieces_l[0].float()
    else:
        o_all, l_all = merge_partials(pieces_o, [x.float() for x in pieces_l])
    out = o_all.view(b, n_qb, hq, qbs, d).transpose(1, 2).reshape(b, hq, n_qb * qbs, d)[:, :, :tq]
    lse = l_all.view(b, n_qb, hq, qbs).transpose(1, 2).reshape(b, hq, n_qb * qbs)[:, :, :tq]
    return out.contiguous(), lse.contiguous(), info


def _valid_key_counts(past: torch.Tensor, bs: int, tk: int) -> torch.Tensor:
    """Keys in the valid blocks of ``past [B, Hq, n_qb, n]`` (the last block may be short)."""
    sizes = torch.clamp(tk - past.clamp_min(0) * bs, max=bs)
    return torch.where(past >= 0, sizes, 0).sum(-1).double()
