"""How a sequence is split across the ranks of a context-parallel group.

* ``contiguous`` — rank ``r`` holds the ``r``-th of ``W`` consecutive pieces. Under a causal mask
  the last rank attends to every key and the first to its own only: the work is unbalanced.
* ``zigzag`` — the sequence is cut into ``2W`` pieces and rank ``r`` holds pieces ``r`` and
  ``2W − 1 − r`` (a head and a tail), so every rank gets the same causal work (the layout of
  ring-flash-attn and of torch's context parallel "load balancing").

Pieces follow ``torch.tensor_split``: when the length does not divide evenly the first pieces are
one token longer. Every rank can compute every rank's pieces from the total length alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens: global positions ``start … start + length − 1``."""

    start: int
    length: int


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def pieces(total: int, world: int, layout: str) -> list[list[Piece]]:
    """Per rank, the pieces of a ``total``-token sequence it holds (in the order they are stored)."""
    check_layout(layout)
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    n = world if layout == "contiguous" else 2 * world
    sizes = [total // n + (1 if i < total % n else 0) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    cut = [Piece(s, z) for s, z in zip(starts, sizes)]
    if layout == "contiguous":
        return [[cut[r]] for r in range(world)]
    return [[cut[r], cut[n - 1 - r]] for r in range(world)]


def shard(x: Tensor, rank: int, world: int, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Rank ``rank``'s part of a full sequence ``x`` along ``dim`` (its pieces, concatenated)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    own = pieces(x.shape[dim], world, layout)[rank]
    return torch.cat([x.narrow(dim, p.start, p.length) for p in own], dim=dim)


def unshard(parts: list[Tensor], layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The full sequence from every rank's part (``parts[r]`` from rank ``r``), inverse of :func:`shard`."""
    world = len(parts)
    total = sum(p.shape[dim] for p in parts)
    layout_pieces = pieces(total, world, layout)
    chunks: list[tuple[int, Tensor]] = []
    for r, part in enumerate(parts):
        if part.shape[dim] != sum(p.length for p in layout_pieces[r]):
            raise ValueError(f"parts[{r}] holds {part.shape[dim]} tokens along dim {dim}, but the {layout} layout of "
                             f"{total} tokens over {world} ranks gives it {sum(p.length for p in layout_pieces[r])}")
        at = 0
        for p in layout_pieces[r]:
            chunks.append((p.start, part.narrow(dim, at, p.length)))
            at += p.length
    return torch.cat([c for _, c in sorted(chunks, key=lambda sc: sc[0])], dim=dim)


def positions(total: int, world: int, rank: int, layout: str, device=None) -> Tensor:
    """int64 ``[tokens on rank]``: the global positions of rank ``rank``'s tokens, in stored order."""
    own = pieces(total, world, layout)[rank]
    return torch.cat([torch.arange(p.start, p.start + p.length, device=device) for p in own])
