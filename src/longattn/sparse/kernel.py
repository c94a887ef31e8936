"""One exact kernel for any block selection.

For each query block the keys it may use split in two:

* *past* blocks — selected blocks that end before the query block's first query, so every query
  sees every key in them: gathered per query head as whole contiguous blocks (GQA heads gather
  from their shared key head; nothing else of the cache is copied) and attended with no mask;
* *present* keys — from the start of the query block's first key block up to its last query
  (forced by the selector under causality): one contiguous slice, masked per token.

Each part runs torch's fused kernel, CPU or CUDA (eager matmul + softmax elsewhere), which returns the
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

from longattn.kernels.sdpa import fused_available, fused_flash, needs_grad
from longattn.core.merge import merge_partials
from longattn.kernels.eager import attend_visible, gather_tokens
from longattn.kernels.native_prefill import selection_visible_pairs, sparse_prefill, sparse_prefill_applies
from longattn.kernels.tiled import chunk_attention
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
        q: ``[B, Hq, Tq, D]`` in the compute dtype (float32, bfloat16 or float16); k, v:
            ``[B, Hkv, Tk, D]``, in q's dtype or (a long cache read in place) another of those three:
            only the keys and values read are converted to q's dtype. Partial results merge in float32.
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
    fused = fused_available(q)
    # the native kernel reads the selected blocks in place (forward only, no key padding; see
    # longattn.kernels.native_prefill); visible_pairs is counted as the batched path counts it
    if sparse_prefill_applies(q, k, v, selection, causal, key_padding_mask):
        out, lse = sparse_prefill(q, k, v, selection, scale=scale, causal=causal)
        return out, lse, SparseInfo(selection_visible_pairs(selection, tq, tk, causal) if count_pairs else 0.0)
    # the batched path gathers into reused buffers and merges in place: forward only. Under
    # autograd the per-query-block loop below runs (every op in it out of place or differentiable)
    if not needs_grad(q, k, v) and batched_path_applies(selection, tq, tk, causal, key_padding_mask, fused):
        return _batched_sparse_attention(q, k, v, selection, scale=scale, causal=causal, count_pairs=count_pairs)
    if fused and causal and key_padding_mask is None and selection.indices.shape[2] == 1 and tq <= tk:
        return _single_block_attention(q, k, v, selection, scale=scale, count_pairs=count_pairs)
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
                # a gather copies only the selected blocks' rows (decoding must not pay O(cache))
                k_sel, v_sel = (t.to(q.dtype) for t in gather_tokens(k, v, pos.clamp(max=tk - 1)))
                ok = valid[..., None].expand(-1, -1, -1, bs).flatten(-2) & (pos < tk)
                if kpm is not None:
                    ok = ok & torch.gather(kpm[:, None, :].expand(b, hq, tk), 2, pos.clamp(max=tk - 1))
                if bool(ok.all()):
                    o_c, l_c = chunk_attention(qt, k_sel, v_sel, scale, None, fused)
                    pieces.append((o_c.reshape(b, hq, m, d).float(), l_c.reshape(b, hq, m).float()))
                    if count_pairs:
                        info.visible_pairs += m * n_past * bs
                else:
                    vis = ok[:, :, None, :]
                    o_c, l_c = attend_visible(qt, k_sel, v_sel, scale, vis, fused)
                    pieces.append((o_c.float(), l_c))
                    if count_pairs:
                        info.visible_pairs += float(vis.expand(b, hq, m, -1).sum()) / (b * hq)
        if present_start < tk and (not causal or present_start <= qhi):
            hi = min(qhi + 1, tk) if causal else tk
            k_pos = torch.arange(present_start, hi, device=q.device)[None, :]
            vis = (k_pos <= q_pos) if causal else torch.ones(1, k_pos.numel(), dtype=torch.bool, device=q.device)
            vis = vis[None, None]
            if kpm is not None:
                vis = vis & kpm[:, None, None, present_start:hi]
            kg = k[:, :, present_start:hi].to(q.dtype)
            vg = v[:, :, present_start:hi].to(q.dtype)
            # GQA: stack the group's query heads along tokens (no copy of keys)
            qg = qt.reshape(b, hk, g * m, d)
            visg = vis.expand(vis.shape[0], 1, m, -1).repeat(1, 1, g, 1) if g > 1 else vis
            o_c, l_c = attend_visible(qg, kg, vg, scale, visg, fused)
            pieces.append((o_c.reshape(b, hq, m, d).float(), l_c.reshape(b, hq, m)))
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
    """The batched kernel needs a fused op (CPU or CUDA), no key padding, several query blocks, and under
    causality query blocks made of whole key blocks that start on a key-block boundary."""
    if not fused or key_padding_mask is not None or selection.indices.shape[2] < 2:
        return False
    if not causal:
        return True
    return selection.q_block % selection.block == 0 and (tk - tq) % selection.block == 0


def _group_blocks(x: torch.Tensor, a: int, z: int, size: int, n: int) -> torch.Tensor:
    """Blocks ``a … z-1`` of ``size`` tokens of ``x [B, H, T, D]`` (``n`` blocks in all, the last
    zero-padded) → ``[B·(z−a), H, size, D]``, stacked on the batch axis."""
    b, h, t, d = x.shape
    lo, hi = a * size, min(z * size, t)
    piece = x[:, :, lo:hi]
    pad = (z - a) * size - (hi - lo)
    if b == 1 and not pad and x.stride(-1) == 1 and x.stride(-2) == d:
        # a strided view, no copy (the fused kernel reads strides)
        return piece.unflatten(2, (z - a, size)).squeeze(0).transpose(0, 1)
    if pad:
        piece = torch.nn.functional.pad(piece, (0, 0, 0, pad))
    return piece.reshape(b, h, z - a, size, d).transpose(1, 2).reshape(b * (z - a), h, size, d)


def _merge_two_(o1, l1, o2, l2):
    """In-place exact merge of two partial results (``o1``/``l1`` are overwritten and returned);
    rows neither part saw stay 0 with LSE −inf."""
    m = torch.maximum(l1, l2)
    safe = m.masked_fill(torch.isneginf(m), 0.0)
    w1 = torch.exp(l1 - safe)
    w2 = torch.exp(l2 - safe)
    total = w1 + w2
    l1.copy_(safe + torch.log(total))
    total.masked_fill_(total == 0, 1.0)
    o1.mul_((w1 / total)[..., None]).addcmul_(o2, (w2 / total)[..., None])
    return o1, l1


def _batched_sparse_attention(q, k, v, selection: Selection, *, scale: float, causal: bool, count_pairs: bool):
    """``sparse_attention`` with query blocks batched (see the module docstring).

    Query blocks go in groups; per group, (1) under causality one fused causal call runs every
    block's own square of keys, (2) the group's past blocks are gathered into buffers reused
    across groups (fresh multi-MB allocations cost more in page faults than the copy itself) and
    attended in one fused call, (3) the two merge in place and land in the output, while the
    group's data is still in cache."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs, qbs = selection.block, selection.q_block
    n_blocks = math.ceil(tk / bs)
    n_qb = selection.indices.shape[2]
    off = tk - tq
    info = SparseInfo()
    idx = selection.indices  # [B, Hq, n_qb, n_sel]
    rows_per_qb = torch.clamp(tq - torch.arange(n_qb, device=q.device) * qbs, max=qbs).double()
    if causal:
        first_key_block = (off + torch.arange(n_qb, device=q.device) * qbs) // bs  # [n_qb]
        past = idx.masked_fill(idx >= first_key_block.view(1, 1, n_qb, 1), -1)
        if count_pairs:
            info.visible_pairs += float((rows_per_qb * (rows_per_qb + 1) / 2).sum())
    else:
        past = idx
    n_valid = (past >= 0).sum(-1)  # [B, Hq, n_qb]
    if count_pairs:
        info.visible_pairs += float((_valid_key_counts(past, bs, tk) * rows_per_qb).sum()) / (b * hq)
    # valid slots first, so a group needs only as many slots as its fullest query block
    past = past.sort(-1, descending=True).values
    n_max = int(n_valid.max())
    pad_k = n_blocks * bs - tk
    k_table = (torch.nn.functional.pad(k, (0, 0, 0, pad_k)) if pad_k else k).reshape(b * hk * n_blocks, bs * d)
    v_table = (torch.nn.functional.pad(v, (0, 0, 0, pad_k)) if pad_k else v).reshape(b * hk * n_blocks, bs * d)
    row0 = (torch.arange(b * hk, device=q.device).view(b, hk) * n_blocks).repeat_interleave(g, dim=1)
    per_group = max(1, GATHER_KEYS // max(1, selection.n_sel * bs))
    k_buf = v_buf = None
    if n_max:
        k_buf = torch.empty(b * per_group * hq * n_max * bs * d, dtype=k.dtype, device=q.device)
        v_buf = torch.empty_like(k_buf)
    out = torch.empty(b, hq, n_qb * qbs, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n_qb * qbs, dtype=torch.float32, device=q.device)
    for a in range(0, n_qb, per_group):
        z = min(a + per_group, n_qb)
        m = z - a
        q_g = _group_blocks(q, a, z, qbs, n_qb)  # [B·m, Hq, qbs, D]
        o_run = l_run = None
        if causal:
            # each query block against its own square of keys, causal (GQA native)
            k_sq = _group_blocks(k[:, :, off:], a, z, qbs, n_qb)
            v_sq = _group_blocks(v[:, :, off:], a, z, qbs, n_qb)
            o_run, l_run = fused_flash(q_g, k_sq.to(q.dtype), v_sq.to(q.dtype), scale=scale, causal=True)
            o_run = o_run.float()  # merged in float32
        n = int(n_valid[:, :, a:z].max()) if n_max else 0
        if n:
            sel = past[:, :, a:z, :n]  # [B, Hq, m, n]
            ok = sel >= 0
            rows_ = (row0[:, :, None, None] + sel.clamp_min(0)).permute(0, 2, 1, 3).reshape(-1)
            size = rows_.numel() * bs * d
            k_sel = torch.index_select(k_table, 0, rows_, out=k_buf[:size].view(-1, bs * d)).view(b * m, hq, n * bs, d)
            v_sel = torch.index_select(v_table, 0, rows_, out=v_buf[:size].view(-1, bs * d)).view(b * m, hq, n * bs, d)
            hidden = ~ok
            if pad_k:
                # the last key block runs past tk: its padding must be hidden too
                tail = (sel == n_blocks - 1)[..., None] & (torch.arange(bs, device=q.device) >= bs - pad_k)
                hidden = hidden[..., None] | tail
            else:
                hidden = hidden[..., None].expand(-1, -1, -1, -1, bs)
            mask = None
            if bool(hidden.any()):
                mask = torch.zeros(hidden.shape, device=q.device).masked_fill_(hidden, -math.inf)
                mask = mask.permute(0, 2, 1, 3, 4).reshape(b * m, hq, 1, n * bs)
            o_p, l_p = fused_flash(q_g, k_sel.to(q.dtype), v_sel.to(q.dtype), scale=scale, attn_mask=mask)
            if mask is not None:
                dead = ~ok.any(-1).permute(0, 2, 1).reshape(b * m, hq)
                if bool(dead.any()):
                    o_p.masked_fill_(dead[..., None, None], 0.0)
                    l_p.masked_fill_(dead[..., None], -math.inf)
            if o_run is None:
                o_run, l_run = o_p.float(), l_p
            else:
                o_run, l_run = _merge_two_(o_run, l_run, o_p, l_p)
        if o_run is None:  # non-causal group with nothing selected
            out.view(b, hq, n_qb, qbs, d)[:, :, a:z] = 0.0
            lse.view(b, hq, n_qb, qbs)[:, :, a:z] = -math.inf
            continue
        out.view(b, hq, n_qb, qbs, d)[:, :, a:z] = o_run.view(b, m, hq, qbs, d).transpose(1, 2)
        lse.view(b, hq, n_qb, qbs)[:, :, a:z] = l_run.view(b, m, hq, qbs).transpose(1, 2)
    if n_qb * qbs != tq:
        out, lse = out[:, :, :tq].contiguous(), lse[:, :, :tq].contiguous()
    return out, lse, info


def _valid_key_counts(past: torch.Tensor, bs: int, tk: int) -> torch.Tensor:
    """Keys in the valid blocks of ``past [B, Hq, n_qb, n]`` (the last block may be short)."""
    sizes = torch.clamp(tk - past.clamp_min(0) * bs, max=bs)
    return torch.where(past >= 0, sizes, 0).sum(-1).double()


def _single_block_attention(q, k, v, selection: Selection, *, scale: float, count_pairs: bool):
    """Causal ``sparse_attention`` for one query block (decoding): the selected past blocks and the
    present keys are gathered into one key set and attended in a single fused call, without a
    mask when a single query sees all of them. Per step this touches only the selected keys, so
    its cost does not grow with the cache."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    bs = selection.block
    off = tk - tq
    present_start = (off // bs) * bs
    idx = selection.indices[:, :, 0]  # [B, Hq, n_sel]
    past = idx.masked_fill(idx * bs >= present_start, -1)  # whole blocks before the present part
    n = int((past >= 0).sum(-1).max())
    info = SparseInfo()
    hidden = None
    # one gather per tensor collects the selected past blocks and the present keys together
    now_pos = torch.arange(present_start, tk, device=q.device).expand(b, hq, -1)  # [B, Hq, n_now]
    if n:
        past = past.sort(-1, descending=True).values[..., :n]  # valid slots first
        past_pos = ((past.clamp_min(0) * bs)[..., None] + torch.arange(bs, device=q.device)).flatten(-2)
        positions = torch.cat([past_pos, now_pos], dim=-1)
        if bool((past < 0).any()):
            hidden = (past < 0)[..., None].expand(b, hq, n, bs).reshape(b, hq, 1, n * bs)
        if count_pairs:
            info.visible_pairs += float((past >= 0).sum()) * bs * tq / (b * hq)
    else:
        positions = now_pos
    keys, values = (t.to(q.dtype) for t in gather_tokens(k, v, positions))  # only the read keys convert
    n_now = tk - present_start
    q_pos = torch.arange(off, tk, device=q.device)[:, None]
    now_visible = torch.arange(present_start, tk, device=q.device)[None, :] <= q_pos  # [tq, n_now]
    if count_pairs:
        info.visible_pairs += float(now_visible.sum())
    mask = None
    if hidden is not None or not bool(now_visible.all()):
        bm, hm = (b, hq) if hidden is not None else (1, 1)
        vis_now = now_visible[None, None].expand(bm, hm, tq, n_now)
        if n:
            vis_past = ~hidden if hidden is not None else torch.ones(1, 1, 1, n * bs, dtype=torch.bool, device=q.device)
            vis_now = torch.cat([vis_past.expand(bm, hm, tq, n * bs), vis_now], dim=-1)
        mask = torch.zeros(vis_now.shape, device=q.device).masked_fill_(~vis_now, -math.inf)
    out, lse = fused_flash(q, keys, values, scale=scale, attn_mask=mask)
    return out, lse, info


def selection_layout(selection: Selection, tokens_q: int, tokens_k: int, causal: bool):
    """The ``BlockLayout`` of a selection (query blocks the size of key blocks), for kernels that
    take layouts — compiled FlexAttention: selected blocks are ``any``; those every query of the
    block sees entirely are ``all`` (full), the rest partial (the causal mask applies there)."""
    from longattn.kernels.layout import BlockLayout

    bs = selection.block
    if selection.q_block != bs:
        raise ValueError(f"a block layout needs query blocks the size of key blocks, got q_block={selection.q_block} "
                         f"and block={bs}")
    idx = selection.indices
    b, hq, n_qb, _ = idx.shape
    n_kb = math.ceil(tokens_k / bs)
    any_ = torch.zeros(b, hq, n_qb, n_kb + 1, dtype=torch.bool, device=idx.device)
    any_.scatter_(-1, idx.masked_fill(idx < 0, n_kb), True)  # unused slots land in a dropped column
    any_ = any_[..., :n_kb]
    if causal:
        first_q = torch.arange(n_qb, device=idx.device) * bs + (tokens_k - tokens_q)
        last_k = torch.clamp(torch.arange(n_kb, device=idx.device) * bs + bs - 1, max=tokens_k - 1)
        full = any_ & (last_k[None, :] <= first_q[:, None])
    else:
        full = any_
    return BlockLayout(block=bs, tokens_q=tokens_q, tokens_k=tokens_k, any=any_, all=full)
