"""Exact attention over a static pattern: A-shape/Λ, tri-shape, PowerAttention, LSG, documents,
prefix-LM or an explicit block map (build one with ``longattn.masks``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from longattn.core.masks import Mask
from longattn.methods.base import Capabilities, register
from longattn.methods.masked import MaskedMethod


@register
@dataclass(frozen=True)
class Pattern(MaskedMethod):
    """Exact attention restricted to a static mask pattern.

    Args:
        mask: a ``longattn.masks.Mask`` (e.g. ``masks.a_shape(64, 1024)``, ``masks.power(64)``,
            ``masks.lsg(...)``, ``masks.document(ids)``, ``masks.prefix_lm(n)``,
            ``masks.block_map(m)``) or a factory ``(tokens_q, tokens_k) -> Mask`` for patterns
            that depend on the length (``masks.triangle``).
        backend: "auto", "tiled" or "flex".
        block: kernel block size (default: the mask's own block grid, else 128).

    Papers: A-shape/Λ (Xiao et al. 2024; Jiang et al. 2024 MInference), tri-shape (Ltri-LLM,
    Tang et al. 2024; SCBench), PowerAttention (Chen et al. 2025), LSG (Condevaux & Harispe 2023),
    prefix-LM (Raffel et al. 2020).
    """

    mask: Mask | Callable[[int, int], Mask]
    backend: str = "auto"
    block: int | None = None
    name = "pattern"
    capabilities = Capabilities(
        half_compute=True,
        exact=True, paper="A-shape, tri-shape (Ltri-LLM), PowerAttention, LSG, document, prefix-LM",
        cost="O(area of the pattern)",
    )

    def __post_init__(self):
        if not (isinstance(self.mask, Mask) or callable(self.mask)):
            raise TypeError(f"mask must be a longattn.masks.Mask or a callable, got {type(self.mask).__name__}")
        self._check_backend()
        self._check_block()

    def method_mask(self, tokens_q, tokens_k, causal):
        m = self.mask if isinstance(self.mask, Mask) else self.mask(tokens_q, tokens_k)
        if not isinstance(m, Mask):
            raise TypeError(f"the pattern's mask factory returned {type(m).__name__}, expected a longattn.masks.Mask")
        if causal and m.self_causal:
            raise ValueError("this pattern carries its own causal structure (prefix-LM); call it with causal=False")
        return m
