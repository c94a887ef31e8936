"""Softmax attention from explicit scores: the eager kernel of methods that decide per (query,
key) pair what is visible (token-level selection, clusters, projections).

The one rule every such method needs: ``-inf`` scores are hidden, and a row that sees nothing
gives output 0 and LSE ``-inf`` (never NaN, which ``softmax`` of an all ``-inf`` row would give).
"""

from __future__ import annotations

import torch


def attend_scores(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores) @ v`` with its log-sum-exp.

    Args:
        scores: ``[B, Hq, M, N]`` float32, already scaled; ``-inf`` where a key is hidden.
        v: ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (the query heads of a group share a value head).

    Returns:
        ``out [B, Hq, M, D]``, ``lse [B, Hq, M]``; rows with every score ``-inf`` give 0 and ``-inf``.
    """
    b, hq, m, n = scores.shape
    hk, d = v.shape[1], v.shape[-1]
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # hidden → 0, dead rows → 0
    out = torch.matmul(p.reshape(b, hk, (hq // hk) * m, n), v).view(b, hq, m, d)
    return out, lse
