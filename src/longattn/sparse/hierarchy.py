"""Hierarchical top-k block selection (HiP Attention, Lee et al. 2024, "A Training-Free
Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned Attention").

Instead of scoring every key block for a query block, HiP prunes a tree: the key blocks a query
block may choose from are cut into ``m`` contiguous groups (``m`` = free slots of its budget);
each round splits every surviving group in two, scores each half by *one representative* key
block, and keeps the best ``m`` halves; after ``⌈log2(candidates/m)⌉`` rounds every survivor is a
single block. A query block scores ``2m`` blocks per round, so ``O(m·log(T/m))`` instead of
``O(T/block)``, and a whole prefill costs ``O(T log T)`` in scoring instead of ``O(T²)``. It works
because attention is locally coherent: a half whose representative is attended tends to hold the
attended blocks (true of RoPE keys, where neighbouring keys look alike); a needle alone in a half
whose representative is unremarkable can be pruned, which is the price of the sub-quadratic cost.

When ``2m`` per round times the rounds would reach the number of candidates (short contexts, or
budgets near the context), every candidate is scored once instead and the best ``m`` kept.

Representative of a half: its *middle* key block (HiP samples one token per branch; a block is
scored by whatever estimate the caller gives, e.g. its mean key). On stories260K attention
(4096 tokens, 4 blocks of 64 per query block) the middle block's mean key recalls 0.830 of the
softmax mass against 0.820 for the first block, 0.795 for the last and 0.844 for scoring every
block (``landmark``); the mean key of the whole half would recall 0.837 but needs range sums,
so one representative block was kept for a scorer interface any block estimate fits. Sinks, the local window and,
under causality, the blocks overlapping the query block are forced exactly as in
``select_blocks`` (``forced_block_grid``) and never scored, so under causality every scored block
lies entirely before the query block's first query.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.sparse.select import Selection, query_block_grid
from longattn.sparse.summaries import BlockSummaries

#: ``(q_rows [B, Hq, g, q_block, D], blocks [B, Hq, g, R] int64) -> est [B, Hq, g, q_block, R]``:
#: each query's estimated log attention mass in each of the given key blocks
GatheredEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class HierarchyStats:
    """Work done by ``hierarchical_select``, summed over (batch, query head, query block)."""

    query_blocks: int = 0
    candidates: int = 0  # key blocks that could have been chosen (visible, not forced)
    scored: int = 0  # representatives scored, over all rounds
    rounds: int = 0

    @property
    def scored_per_query_block(self) -> float:
        return self.scored / self.query_blocks if self.query_blocks else 0.0

    @property
    def candidates_per_query_block(self) -> float:
        return self.candidates / self.query_blocks if self.query_blocks else 0.0


def mean_key_gathered(summaries: BlockSummaries, hq: int, scale: float) -> GatheredEstimator:
    """Landmark-style estimate of the blocks asked for: ``scale·q·mean_j + log(count_j)``."""
    mean = summaries.mean  # [B, Hkv, n, D]
    b, hk, _, d = mean.shape
    per_head = mean.repeat_interleave(hq // hk, dim=1)  # [B, Hq, n, D]: a query head's key head
    log_count = torch.log(summaries.count.clamp_min(1).to(torch.float32))

    def est(q_rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        g, r = blocks.shape[2], blocks.shape[3]
        rep = torch.gather(per_head, 2, blocks.reshape(b, hq, g * r, 1).expand(-1, -1, -1, d)).view(b, hq, g, r, d)
        # selection scores in float32 whatever the compute dtype (half-precision queries included)
        return torch.matmul(q_rows.float(), rep.float().transpose(-1, -2)) * scale + log_count[blocks][..., None, :]

    return est


def hierarchical_select(
    q: torch.Tensor,
    tokens_k: int,
    estimate: GatheredEstimator,
    *,
    q_block: int,
    block: int,
    n_sel: int,
    sinks: int,
    window: int,
    causal: bool,
    group_tokens: int = 2048,
    stats: HierarchyStats | None = None,
) -> Selection:
    """Up to ``n_sel`` key blocks per (batch, query head, query block), forced blocks included,
    the others found by hierarchical pruning.

    Args:
        q: ``[B, Hq, Tq, D]``; query ``i`` sits at position ``i + tokens_k - Tq``.
        estimate: scores the representative blocks (see ``GatheredEstimator``); a half's score
            for a query block is the sum over its queries of the half's softmax share among the
            halves of the round.
        group_tokens: queries handled at once (memory ``group × n_sel × D`` per head).
        stats: when given, accumulates the work done (``HierarchyStats``).
    """
    b, hq, tq, d = q.shape
    n = math.ceil(tokens_k / block)
    n_qb = math.ceil(tq / q_block)
    n_sel = min(n_sel, n)
    out = torch.empty((b, hq, n_qb, n_sel), dtype=torch.int64, device=q.device)
    pad = n_qb * q_block - tq
    q_rows = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(b, hq, n_qb, q_block, d)
    real_row = (torch.arange(n_qb * q_block, device=q.device) < tq).view(n_qb, q_block)
    per_group = max(1, group_tokens // q_block)
    for g0 in range(0, n_qb, per_group):
        g1 = min(g0 + per_group, n_qb)
        visible, forced = query_block_grid(g0, g1, q_block=q_block, block=block, tokens_q=tq, tokens_k=tokens_k,
                                           sinks=sinks, window=window, causal=causal, device=q.device)
        candidates = visible & ~forced
        free = (n_sel - forced.sum(-1)).clamp_min(0)
        chosen = _descend(q_rows[:, :, g0:g1], real_row[g0:g1], candidates, free, estimate, stats)
        # forced first, then the chosen; the same tie-breaking as ``select_blocks`` if forced overflow
        grid = torch.full((b, hq, g1 - g0, n), -math.inf, device=q.device)
        grid = grid.masked_fill(chosen, 0.0).masked_fill(forced, math.inf)
        top_val, top_idx = grid.topk(n_sel, dim=-1)
        top_idx = top_idx.masked_fill(torch.isneginf(top_val), -1)
        out[:, :, g0:g1] = top_idx.sort(-1).values
        if stats is not None:
            stats.query_blocks += b * hq * (g1 - g0)
            stats.candidates += b * hq * int(candidates.sum())
    return Selection(out, q_block, block)


def _descend(q_rows: torch.Tensor, real_row: torch.Tensor, candidates: torch.Tensor, free: torch.Tensor,
             estimate: GatheredEstimator, stats: HierarchyStats | None) -> torch.Tensor:
    """The pruning rounds for ``g`` query blocks: ``q_rows [B, Hq, g, q_block, D]``, ``real_row
    [g, q_block]`` (False for padding rows), ``candidates [g, n]``, ``free [g]`` slots →
    chosen ``[B, Hq, g, n]`` bool, at most ``free`` per query block."""
    b, hq, g = q_rows.shape[:3]
    n = candidates.shape[1]
    dev = q_rows.device
    chosen = torch.zeros(b, hq, g, n, dtype=torch.bool, device=dev)
    count = candidates.sum(-1)  # [g]
    groups = torch.minimum(free, count)  # groups kept per query block
    width, m = int(count.max()), int(groups.max())
    if m == 0:
        return chosen
    # each query block's candidates in order, padded with n; groups are ranges [lo, hi) of this list
    order = torch.where(candidates, torch.arange(n, device=dev), n).sort(-1).values[:, :width]
    order_bh = order.expand(b, hq, g, width)
    slot = torch.arange(m, device=dev)[None, :]
    dead = (slot >= groups[:, None])[None, None]  # slots beyond a query block's budget

    def keep_best(lo2: torch.Tensor, hi2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score ranges ``[lo2, hi2)`` by their middle candidate; keep each query block's best."""
        ok = hi2 > lo2
        rep = ((lo2 + hi2 - 1) // 2).clamp(0, width - 1)
        blocks = torch.gather(order_bh, 3, rep).masked_fill(~ok, 0)
        est = estimate(q_rows, blocks).masked_fill(~ok[..., None, :], -math.inf)  # [B, Hq, g, q_block, R]
        share = torch.softmax(est, -1).nan_to_num(0.0) * real_row[None, None, :, :, None]
        score = share.sum(3).masked_fill(~ok, -math.inf)
        top_val, top_idx = score.topk(m, dim=-1)
        drop = dead | torch.isneginf(top_val)
        if stats is not None:
            stats.scored += int(ok.sum())
            stats.rounds += 1
        return torch.gather(lo2, 3, top_idx).masked_fill(drop, 0), torch.gather(hi2, 3, top_idx).masked_fill(drop, 0)

    live = slot < groups[:, None]
    lo = torch.where(live, slot * count[:, None] // groups.clamp_min(1)[:, None], 0)
    hi = torch.where(live, (slot + 1) * count[:, None] // groups.clamp_min(1)[:, None], 0)
    rounds = math.ceil(math.log2(int((hi - lo).max())))
    if 2 * m * rounds >= width:
        # few candidates per slot: scoring every candidate once costs less than pruning
        first = torch.arange(width, device=dev).expand(b, hq, g, width)
        lo, hi = keep_best(first, (first + 1).masked_fill(first >= count[:, None], 0))
    else:
        lo, hi = lo.expand(b, hq, g, m).clone(), hi.expand(b, hq, g, m).clone()
        while int((hi - lo).max()) > 1:
            mid = (lo + hi) // 2  # a one-block group splits into an empty half and itself
            lo, hi = keep_best(torch.cat([lo, mid], -1), torch.cat([mid, hi], -1))
    picked = (hi - lo) == 1
    blocks = torch.gather(order_bh, 3, lo.clamp(max=width - 1)).masked_fill(~picked, n)
    hit = torch.zeros(b, hq, g, n + 1, dtype=torch.bool, device=dev)
    hit.scatter_(3, blocks, True)
    return chosen | hit[..., :n]
