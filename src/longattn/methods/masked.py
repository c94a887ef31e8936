"""Shared machinery of the exact masked methods (window, streaming, pattern, dense_chunked):
build the method's mask, add causality and key padding, classify blocks, run one exact kernel
(compiled FlexAttention or the eager tiled kernel) and report which path ran."""

from __future__ import annotations

import time
import warnings
from typing import ClassVar

import torch

from longattn.core import validate
from longattn.core.masks import Causal, Full, KeyPadding, Mask
from longattn.kernels import flex
from longattn.kernels.sdpa import needs_grad
from longattn.kernels.layout import build_layout, count_allowed_pairs, dense_pairs
from longattn.kernels.tiled import tiled_attention
from longattn.methods.base import Call, Method, Result

#: with backend="auto", compiled FlexAttention is used from this many keys on. Measured on the
#: 2-core CPU (window 1024, causal, same run): at 8k the tiled kernel ran 2.9–3.4× SDPA against
#: flex's 2.1×; at 16k both ran 3.8–5.5× (flex ahead by up to 10% on block maps). Below 16k the
#: tiled kernel wins and costs no compile (5–30 s per new length).
FLEX_MIN_TOKENS = 16384
#: the same threshold on GPUs: there the tiled kernel's loop launches many small kernels (window
#: 1024 at 4k keys ran 0.02× SDPA on an H200, flex 1.0–1.5× at 16k), so flex takes over early;
#: below it the inputs are small enough that the loop is short and no compile is paid
FLEX_MIN_TOKENS_GPU = 2048
BACKENDS = ("auto", "tiled", "flex")
DEFAULT_BLOCK = 128


class MaskedMethod(Method):
    """Base of methods that attend exactly over a fixed mask. Subclasses implement
    ``method_mask`` and declare fields ``backend`` and ``block``."""

    backend: ClassVar[str]  # overridden by a dataclass field
    block: ClassVar[int | None]

    def method_mask(self, tokens_q: int, tokens_k: int, causal: bool) -> Mask | None:
        raise NotImplementedError

    def visible_mask(self, tokens_q: int, tokens_k: int, causal: bool) -> Mask | None:
        m = self.method_mask(tokens_q, tokens_k, causal)
        if m is not None:
            m = m.for_sizes(tokens_q, tokens_k)  # masks counting queries top-left need the sizes
        if causal:
            m = Causal() if m is None else (Causal() & m)
        return m

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def _check_block(self) -> None:
        # None: the mask's own block grid, else DEFAULT_BLOCK
        if self.block is not None:
            validate.check_positive_int("block", self.block)

    def choose_backend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> str:
        # FlexAttention has no backward on the CPU: under autograd there only the tiled kernel runs
        no_flex_grad = q.device.type == "cpu" and needs_grad(q, k, v)
        if self.backend == "flex":
            if call.row_bias is not None:
                raise ValueError(f"{self.name}: backend='flex' cannot take a content-dependent bias (CoPE); use backend='tiled'")
            if no_flex_grad:
                raise ValueError(f"{self.name}: backend='flex' has no backward on the CPU, but q, k or v requires grad; "
                                 "use backend='tiled' (or 'auto') to train")
            reason = flex.flex_unavailable_reason()
            if reason:
                raise RuntimeError(f"{self.name}: backend='flex' was requested but cannot run: {reason}")
            return "flex"
        if self.backend == "tiled" or call.row_bias is not None:
            return "tiled"
        min_tokens = FLEX_MIN_TOKENS if q.device.type == "cpu" else FLEX_MIN_TOKENS_GPU
        if not no_flex_grad and flex.flex_unavailable_reason() is None and k.shape[2] >= min_tokens:
            return "flex"
        return "tiled"

    def run(self, q, k, v, call: Call) -> Result:
        tq, tk = q.shape[2], k.shape[2]
        mask = self.visible_mask(tq, tk, call.causal)
        if call.key_padding_mask is not None:
            pad = KeyPadding(call.key_padding_mask)
            mask = pad if mask is None else (mask & pad)
        if mask is not None:
            mask = mask.to(q.device)  # ids and maps built on the CPU serve inputs on any device
            mask.check(q.shape[0], tq, tk)
        block = self.block or (mask.block_size if mask is not None else None) or DEFAULT_BLOCK
        t0 = time.perf_counter()
        layout = build_layout(mask if mask is not None else Full(), tq, tk, block, q.device)
        t1 = time.perf_counter()
        path = self.choose_backend(q, k, v, call)
        if path == "flex" and block < flex.FLEX_MIN_BLOCK:
            if self.backend == "flex":
                raise ValueError(f"{self.name}: backend='flex' needs block >= {flex.FLEX_MIN_BLOCK} (FlexAttention "
                                 f"computes smaller blocks wrongly), got block={block}; use backend='tiled'")
            path = "tiled"  # auto: the exact eager kernel takes any block
        stats: dict = {}
        if path == "flex":
            try:
                out, lse = flex.flex_attention_path(q, k, v, scale=call.scale, layout=layout, mask=mask, bias=call.bias)
            except flex.FlexCompileError as exc:
                if self.backend == "flex":
                    raise
                # backend="auto": the eager kernel computes the same exact result; say so in stats
                stats["flex_error"] = str(exc)
                warnings.warn(f"{self.name}: {exc}; ran the exact eager tiled kernel instead", RuntimeWarning, stacklevel=3)
                path = "tiled"
        if path == "tiled":
            out, lse, _ = tiled_attention(q, k, v, scale=call.scale, layout=layout, mask=mask, bias=call.bias,
                                          row_bias=call.row_bias, key_chunk=self.key_chunk())
        t2 = time.perf_counter()
        stats.update({"layout_s": t1 - t0, "kernel_s": t2 - t1, "block": block})
        if call.want_stats:
            b, hq = q.shape[:2]
            allowed = count_allowed_pairs(mask, layout, b, hq)
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = allowed / dense if dense else 0.0
            stats["computed_fraction"] = layout.computed_pairs() / dense if dense else 0.0
            stats["blocks_visited"] = int(layout.any.flatten(0, 1).any(0).sum())
            stats["blocks_total"] = layout.n_q_blocks * layout.n_k_blocks
        return Result(out, lse, path, stats)

    def key_chunk(self) -> int:
        return 2048
