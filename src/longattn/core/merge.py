"""Exact log-sum-exp merge of partial attention results.

Softmax attention over a key set split into disjoint pieces is recovered exactly from each
piece's normalised output ``out_i`` and log-sum-exp ``lse_i``:
``lse = logsumexp_i(lse_i)`` and ``out = sum_i exp(lse_i - lse) * out_i``
(blockwise attention as in FlashAttention and Ring Attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch


def row_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp`` over the last axis, ``-inf`` for a row whose scores are all ``-inf`` (it
    sees no key). Under autograd such a row gets a zero gradient, where ``torch.logsumexp``'s is NaN
    (``exp(-inf - -inf)``) even when the LSE itself is masked out afterwards; the values are the
    same either way."""
    if not (torch.is_grad_enabled() and scores.requires_grad):
        return torch.logsumexp(scores, dim=-1)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.logsumexp(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead.squeeze(-1), -math.inf)


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results over disjoint key sets.

    Args:
        outs: each ``[..., tokens_q, head_dim]``; all of one shape.
        lses: each ``[..., tokens_q]``; ``-inf`` where a piece saw no key.

    Returns:
        ``(out, lse)`` in the dtype of ``outs[0]`` (statistics are accumulated in at least
        float32). Rows that no piece could see give ``out = 0`` and ``lse = -inf``; a piece with
        LSE NaN or +inf makes its rows NaN (never zeros).
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"merge_partials needs one lse per output and at least one piece, got {len(outs)} outs "
            f"and {len(lses)} lses"
        )
    for i, l in enumerate(lses):
        if l is None:
            raise ValueError(
                f"lses[{i}] is None: that piece has no log-sum-exp (a kernel that gives none, or a method that is "
                "not softmax attention, such as the recurrent ones), so it cannot be merged by LSE")
    shape = outs[0].shape
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != shape:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)} but outs[0] has {tuple(shape)}")
        if l.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] has shape {tuple(l.shape)}, expected {tuple(shape[:-1])} (outs without head_dim)"
            )
    acc = torch.promote_types(outs[0].dtype, torch.float32)
    lse_stack = torch.stack([l.to(acc) for l in lses])
    lse = torch.logsumexp(lse_stack, dim=0)
    dead = lse == -math.inf
    safe = lse.masked_fill(dead, 0.0)
    out = None
    for o, l in zip(outs, lse_stack):
        # exp(-inf) = 0 drops pieces that saw nothing; rows nobody saw stay 0. An LSE of NaN or
        # +inf (a piece that met NaN/Inf) is not "saw nothing": it propagates NaN, as IEEE does.
        w = torch.exp(l - safe).masked_fill(dead, 0.0)[..., None]  # not in place: exp saves its output for autograd
        if out is None:
            out = o.to(acc) * w
        else:
            out.addcmul_(o.to(acc), w)  # in place: long-context merges are memory-bound
    return out.to(outs[0].dtype), lse.to(lses[0].dtype if lses[0].is_floating_point() else acc)
