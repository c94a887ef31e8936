"""Compiled FlexAttention over a block layout (torch.nn.attention.flex_attention).

The layout's partial and full blocks become a ``BlockMask`` through ``BlockMask.from_kv_blocks``
(milliseconds, where ``create_block_mask`` would evaluate the mask at every pair: seconds at 16k).
The compiled function is built once per process with static shapes: each new sequence length or
mask structure compiles a kernel (5–30 s on a 2-core CPU; inductor's on-disk cache makes later
processes faster), and new layouts of the same shape reuse it.

On CPU, torch 2.13's compiled FlexAttention does not return the log-sum-exp, so this path gives
``lse = None`` there.
"""

from __future__ import annotations

import functools
import shutil

import torch

from longattn.core.masks import Mask
from longattn.kernels.layout import BlockLayout
from longattn.kernels.tiled import ScoreBias, takes_batch


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


#: each (length, mask structure) compiles its own kernel; dynamo's default of 8 recompiles per
#: function would silently drop to eager FlexAttention, which materialises the score matrix.
RECOMPILE_LIMIT = 128


@functools.cache
def _compiled_flex():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    if getattr(dynamo_config, "recompile_limit", RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT
    # Static shapes: with dynamic=True, torch 2.13's CPU template emitted C++ that does not
    # compile for several masks (sinks + window, PowerAttention, block maps); static shapes
    # compiled all of them. The price is one compile per sequence length.
    return torch.compile(flex_attention, dynamic=False)


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


class FlexCompileError(RuntimeError):
    """torch.compile could not build the FlexAttention kernel for this mask/bias structure."""


#: mask/bias structures whose compile already failed in this process (each try costs seconds)
_FAILED: dict[str, str] = {}


def structure_key(mask: Mask | None, has_bias: bool) -> str:
    """A key naming the *structure* of a mask (its class tree), not its values."""

    def walk(m) -> str:
        if m is None:
            return "none"
        kids = [walk(getattr(m, a)) for a in ("a", "b") if isinstance(getattr(m, a, None), Mask)]
        return type(m).__name__ + (f"({','.join(kids)})" if kids else "")

    return walk(mask) + ("+bias" if has_bias else "")


#: the smallest block FlexAttention computes correctly: with BLOCK_SIZE 8 torch 2.13's CPU kernel
#: returned outputs off by ~3 (40 tokens) or NaN (4,096 tokens) against the float64 oracle, with no
#: error; 16 and up matched it (1e-7)
FLEX_MIN_BLOCK = 16


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
    """``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` float32 → ``(out, lse or None)``.

    Raises ``FlexCompileError`` when inductor cannot compile this mask structure (torch 2.13's CPU
    template fails on some combinations, e.g. a window mask and ``key_padding_mask`` together).
    """
    if layout.block < FLEX_MIN_BLOCK:
        raise ValueError(f"FlexAttention needs blocks of at least {FLEX_MIN_BLOCK} tokens (smaller ones give wrong "
                         f"results), got block={layout.block}; use a larger block or backend='tiled' / 'gather'")
    per_row = bias is not None and takes_batch(bias)
    key = structure_key(mask, bias is not None) + ("(per batch row)" if per_row else "")
    if key in _FAILED:
        raise FlexCompileError(_FAILED[key])
    block_mask = to_block_mask(layout, mask)
    score_mod = None
    if bias is not None:
        off = layout.q_offset

        if per_row:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias(h, q_idx + off, kv_idx, b=b)
        else:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias(h, q_idx + off, kv_idx)

    fn = _compiled_flex()
    gqa = q.shape[1] != k.shape[1]
    want_lse = q.device.type != "cpu"
    try:
        # the CPU kernel has no backward (callers never send inputs needing grad there); on other
        # devices the compiled kernel differentiates out and LSE, so autograd stays as the caller set it
        with torch.set_grad_enabled(want_lse and torch.is_grad_enabled()):
            res = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=gqa, return_lse=want_lse)
    except Exception as exc:  # inductor/dynamo raise many types; all mean "this kernel cannot be built"
        if isinstance(exc, (MemoryError, KeyboardInterrupt)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _FAILED[key] = f"compiled FlexAttention failed for mask structure {key}: {type(exc).__name__}: {first[:200]}"
        raise FlexCompileError(_FAILED[key]) from exc
    if want_lse:
        out, lse = res
        return out, lse.float()
    return res, None
