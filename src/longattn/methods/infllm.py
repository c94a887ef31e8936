"""InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory"): key blocks are looked up by a few representative tokens each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longattn.core import validate
from longattn.methods.base import Capabilities, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.representatives import RepresentativeSummaries, representative_estimate
from longattn.sparse.select import estimated_mass_scores, pooled_query_scores
from longattn.sparse.summaries import BlockSummaries


@register
@dataclass(frozen=True)
class InfLLM(BlockTopK):
    """InfLLM (Xiao et al. 2024): each key block is represented by the ``reps`` keys that its own
    queries attended most (in-block causal attention; see ``longattn.sparse.representatives``);
    a query block attends exactly to its sinks, local window and the blocks whose representatives
    it matches best.

    Args:
        budget, block, q_block, sinks, window, pooled: as for ``BlockTopK``.
        reps: representative keys per block (``1 <= reps <= block``).

    A block's score for a query is InfLLM's mean of ``scale·q·rep_r`` over the representatives,
    plus ``log(block size)`` to read as a log-mass (``representative_estimate``); with
    ``reps == block`` it is ``landmark``'s mean-key score. Representatives are built from
    the call's ``q`` and ``k``; a decode loop can keep a ``RepresentativeSummaries`` current with
    ``append`` and pass it as ``summaries=`` (``BlockSummaries`` are checked against ``k`` but not
    used). Key padding is masked by the kernel but not in the representatives (as for
    ``landmark``): a padding key may represent its block.
    """

    reps: int = 4
    name = "infllm"
    capabilities = Capabilities(
        half_compute=True,
        exact=False, score_bias=False, paper="Xiao et al. 2024, InfLLM",
        cost="O(N·block) representatives + O(N²·reps/block) scoring + O(N·budget)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.check_positive_int("reps", self.reps)
        if self.reps > self.block:
            raise ValueError(f"reps must be <= block (keys per block), got reps={self.reps} and block={self.block}")

    #: linear in the query (the mean representative's logit), so ``pooled=True`` is sound
    estimator = staticmethod(representative_estimate)
    summary_types: ClassVar[tuple[type, ...]] = (BlockSummaries, RepresentativeSummaries)

    def block_scores(self, q, k, scale, causal, summaries):
        return estimated_mass_scores(q, self._representatives(q, k, scale, summaries), representative_estimate,
                                     scale, causal)

    def pooled_scores(self, q, k, scale, causal, summaries, q_block):
        return pooled_query_scores(q, self._representatives(q, k, scale, summaries), representative_estimate,
                                   scale, causal, q_block)

    def _representatives(self, q, k, scale, summaries) -> RepresentativeSummaries:
        if isinstance(summaries, RepresentativeSummaries):
            if summaries.reps != self.reps:
                raise ValueError(f"summaries keep {summaries.reps} representatives per block but method "
                                 f"{self.name!r} uses reps={self.reps}")
            return summaries
        # block summaries given (the caller's, checked, or built by ``select``): build the
        # representatives from this call (in the configured blocks; ``build`` pads no further than k)
        return RepresentativeSummaries.build(k, self.block, self.reps, q=q, scale=scale)
