"""Training-free block retrieval: each query block attends exactly to its sink blocks, its local
window and the top-scoring other key blocks, within a budget of keys per query.

The methods differ only in how a key block is scored, so they share selection and kernel
(``longattn.sparse``):

* ``landmark`` — the block's mean key stands in for it (Landmark Attention's training-free form).
* ``quest`` — Quest's per-channel min/max upper bound on ``q·k``.
* ``block_oracle`` — the true attention mass (a dense pass): the upper bound any block selector
  can reach at a budget, reported next to every method.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import ClassVar

from longattn.core import validate
from longattn.core.masks import Causal
from longattn.kernels import flex
from longattn.kernels.sdpa import needs_grad
from longattn.kernels.layout import count_allowed_pairs, dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.sparse import decode
from longattn.sparse.kernel import selection_layout, sparse_attention
from longattn.sparse.select import (
    estimated_mass_scores,
    mean_key_estimate,
    oracle_mass_scores,
    pooled_query_scores,
    quest_bound_estimate,
    Selection,
    select_blocks,
)
from longattn.sparse.summaries import BlockSummaries, check_summaries


@dataclass(frozen=True)
class BlockTopK(Method):
    """Shared fields and run of the block-retrieval methods; subclasses give ``block_scores``.

    Args:
        budget: keys attended per query, sinks and window included.
        block: keys per key block; q_block: queries sharing one selection. A block (or query
            block) longer than the input holds all of it (see ``sizes``).
        sinks, window: keys always kept (StreamingLLM's sinks, the local window).
        pooled: score each query block once with its mean query (``pooled_query_scores``), about
            ``q_block`` times cheaper than summing per-query estimates and a little less accurate;
            used for long prefill, where per-query scoring would cost as much as the attention.
        backend: ``"gather"`` — the exact gather kernel (``longattn.sparse.kernel``, returns the
            LSE); ``"flex"`` — compiled FlexAttention over the selection's block mask (needs
            ``q_block == block``, no key padding; on CPU torch gives no LSE, and one compile per
            length). On this CPU the gather kernel was as fast; FlexAttention is the path for GPUs.

    Causality: each query attends only to keys at or before it (the kernel masks per token), and
    a query block's selection never depends on keys after its last query. Because the block's
    queries share one selection, it may depend on keys *inside* the block that come after some of
    its queries (at token granularity the output is causal only per query block, as in every
    block-sparse prefill method).
    """

    budget: int = 2048
    block: int = 64
    q_block: int = 64
    sinks: int = 64
    window: int = 256
    pooled: bool = False
    backend: str = "gather"

    def __post_init__(self) -> None:
        validate.check_positive_int("budget", self.budget)
        validate.check_positive_int("block", self.block)
        validate.check_positive_int("q_block", self.q_block)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        validate.check_positive_int("window", self.window, allow_zero=True)
        if self.backend not in ("gather", "flex"):
            raise ValueError(f"backend must be 'gather' or 'flex', got {self.backend!r}")
        if self.backend == "flex" and self.q_block != self.block:
            raise ValueError(f"backend='flex' needs q_block == block (one block size in the block mask), got "
                             f"q_block={self.q_block}, block={self.block}")
        if self.pooled and self.estimator is None:
            raise ValueError(f"pooled=True needs a block estimator, which method {self.name!r} does not have")
        need = self.forced_blocks_max() + 1
        if self.budget // self.block < need:
            raise ValueError(
                f"budget={self.budget} keys gives {self.budget // self.block} blocks of {self.block} "
                f"(budget // block), but sinks={self.sinks} and window={self.window} (for q_block={self.q_block}) "
                f"already take up to {need - 1} blocks: use budget >= {need * self.block}"
            )

    def sizes(self, tokens_q: int, tokens_k: int) -> tuple[int, int]:
        """``(q_block, block)`` used on ``tokens_q`` queries and ``tokens_k`` keys.

        A (query) block longer than the input holds all of it, so both are capped at the input's
        length ``max(tokens_q, tokens_k)``: the selection is the one the configured sizes give, and
        no tensor is sized by them. One cap for both keeps ``q_block == block`` (``backend="flex"``).
        The blocks kept, ``budget // block`` with the configured block, are capped by the selectors
        at the blocks there are.
        """
        cap = max(tokens_q, tokens_k)
        return min(self.q_block, cap), min(self.block, cap)

    def forced_blocks_max(self) -> int:
        sink_blocks = math.ceil(self.sinks / self.block)
        # window plus the query block's own span (forced under causality), misaligned worst case
        local_blocks = math.ceil((self.window + self.q_block - 1) / self.block) + 1
        return sink_blocks + local_blocks

    def block_scores(self, q, k, scale: float, causal: bool, summaries: BlockSummaries):
        """Per-query score function ``(q0, q1) -> [B, Hq, q1-q0, n_blocks]`` (see ``select_blocks``);
        ``summaries`` are this cache's block summaries, in the blocks the selection uses
        (``_summaries``). Default: the softmax of the method's ``estimator`` over the blocks each
        query fully sees."""
        if self.estimator is None:
            raise NotImplementedError(f"method {self.name!r} defines neither block_scores nor an estimator")
        return estimated_mass_scores(q, summaries, self.estimator, scale, causal)

    def select(self, q, k, call: Call) -> Selection:
        """Which key blocks each query block attends; subclasses with another selector override."""
        q_block, block = self.sizes(q.shape[2], k.shape[2])
        # selection scores in float32 whatever the compute dtype; a method reading k in place
        # (scoring from summaries, which are float32) converts none of the cache here
        q = q.float()
        if not self.capabilities.reads_kv_in_place:
            k = k.float()
        summaries = self._summaries(k, call, block)
        if self.pooled:
            scores = self.pooled_scores(q, k, call.scale, call.causal, summaries, q_block)
        else:
            scores = self.block_scores(q, k, call.scale, call.causal, summaries)
        return select_blocks(
            q, k.shape[2], scores, q_block=q_block, block=block, n_sel=self.budget // self.block,
            sinks=self.sinks, window=self.window, causal=call.causal, per_block=self.pooled,
        )

    #: ``(q, summaries, scale) -> estimated log-mass per block``, behind the default
    #: ``block_scores``, pooled scoring and the one-query decode path (None: none of those)
    estimator = None
    #: the summaries a caller may pass with ``attention(..., summaries=...)``
    summary_types: ClassVar[tuple[type, ...]] = (BlockSummaries,)

    def lean_decode(self) -> bool:
        """One-query steps may take ``longattn.sparse.decode``: only methods whose selection is
        the default one — ``estimator`` on ``BlockSummaries`` through ``select_blocks``."""
        cls = type(self)
        return (self.estimator is not None and cls.block_scores is BlockTopK.block_scores
                and cls.select is BlockTopK.select)

    def pooled_scores(self, q, k, scale, causal, summaries, q_block: int):
        if self.estimator is None:
            raise ValueError(f"method {self.name!r} has no block estimator to pool queries with; use pooled=False")
        return pooled_query_scores(q, summaries, self.estimator, scale, causal, q_block)

    def _summaries(self, k, call: Call, block: int):
        """The caller's summaries of ``k [B, Hkv, Tk, D]`` after checking that they describe it in
        this method's blocks (``check_summaries``), else ones built here; either way in blocks of
        ``block``, the size the selection uses (``sizes``)."""
        s = call.summaries
        if s is None:
            return BlockSummaries.build(k, block)
        check_summaries(s, k, self.block, kinds=self.summary_types,
                        uses=f"method {self.name!r} uses blocks of {self.block}")
        # a cache's block may be longer than the keys (one block holding all of them): relabel it
        # with the capped size, which the selection and the decode step gather by
        return s if s.block == block else dataclasses.replace(s, block=block)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its selection ignores it)")
        tq, tk = q.shape[2], k.shape[2]
        if self.backend == "flex":
            return self._run_flex(q, k, v, call)
        if self.lean_decode() and decode.applies(
                q, k, causal=call.causal, key_padding_mask=call.key_padding_mask, estimator=self.estimator):
            return self._decode(q, k, v, call)
        t0 = time.perf_counter()
        selection = self.select(q, k, call)
        t1 = time.perf_counter()
        out, lse, info = sparse_attention(q, k, v, selection, scale=call.scale, causal=call.causal,
                                          key_padding_mask=call.key_padding_mask, count_pairs=call.want_stats)
        t2 = time.perf_counter()
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection.indices,
                 "blocks_per_query_block": selection.n_sel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = info.visible_pairs / dense if dense else 0.0
        return Result(out, lse, "sparse", stats)


    def _run_flex(self, q, k, v, call: Call) -> Result:
        if call.key_padding_mask is not None:
            raise ValueError(f"method {self.name!r} with backend='flex' does not take key_padding_mask; use backend='gather'")
        reason = flex.flex_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{self.name}: backend='flex' was requested but cannot run: {reason}")
        if q.device.type == "cpu" and needs_grad(q, k, v):
            raise ValueError(f"{self.name}: backend='flex' has no backward on the CPU, but q, k or v requires grad; "
                             "use backend='gather' to train")
        tq, tk = q.shape[2], k.shape[2]
        t0 = time.perf_counter()
        selection = self.select(q, k, call)
        layout = selection_layout(selection, tq, tk, call.causal)
        mask = Causal() if call.causal else None
        t1 = time.perf_counter()
        out, lse = flex.flex_attention_path(q, k.to(q.dtype), v.to(q.dtype), scale=call.scale, layout=layout, mask=mask)
        t2 = time.perf_counter()
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection.indices,
                 "blocks_per_query_block": selection.n_sel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = count_allowed_pairs(mask, layout, q.shape[0], q.shape[1]) / dense if dense else 0.0
        return Result(out, lse, "flex", stats)

    def _decode(self, q, k, v, call: Call) -> Result:
        """One query over a cache: the lean path of ``longattn.sparse.decode`` (same selection and
        result as the general one, a fraction of its per-step overhead)."""
        t0 = time.perf_counter()
        summaries = self._summaries(k, call, self.sizes(q.shape[2], k.shape[2])[1])
        step = decode.decode_step(
            q, k, v, summaries, self.estimator, scale=call.scale, n_sel=min(self.budget // self.block, summaries.n_blocks),
            sinks=self.sinks, window=self.window, want_selection=call.want_stats)
        # selection and attention interleave in this path: the whole step is reported as kernel time
        stats = {"selection_s": 0.0, "kernel_s": time.perf_counter() - t0, "path_detail": f"decode ({step.kernel})"}
        if call.want_stats:
            stats.update(selected_blocks=step.selection.indices, blocks_per_query_block=step.selection.n_sel,
                         density=step.visible_keys / k.shape[2])
        return Result(step.out, step.lse, "sparse", stats)


def _caps(paper: str, cost: str) -> Capabilities:
    return Capabilities(exact=False, score_bias=False, paper=paper, cost=cost, half_compute=True,
                        reads_kv_in_place=True)


@register
@dataclass(frozen=True)
class Landmark(BlockTopK):
    """Landmark Attention, training-free form (Mohtashami & Jaggi 2023): each key block is
    represented by its mean key; every query block attends exactly to the top-scoring blocks.

    Args as for ``BlockTopK``.
    """

    name = "landmark"
    capabilities = _caps("Mohtashami & Jaggi 2023, Landmark Attention", "O(N²/block) scoring + O(N·budget)")

    estimator = staticmethod(mean_key_estimate)


@register
@dataclass(frozen=True)
class Quest(BlockTopK):
    """Quest (Tang et al. 2024, "Query-Aware Sparsity for Efficient Long-Context LLM Inference"):
    per block the element-wise min and max of its keys bound ``q·k`` from above; blocks with the
    highest bound are attended exactly. Args as for ``BlockTopK``."""

    name = "quest"
    capabilities = _caps("Tang et al. 2024, Quest", "O(N²/block) scoring + O(N·budget)")

    estimator = staticmethod(quest_bound_estimate)


@register
@dataclass(frozen=True)
class BlockOracle(BlockTopK):
    """The block oracle: selects by the *true* attention mass of each key block (a dense pass), so
    it is the best any block selector can do at a budget — the upper bound reported beside every
    approximate method. Not a speed-up. Args as for ``BlockTopK``."""

    name = "block_oracle"
    capabilities = _caps("upper bound for block selection: the true attention mass of each block", "O(N²) scoring + O(N·budget)")

    def block_scores(self, q, k, scale, causal, summaries):
        # the summaries are unused but for their block: the size the selection uses (``sizes``)
        return oracle_mass_scores(q, k, summaries.block, scale, causal)

