"""HiP Attention (Lee et al. 2024, "A Training-Free Sub-quadratic Cost Transformer Model Serving
Framework With Hierarchically Pruned Attention"): key blocks found by hierarchical pruning."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.methods.base import Call, Capabilities, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.hierarchy import hierarchical_select, mean_key_gathered
from longattn.sparse.select import Selection


@register
@dataclass(frozen=True)
class HiP(BlockTopK):
    """HiP Attention (Lee et al. 2024): per query block, the free slots of the budget are filled
    by hierarchical top-k over the visible key blocks — halve the surviving groups, score each
    half by its middle block's mean key, keep the best, repeat — so a query block scores
    ``O(budget/block · log(T/budget))`` blocks instead of all ``T/block``. Sinks and the local
    window are kept as in every ``BlockTopK`` method; attention over the selection is exact.

    Args as for ``BlockTopK``, but ``pooled=True`` is refused: every round already scores a query
    block as a whole (the sum of its queries' shares), over ``O(budget/block)`` blocks. Selection
    ignores key padding (the kernel masks it).
    """

    name = "hip"
    capabilities = Capabilities(
        half_compute=True,
        exact=False, score_bias=False, paper="Lee et al. 2024, HiP Attention",
        cost="O(N·budget/block·log N) scoring + O(N·budget)",
    )

    def select(self, q, k, call: Call) -> Selection:
        q_block, block = self.sizes(q.shape[2], k.shape[2])
        estimate = mean_key_gathered(self._summaries(k, call, block), q.shape[1], call.scale)
        return hierarchical_select(
            q, k.shape[2], estimate, q_block=q_block, block=block, n_sel=self.budget // self.block,
            sinks=self.sinks, window=self.window, causal=call.causal,
        )
