"""TokenSelect (Wu et al. 2024, "TokenSelect: Efficient Long-Context Inference and Length
Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection"): every query keeps its
top-``budget`` keys by ``q·k``; with *soft voting* the query heads of a key-value group share one
selection, chosen by the sum of their per-head softmax weights. Scoring is as costly as dense
attention for prefill — the method pays off in decoding, where one query scores a long cache — so
in prefill it serves as the finest-grained selection at a budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.methods.base import Capabilities, register
from longattn.methods.token_topk import TokenTopK


@register
@dataclass(frozen=True)
class TokenSelect(TokenTopK):
    """Per-query top-k keys by ``q·k`` (TokenSelect, Wu et al. 2024), exact softmax over them.

    Args:
        budget, sinks, window, chunk: as for ``TokenTopK``.
        voting: share one selection across the query heads of each key-value group (head soft
            voting); else each head selects its own keys.
    """

    voting: bool = False
    name = "tokenselect"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Wu et al. 2024, TokenSelect", cost="O(N²·D) scoring (prefill), O(N·D) per decoded token",
    )

    def rank(self, state, q_rows, k, scores, allowed, scale):
        if not self.voting:
            return scores
        b, hq, m, tk = scores.shape
        hk = k.shape[1]
        w = torch.softmax(scores, -1).nan_to_num(0.0).view(b, hk, hq // hk, m, tk).sum(2, keepdim=True)
        return w.expand(b, hk, hq // hk, m, tk).reshape(b, hq, m, tk)
