"""FlexPrefill (Lai et al. 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
Efficient Long-Sequence Inference"): per head, a query-aware or a vertical-slash block estimate,
chosen by how well pooled vectors predict the true attention; per query block, key blocks until
their estimated mass reaches a share ``gamma``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Result, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.head_patterns import attention_rows, vertical_slash_scores
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.select import Selection
from longattn.sparse.threshold import cumulative_mass_selection, pooled_block_mass


def js_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(JSD(a, b))`` (natural log, so in ``[0, sqrt(ln 2)]``) between distributions on the
    last axis; inputs are normalised first."""
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    b = b / b.sum(-1, keepdim=True).clamp_min(1e-30)
    mid = 0.5 * (a + b)
    kl = lambda x: (torch.xlogy(x, x) - torch.xlogy(x, mid)).sum(-1)  # noqa: E731
    return (0.5 * kl(a) + 0.5 * kl(b)).clamp_min(0.0).sqrt()


def vertical_slash_block_mass(vertical: torch.Tensor, slash: torch.Tensor, *, tokens_q: int, q_block: int,
                              block: int, causal: bool) -> torch.Tensor:
    """Estimated mass ``[B, H, n_q_blocks, n_blocks]`` of each query block in each key block under
    a vertical-slash model of attention: ``a(p, k) ≈ vertical[k] + slash[p - k]``.

    Args:
        vertical: ``[B, H, Tk]`` mass per key column; slash: ``[B, H, Tq + Tk - 1]`` mass per
            offset ``o = p - k`` at index ``o + Tq - 1`` (both from ``vertical_slash_scores``; each is
            normalised to sum 1 here, so the two parts weigh the same).

    A query block's slash mass in a key block is the mean over its queries of the slash mass on
    the diagonals crossing the block; with prefix sums of prefix sums that is four look-ups per
    (query block, key block), no per-query work.
    """
    b, h, tk = vertical.shape
    dev = vertical.device
    n_qb, n = math.ceil(tokens_q / q_block), math.ceil(tk / block)
    off = tk - tokens_q
    v = vertical.double() / vertical.double().sum(-1, keepdim=True).clamp_min(1e-300)
    s = slash.double() / slash.double().sum(-1, keepdim=True).clamp_min(1e-300)
    pad = (1, 0)
    s1 = torch.nn.functional.pad(s.cumsum(-1), pad)  # s1[x] = Σ_{y<x} s[y], length Tq+Tk
    s2 = torch.nn.functional.pad(s1.cumsum(-1), pad)  # s2[x] = Σ_{y<x} s1[y], length Tq+Tk+1
    v1 = torch.nn.functional.pad(v.cumsum(-1), pad)
    qb = torch.arange(n_qb, device=dev)
    a = (qb * q_block + off)[:, None]  # first / last query position of each query block
    z = (torch.clamp((qb + 1) * q_block, max=tokens_q) - 1 + off)[:, None]
    klo = (torch.arange(n, device=dev) * block)[None, :]
    khi = torch.clamp(klo + block - 1, max=tk - 1)
    t = tokens_q - 1  # index of offset 0
    # Σ_{p=a..z} Σ_{k=klo..khi} s[p-k+t] = Σ_p (s1[p-klo+t+1] - s1[p-khi+t])
    hi_sum = s2[..., (z - klo + t + 2)] - s2[..., (a - klo + t + 1)]
    lo_sum = s2[..., (z - khi + t + 1)] - s2[..., (a - khi + t)]
    slash_mass = (hi_sum - lo_sum) / (z - a + 1).double()
    top = torch.minimum(khi, z) if causal else khi.expand(n_qb, -1)  # columns the block can see
    vert_mass = (v1[..., (top + 1).clamp(min=0)] - v1[..., klo.expand(n_qb, -1)]).clamp_min(0.0)
    vert_mass = vert_mass.masked_fill(top < klo, 0.0)
    return (slash_mass.clamp_min(0.0) + vert_mass).float()


@register
@dataclass(frozen=True)
class FlexPrefill(BlockTopK):
    """FlexPrefill (Lai et al. 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
    Efficient Long-Sequence Inference").

    Per (batch, head): the last ``last_q`` queries' true attention, summed per key block, is
    compared with its pooled estimate (their mean query against each block's mean key). If the
    Jensen-Shannon distance ``sqrt(JSD)`` is below ``tau`` the pooled estimate is trusted and the
    head is *query-aware*: every query block ranks key blocks by its own pooled estimate
    (``threshold.pooled_block_mass``). Otherwise the head is *vertical-slash*: the last queries'
    attention summed per key column and per diagonal predicts every query block's mass per key
    block. Either way each query block keeps key blocks in decreasing estimated mass until they
    hold ``gamma`` of it (``threshold.cumulative_mass_selection``): budgets adapt per head and per
    query block, between ``min_blocks`` and ``budget // block`` blocks, sinks and window included.

    Args:
        gamma: mass share to cover, in ``(0, 1]``; 1 keeps every visible block up to the budget.
        tau: JS-distance threshold (``0`` = always vertical-slash, above ``sqrt(ln 2) ≈ 0.83`` =
            always query-aware).
        min_blocks: fewest key blocks per query block.
        last_q: the last queries, whose attention decides the pattern and builds vertical-slash
            estimates; None = the last ``q_block`` (the paper's last query block: more of them
            blur the pooled estimate, which treats them as one block seeing every key).
        budget, block, q_block, sinks, window: as for ``BlockTopK`` (budget = most keys per query).

    Causality: no query sees a later key; query-aware selection depends only on keys up to its
    query block's last query. The pattern test and vertical-slash estimates use the last queries,
    so they depend on the whole prompt (a prefill method, as in the paper): earlier outputs may
    change with later keys, never with later values alone.
    """

    budget: int = 4096
    gamma: float = 0.9
    tau: float = 0.1
    min_blocks: int = 1
    last_q: int | None = None

    name = "flexprefill"
    capabilities = Capabilities(
        half_compute=True,
        exact=False, score_bias=False, paper="Lai et al. 2025, FlexPrefill",
        cost="O(N²/block²) + O(last_q·N) estimate + adaptive O(N·≤budget) attention",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.check_fraction("gamma", self.gamma)
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0.0:
            raise ValueError(f"tau must be a non-negative number, got {t!r}")
        validate.check_positive_int("min_blocks", self.min_blocks)
        if self.last_q is not None:
            validate.check_positive_int("last_q", self.last_q)
        if self.min_blocks > self.budget // self.block:
            raise ValueError(f"min_blocks={self.min_blocks} exceeds the budget's {self.budget // self.block} "
                             f"blocks (budget={self.budget}, block={self.block})")

    def plan(self, q, k, call: Call) -> tuple[Selection, torch.Tensor, torch.Tensor]:
        """The selection, and per (batch, head) whether it is query-aware and its JS distance."""
        b, hq, tq, _ = q.shape
        tk = k.shape[2]
        q, k = q.float(), k.float()  # the estimates are computed in float32 whatever the compute dtype
        q_block, block = self.sizes(tq, tk)
        n = math.ceil(tk / block)
        lq = min(self.last_q or q_block, tq)
        p = attention_rows(q, k, tq - lq, tq, call.scale, call.causal, call.key_padding_mask)  # [B, Hq, lq, Tk]
        true_blocks = torch.nn.functional.pad(p.sum(2), (0, n * block - tk)).view(b, hq, n, block).sum(-1)
        # the pooled estimate of those same queries: one query block holding exactly them
        est = pooled_block_mass(q[:, :, tq - lq:], k, q_block=lq, block=block, scale=call.scale,
                                causal=call.causal)[:, :, 0]
        dist = js_distance(est, true_blocks)
        query_aware = dist < self.tau
        mass = None
        if bool(query_aware.any()):
            mass = pooled_block_mass(q, k, q_block=q_block, block=block, scale=call.scale, causal=call.causal)
        if not bool(query_aware.all()):
            q_pos = torch.arange(tq - lq, tq, device=q.device) + (tk - tq)
            vertical, slash = vertical_slash_scores(p, q_pos, tq, tk)
            vs = vertical_slash_block_mass(vertical, slash, tokens_q=tq, q_block=q_block, block=block,
                                           causal=call.causal)
            mass = vs if mass is None else torch.where(query_aware[..., None, None], mass, vs)
        sel = cumulative_mass_selection(
            mass, tokens_q=tq, tokens_k=tk, q_block=q_block, block=block, gamma=self.gamma,
            min_blocks=self.min_blocks, max_blocks=self.budget // self.block, sinks=self.sinks,
            window=self.window, causal=call.causal,
        )
        return sel, query_aware, dist

    def select(self, q, k, call: Call) -> Selection:
        return self.plan(q, k, call)[0]

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its selection ignores it)")
        tq, tk = q.shape[2], k.shape[2]
        t0 = time.perf_counter()
        selection, query_aware, dist = self.plan(q, k, call)
        t1 = time.perf_counter()
        out, lse, info = sparse_attention(q, k, v, selection, scale=call.scale, causal=call.causal,
                                          key_padding_mask=call.key_padding_mask, count_pairs=call.want_stats)
        t2 = time.perf_counter()
        used = (selection.indices >= 0).sum(-1)
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection.indices,
                 "blocks_per_query_block": selection.n_sel, "mean_blocks": float(used.double().mean()),
                 "query_aware": query_aware, "js_distance": dist}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = info.visible_pairs / dense if dense else 0.0
        return Result(out, lse, "sparse", stats)
