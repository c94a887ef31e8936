"""LongHeads (Lu et al. 2024, "LongHeads: Multi-Head Attention is Secretly a Long Context
Processor"): every query head picks its own chunks of the context so that it attends to no more
than an in-distribution number of tokens, and the positions it sees are re-mapped into that window.

Keys are cut into chunks of ``chunk`` tokens, each represented by its mean key (``score="mean"``)
or by Quest's per-dimension min/max bound on q·k (``score="bound"``). Each query head,
per query block of ``chunk`` queries, keeps the first chunk (the attention sink), the chunks holding
the queries and their ``local`` preceding tokens, and the middle chunks scoring highest against the
chunk representations — ``window // chunk`` chunks in all, so at most ``window`` keys.

Position re-mapping (what makes it more than a block selector): the kept chunks are laid out
contiguously in their original order and the rotary encoding is applied to that layout, key ``j``
at "number of kept keys before ``j``" and each query at "number of kept keys before it". A query
therefore never sees a relative distance of ``window`` or more, however long the context; heads
differ in what they keep, so together they cover the whole context. For this the method takes q/k
*before* rotation (``Capabilities.own_positions``): ``longattn.attention(..., position=RoPE(...))``
hands it the encoding instead of rotating. Without a rotary position it is plain per-head chunk
selection over the keys as given (already rotated, or no positions at all).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.kernels.eager import attend_visible, gather_tokens
from longattn.kernels.sdpa import fused_available
from longattn.methods.base import Call, Capabilities, Method, Result, register, rotary_position
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.select import Selection, estimated_mass_scores, quest_bound_estimate, select_blocks
from longattn.sparse.summaries import BlockSummaries, check_summaries


def chunk_dot_estimate(q: torch.Tensor, s: BlockSummaries, scale: float) -> torch.Tensor:
    """LongHeads' chunk score ``scale · q · c_j`` with ``c_j`` the chunk's mean key:
    q ``[B, Hq, t, D]`` → ``[B, Hq, t, n_chunks]``."""
    b, hq, t, d = q.shape
    hk = s.sums.shape[1]
    est = torch.matmul(q.reshape(b, hk, (hq // hk) * t, d), s.mean.transpose(-1, -2))
    return est.view(b, hq, t, -1) * scale


#: chunk scorers of ``LongHeads(score=...)``
CHUNK_SCORES = ("mean", "bound")


def remap_positions(key_pos: torch.Tensor, kept: torch.Tensor,
                    query_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions inside the contiguous layout of the kept keys.

    Args:
        key_pos: ``[..., L]`` original positions of the layout's slots, increasing over kept slots.
        kept: ``[..., L]`` bool, the slot holds a key of the sequence.
        query_pos: ``[..., m]`` original positions of the queries.

    Returns:
        ``(k_new [..., L], q_new [..., m])`` int64: a kept key's new position is the number of kept
        keys before it (0 for slots not kept); a query's is the number of kept keys at original
        positions before its own, so a query sits where its own key sits when that key is kept.
        With every key kept both are the identity.
    """
    k_new = (kept.cumsum(-1) - 1).clamp_min(0) * kept
    before = kept[..., None, :] & (key_pos[..., None, :] < query_pos[..., :, None])  # [..., m, L]
    return k_new, before.sum(-1)


def remapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    scale: float,
    causal: bool,
    position=None,
    key_padding_mask: torch.Tensor | None = None,
    max_elements: int = 1 << 23,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact attention of each query block over its selected chunks, with the rotary
    ``position`` applied at re-mapped positions (``remap_positions``); ``position=None`` skips the
    rotation (then it equals ``sparse_attention`` on the same selection).

    Args:
        q: ``[B, Hq, Tq, D]`` float32, unrotated; k, v: ``[B, Hkv, Tk, D]`` float32, k unrotated.
        selection: ``indices [B, Hq, n_q_blocks, n_sel]`` (sorted, -1 unused).
        max_elements: bound on gathered keys × head_dim per step (memory).

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` (rows seeing no key: 0 and -inf) and the
        visible (query, key) pairs averaged over batch × heads.
    """
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    cs, qbs = selection.block, selection.q_block
    n_qb, n_sel = selection.indices.shape[2], selection.n_sel
    span = n_sel * cs
    off = tk - tq
    dev = q.device
    fused = fused_available(q)
    out = torch.empty(b, hq, n_qb * qbs, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, n_qb * qbs, dtype=torch.float32, device=dev)
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, n_qb * qbs - tq))
    pairs = 0.0
    per_step = max(1, max_elements // max(1, b * hq * span * max(d, qbs)))
    for i0 in range(0, n_qb, per_step):
        i1 = min(i0 + per_step, n_qb)
        G = i1 - i0
        idx = selection.indices[:, :, i0:i1]  # [B, Hq, G, n_sel]
        pos = (idx.clamp_min(0)[..., None] * cs + torch.arange(cs, device=dev)).flatten(-2)  # [B, Hq, G, L]
        kept = (idx >= 0)[..., None].expand(-1, -1, -1, -1, cs).flatten(-2) & (pos < tk)
        kg, vg = (x.view(b * hq * G, 1, span, d) for x in gather_tokens(k, v, pos.clamp(max=tk - 1)))
        qi = torch.arange(i0 * qbs, i1 * qbs, device=dev).view(G, qbs)
        q_orig = qi + off  # [G, qbs]
        qg = q_pad[:, :, i0 * qbs:i1 * qbs].reshape(b * hq * G, 1, qbs, d)
        if position is not None:
            k_new, q_new = remap_positions(pos, kept, q_orig.expand(b, hq, G, qbs))
            q_new = q_new * (qi < tq)  # rows padding the last query block: position 0, discarded
            qg, kg = position.rotate(qg, kg, q_new.reshape(b * hq * G, qbs), k_new.reshape(b * hq * G, span))
        vis = kept[..., None, :] & (qi < tq)[None, None, :, :, None]  # [B, Hq, G, qbs, L]
        if causal:
            vis = vis & (pos[..., None, :] <= q_orig[None, None, :, :, None])
        if key_padding_mask is not None:
            real = torch.gather(key_padding_mask[:, None, None, :].expand(b, hq, G, tk), 3, pos.clamp(max=tk - 1))
            vis = vis & real[..., None, :]
        vis = vis.reshape(b * hq * G, 1, qbs, span)
        o, l = attend_visible(qg, kg, vg, scale, vis, fused)
        out[:, :, i0 * qbs:i1 * qbs] = o.view(b, hq, G * qbs, d)
        lse[:, :, i0 * qbs:i1 * qbs] = l.view(b, hq, G * qbs)
        pairs += float(vis.sum()) / (b * hq)
    return out[:, :, :tq], lse[:, :, :tq], pairs


@register
@dataclass(frozen=True)
class LongHeads(Method):
    """LongHeads (Lu et al. 2024, "LongHeads: Multi-Head Attention is Secretly a Long Context
    Processor"): each head attends to its own chunks — first chunk, local chunks and top-scoring
    middle chunks — at most ``window`` tokens, with rotary positions re-mapped into that window.

    Args:
        window: keys per query, all chunks included; the in-distribution length (e.g. the model's
            trained context). Must hold the forced chunks: ``window >= chunk × forced_chunks_max()``.
        chunk: tokens per key chunk, and queries sharing one selection. A chunk longer than the
            input holds all of it.
        local: tokens before the query block always kept (the chunks holding them are forced).
        score: how a chunk is scored against a query. ``"mean"``: ``q · mean key`` (LongHeads' chunk
            representation). ``"bound"``: Quest's upper bound ``Σ_d max(q_d·min_d, q_d·max_d)``,
            which sees one strong key however many weak ones share its chunk. The mean dilutes a
            short needle by its share of the chunk, and a needle cut by a chunk boundary by more:
            in the retrieval model a 7-token passkey at positions 253–259 (chunks of 32) was found
            in 3 of 8 samples with ``"mean"`` and 8 of 8 with ``"bound"`` (1,024 tokens).

    Shapes: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; with ``position=RoPE(...)`` (or xPos)
    q/k arrive unrotated and are rotated here per query block. Causality as for ``BlockTopK``:
    per query block (a block's shared selection may depend on keys of its own later queries).
    """

    window: int = 512
    chunk: int = 32
    local: int = 32
    score: str = "mean"
    name = "longheads"
    capabilities = Capabilities(
        exact=False, score_bias=False, own_positions=True,
        paper="Lu et al. 2024, LongHeads",
        cost="O(N²/chunk) chunk scoring + O(N·window)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("window", self.window)
        validate.check_positive_int("chunk", self.chunk)
        validate.check_positive_int("local", self.local, allow_zero=True)
        if self.score not in CHUNK_SCORES:
            raise ValueError(f"score must be one of {', '.join(map(repr, CHUNK_SCORES))}, got {self.score!r}")
        need = self.forced_chunks_max()
        if self.window // self.chunk < need:
            raise ValueError(
                f"window={self.window} holds {self.window // self.chunk} chunks of {self.chunk}, but the first chunk "
                f"and local={self.local} (for query blocks of {self.chunk}) already take up to {need}: "
                f"use window >= {need * self.chunk}"
            )

    def forced_chunks_max(self) -> int:
        """Chunks always kept, worst case (causal, query blocks not aligned with key chunks):
        the first chunk plus those spanned by ``local`` tokens and the query block."""
        return 1 + math.ceil((max(self.local, 1) + self.chunk - 1) / self.chunk) + 1

    def select(self, q: torch.Tensor, k: torch.Tensor, call: Call) -> Selection:
        """Each (batch, query head, query block)'s chunks."""
        tk = k.shape[2]
        # a chunk longer than the input holds all of it: capped at the input's length the selection
        # is the same, and no tensor is sized by the configured chunk
        chunk = min(self.chunk, max(q.shape[2], tk))
        s = call.summaries
        if s is None:
            s = BlockSummaries.build(k, chunk)
        else:
            check_summaries(s, k, self.chunk, kinds=(BlockSummaries,),
                            uses=f"method 'longheads' uses chunks of {self.chunk}")
        estimate = chunk_dot_estimate if self.score == "mean" else quest_bound_estimate
        scores = estimated_mass_scores(q, s, estimate, call.scale, call.causal)
        # select_blocks' window forces the chunks holding the block's queries (window >= 1) and
        # those reaching `local` tokens back; sinks=chunk forces the first chunk
        return select_blocks(q, tk, scores, q_block=chunk, block=chunk, n_sel=self.window // self.chunk,
                             sinks=chunk, window=max(self.local, 1), causal=call.causal)

    def run(self, q, k, v, call: Call) -> Result:
        position = rotary_position(call, self.name, "it re-maps rotary positions")
        tq, tk = q.shape[2], k.shape[2]
        t0 = time.perf_counter()
        selection = self.select(q, k, call)
        t1 = time.perf_counter()
        if position is None:
            out, lse, info = sparse_attention(q, k, v, selection, scale=call.scale, causal=call.causal,
                                              key_padding_mask=call.key_padding_mask, count_pairs=call.want_stats)
            pairs, path = info.visible_pairs, "sparse"
        else:
            out, lse, pairs = remapped_attention(q, k, v, selection, scale=call.scale, causal=call.causal,
                                                 position=position, key_padding_mask=call.key_padding_mask)
            path = "remapped"
        t2 = time.perf_counter()
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection.indices,
                 "chunks_per_query_block": selection.n_sel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, path, stats)
