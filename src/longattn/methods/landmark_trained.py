"""Landmark Attention as the paper trains it (Mohtashami & Jaggi 2023, "Landmark Attention:
Random-Access Infinite Context Length for Transformers"): a landmark token closes every block, a
grouped softmax makes attention to an earlier block pass through its landmark, and at inference
the landmarks retrieve the top-k blocks from a context of any length.

The model must have been trained with landmark tokens in its input at every ``block``-th position
(``longattn.train.landmarks`` inserts them into any task) and with this method (``top_k=None``: the
grouped softmax over every earlier block). The kernel is :mod:`longattn.sparse.landmark`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register, rotary_position
from longattn.sparse.landmark import grouped_attention, landmark_scores, select_landmark_blocks


@register
@dataclass(frozen=True)
class LandmarkTrained(Method):
    """Trained Landmark Attention (Mohtashami & Jaggi 2023): grouped softmax through landmark
    tokens, top-k block retrieval by landmark score.

    Args:
        block: tokens per block, its landmark (the last slot) included: positions ``b·block-1`` for
            ``b ≥ 1`` hold landmark tokens. Must match the model's training.
        top_k: earlier blocks each query block attends (through their landmarks); None: every
            earlier block (training, and the exact formula). The paper retrieves a few (4).
        local: the nearest earlier blocks always kept (counted in ``top_k``).

    Shapes: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``, causal only, the queries the last ``Tq``
    positions. With ``position=RoPE(...)`` q/k arrive unrotated and the kept blocks are laid out
    right before the query's block (``longattn.sparse.landmark``). Selection is per query block
    and per query head, from complete earlier blocks only: causal at the token level. With
    ``block`` at least the sequence length it is causal softmax attention.
    """

    block: int = 64
    top_k: int | None = None
    local: int = 1
    name = "landmark_trained"
    capabilities = Capabilities(
        exact=False, non_causal=False, score_bias=False, own_positions=True,
        paper="Mohtashami & Jaggi 2023, Landmark Attention",
        cost="O(N²/block) landmark scoring + O(N·(top_k+1)·block)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("block", self.block)
        if self.block < 2:
            raise ValueError(f"block must be >= 2 (ordinary tokens and a landmark), got {self.block}")
        if self.top_k is not None:
            validate.check_positive_int("top_k", self.top_k)
        validate.check_positive_int("local", self.local, allow_zero=True)
        if self.top_k is not None and self.local > self.top_k:
            raise ValueError(f"local={self.local} nearest blocks do not fit in top_k={self.top_k}")

    def run(self, q, k, v, call: Call) -> Result:
        position = rotary_position(call, self.name, "it lays out rotary positions over the kept blocks")
        tq, tk = q.shape[2], k.shape[2]
        # a block longer than the keys holds all of them and no landmark: one block, whose size
        # then does not matter (capped so that nothing is sized by the configured block)
        block = min(self.block, tk)
        t0 = time.perf_counter()
        with torch.no_grad():  # the choice of blocks carries no gradient
            if self.top_k is None:  # every earlier block: nothing to score
                scores = q.new_zeros(q.shape[0], q.shape[1], (tk - 1) // block - (tk - tq) // block + 1, tk // block)
            else:
                scores = landmark_scores(q, k, block=block, scale=call.scale, position=position)
            selection = select_landmark_blocks(scores, first_block=(tk - tq) // block, top_k=self.top_k,
                                               local=self.local)
        t1 = time.perf_counter()
        out, lse = grouped_attention(q, k, v, selection, block=block, scale=call.scale, position=position,
                                     key_padding_mask=call.key_padding_mask)
        t2 = time.perf_counter()
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection}
        if call.want_stats:
            dense = dense_pairs(tq, tk, True)
            kept = float((selection >= 0).sum()) / max(1, selection.shape[0] * selection.shape[1])
            pairs = min(dense, kept * block * block + tq * (block + 1) / 2)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, "landmark", stats)
