"""The float64 oracle every method is tested against.

It materialises the full score matrix, so it is for tests and accuracy checks, not for long inputs.
"""

from __future__ import annotations

import math

import torch

from longattn.core import validate


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in float64.

    Args:
        q: ``[batch, heads_q, tokens_q, head_dim]``.
        k: ``[batch, heads_kv, tokens_k, head_dim]``; ``heads_q % heads_kv == 0`` (GQA/MQA).
        v: ``[batch, heads_kv, tokens_k, head_dim]``, like ``k``.
        causal: query ``i`` sees keys ``j <= i + tokens_k - tokens_q`` (the last query is aligned
            with the last key, as in decoding).
        mask: boolean, broadcastable to ``[batch, heads_q, tokens_q, tokens_k]``; True = may attend.
        scale: score scale, default ``1/sqrt(head_dim)``.
        bias: float, broadcastable to ``[batch, heads_q, tokens_q, tokens_k]``, added to the scaled
            scores (ALiBi, T5 bias, CoPE ...).
        softcap: logit soft-capping (Gemma 2): scaled scores ``s`` become ``softcap·tanh(s/softcap)``
            before the bias and the mask.

    Returns:
        ``(out, lse)``: ``out`` ``[batch, heads_q, tokens_q, head_dim]`` float64 and
        ``lse`` ``[batch, heads_q, tokens_q]`` float64, the natural-log sum of exp of the scaled
        scores over the visible keys. Fully masked rows give ``out = 0`` and ``lse = -inf``.
        NaN/Inf follow IEEE over the visible keys only: a NaN visible score or value makes the row
        NaN; hidden keys and values never reach a row, whatever they hold.
    """
    validate.check_qkv(q, k, v, causal=causal)
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    scale = validate.check_scale(scale, d)
    group = hq // hk
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    if softcap is not None:
        if not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap > 0):
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(torch.float64)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=tk - tq)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        allowed = allowed & mask
    allowed = allowed.expand(b, hq, tq, tk)
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no visible key get zero weights (exp(-inf - -inf) would be NaN there). Every other
    # case follows IEEE, the oracle must show exactly what a kernel may not hide: a NaN score, a
    # +inf score (lse = +inf or NaN), or visible keys whose scores are all -inf (possible only
    # with infinite inputs) make the row NaN.
    dead = ~allowed.any(-1)
    weights = torch.exp(scores - lse.masked_fill(dead, 0)[..., None]).masked_fill(dead[..., None], 0.0)
    bad_v = ~torch.isfinite(v64)
    if not bool(bad_v.any()):
        return weights @ v64, lse
    # A hidden key's weight is 0, and 0 · NaN = NaN in a matmul: non-finite values count only
    # where the key is visible, added back for the rows that see them.
    out = weights @ v64.masked_fill(bad_v, 0.0)
    bad_key = bad_v.any(-1)  # [B, Hq, Tk]
    cols = bad_key.any(1).any(0).nonzero().flatten()
    vis = allowed[..., cols] & bad_key[:, :, None, cols]  # [B, Hq, Tq, n]
    rows = vis.any(-1)
    if bool(rows.any()):
        # only the non-finite elements: the finite ones of the same value rows are already in `out`
        only_bad = v64.masked_fill(~bad_v, 0.0)
        extra = (weights[..., cols].masked_fill(~vis, 0.0)[..., None] * only_bad[:, :, None, cols]).masked_fill(
            ~vis[..., None], 0.0).sum(-2)
        out = torch.where(rows[..., None], out + extra, out)
    return out, lse