"""Core Context Aware attention (Chen et al. 2024, "Core Context Aware Attention for Long Context
Language Modeling"): distant context is compressed, near context is kept exact.

* Globality-aware pooling: the keys are cut into groups of ``group`` consecutive tokens and each
  group becomes one *core token*, a weighted mean of its keys and of its values. The weights are
  the group's significance as the paper measures it: the softmax of the scores that the group's
  last token gives the group's keys (``softmax(scale · q_last · k_j)``), so the tokens the group
  itself attends to dominate its summary.
* Locality-preserving attention: each query attends exactly to its recent keys.

A query scores the core tokens of the groups that lie wholly before its local range and the local
keys exactly; one softmax over both (a log-sum-exp merge of the two parts) fuses them.

Training-free choices (the paper fine-tunes the model around its module):

* The local range starts at the first key of the group holding the query's ``window``-th most
  recent key, so every visible key is counted once, either inside a core token or exactly (no gap
  between the last whole group and the window). It holds ``window`` to ``window + group - 1`` keys.
* A core token's score gets ``log n`` added (``n`` = real keys in the group): the group then carries
  the softmax mass of ``n`` keys scoring like their weighted mean, not that of one key; it is exact
  when the group's keys are equal. ``group=1`` is exact attention.
* In a decode call (fewer queries than keys) the groups that end before the first query have no
  query in the call; their last *key* stands in for the last query in the significance scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.kernels.eager import attend_scores
from longattn.core import validate
from longattn.core.merge import merge_partials, row_logsumexp
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register


@register
@dataclass(frozen=True)
class CCA(Method):
    """Core Context Aware attention (Chen et al. 2024): pooled core tokens + exact local window.

    One significance-weighted core token per group of ``group`` keys stands for distant context;
    the local window is attended exactly.

    Args:
        group: keys pooled into one core token (1: every key is its own core token → exact).
        window: recent keys attended exactly (the query itself included), extended back to a group
            boundary. Without causality the window is ``window - 1`` keys on each side of the query,
            extended outward to group boundaries, and core tokens of groups on both sides are seen.
        chunk: queries processed at once.

    Query ``i`` sits at key position ``i + Tk - Tq`` (the last query on the last key, as in
    decoding), with or without causality.

    Shapes: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` → ``out [B, Hq, Tq, D]``, ``lse [B, Hq,
    Tq]`` over the scores used (core scores with their ``log n`` term). Core tokens are built per
    query head (the last query differs between the heads of a GQA group). Causal: a core token is
    seen only by queries after its group's last token, so no output depends on a later token.
    """

    group: int = 16
    window: int = 256
    chunk: int = 256
    name = "cca"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Chen et al. 2024, Core Context Aware Attention for Long Context Language Modeling",
        cost="O(N·(N/group + window)·D)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("group", self.group)
        validate.check_positive_int("window", self.window)
        validate.check_positive_int("chunk", self.chunk)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (core tokens pool keys)")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        off = tk - tq
        dev = q.device
        pad = call.key_padding_mask
        t0 = time.perf_counter()
        core_k, core_v, core_log_n = self._core_tokens(q, k, v, pad, call.scale)  # [B,Hq,G,D] x2, [B,G]
        n_groups = core_k.shape[2]
        g_start = torch.arange(n_groups, device=dev) * self.group
        g_end = (g_start + self.group - 1).clamp(max=tk - 1)
        k_pos = torch.arange(tk, device=dev)
        t_pool = time.perf_counter() - t0
        out = torch.empty(b, hq, tq, d, device=dev)
        lse = torch.empty(b, hq, tq, device=dev)
        pairs = 0.0
        t1 = time.perf_counter()
        for q0 in range(0, tq, self.chunk):
            q1 = min(q0 + self.chunk, tq)
            m = q1 - q0
            pos = torch.arange(q0, q1, device=dev) + off  # key position of each query
            lo = ((pos - self.window + 1).clamp(min=0) // self.group) * self.group
            if call.causal:
                hi = pos
            else:
                hi = (((pos + self.window - 1) // self.group + 1) * self.group - 1).clamp(max=tk - 1)
            a, z = int(lo.min()), int(hi.max()) + 1  # keys any query of the chunk sees exactly
            qc = q[:, :, q0:q1]
            # exact local part
            s = torch.matmul(qc.reshape(b, hk, g * m, d), k[:, :, a:z].transpose(-1, -2)).view(b, hq, m, z - a)
            local = (k_pos[None, a:z] >= lo[:, None]) & (k_pos[None, a:z] <= hi[:, None])  # [m, z-a]
            local = local[None, None]
            if pad is not None:
                local = local & pad[:, None, None, a:z]
            s = (s * call.scale).masked_fill(~local, -math.inf)
            o_loc, l_loc = attend_scores(s, v[:, :, a:z])
            # core tokens of the groups wholly outside the local range
            seen = g_end[None, :] < lo[:, None]
            if not call.causal:
                seen = seen | (g_start[None, :] > hi[:, None])
            sc = torch.matmul(qc, core_k.transpose(-1, -2)) * call.scale + core_log_n[:, None, None, :]
            sc = sc.masked_fill(~seen[None, None], -math.inf)  # empty groups already -inf
            l_core = row_logsumexp(sc)
            p = torch.exp(sc - l_core.masked_fill(torch.isinf(l_core), 0.0)[..., None])
            o_core = torch.matmul(p, core_v)
            out[:, :, q0:q1], lse[:, :, q0:q1] = merge_partials([o_loc, o_core], [l_loc, l_core])
            if call.want_stats:
                core_seen = seen[None, None] & torch.isfinite(core_log_n)[:, None, None, :]
                seen_pairs = local.expand(b, hq, m, z - a).sum() + core_seen.expand(b, hq, m, n_groups).sum()
                pairs += float(seen_pairs) / (b * hq)
        stats = {"pooling_s": t_pool, "kernel_s": time.perf_counter() - t1}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, "cca", stats)

    def _core_tokens(self, q, k, v, pad, scale):
        """Per query head, one significance-weighted key and value per group → ``core_k, core_v
        [B, Hq, G, D]`` and ``log`` of each group's real-key count ``[B, G]`` (-inf: none)."""
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        off = tk - tq
        # a group longer than the keys is one group of them all: pad to the keys' length, not the group's
        group = min(self.group, tk)
        n_groups = math.ceil(tk / group)
        fill = n_groups * group - tk
        real = torch.ones(b, tk, dtype=torch.bool, device=q.device) if pad is None else pad
        real = torch.cat([real, real.new_zeros(b, fill)], 1).view(b, n_groups, group)
        kg = torch.cat([k, k.new_zeros(b, hk, fill, d)], 2).view(b, hk, n_groups, group, d)
        vg = torch.cat([v, v.new_zeros(b, hk, fill, d)], 2).view(b, hk, n_groups, group, d)
        # the query at each group's last position, or that position's key where the call has no query
        last = ((torch.arange(n_groups, device=q.device) + 1) * group - 1).clamp(max=tk - 1)
        has_q = last >= off
        lq = q[:, :, (last - off).clamp(min=0)]  # [B, Hq, G, D]
        lk = k[:, :, last].repeat_interleave(g, 1)
        lead = torch.where(has_q[None, None, :, None], lq, lk).view(b, hk, g, n_groups, d)
        s = torch.einsum("bhgnd,bhntd->bhgnt", lead, kg) * scale  # [B, Hkv, g, G, group]
        s = s.masked_fill(~real[:, None, None], -math.inf)
        w = torch.softmax(s, -1).nan_to_num(0.0)  # a group of padding only: all-zero weights
        core_k = torch.einsum("bhgnt,bhntd->bhgnd", w, kg).reshape(b, hq, n_groups, d)
        core_v = torch.einsum("bhgnt,bhntd->bhgnd", w, vg).reshape(b, hq, n_groups, d)
        return core_k, core_v, torch.log(real.sum(-1).to(torch.float32))

