"""Block scores and selectors: which key blocks each (batch, query head, query block) attends.

Scores are *estimated log attention mass* per query and key block, ``est[..., q, j]``; a query
block's score for key block ``j`` is the estimated share of its queries' attention that falls in
``j``: ``Σ_q softmax_j(est[q, j])`` over the blocks the query may see. Selection keeps forced
blocks (sinks, local window), then the highest-scoring others up to the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.sparse.summaries import BlockSummaries

#: ``(q [B, Hq, bq, D], summaries, scale) -> est [B, Hq, bq, n]``
BlockEstimator = Callable[[torch.Tensor, BlockSummaries, float], torch.Tensor]


@dataclass
class Selection:
    """``indices [B, Hq, n_q_blocks, n_sel]``: selected key blocks in increasing order, ``-1`` for
    unused slots; ``q_block`` queries per query block, ``block`` keys per key block."""

    indices: torch.Tensor
    q_block: int
    block: int

    @property
    def n_sel(self) -> int:
        return self.indices.shape[-1]


def _grouped(q: torch.Tensor, hk: int) -> torch.Tensor:
    """``[B, Hq, t, D]`` → ``[B, Hkv, G·t, D]`` (query heads of a group stacked)."""
    b, hq, t, d = q.shape
    return q.reshape(b, hk, (hq // hk) * t, d)


def mean_key_estimate(q: torch.Tensor, s: BlockSummaries, scale: float) -> torch.Tensor:
    """Landmark-style: ``scale·q·mean_j + log(count_j)``: the block's mass if every key in it
    scored like its mean key."""
    b, hq, t, _ = q.shape
    hk = s.sums.shape[1]
    # summaries are float32; so is scoring (q may arrive in a half compute dtype)
    est = torch.matmul(_grouped(q.to(s.sums.dtype), hk), s.mean.transpose(-1, -2)).view(b, hq, t, -1) * scale
    return est + torch.log(s.count.to(est.dtype).clamp_min(1))


def quest_bound_estimate(q: torch.Tensor, s: BlockSummaries, scale: float) -> torch.Tensor:
    """Quest: ``scale·Σ_d max(q_d·min_d, q_d·max_d) + log(count_j)``, an upper bound of the
    block's mass (every key at the bound on ``q·k``)."""
    b, hq, t, d = q.shape
    hk = s.sums.shape[1]
    qg = _grouped(q.to(s.sums.dtype), hk)  # [B, Hkv, M, D], float32 like the summaries
    # Σ_d max(q_d min_d, q_d max_d) = Σ_d (q_d⁺ max_d + q_d⁻ min_d): two matmuls, no [M, n, D] tensor
    pos, neg = qg.clamp(min=0), qg.clamp(max=0)
    bound = torch.matmul(pos, s.kmax.transpose(-1, -2)) + torch.matmul(neg, s.kmin.transpose(-1, -2))
    est = bound.view(b, hq, t, -1) * scale
    return est + torch.log(s.count.to(est.dtype).clamp_min(1))


def fully_visible_blocks(q_pos: torch.Tensor, n_blocks: int, block: int, causal: bool) -> torch.Tensor:
    """``[bq, n]`` bool: every key of block ``j`` is visible to query ``q_pos``."""
    if not causal:
        return torch.ones(q_pos.numel(), n_blocks, dtype=torch.bool, device=q_pos.device)
    khi = torch.arange(n_blocks, device=q_pos.device) * block + block - 1
    return khi[None, :] <= q_pos[:, None]


def forced_block_grid(qlo: torch.Tensor, qhi: torch.Tensor, klo: torch.Tensor, khi: torch.Tensor, sinks: int,
                      window: int, causal: bool) -> torch.Tensor:
    """``[g, n]`` bool for query blocks with first/last positions ``qlo, qhi [g, 1]`` and key
    blocks ``klo, khi [1, n]``: sink blocks, the local window's blocks and, under causality, the
    blocks overlapping the query block itself. Those hold keys only some of the block's queries
    may see; scoring them would let a summary of future keys steer a query's selection, so they
    are always kept (the kernel masks them per token) and never scored."""
    forced = (klo < sinks).expand(qlo.shape[0], -1)
    if causal:
        forced = forced | ((klo <= qhi) & (khi >= qlo))
        if window > 0:
            forced = forced | ((khi >= qlo - window + 1) & (klo <= qhi))
    elif window > 0:
        forced = forced | ((khi >= qlo - window + 1) & (klo <= qhi + window - 1))
    return forced


def query_block_grid(g0: int, g1: int, *, q_block: int, block: int, tokens_q: int, tokens_k: int, sinks: int,
                     window: int, causal: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For query blocks ``g0 … g1-1`` against every key block: ``visible [g, n]`` (the block holds
    a key some query of the query block may see) and ``forced [g, n]`` (visible and always kept,
    never scored; see ``forced_block_grid``). Shared by every block selector."""
    n = math.ceil(tokens_k / block)
    off = tokens_k - tokens_q
    qb = torch.arange(g0, g1, device=device)[:, None]
    qlo = qb * q_block + off
    qhi = torch.clamp((qb + 1) * q_block, max=tokens_q) - 1 + off
    j = torch.arange(n, device=device)
    klo, khi = (j * block)[None, :], torch.clamp(j * block + block - 1, max=tokens_k - 1)[None, :]
    visible = (klo <= qhi) if causal else torch.ones(g1 - g0, n, dtype=torch.bool, device=device)
    return visible, forced_block_grid(qlo, qhi, klo, khi, sinks, window, causal) & visible


def select_blocks(
    q: torch.Tensor,
    tokens_k: int,
    query_scores: Callable[[int, int], torch.Tensor],
    *,
    q_block: int,
    block: int,
    n_sel: int,
    sinks: int,
    window: int,
    causal: bool,
    group_tokens: int = 2048,
    per_block: bool = False,
) -> Selection:
    """Top-``n_sel`` key blocks per (batch, query head, query block).

    Args:
        q: ``[B, Hq, Tq, D]``; query ``i`` sits at position ``i + tokens_k - Tq``.
        query_scores: ``(q0, q1) -> [B, Hq, q1-q0, n]``: each query's share of attention it is
            estimated to give each key block; a query block's score is their sum.
        n_sel: blocks kept per query block, forced ones included.
        group_tokens: queries scored at once (bounds memory to ``group × n`` per head).
        per_block: ``query_scores(q0, q1)`` already gives one row per query block of the range,
            ``[B, Hq, n_query_blocks, n]`` (see ``pooled_query_scores``).
    """
    b, hq, tq, _ = q.shape
    n = math.ceil(tokens_k / block)
    n_qb = math.ceil(tq / q_block)
    n_sel = min(n_sel, n)
    out = torch.empty((b, hq, n_qb, n_sel), dtype=torch.int64, device=q.device)
    per_group = max(1, group_tokens // q_block)
    for g0 in range(0, n_qb, per_group):
        g1 = min(g0 + per_group, n_qb)
        q0, q1 = g0 * q_block, min(g1 * q_block, tq)
        if per_block:
            scores = query_scores(q0, q1)  # [B, Hq, g, n]
        else:
            per_query = query_scores(q0, q1)  # [B, Hq, q1-q0, n]
            pad = (g1 - g0) * q_block - (q1 - q0)
            if pad:
                per_query = torch.nn.functional.pad(per_query, (0, 0, 0, pad))
            scores = per_query.view(b, hq, g1 - g0, q_block, n).sum(3)  # [B, Hq, g, n]
        visible, forced = query_block_grid(g0, g1, q_block=q_block, block=block, tokens_q=tq, tokens_k=tokens_k,
                                           sinks=sinks, window=window, causal=causal, device=q.device)
        scores = scores.masked_fill(~visible, -math.inf).masked_fill(forced, math.inf)
        top_val, top_idx = scores.topk(n_sel, dim=-1)
        top_idx = top_idx.masked_fill(torch.isneginf(top_val), -1)
        out[:, :, g0:g1] = top_idx.sort(-1).values
    return Selection(out, q_block, block)


def estimated_mass_scores(q: torch.Tensor, summaries: BlockSummaries, estimator: BlockEstimator, scale: float,
                          causal: bool) -> Callable[[int, int], torch.Tensor]:
    """Per-query scores: the softmax of the estimates over the blocks the query fully sees."""
    tk = summaries.tokens
    off = tk - q.shape[2]

    def scores(q0: int, q1: int) -> torch.Tensor:
        est = estimator(q[:, :, q0:q1], summaries, scale)  # [B, Hq, bq, n]
        q_pos = torch.arange(q0, q1, device=q.device) + off
        # only blocks *entirely* visible to a query enter its estimate: a partly visible block's
        # summary includes keys after the query (those blocks are forced, see forced_block_grid)
        fully = fully_visible_blocks(q_pos, summaries.n_blocks, summaries.block, causal)
        est = est.masked_fill(~fully, -math.inf)
        return torch.softmax(est, dim=-1).nan_to_num(0.0)

    return scores


def pooled_query_scores(q: torch.Tensor, summaries: BlockSummaries, estimator: BlockEstimator, scale: float,
                        causal: bool, q_block: int) -> Callable[[int, int], torch.Tensor]:
    """Per-query-block scores from the block's *mean query* (the pooled estimate MInference and
    FlexPrefill use): one estimate per (query block, key block) instead of one per query, so
    scoring costs ``q_block`` times less. Since the mean-key and Quest estimates are linear in the
    query, the pooled logit is the mean of the queries' logits; the per-query softmax is lost, so
    a block that one query needs badly weighs less than in ``estimated_mass_scores``.
    Use with ``select_blocks(..., per_block=True)``."""
    tk = summaries.tokens
    b, hq, tq, d = q.shape
    off = tk - tq

    def scores(q0: int, q1: int) -> torch.Tensor:
        m = q1 - q0
        n_qb = math.ceil(m / q_block)
        rows = q[:, :, q0:q1].float()  # pooled in float32 whatever the compute dtype
        pad = n_qb * q_block - m
        sums = torch.nn.functional.pad(rows, (0, 0, 0, pad)).view(b, hq, n_qb, q_block, d).sum(3)
        counts = torch.clamp(m - torch.arange(n_qb, device=q.device) * q_block, max=q_block)
        pooled = sums / counts.view(1, 1, n_qb, 1).to(sums.dtype)
        est = estimator(pooled, summaries, scale)  # [B, Hq, n_qb, n]
        first = torch.arange(q0, q1, q_block, device=q.device) + off
        # only blocks fully visible to the block's first query: the others are forced (see
        # forced_block_grid) and their summaries may include keys after some of its queries
        fully = fully_visible_blocks(first, summaries.n_blocks, summaries.block, causal)
        return est.masked_fill(~fully, -math.inf)

    return scores


def oracle_mass_scores(q: torch.Tensor, k: torch.Tensor, block: int, scale: float,
                       causal: bool) -> Callable[[int, int], torch.Tensor]:
    """The oracle: each query's *true* attention mass in each key block (exact softmax). An upper
    bound for any block selector; costs a dense pass."""
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    n = math.ceil(tk / block)
    off = tk - tq
    q, k = q.float(), k.float()  # exact masses: scored in float32 whatever the compute dtype

    def rows(q0: int, q1: int) -> torch.Tensor:
        s = torch.matmul(_grouped(q[:, :, q0:q1], hk), k.transpose(-1, -2)).view(b, hq, q1 - q0, tk) * scale
        if causal:
            q_pos = torch.arange(q0, q1, device=q.device)[:, None] + off
            s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > q_pos, -math.inf)
        p = torch.softmax(s, -1).nan_to_num(0.0)  # [B, Hq, bq, tk]
        pad = n * block - tk
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
        return p.view(b, hq, q1 - q0, n, block).sum(-1)

    def scores(q0: int, q1: int) -> torch.Tensor:
        # a [rows × tokens_k] score matrix per head at a time keeps memory O(N)
        return torch.cat([rows(a, min(a + 256, q1)) for a in range(q0, q1, 256)], dim=2)

    return scores
