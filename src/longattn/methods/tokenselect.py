"""Token-level selection: every query attends exactly to its own top-``budget`` keys.

TokenSelect (Wu et al. 2024, "TokenSelect: Efficient Long-Context Inference and Length
Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection") scores every cached key by
``q·k`` per head and keeps the best; with *soft voting* the heads of a query (within a key-value
group) share one selection, chosen by the sum of their per-head softmax weights. The scoring pass
is as costly as dense attention for prefill — the method pays off in decoding, where one query
scores a long cache — so here it serves mainly as the finest-grained selection at a budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register


@register
@dataclass(frozen=True)
class TokenSelect(Method):
    """Per-query top-k keys by ``q·k`` (TokenSelect, Wu et al. 2024), exact softmax over them.

    Args:
        budget: keys attended per query, sinks and window included.
        sinks, window: keys always kept (first ``sinks``, last ``window`` up to the query).
        voting: share one selection across the query heads of each key-value group, chosen by the
            sum of the heads' softmax weights (TokenSelect's head soft voting); else per head.
        chunk: queries scored at once (memory ``heads × chunk × tokens_k``).
    """

    budget: int = 2048
    sinks: int = 0
    window: int = 0
    voting: bool = False
    chunk: int = 256
    name = "tokenselect"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Wu et al. 2024, TokenSelect", cost="O(N²·D) scoring (prefill), O(N·D) per decoded token",
    )

    def __post_init__(self):
        validate.check_positive_int("budget", self.budget)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        validate.check_positive_int("window", self.window, allow_zero=True)
        validate.check_positive_int("chunk", self.chunk)
        if self.sinks + self.window > self.budget:
            raise ValueError(f"sinks + window = {self.sinks + self.window} exceeds budget={self.budget}")

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'tokenselect' does not take a score bias")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        off = tk - tq
        out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
        k_pos = torch.arange(tk, device=q.device)
        visible_pairs = 0.0
        t_select = t_kernel = 0.0
        for q0 in range(0, tq, self.chunk):
            q1 = min(q0 + self.chunk, tq)
            m = q1 - q0
            t0 = time.perf_counter()
            s = torch.matmul(q[:, :, q0:q1].reshape(b, hk, g * m, d), k.transpose(-1, -2)).view(b, hq, m, tk)
            s.mul_(call.scale)
            q_pos = torch.arange(q0, q1, device=q.device)[:, None] + off
            allowed = torch.ones(m, tk, dtype=torch.bool, device=q.device)
            if call.causal:
                allowed = k_pos[None, :] <= q_pos
            allowed = allowed[None, None]
            if call.key_padding_mask is not None:
                allowed = allowed & call.key_padding_mask[:, None, None, :]
            s = s.masked_fill(~allowed, -math.inf)
            rank = s
            if self.voting:
                w = torch.softmax(s, -1).nan_to_num(0.0).view(b, hk, g, m, tk).sum(2, keepdim=True)
                rank = w.expand(b, hk, g, m, tk).reshape(b, hq, m, tk).masked_fill(~allowed, -math.inf)
            forced = (k_pos[None, :] < self.sinks) | ((k_pos[None, :] > q_pos - self.window) & (k_pos[None, :] <= q_pos))
            rank = rank.masked_fill(forced[None, None] & allowed, math.inf)
            n_keep = min(self.budget, tk)
            top_val, top_idx = rank.topk(n_keep, dim=-1)
            keep = torch.zeros_like(allowed.expand(b, hq, m, tk))
            keep.scatter_(-1, top_idx, ~torch.isneginf(top_val))
            keep &= allowed
            t1 = time.perf_counter()
            s = s.masked_fill(~keep, -math.inf)
            l = torch.logsumexp(s, -1)
            p = torch.exp(s - l.masked_fill(torch.isinf(l), 0.0)[..., None])
            o = torch.matmul(p.view(b, hk, g * m, tk), v).view(b, hq, m, d)
            out[:, :, q0:q1] = o
            lse[:, :, q0:q1] = l
            t_select += t1 - t0
            t_kernel += time.perf_counter() - t1
            if call.want_stats:
                visible_pairs += float(keep.sum()) / (b * hq)
        stats = {"selection_s": t_select, "kernel_s": t_kernel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = visible_pairs / dense if dense else 0.0
        return Result(out, lse, "token-topk", stats)
