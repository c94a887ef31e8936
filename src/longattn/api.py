"""``longattn.attention``: validate, resolve the method, apply positions, run, restore dtype."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.core import validate
from longattn.core.positions import PositionEncoding
from longattn.methods.base import Call, Method, resolve


@dataclass
class AttentionStats:
    """What ``attention(..., return_stats=True)`` reports.

    Attributes:
        method: registry name of the method that ran.
        path: the kernel that ran: "sdpa", "tiled" or "flex".
        density: share of the dense pattern's (query, key) pairs that were visible (the causal
            triangle for causal attention), averaged over batch × heads.
        computed_fraction: share of the dense pattern's pairs inside the blocks the kernel visited.
        lse: ``[B, Hq, Tq]`` float32 log-sum-exp, or None where the kernel does not give it
            (compiled FlexAttention on CPU).
        time_s: wall time of the method call; ``extra`` holds its parts (layout_s, kernel_s, ...).
    """

    method: str
    path: str
    density: float | None
    computed_fraction: float | None
    lse: torch.Tensor | None
    time_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    method: str | Method = "dense",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    position: PositionEncoding | None = None,
    return_stats: bool = False,
    summaries: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Attention with any registered method.

    Args:
        q: ``[batch, heads_q, tokens_q, head_dim]``.
        k: ``[batch, heads_kv, tokens_k, head_dim]`` with ``heads_q % heads_kv == 0``.
        v: ``[batch, heads_kv, tokens_k, head_dim]``, like ``k``.
        causal: query ``i`` sees keys up to ``i + tokens_k - tokens_q`` (last query aligned with
            the last key).
        method: a registered name (``longattn.methods()``) or a method object
            (``longattn.method("window", window=512)``).
        scale: score scale, default ``1/sqrt(head_dim)``.
        key_padding_mask: bool ``[batch, tokens_k]``, True = real key, False = padding.
        position: a ``longattn.positions`` encoding (rotations on q/k or a score bias). Methods
            whose capability sheet has ``own_positions`` (LongHeads) get it untouched in
            ``Call.position`` with q/k unrotated, and place the positions themselves.
        return_stats: also return an ``AttentionStats``.
        summaries: a ``longattn.sparse.BlockSummaries`` of ``k`` kept current by the caller (a decode
            loop appends each new key), so block-retrieval methods need not rebuild it per step.

    Returns:
        ``out`` ``[batch, heads_q, tokens_q, head_dim]`` in the dtype of ``q`` (computed in float32), or ``(out, stats)``. Queries with no visible key get zeros.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    validate.check_qkv(q, k, v, causal=causal)
    validate.check_key_padding_mask(key_padding_mask, q, k)
    scale = validate.check_scale(scale, q.shape[-1])
    m = resolve(method)
    _check_capabilities(m, q, k, causal, position)
    if position is not None:
        position.check(q, k)  # head counts / head_dim: score biases cannot check under FlexAttention
    in_dtype = q.dtype
    q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    bias = None
    row_bias = None
    own = position if (position is not None and m.capabilities.own_positions) else None
    if position is not None and own is None:
        q_pos = torch.arange(tq, device=q.device) + (tk - tq)
        k_pos = torch.arange(tk, device=q.device)
        if position.kind == "rotary":
            q32, k32 = position.rotate(q32, k32, q_pos, k_pos)
        elif position.kind == "bias":
            bias = position.score_bias
        elif position.kind == "content":
            row_bias = _content_rows(position, q32, k32, k_pos, scale)
    call = Call(causal=causal, scale=scale, key_padding_mask=key_padding_mask, bias=bias,
                row_bias=row_bias, want_stats=return_stats, summaries=summaries, position=own)
    t0 = time.perf_counter()
    res = m.run(q32, k32, v32, call)
    elapsed = time.perf_counter() - t0
    out = res.out.to(in_dtype)
    if not return_stats:
        return out
    extra = dict(res.stats)
    stats = AttentionStats(
        method=m.name,
        path=res.path,
        density=extra.pop("density", None),
        computed_fraction=extra.pop("computed_fraction", None),
        lse=res.lse,
        time_s=elapsed,
        extra=extra,
    )
    return out, stats


def _content_rows(position: PositionEncoding, q, k, k_pos, scale):
    tq, tk = q.shape[2], k.shape[2]

    def rows(q0: int, q1: int) -> torch.Tensor:
        q_pos = torch.arange(q0, q1, device=q.device) + (tk - tq)
        return position.row_bias(q[:, :, q0:q1], k, q_pos, k_pos, scale)

    return rows


def _check_capabilities(m: Method, q, k, causal: bool, position) -> None:
    caps = m.capabilities
    if causal and not caps.causal:
        raise ValueError(f"method {m.name!r} does not support causal=True")
    if not causal and not caps.non_causal:
        raise ValueError(f"method {m.name!r} supports only causal=True, got causal=False")
    if q.shape[2] != k.shape[2] and not caps.cross:
        raise ValueError(
            f"method {m.name!r} does not support cross attention (tokens_q={q.shape[2]} != tokens_k={k.shape[2]})"
        )
    if position is not None:
        if not isinstance(position, PositionEncoding):
            raise TypeError(f"position must be a longattn.positions encoding, got {type(position).__name__}")
        if position.kind in ("bias", "content") and not caps.score_bias:
            raise ValueError(f"method {m.name!r} cannot take a score bias ({type(position).__name__})")
