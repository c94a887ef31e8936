"""Block-sparse exact attention: the portable kernel behind ``dense_chunked`` and the fallback of
every masked method.

For each query block it visits only the key blocks the layout marks as non-empty, cuts them into
chunks of at most ``key_chunk`` keys — full blocks (no mask needed, sliced without a copy where
consecutive) apart from partial blocks (mask applied) — computes each chunk's ``(out, lse)`` and
folds it into the running result by the exact log-sum-exp merge (the online softmax of
FlashAttention / blockwise attention). Memory is ``O(block × key_chunk)`` per step, never
``O(N²)``.

A chunk's ``(out, lse)`` comes from torch's fused flash kernel (CPU or CUDA) where available (it accepts an
additive mask and returns the LSE), else from eager matmul + softmax. GQA never copies keys: the
query heads of a group are stacked along the token axis, ``[B, Hkv, G·bq, D]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.core.masks import Mask
from longattn.core.merge import merge_partials, row_logsumexp
from longattn.kernels.layout import BlockLayout
from longattn.kernels.sdpa import fused_available, fused_flash

#: ``bias(h, q_pos, k_pos) -> [1|B, H, bq, nk]`` float added to scaled scores (ALiBi, T5 ...). A
#: bias that differs between batch rows declares a keyword parameter ``b`` (see ``takes_batch``).
ScoreBias = Callable[..., torch.Tensor]


def takes_batch(bias: ScoreBias) -> bool:
    """Whether ``bias`` wants the batch index: it has a parameter named ``b`` (``ALiBi.score_bias``
    for per-batch slopes); kernels then call ``bias(h, q_pos, k_pos, b=b)``."""
    try:
        return "b" in inspect.signature(bias).parameters
    except (TypeError, ValueError):  # a callable without a readable signature (C builtins): the plain form
        return False


@dataclass
class TiledInfo:
    visited_blocks: int = 0
    partial_blocks: int = 0
    fused: bool = False


def chunk_attention(q, k, v, scale: float, add_mask: torch.Tensor | None, fused: bool):
    """Exact attention of ``q [B, H, M, D]`` over ``k, v [B, H, n, D]`` with an optional additive
    mask ``[B|1, H|1, M, n]`` (``-inf`` = hidden) → ``(out [B, H, M, D], lse [B, H, M])``.
    Rows whose keys are all hidden are *not* fixed here: the caller knows them."""
    if fused:
        return fused_flash(q, k, v, scale=scale, attn_mask=add_mask)
    if q.dtype in (torch.bfloat16, torch.float16):
        # the eager form would round scores and probabilities to the half dtype (flash kernels
        # keep them in float32): compute it in float32
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if add_mask is not None:
        s = s + add_mask
    lse = row_logsumexp(s)
    # out of place: logsumexp and exp keep their inputs / outputs for autograd
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.matmul(p, v), lse


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    layout: BlockLayout,
    mask: Mask | None,
    bias: ScoreBias | None = None,
    row_bias: Callable[[int, int], torch.Tensor] | None = None,
    key_chunk: int = 2048,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, TiledInfo]:
    """Exact attention over the blocks of ``layout``.

    Args:
        q: ``[B, Hq, Tq, D]`` float32; k, v: ``[B, Hkv, Tk, D]`` float32.
        layout: block classification of ``mask`` (see ``kernels.layout.build_layout``).
        mask: token-level rule applied on partial blocks (None: every visited pair is visible).
        bias: optional positional score bias.
        row_bias: optional ``(q0, q1) -> [B, Hq, q1-q0, Tk]`` content-dependent bias (CoPE),
            computed once per query block (memory ``O(block × Tk)``).
        key_chunk: keys per chunk (rounded down to whole blocks, at least one block).
        fused: use torch's fused kernel per chunk (default: where available, ``sdpa.fused_available``).

    Returns:
        ``out [B, Hq, Tq, D]``, ``lse [B, Hq, Tq]`` (float32; rows with no visible key give
        0 and -inf) and a ``TiledInfo``.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    bs = layout.block
    dev = q.device
    fused = fused_available(q) if fused is None else fused
    out = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=dev)
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float32, device=dev)
    info = TiledInfo(fused=fused)
    b_idx = torch.arange(b, device=dev).view(b, 1, 1, 1)
    h_idx = torch.arange(hq, device=dev).view(1, hq, 1, 1)
    # a block is visited if any batch/head needs it, and unmasked only if it is full for all.
    visit = layout.any.flatten(0, 1).any(0).cpu()  # [nqb, nkb]
    full = layout.all.flatten(0, 1).all(0).cpu()
    per_step_blocks = max(1, key_chunk // bs)
    bias_kw = {"b": b_idx} if bias is not None and takes_batch(bias) else {}

    for qi in range(layout.n_q_blocks):
        row = visit[qi]
        if not bool(row.any()):
            continue
        q0, q1 = qi * bs, min((qi + 1) * bs, tq)
        m = q1 - q0
        full_blocks = (row & full[qi]).nonzero().flatten().tolist()
        partial_blocks = (row & ~full[qi]).nonzero().flatten().tolist()
        info.visited_blocks += len(full_blocks) + len(partial_blocks)
        info.partial_blocks += len(partial_blocks)
        chunks = [(full_blocks[c : c + per_step_blocks], False) for c in range(0, len(full_blocks), per_step_blocks)]
        chunks += [(partial_blocks[c : c + per_step_blocks], True) for c in range(0, len(partial_blocks), per_step_blocks)]
        qt = q[:, :, q0:q1].reshape(b, hk, g * m, d)  # query heads of a group stacked along tokens
        q_pos = (torch.arange(q0, q1, device=dev) + layout.q_offset).view(-1, 1)
        rows = row_bias(q0, q1) if row_bias is not None else None
        o_run = l_run = None
        for chunk, is_partial in chunks:
            k_sel, v_sel, k_pos = _gather_blocks(k, v, chunk, bs, tk)
            add = None  # additive mask/bias [B|1, Hq|1, m, n] before regrouping
            alive = None  # [B|1, Hq|1, m]: rows with at least one visible key in this chunk
            if bias is not None:
                add = bias(h_idx, q_pos, k_pos.view(1, -1), **bias_kw).to(torch.float32)
            if rows is not None:
                r = rows.index_select(-1, k_pos)
                add = r if add is None else add + r
            if is_partial and mask is not None:
                allowed = mask.mask_mod(b_idx, h_idx, q_pos, k_pos.view(1, -1))
                allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
                hidden = torch.zeros(allowed.shape, dtype=torch.float32, device=dev).masked_fill_(~allowed, -math.inf)
                add = hidden if add is None else add + hidden
                alive = allowed.any(-1)
            if add is not None:
                add = _group_rows(add, b, hk, g, m, k_pos.numel())
            o_c, l_c = chunk_attention(qt, k_sel, v_sel, scale, add, fused)
            o_c = o_c.reshape(b, hq, m, d)
            l_c = l_c.reshape(b, hq, m).to(torch.float32)
            if alive is not None:
                dead = ~alive.expand(b, hq, m)
                l_c = l_c.masked_fill(dead, -math.inf)
                o_c = o_c.masked_fill(dead[..., None], 0.0)
            if o_run is None:
                o_run, l_run = o_c, l_c
            else:
                o_run, l_run = merge_partials([o_run, o_c], [l_run, l_c])
        out[:, :, q0:q1] = o_run
        lse[:, :, q0:q1] = l_run
    return out, lse, info


def _group_rows(add: torch.Tensor, b: int, hk: int, g: int, m: int, n: int) -> torch.Tensor:
    """``[B|1, Hq|1, m, n]`` → ``[B|1, Hkv|1, G·m, n]`` matching the stacked query layout."""
    bb = add.shape[0]
    if add.shape[1] == 1:
        # head-independent: repeat the rows for each query head of the group
        return add.expand(bb, 1, m, n).repeat(1, 1, g, 1) if g > 1 else add.expand(bb, 1, m, n)
    return add.expand(bb, hk * g, m, n).reshape(bb, hk, g * m, n)


def _gather_blocks(k, v, blocks: list[int], bs: int, tk: int):
    """Keys/values of the given blocks, sliced where blocks are consecutive, and their positions."""
    runs: list[tuple[int, int]] = []
    for j in blocks:
        lo, hi = j * bs, min((j + 1) * bs, tk)
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    if len(runs) == 1:
        lo, hi = runs[0]
        return k[:, :, lo:hi], v[:, :, lo:hi], torch.arange(lo, hi, device=k.device)
    pos = torch.cat([torch.arange(lo, hi, device=k.device) for lo, hi in runs])
    return k.index_select(2, pos), v.index_select(2, pos), pos
