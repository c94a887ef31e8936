"""Compact summaries of blocks of keys, kept up to date as keys are appended.

For keys ``k [B, H, T, D]`` cut into blocks of ``block`` tokens (the last may be partial; a block
longer than the keys holds all of them):

* ``mean``  ``[B, H, n, D]`` — the block's mean key: a training-free "landmark" (Landmark
  Attention, Mohtashami & Jaggi 2023; LongHeads' chunk representation).
* ``kmin``, ``kmax`` ``[B, H, n, D]`` — element-wise extremes, from which Quest (Tang et al. 2024)
  bounds ``q·k`` over the block by ``Σ_d max(q_d·min_d, q_d·max_d)``.
* ``count`` ``[n]`` — tokens in each block.

Sums are kept (not means) so appending a token updates its block in O(D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class BlockSummaries:
    block: int
    sums: torch.Tensor  # [B, H, n, D] float32
    kmin: torch.Tensor  # [B, H, n, D]
    kmax: torch.Tensor  # [B, H, n, D]
    count: torch.Tensor  # [n] int64
    tokens: int
    #: the mean, cached: a decode step scores against it every token; ``append`` clears it
    _mean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: whether every key summarised is finite, once known; kept current from the new keys alone
    _finite: bool | None = field(default=None, repr=False, compare=False)

    @property
    def n_blocks(self) -> int:
        return self.count.numel()

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(batch, heads, head_dim)`` of the keys summarised."""
        b, h, _, d = self.sums.shape
        return b, h, d

    @property
    def keys_finite(self) -> bool:
        """True when every key summarised is finite: a NaN/Inf key makes its block's sum
        non-finite (a finite sum that overflows reads as False, which only costs a caller a full
        check). Computed once from the sums, then kept current by ``append``/``extend`` from the
        new keys alone, so a decode loop asks it for O(1) per step (``core.nonfinite``)."""
        if self._finite is None:
            self._finite = bool(torch.isfinite(self.sums.sum()))
        return self._finite

    def _note_new_keys(self, k_new: torch.Tensor) -> None:
        if self._finite:
            self._finite = bool(torch.isfinite(k_new.sum()))

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            self._mean = self.sums / self.count.clamp_min(1).view(1, 1, -1, 1).to(self.sums.dtype)
        return self._mean

    @classmethod
    def build(cls, k: torch.Tensor, block: int) -> "BlockSummaries":
        """Summaries of ``k [B, H, T, D]`` in blocks of ``block`` tokens."""
        b, h, t, d = k.shape
        n = math.ceil(t / block)
        # blocks are laid out ``width`` wide: keys shorter than a block form one block of them all,
        # padded to no more than the keys' length whatever ``block`` is
        width = min(block, t) if t else block
        pad = n * width - t
        k32 = k.to(torch.float32)
        if pad:
            # padding must not win a min or a max, and adds nothing to a sum
            k_lo = torch.nn.functional.pad(k32, (0, 0, 0, pad), value=math.inf)
            k_hi = torch.nn.functional.pad(k32, (0, 0, 0, pad), value=-math.inf)
            k_sum = torch.nn.functional.pad(k32, (0, 0, 0, pad), value=0.0)
        else:
            k_lo = k_hi = k_sum = k32
        view = (b, h, n, width, d)
        count = torch.full((n,), width, dtype=torch.int64, device=k.device)
        if pad:
            count[-1] = width - pad
        return cls(
            block=block,
            sums=k_sum.reshape(view).sum(3),
            kmin=k_lo.reshape(view).amin(3),
            kmax=k_hi.reshape(view).amax(3),
            count=count,
            tokens=t,
        )

    def blocks(self, start: int, stop: int) -> "BlockSummaries":
        """The summaries of blocks ``[start, stop)`` (views, not copies)."""
        return BlockSummaries(block=self.block, sums=self.sums[:, :, start:stop], kmin=self.kmin[:, :, start:stop],
                              kmax=self.kmax[:, :, start:stop], count=self.count[start:stop],
                              tokens=int(self.count[start:stop].sum()))

    def extend(self, k_new: torch.Tensor) -> None:
        """Fold many new keys ``[B, H, t, D]`` at once: fill the open block, then summarise the rest
        block-wise and append them in one concatenation (``append`` goes token by token)."""
        t = k_new.shape[2]
        if t == 0:
            return
        self._mean = None
        self._note_new_keys(k_new)
        off = self.tokens % self.block
        start = 0
        if off and self.n_blocks:
            start = min(self.block - off, t)
            part = k_new[:, :, :start].to(torch.float32)
            j = self.n_blocks - 1
            self.sums[:, :, j] += part.sum(2)
            self.kmin[:, :, j] = torch.minimum(self.kmin[:, :, j], part.amin(2))
            self.kmax[:, :, j] = torch.maximum(self.kmax[:, :, j], part.amax(2))
            self.count[j] += start
            self.tokens += start
        if start < t:
            rest = BlockSummaries.build(k_new[:, :, start:], self.block)
            self.sums = torch.cat([self.sums, rest.sums], 2)
            self.kmin = torch.cat([self.kmin, rest.kmin], 2)
            self.kmax = torch.cat([self.kmax, rest.kmax], 2)
            self.count = torch.cat([self.count, rest.count])
            self.tokens += rest.tokens

    def append(self, k_new: torch.Tensor) -> None:
        """Fold new keys ``[B, H, t, D]`` (positions ``tokens …``) into the summaries."""
        k_new = k_new.to(torch.float32)
        self._mean = None
        self._note_new_keys(k_new)
        for i in range(k_new.shape[2]):
            j, off = divmod(self.tokens, self.block)
            row = k_new[:, :, i]
            if off == 0:  # a new block opens
                self.sums = torch.cat([self.sums, row[:, :, None]], 2)
                self.kmin = torch.cat([self.kmin, row[:, :, None]], 2)
                self.kmax = torch.cat([self.kmax, row[:, :, None]], 2)
                self.count = torch.cat([self.count, self.count.new_ones(1)])
            else:
                self.sums[:, :, j] += row
                self.kmin[:, :, j] = torch.minimum(self.kmin[:, :, j], row)
                self.kmax[:, :, j] = torch.maximum(self.kmax[:, :, j], row)
                self.count[j] += 1
            self.tokens += 1


def check_summaries(s: object, k: torch.Tensor, block: int, *, kinds: tuple[type, ...], uses: str) -> None:
    """Refuse summaries that do not describe the call's keys ``k [B, Hkv, Tk, D]`` in blocks of
    ``block`` tokens, before they are scored against (a mismatch would otherwise surface as a
    broadcasting error deep in a kernel, or as a silently wrong selection).

    Args:
        s: what the caller passed; it must be an instance of one of ``kinds`` (TypeError), and
            have ``dims`` (batch, heads, head_dim), ``tokens``, ``block`` and ``count``.
        block: the caller's block size. Summaries in blocks of another size describe the same
            blocks only when both are at least ``Tk`` (one block holding every key).
        uses: ends the message about blocks, e.g. ``"method 'landmark' uses blocks of 16"``.
    """
    if not isinstance(s, kinds):
        names = " or ".join(t.__name__ for t in kinds)
        raise TypeError(f"summaries must be a {names} of k (or None), got {type(s).__name__}")
    want = dict(zip(("batch", "heads", "head_dim"), (k.shape[0], k.shape[1], k.shape[3])))
    have = dict(zip(want, s.dims))
    wrong = [name for name in want if have[name] != want[name]]
    if wrong:
        raise ValueError(
            f"summaries have {', '.join(f'{n} {have[n]}' for n in wrong)} but k has "
            f"{', '.join(f'{n} {want[n]}' for n in wrong)} (k [batch, heads_kv, tokens_k, head_dim] = "
            f"{list(k.shape)}): they must summarise the call's keys"
        )
    if s.count.device != k.device:
        raise ValueError(f"summaries are on {s.count.device} but k is on {k.device}: they must match")
    tk = k.shape[2]
    if s.tokens != tk or min(s.block, tk) != min(block, tk):
        raise ValueError(
            f"summaries cover {s.tokens} keys in blocks of {s.block}, but the call has {tk} keys and {uses}"
        )
