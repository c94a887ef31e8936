"""MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs", Kimi): a
parameter-free router over blocks of keys. Each key block is represented by its mean key; a query
gates on ``q · mean(K_b)`` over the blocks that end before it, keeps the top ones, and always its own
block (causal inside it); attention runs exactly over the kept blocks' keys.

There is nothing to learn in the router: the model learns, through the attention of the kept
blocks, to make keys whose block means route well. Gradients flow through the shared block-sparse
kernel (``longattn.sparse.kernel``) to q, k and v; the top-k choice itself is piecewise constant.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.select import Selection, fully_visible_blocks, select_blocks
from longattn.sparse.summaries import BlockSummaries, check_summaries


def moba_votes(q: torch.Tensor, summaries: BlockSummaries, *, k: int, scale: float, causal: bool, q_block: int):
    """Per-query gate votes ``(q0, q1) -> [B, Hq, q1-q0, n_blocks]``: 1 for each of the query's top
    ``k`` blocks by ``q · mean key``, plus the gate's softmax (below 1) to break ties between blocks
    with equal votes when queries share a selection. A query votes only on blocks the *first* query
    of its query block fully sees: a later query's vote must not bring in keys an earlier one of
    the same block cannot see (token-level causality)."""
    tk = summaries.tokens
    off = tk - q.shape[2]
    b, hq, _, d = q.shape
    hk = summaries.sums.shape[1]

    def scores(q0: int, q1: int) -> torch.Tensor:
        qs = q[:, :, q0:q1].float()
        gate = torch.matmul(qs.reshape(b, hk, -1, d), summaries.mean.transpose(-1, -2)).view(b, hq, q1 - q0, -1)
        q_pos = (torch.arange(q0, q1, device=q.device) // q_block) * q_block + off
        gate = (gate * scale).masked_fill(~fully_visible_blocks(q_pos, summaries.n_blocks, summaries.block, causal),
                                          -math.inf)
        votes = torch.zeros_like(gate)
        if k:
            top = gate.topk(min(k, gate.shape[-1]), dim=-1)
            votes.scatter_(-1, top.indices, torch.isfinite(top.values).to(votes.dtype))
        return votes + 0.5 * torch.softmax(gate, dim=-1).nan_to_num(0.0)

    return scores


@register
@dataclass(frozen=True)
class MoBA(Method):
    """MoBA (Lu et al. 2025, Kimi): mean-pooled block keys route each query to its top-k blocks
    plus its own block; exact attention over them; trainable through the sparse kernel.

    Args:
        block: keys per block.
        top_k: blocks per query, the own block included (MoBA counts it in k).
        q_block: queries sharing one selection. MoBA gates every query on its own (``q_block=1``);
            a block of queries takes the blocks most of its queries vote for (ties by gate), which
            is what makes the shared kernel's batched path and long prefill fast.

    Causal: a query's vote reads only blocks that end before it; the own block is always kept and
    masked per token, so no key after a query reaches it.
    """

    block: int = 64
    top_k: int = 4
    q_block: int = 64
    name = "moba"
    capabilities = Capabilities(
        exact=False, score_bias=False, non_causal=False, half_compute=True, reads_kv_in_place=True,
        paper="Lu et al. 2025, MoBA", cost="O(N²/block) gating + O(N·top_k·block)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("block", self.block)
        validate.check_positive_int("top_k", self.top_k)
        validate.check_positive_int("q_block", self.q_block)
        need = math.ceil((self.q_block - 1) / self.block) + 1
        if self.top_k < need:
            raise ValueError(f"top_k={self.top_k} cannot hold the {need} blocks a query block of q_block={self.q_block} "
                             f"overlaps (block={self.block}): use top_k >= {need}")

    def select(self, q, k, call: Call) -> Selection:
        tq, tk = q.shape[2], k.shape[2]
        cap = max(tq, tk)
        block, q_block = min(self.block, cap), min(self.q_block, cap)
        s = call.summaries
        if s is None:
            s = BlockSummaries.build(k, block)
        else:
            check_summaries(s, k, self.block, kinds=(BlockSummaries,), uses=f"method 'moba' uses blocks of {self.block}")
        own = math.ceil((q_block - 1) / block) + 1 if q_block > 1 else 1
        votes = moba_votes(q, s, k=max(self.top_k - 1, 0), scale=call.scale, causal=call.causal, q_block=q_block)
        # window=1: the block(s) holding the query block's own queries are forced (MoBA's own block)
        return select_blocks(q, tk, votes, q_block=q_block, block=block, n_sel=max(self.top_k, own),
                             sinks=0, window=1, causal=call.causal)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'moba' does not take a score bias (its router ignores it)")
        tq, tk = q.shape[2], k.shape[2]
        t0 = time.perf_counter()
        with torch.no_grad():
            selection = self.select(q.detach(), k.detach(), call)
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
