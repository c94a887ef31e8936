"""Exact attention of a chunk of queries over a memory's layout of kept keys.

The layout is ``[kept keys …, the chunk's own keys]``: every kept key is visible to every query
of the chunk (they all came earlier), the chunk's keys causally — the bottom-right-aligned causal
rule of ``kernels.sdpa``, which runs the step whenever no slot is padding and no probabilities
are wanted. Padding differs per head here (each head keeps its own slots) and the scoring
policies need the probabilities; those steps take the explicit float32 softmax below. GQA is handled by grouping the
queries of a key head, never by repeating keys. Scores are float32; a row that sees no real key
(a padding query) gives 0, not NaN.
"""

from __future__ import annotations

import math

import torch

from longattn.kernels.sdpa import sdpa_attention


def attend_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor, scale: float,
                  want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the chunk's queries over the layout.

    Args:
        q: ``[B, Hq, L, D]``, the chunk's queries (L ≥ 1), already position-encoded.
        k, v: ``[B, H, N, D]`` with ``Hq % H == 0`` and ``N ≥ L``: the last ``L`` slots are the
            chunk's own keys.
        key_ok: ``[B, H, N]`` bool, False for slots holding padding.
        scale: the softmax scale.
        want_probs: also return the attention probabilities (for scoring policies).

    Returns:
        ``(out [B, Hq, L, D] in q's dtype, probs [B, H, Hq/H, L, N] float32 or None)``.
    """
    b, hq, lq, d = q.shape
    h, n = k.shape[1], k.shape[2]
    if hq % h or n < lq:
        raise ValueError(f"query heads {hq} must be a multiple of key heads {h}, and keys {n} ≥ queries {lq}")
    if not want_probs and bool(key_ok.all()):
        # every slot real: exactly the library's dense causal kernel (last query ↔ last key)
        out, _ = sdpa_attention(q, k, v, scale=scale, causal=True)
        return out.to(q.dtype), None
    g = hq // h
    qg = q.to(torch.float32).reshape(b, h, g * lq, d)
    s = torch.matmul(qg, k.to(torch.float32).transpose(-1, -2)).mul_(scale).view(b, h, g, lq, n)
    visible = torch.ones(lq, n, dtype=torch.bool, device=q.device)
    visible[:, n - lq:] = torch.ones(lq, lq, dtype=torch.bool, device=q.device).tril()
    mask = key_ok[:, :, None, None, :] & visible
    s = s.masked_fill(~mask, -math.inf)
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), device=q.device))
    p = torch.exp(s - top)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.matmul(p.view(b, h, g * lq, n), v.to(torch.float32)).view(b, hq, lq, d)
    return out.to(q.dtype), (p if want_probs else None)
