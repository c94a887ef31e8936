"""Exact attention with logit soft-capping (Gemma 2): scores become ``c·tanh(s/c)`` before the softmax.

``softcap_attention`` runs over tiles of queries, so it holds ``heads × tile × tokens_k`` scores at a
time and never the whole ``tokens_q × tokens_k`` matrix (the tile shrinks as the keys grow). With
``softcap=None`` it is plain exact attention that also accepts an arbitrary boolean or additive
mask and returns the log-sum-exp; the Hugging Face integration uses it for a general 4-D mask
when it needs the LSE (attention sinks).

Rules shared with the other kernels: causal is bottom-right aligned (query ``i`` sees keys
``j <= i + tokens_k - tokens_q``); everything is computed and returned in float32; a row that sees
no key gives output 0 and LSE ``-inf``, never NaN.
"""

from __future__ import annotations

import math
import numbers

import torch

from longattn.core import validate
from longattn.core.masks import Mask
from longattn.core.merge import row_logsumexp

#: scores held at once (batch × heads_q × tile × tokens_k), 16 MiB of float32
TILE_ELEMENTS = 1 << 22


def softcap_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softcap: float | None,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    mask: torch.Tensor | Mask | None = None,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(c·tanh(scale·q·kᵀ / c) + mask) @ v`` with its log-sum-exp, one query tile at a time.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (GQA: query head
            ``h`` reads key head ``h // (Hq / Hkv)``).
        softcap: the cap ``c > 0``, or None for no capping.
        scale: score scale, default ``1/sqrt(D)``.
        causal: hide keys ``j > i + Tk - Tq`` from query ``i``.
        key_padding_mask: bool ``[B, Tk]``, True = real key.
        mask: a ``longattn.masks.Mask`` (evaluated one tile at a time, positions bottom-right
            aligned as everywhere in longattn: query ``i`` at ``i + Tk - Tq``), or a tensor
            broadcastable to ``[B, Hq, Tq, Tk]`` (4-D): bool (True = visible) or float, added to
            the capped scores; float values at or below half the dtype's minimum count as hidden
            (transformers' additive masks use ``finfo.min``).
        tile: queries per tile; default as many as keep ``B·Hq·tile·Tk`` within ``TILE_ELEMENTS``.

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``, float32 (the LSE of the capped, masked
        scores); rows that see no key give 0 and ``-inf``.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    validate.check_qkv(q, k, v, causal=causal)
    validate.check_key_padding_mask(key_padding_mask, q, k)
    scale = validate.check_scale(scale, q.shape[-1])
    cap = check_softcap(softcap)
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    rule = mask if isinstance(mask, Mask) else None
    if rule is not None:
        rule.check(b, tq, tk)
        mask = None
    elif mask is not None:
        _check_mask(mask, b, hq, tq, tk)
    if tile is None:
        tile = max(1, TILE_ELEMENTS // max(1, b * hq * tk))
    else:
        tile = validate.check_positive_int("tile", tile)
    out = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float32, device=q.device)
    if tq == 0 or tk == 0 or hq == 0:
        return out, lse
    g = hq // hk
    q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
    kt = k32.transpose(-1, -2)  # [B, Hkv, D, Tk]
    offset = tk - tq
    key_pos = torch.arange(tk, device=q.device)
    b_idx = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    h_idx = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
    for q0 in range(0, tq, tile):
        q1 = min(tq, q0 + tile)
        t = q1 - q0
        # keys past the tile's last visible one are hidden by causality: not computed at all
        n = tk if not causal else max(0, min(tk, q1 + offset))
        if n == 0:
            continue  # every query of the tile sees nothing: zeros and -inf already there
        qt = q32[:, :, q0:q1].reshape(b, hk, g * t, d)  # the g heads of a group share the keys
        s = torch.matmul(qt, kt[..., :n]).view(b, hq, t, n) * scale
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]
            m = m[..., :n]
            if m.dtype == torch.bool:
                s = s.masked_fill(~m, -math.inf)
            else:
                s = (s + m.to(torch.float32)).masked_fill(hidden_by(m), -math.inf)
        if rule is not None:
            q_pos = (torch.arange(q0, q1, device=q.device) + offset).view(t, 1)
            seen_by_rule = rule.mask_mod(b_idx, h_idx, q_pos, key_pos[None, :n])
            s = s.masked_fill(~seen_by_rule, -math.inf)
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :n], -math.inf)
        if causal:
            seen = key_pos[None, :n] <= (torch.arange(q0, q1, device=q.device) + offset)[:, None]
            s = s.masked_fill(~seen, -math.inf)
        row = row_logsumexp(s)  # -inf where the row sees nothing
        p = torch.exp(s - row.masked_fill(torch.isinf(row), 0.0)[..., None])  # hidden → 0, dead rows → 0
        o = torch.matmul(p.view(b, hk, g * t, n), v32[:, :, :n])
        out[:, :, q0:q1] = o.view(b, hq, t, d)
        lse[:, :, q0:q1] = row
    return out, lse


def hidden_by(mask: torch.Tensor) -> torch.Tensor:
    """Which keys a 4-D mask hides, bool of its shape: False for a bool mask's True entries; for an
    additive float mask, the values at or below half the dtype's minimum (transformers writes
    ``finfo.min`` there; a finite value above it is a bias, not a mask)."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask <= torch.finfo(mask.dtype).min / 2


def check_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, torch.Tensor) and softcap.numel() == 1:
        softcap = float(softcap)
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap):
        raise TypeError(f"softcap must be a finite real number or None, got {softcap!r}")
    if softcap <= 0:
        raise ValueError(f"softcap must be > 0 (scores become softcap·tanh(scores/softcap)), got {softcap!r}")
    return float(softcap)


def _check_mask(mask: object, b: int, hq: int, tq: int, tk: int) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() != 4:
        raise ValueError(f"mask must have rank 4 (broadcastable to [B, Hq, Tq, Tk]), got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool (True = visible) or floating (additive), got dtype {mask.dtype}")
    for size, full, name in zip(mask.shape, (b, hq, tq, tk), ("batch", "heads_q", "tokens_q", "tokens_k")):
        if size not in (1, full) or (name == "tokens_k" and size != full):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Tq, Tk] = {(b, hq, tq, tk)} "
                f"({name}: {size}; tokens_k must match exactly)")
