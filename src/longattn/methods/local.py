"""Exact local attention: sliding / dilated window, and attention sinks + window (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.core import validate
from longattn.core.masks import Sinks, Window
from longattn.methods.base import Capabilities, register
from longattn.methods.masked import MaskedMethod


@register
@dataclass(frozen=True)
class SlidingWindow(MaskedMethod):
    """Sliding / dilated neighbourhood attention (Longformer's local window, Beltagy et al. 2020;
    dilation as in Hassani et al. 2024, "Faster Neighborhood Attention").

    Args:
        window: keys per side, the query itself included: with ``causal=True`` each query sees its
            last ``window`` keys; without, ``window - 1`` on each side of it.
        dilation: step between attended keys (1 = contiguous).
        backend: "auto" (FlexAttention from 8k keys when it compiles here), "tiled" or "flex".
        block: kernel block size (default 128).
    """

    window: int = 1024
    dilation: int = 1
    backend: str = "auto"
    block: int | None = None
    name = "window"
    capabilities = Capabilities(
        exact=True, paper="Beltagy et al. 2020, Longformer; Hassani et al. 2024, Faster Neighborhood Attention",
        cost="O(N·window)",
    )

    def __post_init__(self):
        validate.check_positive_int("window", self.window)
        validate.check_positive_int("dilation", self.dilation)
        self._check_backend()

    def method_mask(self, tokens_q, tokens_k, causal):
        return Window(self.window, self.dilation)


@register
@dataclass(frozen=True)
class Streaming(MaskedMethod):
    """Attention sinks + recent window (Xiao et al. 2024, "Efficient Streaming Language Models
    with Attention Sinks", StreamingLLM).

    Each query sees the first ``sinks`` keys and its last ``window`` keys (itself included), so a
    query attends to at most ``sinks + window`` keys. Exact on that mask. (Re-assigning positions
    inside the kept cache, which StreamingLLM needs for generation past the trained length, is the
    job of the KV-cache layer.)
    """

    sinks: int = 4
    window: int = 1024
    backend: str = "auto"
    block: int | None = None
    name = "streaming"
    capabilities = Capabilities(
        exact=True, non_causal=False,
        paper="Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks",
        cost="O(N·(sinks+window))",
    )

    def __post_init__(self):
        validate.check_positive_int("sinks", self.sinks)
        validate.check_positive_int("window", self.window)
        self._check_backend()

    def method_mask(self, tokens_q, tokens_k, causal):
        return Sinks(self.sinks) | Window(self.window)
