"""PBS-Attn (2025, "Sparser Block-Sparse Attention via Token Permutation"): permute keys within
segments so that the keys queries need cluster into fewer blocks, then block-sparse attention on
the permuted keys."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.core.merge import merge_partials
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Result, register
from longattn.methods.block_topk import BlockTopK
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.select import Selection, forced_block_grid
from longattn.sparse.strided import (
    CHUNK_ELEMENTS, _grouped_scores, as_float32, block_sums, sampled_rows,
)

ESTIMATES = ("pooled", "rows")


@dataclass
class PBSPlan:
    """What ``PBS.plan`` decided.

    Attributes:
        order: ``[B, Hkv, Tk]`` int64: slot ``p`` of the permuted keys holds original key
            ``order[..., p]`` (a permutation inside each segment).
        past: selection over the *permuted* keys (whole segments before each query block's local
            region), attended without a causal mask (every key there precedes every query).
        present: selection over the keys in their *original* order (the local region: from the
            start of the segment holding the window's first key to the query block), attended
            with the call's causality.
        key_padding_mask: ``[B, Tk]`` padding of the permuted keys (padded keys sort last in their
            segment, so it is the same for every head), or None.
    """

    order: torch.Tensor
    past: Selection
    present: Selection
    key_padding_mask: torch.Tensor | None


@register
@dataclass(frozen=True)
class PBS(BlockTopK):
    """PBS-Attn, permuted block-sparse attention (2025, "Sparser Block-Sparse Attention via Token
    Permutation").

    Block-sparse attention is as good as the blocks are homogeneous: a block holding one needed
    key among many unneeded ones costs a whole block. PBS sorts the keys *inside segments* of
    ``segment`` tokens by an importance score, so that important keys share blocks, and selects
    blocks on the permuted keys. Attention is invariant to the order of keys, so nothing needs
    un-permuting; queries keep their order.

    Causality: a segment is used permuted only by query blocks it lies entirely before. Each query
    block's *local region* — from the start of the segment holding its window's first key up to its
    last query — stays in the original order and is attended with the per-token causal mask, its
    blocks scored like the permuted ones. So a query block attends (1) selected permuted blocks of
    the earlier segments, without a mask, and (2) selected original blocks of its local region
    (window and diagonal forced); the two exact partial results merge by their LSE
    (``core.merge.merge_partials``). Sink keys keep their place (they are never permuted) and their
    blocks are forced. Non-causal: every segment outside the region around the query block (the
    window's segments) is used permuted.

    Importance and block scores come from *probability rows*: query rows that attend to all keys
    they see with the exact softmax. A key's importance is its probability summed over the rows
    (and over the query heads sharing its key head); a block's score for a query block is the
    probability its rows give the block's keys, in the original order (local region, first pass)
    or the permuted one (earlier segments, second pass: the rows against the permuted keys,
    normalised by the first pass's log-sum-exp). The rows, by ``estimate``:

    * ``"pooled"`` — each query block's mean query, placed at the block's last query: about
      ``2·Tq·Tk·D/q_block`` to estimate;
    * ``"rows"`` — every ``stride``-th query of each block (``sparse.strided.sampled_rows``): about
      ``2·Tq·Tk·D/stride``, markedly more accurate.

    The importance is a statistic of the whole prompt (later queries too): as with FlexPrefill,
    an earlier query's output may change when later keys do (never when only later values do).

    Args:
        segment: keys per permutation segment (a multiple of ``block``; the local region spans up
            to one segment plus the window before the query block).
        estimate, stride: see above.
        budget: most keys per query, both parts, sinks, window and diagonal included; block,
            q_block, sinks, window: as for ``BlockTopK`` (``pooled`` does not apply; gather
            backend only).

    Tensors: q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` (GQA: one permutation per key head,
    from its query heads' importance summed), any float dtype; estimates in float32; out
    ``[B, Hq, Tq, D]``, LSE ``[B, Hq, Tq]`` float32.
    """

    budget: int = 4096
    segment: int = 256
    estimate: str = "pooled"
    stride: int = 8

    name = "pbs"
    capabilities = Capabilities(
        exact=False, score_bias=False, half_compute=True,
        paper="PBS-Attn 2025, Sparser Block-Sparse Attention via Token Permutation",
        cost=("O(N²·D/q_block) pooled (O(N²·D/stride) rows) estimate, two passes + O(N·D) permutation "
              "+ O(N·≤budget) attention"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend != "gather":
            raise ValueError(f"method 'pbs' runs on the gather kernel only (two partial results merge), got "
                             f"backend={self.backend!r}")
        validate.check_positive_int("segment", self.segment)
        if self.segment % self.block:
            raise ValueError(f"segment={self.segment} must be a multiple of block={self.block} (segments are whole "
                             "key blocks)")
        validate.check_choice("estimate", self.estimate, ESTIMATES)
        validate.check_positive_int("stride", self.stride)

    # -- planning --------------------------------------------------------------------------------

    def _regions(self, tq: int, tk: int, q_block: int, block: int, seg_blocks: int, causal: bool, device):
        """Per query block, the local region ``[lo, hi)`` in key blocks (``lo`` a segment start)."""
        n = math.ceil(tk / block)
        off = tk - tq
        qb = torch.arange(math.ceil(tq / q_block), device=device)
        qlo = qb * q_block + off
        qhi = torch.clamp((qb + 1) * q_block, max=tq) - 1 + off
        reach = self.window - 1 if self.window > 0 else 0
        first = torch.clamp(qlo - reach, min=0, max=tk - 1)
        lo = (first // block) // seg_blocks * seg_blocks
        if causal:
            hi = torch.clamp(torch.div(qhi, block, rounding_mode="floor") + 1, min=0, max=n)
        else:
            last = torch.clamp(qhi + reach, min=0, max=tk - 1)
            hi = torch.clamp(((last // block) // seg_blocks + 1) * seg_blocks, max=n)
        return qlo, qhi, lo, hi

    def plan(self, q, k, call: Call) -> PBSPlan:
        """The permutation and the two selections (see ``PBSPlan``)."""
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        dev = q.device
        q_block, block = self.sizes(tq, tk)
        n, n_qb = math.ceil(tk / block), math.ceil(tq / q_block)
        seg_blocks = max(1, min(self.segment // self.block, n))  # a segment longer than the keys: one
        seg_len = seg_blocks * block
        kpm = call.key_padding_mask
        with torch.no_grad():
            k32 = as_float32(k)
            # pass 1, original order: importance, block masses of the local region, each row's LSE
            importance = torch.zeros(b, hq, tk, dtype=torch.float32, device=dev)
            mass_o = torch.zeros(b, hq, n_qb, n, dtype=torch.float32, device=dev)
            lses = []
            for qb, pos, rows32 in self._row_queries(q, tk, q_block):
                hi = min(int(pos.max()) + 1, tk) if call.causal else tk
                if hi <= 0:
                    lses.append(torch.full((b, hq, qb.numel()), -math.inf, device=dev))
                    continue
                sc = _grouped_scores(rows32, k32[:, :, :hi], call.scale)
                first = max(int(pos[0]) + 1, 0)  # positions ascend: every row sees the keys before this
                if call.causal and first < hi:
                    sc[..., first:].masked_fill_(torch.arange(first, hi, device=dev)[None, :] > pos[:, None], -math.inf)
                if kpm is not None:
                    sc.masked_fill_(~kpm[:, None, None, :hi], -math.inf)
                p = torch.softmax(sc, dim=-1)
                if kpm is not None or int(pos.min()) < 0:  # a row may see no key: NaN → 0
                    p = p.nan_to_num_(0.0)
                # log-sum-exp from the softmax: lse = s_j − log p_j at the row's largest score
                lses.append(sc.amax(-1) - torch.log(p.amax(-1)))
                importance[..., :hi] += p.sum(2)
                mass_o[..., :math.ceil(hi / block)].index_add_(2, qb, block_sums(p, block, math.ceil(hi / block)))
                del sc, p
            importance = importance.view(b, hk, g, tk).sum(2).nan_to_num_(0.0)
            if self.sinks:
                importance[..., :min(self.sinks, tk)] = math.inf  # sinks keep their place
            if kpm is not None:
                importance = importance.masked_fill(~kpm[:, None, :], -math.inf)  # padding sorts last
            n_seg = math.ceil(tk / seg_len)
            pad = n_seg * seg_len - tk
            imp = torch.nn.functional.pad(importance, (0, pad), value=-math.inf) if pad else importance
            # a short last segment: its padding slots sort last and are dropped below
            local = imp.view(b, hk, n_seg, seg_len).argsort(dim=-1, descending=True, stable=True)
            order = (local + (torch.arange(n_seg, device=dev) * seg_len).view(1, 1, n_seg, 1)).view(b, hk, -1)
            if pad:
                order = order[order < tk].view(b, hk, tk)
            kpm_perm = None
            if kpm is not None:
                real = torch.nn.functional.pad(kpm, (0, pad)).reshape(b, n_seg, seg_len).sum(-1)  # [B, n_seg]
                slot = torch.arange(n_seg * seg_len, device=dev).view(n_seg, seg_len) % seg_len
                kpm_perm = (slot[None] < real[..., None]).view(b, -1)[:, :tk]

            qlo, qhi, lo, hi = self._regions(tq, tk, q_block, block, seg_blocks, call.causal, dev)
            j = torch.arange(n, device=dev)[None, :]
            klo = j * block
            khi = torch.clamp(klo + block - 1, max=tk - 1)
            in_region = (j >= lo[:, None]) & (j < hi[:, None])  # [n_qb, n]
            past = ~in_region & (j < lo[:, None]) if call.causal else ~in_region
            visible = (klo <= qhi[:, None]) if call.causal else torch.ones_like(in_region)
            forced_o = forced_block_grid(qlo[:, None], qhi[:, None], klo, khi, self.sinks, self.window,
                                         call.causal) & visible & in_region
            fully_o = ((khi <= qlo[:, None]) if call.causal else torch.ones_like(in_region)) & in_region
            sink_p = (klo < self.sinks) & past
            cand_o = fully_o & ~forced_o
            cand_p = past & ~sink_p

            # pass 2, permuted order: block masses of the segments before each row's local region
            mass_p = torch.zeros_like(mass_o)
            k_perm = torch.gather(k32, 2, order[..., None].expand(-1, -1, -1, d))
            region_lo, region_hi = lo * block, torch.clamp(hi * block, max=tk)  # [n_qb], in keys
            for (qb, pos, rows32), lse in zip(self._row_queries(q, tk, q_block), lses):
                rlo, rhi = region_lo[qb], region_hi[qb]
                upto = int(rlo.max()) if call.causal else tk
                if upto <= 0:
                    continue
                sc = _grouped_scores(rows32, k_perm[:, :, :upto], call.scale)
                slot = torch.arange(upto, device=dev)[None, :]
                local = (slot >= rlo[:, None]) & (slot < rhi[:, None])
                sc.masked_fill_((slot >= rlo[:, None]) if call.causal else local, -math.inf)
                if kpm_perm is not None:
                    sc.masked_fill_(~kpm_perm[:, None, None, :upto], -math.inf)
                p = torch.exp(sc.sub_(lse[..., None])).nan_to_num_(0.0)
                mass_p[..., :math.ceil(upto / block)].index_add_(2, qb, block_sums(p, block, math.ceil(upto / block)))
                del sc, p

            inf = torch.tensor(math.inf, device=dev)
            score_p = torch.where(cand_p, mass_p, -inf).masked_fill(sink_p, math.inf)
            score_o = torch.where(cand_o, mass_o, -inf).masked_fill(forced_o, math.inf)
            scores = torch.cat([score_p, score_o], dim=-1)  # [B, Hq, n_qb, 2n]
            n_sel = min(self.budget // self.block, 2 * n)
            top_val, top_idx = scores.topk(n_sel, dim=-1)
            top_idx = top_idx.masked_fill(torch.isneginf(top_val) | torch.isnan(top_val), -1)
            idx_p = top_idx.masked_fill(top_idx >= n, -1)
            idx_o = torch.where(top_idx >= n, top_idx - n, -1)
            idx_p = self._trim(idx_p.sort(-1).values)
            idx_o = self._trim(idx_o.sort(-1).values)
        return PBSPlan(order, Selection(idx_p, q_block, block), Selection(idx_o, q_block, block), kpm_perm)

    @staticmethod
    def _trim(idx: torch.Tensor) -> torch.Tensor:
        """Drop slots no query block uses (sorted ``-1`` first): ``[..., ≥1]``, sorted, ``-1`` unused."""
        used = int((idx >= 0).sum(-1).max()) if idx.numel() else 0
        idx = idx.flip(-1)[..., :max(used, 1)]  # the used slots, largest first
        return idx.sort(-1).values

    def _row_queries(self, q, tk: int, q_block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The query rows both passes score, in chunks: ``(query_block [m], position [m],
        rows [B, Hq, m, D] float32)``. ``"rows"``: every ``stride``-th query of each block;
        ``"pooled"``: each block's mean query, placed at the block's last query (it sees the keys
        up to there)."""
        b, hq, tq, d = q.shape
        dev = q.device
        off = tk - tq
        per = max(1, CHUNK_ELEMENTS // max(1, b * hq * tk))
        if self.estimate == "rows":
            rows = sampled_rows(tq, q_block, self.stride, dev)
            for a in range(0, rows.numel(), per):
                r = rows[a:a + per]
                yield r // q_block, r + off, as_float32(q[:, :, r])
            return
        n_qb = math.ceil(tq / q_block)
        counts = torch.clamp(tq - torch.arange(n_qb, device=dev) * q_block, max=q_block).to(torch.float32)
        q_bar = torch.nn.functional.pad(q, (0, 0, 0, n_qb * q_block - tq)).reshape(b, hq, n_qb, q_block, d)
        q_bar = q_bar.sum(3, dtype=torch.float32) / counts.view(1, 1, n_qb, 1)
        last = torch.clamp((torch.arange(n_qb, device=dev) + 1) * q_block, max=tq) - 1 + off
        for g0 in range(0, n_qb, per):
            g1 = min(g0 + per, n_qb)
            yield torch.arange(g0, g1, device=dev), last[g0:g1], q_bar[:, :, g0:g1]

    # -- running ---------------------------------------------------------------------------------

    def select(self, q, k, call: Call) -> Selection:  # pragma: no cover - PBS runs its own two-part path
        raise NotImplementedError("pbs selects over two key layouts; use plan()")

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its selection ignores it)")
        tq, tk = q.shape[2], k.shape[2]
        d = k.shape[3]
        t0 = time.perf_counter()
        plan = self.plan(q, k, call)
        t1 = time.perf_counter()
        outs, lses, pairs = [], [], 0.0
        if bool((plan.past.indices >= 0).any()):
            idx = plan.order[..., None].expand(-1, -1, -1, d)
            k_perm, v_perm = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
            o, l, info = sparse_attention(q, k_perm, v_perm, plan.past, scale=call.scale, causal=False,
                                          key_padding_mask=plan.key_padding_mask, count_pairs=call.want_stats)
            outs.append(o)
            lses.append(l)
            pairs += info.visible_pairs
        o, l, info = sparse_attention(q, k, v, plan.present, scale=call.scale, causal=call.causal,
                                      key_padding_mask=call.key_padding_mask, count_pairs=call.want_stats)
        outs.append(o)
        lses.append(l)
        pairs += info.visible_pairs
        out, lse = merge_partials(outs, lses) if len(outs) > 1 else (outs[0], lses[0])
        t2 = time.perf_counter()
        used = (plan.past.indices >= 0).sum(-1) + (plan.present.indices >= 0).sum(-1)
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": plan.present.indices,
                 "selected_permuted_blocks": plan.past.indices, "permutation": plan.order,
                 "blocks_per_query_block": int(used.max()) if used.numel() else 0,
                 "mean_blocks": float(used.double().mean()) if used.numel() else 0.0}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, "sparse", stats)


def attended_keys(plan: PBSPlan, tokens_q: int, tokens_k: int, causal: bool,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hq, Tq, Tk]`` bool: the keys, in their original order, each query attends under
    ``plan`` (the permuted blocks mapped back through ``plan.order``; causality and padding
    applied). Attention over exactly these keys is what ``PBS.run`` returns."""
    idx_p, idx_o = plan.past.indices, plan.present.indices
    b, hq, n_qb, _ = idx_o.shape
    hk = plan.order.shape[1]
    qbs, bs = plan.present.q_block, plan.present.block
    dev = idx_o.device
    order_q = plan.order.repeat_interleave(hq // hk, dim=1)  # [B, Hq, Tk]
    hits = torch.zeros(b, hq, n_qb, tokens_k, dtype=torch.int32, device=dev)
    slots = torch.arange(bs, device=dev)
    for idx, permuted in ((idx_p, True), (idx_o, False)):
        pos = (idx.clamp_min(0)[..., None] * bs + slots).flatten(-2)  # [B, Hq, n_qb, L]
        ok = (idx >= 0)[..., None].expand(*idx.shape, bs).flatten(-2) & (pos < tokens_k)
        pos = pos.clamp(max=tokens_k - 1)
        if permuted:
            pos = torch.gather(order_q[:, :, None, :].expand(-1, -1, n_qb, -1), 3, pos)
        hits.scatter_add_(3, pos, ok.to(torch.int32))
    mask = (hits > 0).repeat_interleave(qbs, dim=2)[:, :, :tokens_q]
    if causal:
        off = tokens_k - tokens_q
        mask = mask & (torch.arange(tokens_k, device=dev)[None, :] <= torch.arange(tokens_q, device=dev)[:, None] + off)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return mask
