"""AnchorAttention (2025, "AnchorAttention: Difference-Aware Sparse Attention with Stripe
Granularity"): a near-maximum score per query (the *anchor*) from a fixed pattern; key stripes
whose estimated score comes within a margin of it are kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.methods.base import Call, Capabilities, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.select import Selection, select_blocks
from longattn.sparse.strided import CHUNK_ELEMENTS, _grouped_scores, as_float32

#: score differences above this would overflow float32's exp (the anchor is near the maximum)
MAX_DIFF = 80.0


def query_anchors(q: torch.Tensor, k32: torch.Tensor, *, q_block: int, block: int, window: int, scale: float,
                  causal: bool, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The anchor of every query: its largest exact score over a fixed pattern — the first key
    block and the local span: the keys of the local window the selectors force
    (``select.forced_block_grid``), from ``window − 1`` keys before its query block's first query
    up to the query itself (non-causal: up to ``window − 1`` keys after the block's last query;
    with ``window=0`` the query block's own positions).

    Args:
        q: ``[B, Hq, Tq, D]``; k32: ``[B, Hkv, Tk, D]`` float32.

    Returns:
        ``[B, Hq, Tq]`` float32; ``-inf`` for a query none of whose pattern keys is visible.
    """
    b, hq, tq, d = q.shape
    hk, tk = k32.shape[1], k32.shape[2]
    g = hq // hk
    off = tk - tq
    dev = q.device
    n_qb = math.ceil(tq / q_block)
    before = max(window - 1, 0)  # keys before the block's first query the pattern reaches
    after = 0 if causal else before  # ... and after its last query (non-causal)
    span = min(tk, before + q_block + after)  # local keys of one query block, at most
    anchors = torch.empty(b, hq, tq, dtype=torch.float32, device=dev)
    # the first block: every query against the same keys
    first = min(block, tk)
    s = _grouped_scores(as_float32(q), k32[:, :, :first], scale)  # [B, Hq, Tq, first]
    j = torch.arange(first, device=dev)[None, :]
    ok = (j <= (torch.arange(tq, device=dev) + off)[:, None]) if causal else torch.ones(1, first, dtype=torch.bool,
                                                                                          device=dev)
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :first]
    anchors.copy_(s.masked_fill(~ok, -math.inf).amax(-1))
    del s
    # the local spans: each query block against its own gathered span of keys
    per = max(1, CHUNK_ELEMENTS // max(1, b * hq * q_block * span))
    for g0 in range(0, n_qb, per):
        g1 = min(g0 + per, n_qb)
        m = g1 - g0
        q0, q1 = g0 * q_block, min(g1 * q_block, tq)
        qb = torch.arange(g0, g1, device=dev)
        blo = qb * q_block + off  # first query position of each block
        bhi = torch.clamp((qb + 1) * q_block, max=tq) - 1 + off
        lo = torch.clamp(blo - before, min=0)
        hi = torch.clamp(bhi + after + 1, max=tk)
        keys = (lo[:, None] + torch.arange(span, device=dev)[None, :])  # [m, span]
        valid = keys < hi[:, None]
        keys = keys.clamp(max=tk - 1)
        qs = torch.nn.functional.pad(as_float32(q[:, :, q0:q1]), (0, 0, 0, m * q_block - (q1 - q0)))
        qs = qs.reshape(b, hk, g, m, q_block, d).transpose(2, 3).reshape(b, hk, m, g * q_block, d)
        ks = k32[:, :, keys]  # [B, Hkv, m, span, D]
        sc = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale)  # [B, Hkv, m, G·q_block, span]
        sc = sc.view(b, hk, m, g, q_block, span).transpose(2, 3).reshape(b, hq, m, q_block, span)
        pos = blo[:, None] + torch.arange(q_block, device=dev)[None, :]  # [m, q_block]
        ok = valid[:, None, :].expand(m, q_block, span)
        if causal:
            ok = ok & (keys[:, None, :] <= pos[:, :, None])
        if key_padding_mask is not None:
            ok = ok & torch.gather(key_padding_mask, 1, keys.reshape(1, -1).expand(b, -1)).view(b, 1, m, 1, span)
        local = sc.masked_fill(~ok, -math.inf).amax(-1).reshape(b, hq, m * q_block)[..., :q1 - q0]
        anchors[:, :, q0:q1] = torch.maximum(anchors[:, :, q0:q1], local)
    return anchors


@register
@dataclass(frozen=True)
class Anchor(BlockTopK):
    """AnchorAttention (2025, "AnchorAttention: Difference-Aware Sparse Attention with Stripe
    Granularity").

    1. *Anchor*: each query's largest exact score over a fixed pattern — the first key block and
       the local span (``query_anchors``). Those keys usually hold the row's maximum, so the
       anchor stands in for it at the cost of a window.
    2. *Stripes*: a key column ``j`` is kept for a query block when its estimated score comes within
       ``theta`` of the anchor: the block's mean query scores every key (``q̄·k_j``, the mean of
       the block's scores on that key), against the block's mean anchor — both are means over the
       block's queries, so the test reads ``mean_i s_ij >= mean_i anchor_i − theta``.
    3. *Kernel*: the paper gathers the kept stripes token by token. Here stripes are grouped into
       key blocks of ``block`` tokens — a block is a candidate when it holds at least one kept
       stripe, and candidates are ranked by their estimated mass relative to the anchor
       (``logsumexp`` of the stripes' score differences) and kept up to ``budget // block`` blocks.
       The shared exact block kernel then runs (``sparse.kernel.sparse_attention``): its gathers are
       contiguous rows of whole blocks and batch across query blocks, where a token-granular
       gather would need a per-query-block key list and a masked call per block; small blocks
       (e.g. 16) bring the grouping closer to stripes.

    The anchor's local keys are always attended (they lie in the forced window and diagonal
    blocks; non-causal with ``window=0`` forces none); its first block is attended when ``sinks``
    force it, and is otherwise a candidate like any other.

    Args:
        theta: margin in score units (scaled logits; ``inf``: every block is a candidate, the
            budget alone decides — exact at full budget).
        budget, block, q_block, sinks, window, backend: as for ``BlockTopK`` (``pooled`` does not
            apply); the window also sets the anchor's local span.

    Tensors: q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` (GQA), any float dtype; estimates in
    float32; out ``[B, Hq, Tq, D]``, LSE ``[B, Hq, Tq]`` float32.

    Causality: no query sees a later key; the anchors use only keys each query sees, the stripe
    estimates only keys before the query block (the blocks it overlaps are forced).
    """

    budget: int = 4096
    theta: float = 12.0

    name = "anchor"
    capabilities = Capabilities(
        exact=False, score_bias=False, half_compute=True,
        paper="AnchorAttention 2025 (Difference-Aware Sparse Attention with Stripe Granularity)",
        cost="O(N·(window+q_block)·D) anchors + O(N²·D/q_block) pooled stripe scores + adaptive O(N·≤budget) attention",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.theta
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"theta must be a non-negative number (inf allowed), got {t!r}")

    def block_scores(self, q, k, call: Call, q_block: int, block: int) -> torch.Tensor:
        """``[B, Hq, n_q_blocks, n_blocks]`` float32: the estimated log-mass of each key block
        relative to the anchor, ``-inf`` where the block holds no stripe within ``theta``."""
        with torch.no_grad():
            k32 = as_float32(k)
            anchors = query_anchors(q, k32, q_block=q_block, block=block, window=self.window, scale=call.scale,
                                    causal=call.causal, key_padding_mask=call.key_padding_mask)
            return self._pooled_scores(q, k32, anchors, call, q_block, block)

    def _pooled_scores(self, q, k32, anchors, call: Call, q_block: int, block: int) -> torch.Tensor:
        b, hq, tq, d = q.shape
        tk = k32.shape[2]
        off = tk - tq
        dev = q.device
        n_qb, n = math.ceil(tq / q_block), math.ceil(tk / block)
        pad = n_qb * q_block - tq
        rows = torch.clamp(tq - torch.arange(n_qb, device=dev) * q_block, max=q_block).to(torch.float32)
        q_bar = torch.nn.functional.pad(q, (0, 0, 0, pad)).reshape(b, hq, n_qb, q_block, d).sum(3, dtype=torch.float32)
        q_bar = q_bar / rows.view(1, 1, n_qb, 1)
        a = torch.nn.functional.pad(anchors, (0, pad)).reshape(b, hq, n_qb, q_block)
        fin = torch.isfinite(a)
        a_bar = a.masked_fill(~fin, 0.0).sum(-1) / fin.sum(-1).clamp_min(1)
        out = torch.empty(b, hq, n_qb, n, dtype=torch.float32, device=dev)
        per = max(1, CHUNK_ELEMENTS // max(1, b * hq * tk))
        for g0 in range(0, n_qb, per):
            g1 = min(g0 + per, n_qb)
            e = _grouped_scores(q_bar[:, :, g0:g1], k32, call.scale)  # [B, Hq, g, Tk]
            ref = torch.where(fin[:, :, g0:g1].any(-1), a_bar[:, :, g0:g1], e.amax(-1))
            diff = e - ref[..., None]
            if call.causal:
                first = torch.arange(g0, g1, device=dev) * q_block + off
                diff = diff.masked_fill(torch.arange(tk, device=dev)[None, :] >= first[:, None], -math.inf)
            if call.key_padding_mask is not None:
                diff = diff.masked_fill(~call.key_padding_mask[:, None, None, :], -math.inf)
            d = torch.nn.functional.pad(diff, (0, n * block - tk), value=-math.inf).reshape(b, hq, g1 - g0, n, block)
            out[:, :, g0:g1] = self._ranked(torch.exp(d.clamp(max=MAX_DIFF)).sum(-1), d.amax(-1))
        return out

    def _ranked(self, mass: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Candidates (a stripe within ``theta``) ranked by log-mass; a candidate whose mass
        underflows ranks by its best difference; ``-inf`` = not a candidate."""
        score = torch.where(mass > 0, torch.log(mass), best)
        return score.masked_fill(~(best >= -self.theta), -math.inf)

    def select(self, q, k, call: Call) -> Selection:
        tq, tk = q.shape[2], k.shape[2]
        q_block, block = self.sizes(tq, tk)
        scores = self.block_scores(q, k, call, q_block, block)
        return select_blocks(
            q, tk, lambda q0, q1: scores[:, :, q0 // q_block: math.ceil(q1 / q_block)], q_block=q_block, block=block,
            n_sel=self.budget // self.block, sinks=self.sinks, window=self.window, causal=call.causal, per_block=True,
        )
