"""Block layouts: which (query block, key block) tiles a mask touches, computed without
evaluating the mask on every pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.core.masks import Mask


@dataclass(frozen=True)
class BlockLayout:
    """Tiles of a ``tokens_q × tokens_k`` attention matrix cut into ``block × block`` blocks.

    ``any``/``all``: bool ``[B|1, H|1, n_q_blocks, n_k_blocks]``: some / every pair of the block is
    visible. Blocks with ``any & ~all`` are *partial*: the kernel applies the mask there.
    """

    block: int
    tokens_q: int
    tokens_k: int
    any: torch.Tensor
    all: torch.Tensor

    @property
    def q_offset(self) -> int:
        return self.tokens_k - self.tokens_q

    @property
    def n_q_blocks(self) -> int:
        return self.any.shape[-2]

    @property
    def n_k_blocks(self) -> int:
        return self.any.shape[-1]

    def computed_pairs(self) -> float:
        """(query, key) pairs inside visited blocks, averaged over batch and heads."""
        qs = _block_sizes(self.tokens_q, self.block, self.any.device).to(torch.float64)
        ks = _block_sizes(self.tokens_k, self.block, self.any.device).to(torch.float64)
        area = qs[:, None] * ks[None, :]
        return float((self.any.to(torch.float64) * area).sum(dim=(-1, -2)).mean())


def _block_sizes(tokens: int, block: int, device=None) -> torch.Tensor:
    starts = torch.arange(0, tokens, block, device=device)
    return torch.clamp(tokens - starts, max=block)


def block_bounds(tokens: int, block: int, offset: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive first/last position of each block of ``tokens`` indices, shifted by ``offset``."""
    lo = torch.arange(0, tokens, block, device=device)
    hi = torch.clamp(lo + block - 1, max=tokens - 1)
    return lo + offset, hi + offset


def build_layout(mask: Mask, tokens_q: int, tokens_k: int, block: int, device=None) -> BlockLayout:
    """Classify every block of ``mask`` as empty, partial or full."""
    offset = tokens_k - tokens_q
    qlo, qhi = block_bounds(tokens_q, block, offset, device)
    klo, khi = block_bounds(tokens_k, block, 0, device)
    qlo, qhi, klo, khi = qlo[:, None], qhi[:, None], klo[None, :], khi[None, :]
    shape = (qlo.shape[0], klo.shape[1])
    any_ = _as4d(mask.block_any(qlo, qhi, klo, khi), shape)
    all_ = _as4d(mask.block_all(qlo, qhi, klo, khi), shape) & any_
    return BlockLayout(block, tokens_q, tokens_k, any_, all_)


def _as4d(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    t = t.to(torch.bool)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.expand(*t.shape[:2], *shape).contiguous()


def dense_pairs(tokens_q: int, tokens_k: int, causal: bool) -> int:
    """(query, key) pairs of the dense pattern: the full rectangle, or the causal (bottom-right
    aligned) triangle. Density is always measured against this."""
    if not causal:
        return tokens_q * tokens_k
    off = tokens_k - tokens_q
    # row i sees min(tokens_k, i + off + 1) keys, and i + off + 1 <= tokens_k for every row: the sum
    # in closed form (host arithmetic, no tensor on any device)
    return tokens_q * (off + 1) + tokens_q * (tokens_q - 1) // 2


def count_allowed_pairs(mask: Mask | None, layout: BlockLayout, batch: int, heads: int) -> float:
    """Visible (query, key) pairs, averaged over batch × heads: full blocks counted by area,
    the mask evaluated only on partial blocks (one query-block row at a time)."""
    qs = _block_sizes(layout.tokens_q, layout.block, layout.any.device)
    ks = _block_sizes(layout.tokens_k, layout.block, layout.any.device)
    full = layout.all.expand(batch, heads, -1, -1)
    partial = (layout.any & ~layout.all).expand(batch, heads, -1, -1)
    total = float((full.to(torch.float64) * (qs[:, None] * ks[None, :]).to(torch.float64)).sum())
    if mask is None:
        return total / (batch * heads)
    dev = layout.any.device
    b_idx = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    bs = layout.block
    rows = partial.flatten(0, 1).any(0)
    for qi in rows.any(-1).nonzero().flatten().tolist():
        q_pos = torch.arange(qi * bs, min((qi + 1) * bs, layout.tokens_q), device=dev) + layout.q_offset
        for kj in rows[qi].nonzero().flatten().tolist():
            k_pos = torch.arange(kj * bs, min((kj + 1) * bs, layout.tokens_k), device=dev)
            allowed = mask.mask_mod(b_idx, h_idx, q_pos.view(-1, 1), k_pos.view(1, -1))
            allowed = allowed.expand(batch, heads, q_pos.numel(), k_pos.numel())
            sel = partial[:, :, qi, kj]
            total += float((allowed.sum(dim=(-1, -2)) * sel).sum())
    return total / (batch * heads)
