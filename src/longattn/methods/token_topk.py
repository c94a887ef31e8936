"""Token-level selection: every query attends exactly to its own top-``budget`` keys.

The methods here differ only in how keys are ranked for a query (``rank``): the scores
themselves (TokenSelect), a low-rank estimate of them (Loki). Ranking, forcing sinks and the
window, the exact softmax over the kept keys and the statistics are shared.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.kernels.eager import attend_scores, visible_rows
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Method, Result


@dataclass(frozen=True)
class TokenTopK(Method):
    """Shared fields and run of token-level selection.

    Args:
        budget: keys attended per query, sinks and window included.
        sinks, window: keys always kept (first ``sinks``, last ``window`` up to the query).
        chunk: queries scored at once (memory ``heads × chunk × tokens_k``).
    """

    budget: int = 2048
    sinks: int = 0
    window: int = 0
    chunk: int = 256

    def __post_init__(self):
        validate.check_positive_int("budget", self.budget)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        validate.check_positive_int("window", self.window, allow_zero=True)
        validate.check_positive_int("chunk", self.chunk)
        if self.sinks + self.window > self.budget:
            raise ValueError(f"sinks + window = {self.sinks + self.window} exceeds budget={self.budget}")

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> object:
        """Per-call state for ``rank`` (e.g. a key projection); default none."""
        return None

    def rank(self, state, q_rows: torch.Tensor, k: torch.Tensor, scores: torch.Tensor,
             allowed: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, Hq, m, Tk]`` ranking of keys for ``q_rows [B, Hq, m, D]`` (higher = keep);
        ``scores`` are the exact scaled scores, already ``-inf`` where not ``allowed``."""
        raise NotImplementedError

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        off = tk - tq
        out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
        k_pos = torch.arange(tk, device=q.device)
        visible_pairs = 0.0
        t_select = t_kernel = 0.0
        t0 = time.perf_counter()
        state = self.prepare(q, k)
        t_select += time.perf_counter() - t0
        for q0 in range(0, tq, self.chunk):
            q1 = min(q0 + self.chunk, tq)
            m = q1 - q0
            t0 = time.perf_counter()
            q_rows = q[:, :, q0:q1]
            s = torch.matmul(q_rows.reshape(b, hk, g * m, d), k.transpose(-1, -2)).view(b, hq, m, tk)
            s.mul_(call.scale)
            q_pos = torch.arange(q0, q1, device=q.device)[:, None] + off
            allowed = visible_rows(q0, q1, tq, tk, call.causal, call.key_padding_mask, q.device)
            s = s.masked_fill(~allowed, -math.inf)
            rank = self.rank(state, q_rows, k, s, allowed, call.scale).masked_fill(~allowed, -math.inf)
            forced = (k_pos[None, :] < self.sinks) | ((k_pos[None, :] > q_pos - self.window) & (k_pos[None, :] <= q_pos))
            rank = rank.masked_fill(forced[None, None] & allowed, math.inf)
            top_val, top_idx = rank.topk(min(self.budget, tk), dim=-1)
            keep = torch.zeros(b, hq, m, tk, dtype=torch.bool, device=q.device)
            keep.scatter_(-1, top_idx, ~torch.isneginf(top_val))
            keep &= allowed
            t1 = time.perf_counter()
            out[:, :, q0:q1], lse[:, :, q0:q1] = attend_scores(s.masked_fill(~keep, -math.inf), v)
            t_select += t1 - t0
            t_kernel += time.perf_counter() - t1
            if call.want_stats:
                visible_pairs += float(keep.sum()) / (b * hq)
        stats = {"selection_s": t_select, "kernel_s": t_kernel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = visible_pairs / dense if dense else 0.0
        return Result(out, lse, "token-topk", stats)
