"""Compiled FlexAttention over a block layout (torch.nn.attention.flex_attention).

The layout's partial and full blocks become a ``BlockMask`` through ``BlockMask.from_kv_blocks``
(milliseconds, where ``create_block_mask`` would evaluate the mask at every pair: seconds at 16k).
The compiled function is built once per process with dynamic shapes, so new lengths and new
layouts reuse it; the first call compiles (tens of seconds on a 2-core CPU).

On CPU, torch 2.13's compiled FlexAttention does not return the log-sum-exp, so this path gives
``lse = None`` there.
"""

from __future__ import annotations

import functools
import shutil

import torch

from longattn.core.masks import Mask
from longattn.kernels.layout import BlockLayout
from longattn.kernels.tiled import ScoreBias


@functools.cache
def flex_unavailable_reason() -> str | None:
    """None when compiled FlexAttention can run here, else why not."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return f"torch {torch.__version__} has no FlexAttention ({exc})"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/clang++) and none is on PATH"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def to_block_mask(layout: BlockLayout, mask: Mask | None):
    """``BlockMask`` with the layout's partial blocks (mask applied) and full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = layout.any & ~layout.all
    full = layout.all

    def _indices(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(-1, dtype=torch.int32)
        # stable sort puts selected block indices first, in increasing order
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    off = layout.q_offset
    mask_mod = None
    if mask is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask.mask_mod(b, h, q_idx + off, kv_idx)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=layout.block, mask_mod=mask_mod, seq_lengths=(layout.tokens_q, layout.tokens_k),
    )


def flex_attention_path(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    layout: BlockLayout,
    mask: Mask | None,
    bias: ScoreBias | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` float32 → ``(out, lse or None)``."""
    block_mask = to_block_mask(layout, mask)
    score_mod = None
    if bias is not None:
        off = layout.q_offset

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias(h, q_idx + off, kv_idx)

    fn = _compiled_flex()
    gqa = q.shape[1] != k.shape[1]
    want_lse = q.device.type != "cpu"
    with torch.no_grad():
        res = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                 enable_gqa=gqa, return_lse=want_lse)
    if want_lse:
        out, lse = res
        return out, lse.float()
    return res, None
