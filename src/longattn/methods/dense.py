"""Exact dense attention: torch SDPA, and the online-softmax chunked form with O(N) memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

from longattn.core import validate
from longattn.kernels.sdpa import sdpa_attention
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.methods.masked import MaskedMethod


@register
@dataclass(frozen=True)
class Dense(Method):
    """Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need") via torch SDPA.

    Uses torch's fused flash kernel (CPU or CUDA), which also yields the log-sum-exp. With a score bias
    (ALiBi, T5, CoPE) SDPA would need an N×N bias tensor, so that case runs the exact tiled kernel
    instead and ``stats['path']`` says so.
    """

    name = "dense"
    capabilities = Capabilities(
        half_compute=True,
        exact=True, paper="Vaswani et al. 2017, Attention Is All You Need", cost="O(N²) time, O(N) memory"
    )

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            return DenseChunked().run(q, k, v, call)
        t0 = time.perf_counter()
        out, lse = sdpa_attention(q, k, v, scale=call.scale, causal=call.causal,
                                  key_padding_mask=call.key_padding_mask)
        stats = {"kernel_s": time.perf_counter() - t0}
        if call.want_stats:
            stats["density"] = 1.0
            stats["computed_fraction"] = 1.0
        return Result(out, lse, "sdpa", stats)


@register
@dataclass(frozen=True)
class DenseChunked(MaskedMethod):
    """Blockwise attention with an online softmax over key tiles (FlashAttention, Dao et al. 2022;
    Blockwise Parallel Transformer / Ring Attention, Liu et al. 2023).

    Args:
        chunk: keys folded into the running softmax per step; peak extra memory is
            ``heads × block × chunk`` floats, independent of the sequence length.
        block: query tile size.
    """

    chunk: int = 2048
    block: int = 256
    name = "dense_chunked"
    # half inputs compute in float32: the chunks' outputs would each be rounded to the half dtype
    # before the merge (the CPU fused kernel returns q's dtype), about twice SDPA's error
    capabilities = Capabilities(
        exact=True, paper="Dao et al. 2022, FlashAttention; Liu et al. 2023, Ring Attention",
        cost="O(N²) time, O(N) memory",
    )
    backend = "tiled"

    def __post_init__(self):
        validate.check_positive_int("chunk", self.chunk)
        validate.check_positive_int("block", self.block)

    def method_mask(self, tokens_q, tokens_k, causal):
        return None

    def key_chunk(self) -> int:
        return self.chunk
