"""XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention with Antidiagonal Scoring"):
block importance from strided antidiagonal sums of the score matrix; per query block, key blocks
in decreasing importance until their cumulative share reaches a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.methods.base import Call, Capabilities, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.select import Selection
from longattn.sparse.strided import antidiagonal_mass, strided_row_mass
from longattn.sparse.threshold import cumulative_mass_selection

ESTIMATES = ("antidiagonal", "antidiagonal_entries", "rows")


@register
@dataclass(frozen=True)
class XAttention(BlockTopK):
    """XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention with Antidiagonal Scoring").

    Each (query block, key block) square of the score matrix is cut into ``stride × stride``
    squares; the sum over their antidiagonals (one entry per query row and per key column of the
    small square, so both vertical and slash patterns register) scores the block. The scores are
    softmax-normalised per query group (``longattn.sparse.strided.antidiagonal_mass``) and summed
    per block; each query block keeps key blocks in decreasing score until they hold a share
    ``threshold`` of it (``threshold.cumulative_mass_selection``), forced sinks, local window and
    its own diagonal blocks first and counted, at most ``budget // block`` blocks. The selected
    blocks are attended exactly (``sparse.kernel.sparse_attention``).

    Args:
        threshold: the cumulative share τ to cover, in ``(0, 1]``; 1 fills the budget with the
            highest-scoring blocks (exact once the budget holds every block).
        stride: ``S``, one score in ``S`` is read (estimation costs ``Tq·Tk·D/S``).
        estimate: ``"antidiagonal"`` — the paper's: the antidiagonal's logits are summed
            (``S × S`` regrouped matmul) and the softmax runs over those sums;
            ``"antidiagonal_entries"`` — each antidiagonal entry is a softmax term of its own
            query (a lone strong key is not averaged away); ``"rows"`` — every ``S``-th query
            attends to all keys exactly and its block masses are summed (the block oracle on a
            sample of queries: the most accurate of the three, at the same cost).
        budget: most keys per query (sinks, window and diagonal included); block, q_block,
            sinks, window, backend: as for ``BlockTopK`` (``pooled`` does not apply).

    Tensors: q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` (GQA), any float dtype; scores are
    estimated in float32; out ``[B, Hq, Tq, D]``, LSE ``[B, Hq, Tq]`` float32.

    Causality: no query sees a later key; a query block's selection reads only keys up to its last
    query (with ``"antidiagonal"`` the block's own diagonal stride groups hold keys after some of
    its queries, as the selection of every block-sparse prefill method does).
    """

    budget: int = 4096
    threshold: float = 0.9
    stride: int = 8
    estimate: str = "antidiagonal"

    name = "xattention"
    capabilities = Capabilities(
        exact=False, score_bias=False, half_compute=True,
        paper="Xu et al. 2025, XAttention: Block Sparse Attention with Antidiagonal Scoring",
        cost="O(N²·D/stride) antidiagonal scoring + adaptive O(N·≤budget) attention",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.check_fraction("threshold", self.threshold)
        validate.check_positive_int("stride", self.stride)
        validate.check_choice("estimate", self.estimate, ESTIMATES)

    def block_mass(self, q, k, call: Call, q_block: int, block: int) -> torch.Tensor:
        """Estimated mass ``[B, Hq, n_q_blocks, n_blocks]`` (float32) of each query block in each
        key block, by ``estimate``."""
        kw = dict(stride=self.stride, q_block=q_block, block=block, scale=call.scale, causal=call.causal,
                  key_padding_mask=call.key_padding_mask)
        with torch.no_grad():
            if self.estimate == "rows":
                return strided_row_mass(q, k, **kw)
            return antidiagonal_mass(q, k, mode="sum" if self.estimate == "antidiagonal" else "entries", **kw)

    def select(self, q, k, call: Call) -> Selection:
        tq, tk = q.shape[2], k.shape[2]
        q_block, block = self.sizes(tq, tk)
        mass = self.block_mass(q, k, call, q_block, block)
        return cumulative_mass_selection(
            mass, tokens_q=tq, tokens_k=tk, q_block=q_block, block=block, gamma=self.threshold, min_blocks=1,
            max_blocks=max(1, self.budget // self.block), sinks=self.sinks, window=self.window, causal=call.causal,
        )
