"""Cumulative-mass block selection: per query block, keep key blocks in decreasing estimated
attention mass until they hold a share ``gamma`` of it (FlexPrefill, Lai et al. 2025).

Unlike top-k (``select.select_blocks``) the number of blocks adapts: a query block whose
attention is peaked on a few blocks keeps few, one whose attention is flat keeps many, between
``min_blocks`` and ``max_blocks``. Forced blocks (sinks, local window and, under causality, the
blocks overlapping the query block, see ``select.forced_block_grid``) are always kept, count
towards the budget and their estimated mass towards ``gamma``.

``pooled_block_mass`` is the estimate FlexPrefill feeds it in its query-aware mode (and
MInference's block-sparse heads rank by): each query block's mean query against each key
block's mean key.
"""

from __future__ import annotations

import math

import torch

from longattn.sparse.select import Selection, query_block_grid


def pooled_block_mass(q: torch.Tensor, k: torch.Tensor, *, q_block: int, block: int, scale: float,
                      causal: bool) -> torch.Tensor:
    """Estimated share of each query block's attention in each key block, from pooled vectors.

    ``softmax_j(scale·q̄_i·k̄_j + log count_j)``: the mass key block ``j`` would get from query
    block ``i`` if all its queries were their mean ``q̄_i`` and all its keys their mean ``k̄_j``.
    Under causality a key block that holds keys after the query block's last query enters with
    the mean and count of its keys up to that query only (so the estimate never reads a key the
    query block cannot see), and blocks starting after it get 0.

    Args:
        q: ``[B, Hq, Tq, D]``; query ``i`` at position ``i + Tk - Tq``. k: ``[B, Hkv, Tk, D]``.

    Returns:
        ``[B, Hq, ceil(Tq/q_block), ceil(Tk/block)]`` float32, rows summing to 1 (0 for a query
        block that sees no key).
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    dev = q.device
    n_qb, n = math.ceil(tq / q_block), math.ceil(tk / block)
    off = tk - tq
    rows = torch.clamp(tq - torch.arange(n_qb, device=dev) * q_block, max=q_block)  # queries per block
    q_bar = torch.nn.functional.pad(q, (0, 0, 0, n_qb * q_block - tq)).view(b, hq, n_qb, q_block, d).sum(3)
    q_bar = q_bar / rows.view(1, 1, n_qb, 1).to(q.dtype)
    # prefix sums of keys (float64: differences of long prefix sums lose float32 digits)
    k_cum = torch.nn.functional.pad(k.to(torch.float64).cumsum(2), (0, 0, 1, 0))  # [B, Hkv, Tk+1, D]
    klo = torch.arange(n, device=dev) * block
    khi = torch.clamp(klo + block, max=tk)  # exclusive
    count = (khi - klo).to(torch.float32)
    k_bar = ((k_cum[:, :, khi] - k_cum[:, :, klo]) / count.view(1, 1, n, 1).double()).float()
    logits = torch.matmul(q_bar.reshape(b, hk, g * n_qb, d), k_bar.transpose(-1, -2)).view(b, hq, n_qb, n)
    logits = logits * scale + torch.log(count)
    if causal:
        qhi = torch.clamp((torch.arange(n_qb, device=dev) + 1) * q_block, max=tq) - 1 + off  # last position
        cut = qhi // block  # the key block holding the last query's position
        partial = khi[cut] - 1 > qhi  # ... and holding keys after it
        if bool(partial.any()):
            lo = klo[cut]
            cnt = (qhi - lo + 1).to(torch.float32)
            part = ((k_cum[:, :, qhi + 1] - k_cum[:, :, lo]) / cnt.view(1, 1, n_qb, 1).double()).float()
            part = part.repeat_interleave(g, dim=1)  # [B, Hq, n_qb, D]: each query head's key head
            part_logit = (q_bar * part).sum(-1) * scale + torch.log(cnt)
            col = logits.gather(-1, cut.view(1, 1, n_qb, 1).expand(b, hq, n_qb, 1)).squeeze(-1)
            new = torch.where(partial.view(1, 1, n_qb), part_logit, col)
            logits = logits.scatter(-1, cut.view(1, 1, n_qb, 1).expand(b, hq, n_qb, 1), new[..., None])
        logits = logits.masked_fill(klo.view(1, n) > qhi.view(n_qb, 1), -math.inf)
    return torch.softmax(logits, -1).nan_to_num(0.0)


def cumulative_mass_selection(
    mass: torch.Tensor,
    *,
    tokens_q: int,
    tokens_k: int,
    q_block: int,
    block: int,
    gamma: float,
    min_blocks: int,
    max_blocks: int,
    sinks: int,
    window: int,
    causal: bool,
) -> Selection:
    """Key blocks per (batch, head, query block) by cumulative estimated mass.

    Args:
        mass: ``[B, H, n_q_blocks, n_blocks]`` non-negative estimated attention mass of each
            query block in each key block (need not be normalised; entries of blocks a query
            block cannot see are ignored).
        tokens_q, tokens_k: query ``i`` sits at position ``i + tokens_k - tokens_q``.
        gamma: in ``(0, 1]``; the kept blocks hold at least ``gamma`` of the visible estimated
            mass. ``gamma >= 1`` keeps every visible block (up to ``max_blocks``).
        min_blocks, max_blocks: bounds on the blocks kept per query block, forced ones included
            (never more than the query block can see).

    Returns:
        a ``Selection`` whose ``indices [B, H, n_q_blocks, n_sel]`` are sorted with ``-1`` for
        unused slots; ``n_sel`` is the largest count kept by any query block.
    """
    b, h, n_qb, n = mass.shape
    visible, forced = query_block_grid(0, n_qb, q_block=q_block, block=block, tokens_q=tokens_q, tokens_k=tokens_k,
                                       sinks=sinks, window=window, causal=causal, device=mass.device)

    m = mass.to(torch.float64).clamp_min(0.0).masked_fill(~visible, 0.0)
    # order: forced blocks first, then visible ones by decreasing mass, invisible last
    key = m.masked_fill(forced, math.inf).masked_fill(~visible, -math.inf)
    order = key.argsort(dim=-1, descending=True, stable=True)
    m_sorted = m.gather(-1, order)
    total = m.sum(-1, keepdim=True)
    before = m_sorted.cumsum(-1) - m_sorted  # mass of the blocks ranked ahead of each one
    n_visible = visible.sum(-1).expand(b, h, n_qb)
    if gamma >= 1.0:
        need = n_visible
    else:
        # a block is needed while the blocks ahead of it hold less than gamma of the mass
        need = (before < gamma * total).sum(-1)
    need = torch.maximum(need, forced.sum(-1).expand(b, h, n_qb))
    need = torch.maximum(need, torch.full_like(need, min_blocks))
    need = torch.minimum(torch.minimum(need, torch.full_like(need, max_blocks)), n_visible)
    width = max(int(need.max()), 1) if need.numel() else 1
    idx = order[..., :width]
    unused = torch.arange(width, device=mass.device) >= need[..., None]
    idx = idx.masked_fill(unused, -1)
    return Selection(idx.sort(-1).values, q_block, block)
