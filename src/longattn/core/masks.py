"""Attention masks as small pure rules over (batch, head, query position, key position).

A mask says which keys each query may see. Every mask here gives that rule in two forms:

* ``mask_mod(b, h, q_pos, k_pos) -> bool``: the token-level rule (True = may attend), written with
  broadcasting tensor ops so the same function serves the eager kernels (whole tiles at once) and
  FlexAttention (which vmaps it over scalars). This is the attention-gym convention.
* ``block_any`` / ``block_all``: for a grid of query blocks × key blocks, whether *some* / *every*
  (query, key) pair in the block is allowed. Kernels skip blocks with no allowed pair, skip the
  mask on blocks where every pair is allowed and apply it only on the rest. ``block_any`` may
  over-report and ``block_all`` may under-report (both only cost speed); neither may err the other
  way. They are derived from interval arithmetic, never by evaluating the mask on every pair, so
  building a block layout at 128k tokens costs microseconds. (The one exception is
  ``from_mask_mod``: an arbitrary user rule has no interval form, so it is evaluated once per pair
  up to a size limit, see there.)

Positions: key ``j`` sits at position ``j``; query ``i`` at ``i + q_offset`` with
``q_offset = tokens_k - tokens_q`` (the last query aligned with the last key, as in decoding and
flash-attn). A mask that counts queries otherwise (FlexAttention's top-left ``q_idx``) learns the
sizes through ``Mask.for_sizes``. Masks combine with ``&`` and ``|``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longattn.core import validate

Tensor = torch.Tensor


class Mask:
    """Base class. Subclasses define ``mask_mod``, ``block_any`` and ``block_all``.

    ``block_any(qlo, qhi, klo, khi)`` receives inclusive position bounds of each block: ``qlo``,
    ``qhi`` of shape ``[n_q_blocks, 1]``, ``klo``, ``khi`` of shape ``[1, n_k_blocks]`` (int64),
    and returns a bool tensor broadcastable to ``[batch, heads, n_q_blocks, n_k_blocks]``.
    """

    #: kernels should use blocks of this many tokens (masks defined on a block grid), or None.
    block_size: int | None = None
    #: True when the mask already encodes its own causal structure (prefix-LM) and must not be
    #: combined with ``causal=True``.
    self_causal: bool = False

    def mask_mod(self, b: Tensor, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """May return any shape that broadcasts to ``[B, H, tq, tk]`` (e.g. ``[1, tk]``); must use
        only tensor ops so FlexAttention can compile it."""
        raise NotImplementedError

    def check(self, batch: int, tokens_q: int, tokens_k: int) -> None:
        """Raise a clear error when the mask cannot describe inputs of these sizes."""

    def for_sizes(self, tokens_q: int, tokens_k: int) -> "Mask":
        """This mask for inputs of ``tokens_q`` queries and ``tokens_k`` keys.

        Masks written on longattn's positions need nothing (the default returns ``self``); a mask
        that counts queries another way (``from_mask_mod(..., align="top_left")``, FlexAttention's
        convention) returns a copy that knows the offset between the two. Masked methods and
        ``dense`` call it before evaluating a mask; ``&`` and ``|`` pass it to both sides.
        """
        return self

    def to(self, device: torch.device | str) -> "Mask":
        """This mask with its tensors (document ids, block maps, prefixes, padding) on ``device``:
        kernels index them with positions made on the inputs' device, so a mask built on the CPU
        serves CUDA inputs. Returns ``self`` when nothing needs to move; combined masks move both
        sides. (A ``from_mask_mod`` function's own captured tensors are the caller's to place.)"""
        if not dataclasses.is_dataclass(self):
            return self
        device = torch.device(device)
        changes = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.device != device:
                changes[f.name] = value.to(device)
            elif isinstance(value, Mask):
                moved = value.to(device)
                if moved is not value:
                    changes[f.name] = moved
        return dataclasses.replace(self, **changes) if changes else self

    def block_any(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> Tensor:
        raise NotImplementedError

    def block_all(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> Tensor:
        raise NotImplementedError

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, other)

    # -- materialisation (small inputs, tests, the reference) --------------------------------
    def dense(self, batch: int, heads: int, tokens_q: int, tokens_k: int, device=None) -> Tensor:
        """The mask as a bool tensor of shape ``[batch, heads, tokens_q, tokens_k]`` (a broadcast view).

        Materialises ``tokens_q × tokens_k`` entries: meant for the reference and for tests.
        """
        b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, heads, 1, 1)
        q_pos = torch.arange(tokens_q, device=device).view(tokens_q, 1) + (tokens_k - tokens_q)
        k_pos = torch.arange(tokens_k, device=device).view(1, tokens_k)
        mask = self.for_sizes(tokens_q, tokens_k)
        if device is not None:
            mask = mask.to(device)
        return mask.mask_mod(b, h, q_pos, k_pos).broadcast_to(batch, heads, tokens_q, tokens_k)


def _const(value: bool, like: Tensor) -> Tensor:
    return torch.full((1, 1), value, dtype=torch.bool, device=like.device)


@dataclass(frozen=True)
class Full(Mask):
    """Every key is visible."""

    def mask_mod(self, b, h, q_pos, k_pos):
        return k_pos >= 0  # key positions are never negative; broadcasts against q

    def block_any(self, qlo, qhi, klo, khi):
        return _const(True, qlo)

    def block_all(self, qlo, qhi, klo, khi):
        return _const(True, qlo)


@dataclass(frozen=True)
class Causal(Mask):
    """Key position ``<=`` query position."""

    def mask_mod(self, b, h, q_pos, k_pos):
        return k_pos <= q_pos

    def block_any(self, qlo, qhi, klo, khi):
        return klo <= qhi

    def block_all(self, qlo, qhi, klo, khi):
        return khi <= qlo


@dataclass(frozen=True)
class Window(Mask):
    """Neighbourhood attention: keys within ``window`` steps of ``dilation`` on either side.

    A query at position ``p`` sees keys ``p ± m·dilation`` for ``m = 0 … window-1``; combined with
    causality that is exactly ``window`` keys (itself included), otherwise ``2·window - 1``.
    ``dilation > 1`` is the dilated neighbourhood of "Faster Neighborhood Attention" (Hassani et al.
    2024); ``dilation = 1`` is the local sliding window of Longformer / Mistral.
    """

    window: int
    dilation: int = 1

    def __post_init__(self):
        validate.check_positive_int("window", self.window)
        validate.check_positive_int("dilation", self.dilation)

    @property
    def reach(self) -> int:
        return (self.window - 1) * self.dilation

    def mask_mod(self, b, h, q_pos, k_pos):
        d = q_pos - k_pos
        near = (d <= self.reach) & (d >= -self.reach)
        if self.dilation == 1:
            return near
        return near & (torch.remainder(d, self.dilation) == 0)

    def block_any(self, qlo, qhi, klo, khi):
        return (qlo - khi <= self.reach) & (qhi - klo >= -self.reach)

    def block_all(self, qlo, qhi, klo, khi):
        if self.dilation != 1:
            # a dilated window skips positions, so only a single (query, key) pair block is full.
            return ((qlo == qhi) & (klo == khi)) & (torch.remainder(qlo - klo, self.dilation) == 0) & (
                (qlo - klo).abs() <= self.reach
            )
        return (qhi - klo <= self.reach) & (qlo - khi >= -self.reach)


def _reach(name: str, value: object) -> int | None:
    """One side of a ``Band``: an int >= 0, or None / -1 (flash-attn's spelling) for unbounded."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= -1 or None (-1 and None: unbounded), got {type(value).__name__} {value!r}")
    if value < -1:
        raise ValueError(f"{name} must be an int >= -1 or None (-1 and None: unbounded), got {value}")
    return None if value == -1 else int(value)


@dataclass(frozen=True)
class Band(Mask):
    """Asymmetric local window, flash-attn's ``window_size=(left, right)``: a query at position
    ``p`` sees keys ``p - left … p + right`` (both ends included).

    ``None`` (or flash-attn's ``-1``, stored as None) leaves that side unbounded, so
    ``Band(None, None)`` is ``Full`` and ``Band(None, 0)`` is ``Causal``. ``Band(w - 1, w - 1)`` is
    ``Window(w)``. Positions are longattn's (bottom-right: query ``i`` at
    ``i + tokens_k - tokens_q``), the alignment flash-attn uses for ``window_size``; with
    ``causal=True`` flash-attn also cuts the right side at the query, which is this mask ``&
    Causal()``.

    Args:
        left: keys before the query that stay visible (int >= 0, or None / -1: all of them).
        right: keys after the query that stay visible (int >= 0, or None / -1: all of them).
    """

    left: int | None = None
    right: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "left", _reach("left", self.left))
        object.__setattr__(self, "right", _reach("right", self.right))

    def _within(self, d_right: Tensor, d_left: Tensor) -> Tensor:
        """True where ``d_left <= left`` and ``d_right >= -right`` (query − key distances tested
        against each side; a side that is None is unbounded)."""
        ok = _const(True, d_left)
        if self.left is not None:
            ok = ok & (d_left <= self.left)
        if self.right is not None:
            ok = ok & (d_right >= -self.right)
        return ok

    def mask_mod(self, b, h, q_pos, k_pos):
        d = q_pos - k_pos
        return self._within(d, d)

    # A block's query - key distances fill [qlo - khi, qhi - klo]; the block has a visible pair
    # iff that interval meets [-right, left], and is full iff it lies inside it.
    def block_any(self, qlo, qhi, klo, khi):
        return self._within(qhi - klo, qlo - khi)

    def block_all(self, qlo, qhi, klo, khi):
        return self._within(qlo - khi, qhi - klo)


@dataclass(frozen=True)
class Sinks(Mask):
    """The first ``sinks`` keys (attention sinks, StreamingLLM) are visible to every query."""

    sinks: int

    def __post_init__(self):
        validate.check_positive_int("sinks", self.sinks)

    def mask_mod(self, b, h, q_pos, k_pos):
        return k_pos < self.sinks

    def block_any(self, qlo, qhi, klo, khi):
        return klo < self.sinks

    def block_all(self, qlo, qhi, klo, khi):
        return khi < self.sinks


#: a head whose window is 0 sees every key: its reach is this (beyond any length)
_UNBOUNDED_REACH = 1 << 40


@dataclass(frozen=True)
class HeadWindow(Mask):
    """A sliding window whose width differs per query head (MoA's elastic windows, Fu et al. 2024).

    ``reach`` is int64 ``[heads]``: head ``h`` sees keys within ``reach[h]`` positions on either side
    (``window − 1``; combined with causality, its last ``window`` keys). Build it with
    :meth:`of` from the windows themselves (0 = the whole context). The mask's heads must be the
    query heads of the inputs (the method checks; a mask of one head applies to all)."""

    reach: Tensor

    @classmethod
    def of(cls, windows) -> "HeadWindow":
        """From one window per query head (ints >= 0; 0 = every key)."""
        ws = list(windows)
        if not ws or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0 for w in ws):
            raise ValueError(f"windows must be ints >= 0 (0 = the whole context), one per head, got {windows!r}")
        # built on the host like every mask; MaskedMethod.run moves it to the inputs' device (Mask.to)
        reach = [_UNBOUNDED_REACH if w == 0 else int(w) - 1 for w in ws]
        return cls(torch.tensor(reach, dtype=torch.int64, device="cpu"))

    @property
    def heads(self) -> int:
        return int(self.reach.numel())

    def mask_mod(self, b, h, q_pos, k_pos):
        r = self.reach[h] if self.reach.numel() > 1 else self.reach[0]
        d = q_pos - k_pos
        return (d <= r) & (d >= -r)

    def _r(self, like: Tensor) -> Tensor:
        return self.reach.to(like.device).view(1, -1, 1, 1)

    def block_any(self, qlo, qhi, klo, khi):
        r = self._r(qlo)
        return (qlo - khi <= r) & (qhi - klo >= -r)

    def block_all(self, qlo, qhi, klo, khi):
        r = self._r(qlo)
        return (qhi - klo <= r) & (qlo - khi >= -r)


@dataclass(frozen=True)
class QueryRows(Mask):
    """The last ``rows`` query positions (``q_pos >= start``) see every key: the dense bottom rows
    of the tri-shape pattern. ``start`` is a key position (``tokens_k - rows`` for self attention)."""

    start: int

    def mask_mod(self, b, h, q_pos, k_pos):
        return q_pos >= self.start

    def block_any(self, qlo, qhi, klo, khi):
        return qhi >= self.start

    def block_all(self, qlo, qhi, klo, khi):
        return qlo >= self.start


@dataclass(frozen=True, eq=False)
class Document(Mask):
    """Queries see only keys of their own document (packed sequences).

    Args:
        key_ids: int tensor ``[batch, tokens_k]`` (or ``[tokens_k]``): document id of each key.
        query_ids: ``[batch, tokens_q]``; default: the key ids at the query positions (self
            attention).
    Block bounds use the min and max id inside each block, so they are tight when ids are
    sorted (contiguous documents) and still correct when they are not.
    """

    key_ids: Tensor
    query_ids: Tensor | None = None

    def __post_init__(self):
        for name in ("key_ids", "query_ids"):
            ids = getattr(self, name)
            if ids is None:
                continue
            if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of document ids, got {ids!r:.60}")
            if ids.dim() == 1:
                object.__setattr__(self, name, ids[None])
            elif ids.dim() != 2:
                raise ValueError(f"{name} must have shape [batch, tokens] or [tokens], got {tuple(ids.shape)}")

    def check(self, batch, tokens_q, tokens_k):
        if self.key_ids.shape[1] != tokens_k or self.key_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"document key_ids has shape {tuple(self.key_ids.shape)}, expected [batch or 1, tokens_k] = "
                f"[{batch}, {tokens_k}]"
            )
        if self.query_ids is None:
            if tokens_q > tokens_k:
                raise ValueError(f"document mask with tokens_q={tokens_q} > tokens_k={tokens_k} needs query_ids")
        elif self.query_ids.shape[1] != tokens_q or self.query_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"document query_ids has shape {tuple(self.query_ids.shape)}, expected [batch or 1, tokens_q] = "
                f"[{batch}, {tokens_q}]"
            )

    def _q_ids(self) -> Tensor:
        return self.key_ids if self.query_ids is None else self.query_ids

    def _q_index(self, q_pos: Tensor) -> Tensor:
        # query ids are indexed by query index, key ids by key position.
        if self.query_ids is None:
            return q_pos
        return q_pos - (self.key_ids.shape[1] - self.query_ids.shape[1])

    def mask_mod(self, b, h, q_pos, k_pos):
        qi = self._q_ids()
        kb = b if self.key_ids.shape[0] > 1 else torch.zeros_like(b)
        qb = b if qi.shape[0] > 1 else torch.zeros_like(b)
        return qi[qb, self._q_index(q_pos)] == self.key_ids[kb, k_pos]

    @staticmethod
    def _block_ranges(ids: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        # lo, hi: [n] inclusive token indices of each block -> per-batch min and max id [B, n]
        n_blocks = lo.numel()
        size = int((hi - lo).max().item()) + 1 if n_blocks else 1
        idx = (lo.view(-1, 1) + torch.arange(size, device=lo.device)).clamp(max=ids.shape[1] - 1)
        idx = torch.minimum(idx, hi.view(-1, 1))
        vals = ids[:, idx]  # [B, n, size]
        return vals.amin(-1), vals.amax(-1)

    def _bounds(self, qlo, qhi, klo, khi):
        qmin, qmax = self._block_ranges(self._q_ids(), self._q_index(qlo.view(-1)), self._q_index(qhi.view(-1)))
        kmin, kmax = self._block_ranges(self.key_ids, klo.view(-1), khi.view(-1))
        return qmin[:, None, :, None], qmax[:, None, :, None], kmin[:, None, None, :], kmax[:, None, None, :]

    def block_any(self, qlo, qhi, klo, khi):
        qmin, qmax, kmin, kmax = self._bounds(qlo, qhi, klo, khi)
        return (qmin <= kmax) & (kmin <= qmax)

    def block_all(self, qlo, qhi, klo, khi):
        qmin, qmax, kmin, kmax = self._bounds(qlo, qhi, klo, khi)
        return (qmin == qmax) & (kmin == kmax) & (qmin == kmin)


@dataclass(frozen=True, eq=False)
class PrefixLM(Mask):
    """Prefix-LM (T5, UniLM): bidirectional over the first ``prefix`` keys, causal after them.

    ``prefix`` is an int or an int tensor ``[batch]``. The mask carries its own causality, so it
    is used with ``causal=False``.
    """

    prefix: int | Tensor
    self_causal: bool = field(default=True, init=False)

    def __post_init__(self):
        if isinstance(self.prefix, torch.Tensor):
            if self.prefix.dim() != 1 or self.prefix.dtype.is_floating_point:
                raise ValueError(f"prefix must be an int or an int tensor [batch], got {self.prefix!r:.60}")
        else:
            validate.check_positive_int("prefix", self.prefix, allow_zero=True)

    def check(self, batch, tokens_q, tokens_k):
        if isinstance(self.prefix, torch.Tensor) and self.prefix.shape[0] not in (1, batch):
            raise ValueError(f"prefix has {self.prefix.shape[0]} entries, expected one per batch row ({batch})")

    def _prefix(self, b: Tensor) -> Tensor | int:
        if isinstance(self.prefix, torch.Tensor):
            return self.prefix.to(b.device)[b]
        return self.prefix

    def mask_mod(self, b, h, q_pos, k_pos):
        return (k_pos <= q_pos) | (k_pos < self._prefix(b))

    def _prefix_blocks(self, like):
        if isinstance(self.prefix, torch.Tensor):
            return self.prefix.to(like.device).view(-1, 1, 1, 1)
        return self.prefix

    def block_any(self, qlo, qhi, klo, khi):
        return (klo <= qhi) | (klo < self._prefix_blocks(qlo))

    def block_all(self, qlo, qhi, klo, khi):
        return (khi <= qlo) | (khi < self._prefix_blocks(qlo))


@dataclass(frozen=True, eq=False)
class BlockMap(Mask):
    """An explicit block map: query block ``i`` sees key block ``j`` iff ``map[..., i, j]``.

    Args:
        map: bool ``[n_q_blocks, n_k_blocks]`` or ``[batch|1, heads|1, n_q_blocks, n_k_blocks]``.
        block_size: tokens per block (query and key). Query blocks are counted on query
            *indices* (``q_pos - q_offset``) so the map reads like the attention matrix.
        q_offset: ``tokens_k - tokens_q`` of the inputs this map is used with (0 for self
            attention).
    """

    map: Tensor
    block_size: int = 128
    q_offset: int = 0

    def __post_init__(self):
        if not isinstance(self.map, torch.Tensor) or self.map.dtype != torch.bool:
            raise TypeError(f"map must be a bool tensor, got {self.map!r:.60}")
        if self.map.dim() == 2:
            object.__setattr__(self, "map", self.map[None, None])
        elif self.map.dim() != 4:
            raise ValueError(f"map must have shape [n_q_blocks, n_k_blocks] or [B, H, nq, nk], got {tuple(self.map.shape)}")
        validate.check_positive_int("block_size", self.block_size)

    def _lookup(self, b, h, qb, kb):
        m = self.map
        nq, nk = m.shape[-2:]
        inside = (qb >= 0) & (qb < nq) & (kb >= 0) & (kb < nk)
        bb = b if m.shape[0] > 1 else torch.zeros_like(b)
        hh = h if m.shape[1] > 1 else torch.zeros_like(h)
        return m[bb, hh, qb.clamp(0, nq - 1), kb.clamp(0, nk - 1)] & inside

    def mask_mod(self, b, h, q_pos, k_pos):
        return self._lookup(b, h, (q_pos - self.q_offset) // self.block_size, k_pos // self.block_size)

    def _grid(self, qlo, klo):
        b = torch.arange(self.map.shape[0], device=qlo.device).view(-1, 1, 1, 1)
        h = torch.arange(self.map.shape[1], device=qlo.device).view(1, -1, 1, 1)
        return b, h

    def block_any(self, qlo, qhi, klo, khi):
        # Exact when kernel blocks coincide with map blocks (kernels use ``self.block_size``);
        # otherwise OR over the map cells that a kernel block touches, via 2-D prefix sums.
        return self._count(qlo, qhi, klo, khi) > 0

    def block_all(self, qlo, qhi, klo, khi):
        qa, qb_, ka, kb_ = self._cells(qlo, qhi, klo, khi)
        area = (qb_ - qa + 1) * (kb_ - ka + 1)
        return self._count(qlo, qhi, klo, khi) == area

    def _cells(self, qlo, qhi, klo, khi):
        bs = self.block_size
        return (qlo - self.q_offset) // bs, (qhi - self.q_offset) // bs, klo // bs, khi // bs

    def _count(self, qlo, qhi, klo, khi):
        m = self.map.to(torch.int64)
        nq, nk = m.shape[-2:]
        pref = torch.zeros(*m.shape[:2], nq + 1, nk + 1, dtype=torch.int64, device=m.device)
        pref[..., 1:, 1:] = m.cumsum(-2).cumsum(-1)
        qa, qb_, ka, kb_ = self._cells(qlo, qhi, klo, khi)
        qa, qb_ = qa.clamp(0, nq), (qb_ + 1).clamp(0, nq)
        ka, kb_ = ka.clamp(0, nk), (kb_ + 1).clamp(0, nk)
        return pref[..., qb_, kb_] - pref[..., qa, kb_] - pref[..., qb_, ka] + pref[..., qa, ka]


@dataclass(frozen=True)
class PowerDilated(Mask):
    """PowerAttention (Chen et al. 2025): block ``i`` sees block ``j`` iff ``|i - j|`` is 0 or a
    power of two, so the receptive field doubles with every layer at ``O(log N)`` blocks per query.
    Blocks are counted on positions."""

    block_size: int = 64

    def __post_init__(self):
        validate.check_positive_int("block_size", self.block_size)

    @staticmethod
    def _is_pow2_or_zero(d: Tensor) -> Tensor:
        d = d.abs()
        return (d & (d - 1)) == 0  # true for 0, 1, 2, 4, ...

    def mask_mod(self, b, h, q_pos, k_pos):
        return self._is_pow2_or_zero(q_pos // self.block_size - k_pos // self.block_size)

    def _pairs(self, qlo, qhi, klo, khi):
        bs = self.block_size
        return qlo // bs, qhi // bs, klo // bs, khi // bs

    def block_any(self, qlo, qhi, klo, khi):
        qa, qb, ka, kb = self._pairs(qlo, qhi, klo, khi)
        single = (qa == qb) & (ka == kb)
        return torch.where(single, self._is_pow2_or_zero(qa - ka), torch.ones_like(single))

    def block_all(self, qlo, qhi, klo, khi):
        qa, qb, ka, kb = self._pairs(qlo, qhi, klo, khi)
        return (qa == qb) & (ka == kb) & self._is_pow2_or_zero(qa - ka)


@dataclass(frozen=True)
class Strided(Mask):
    """Every ``stride``-th key block is visible (the "sparse" part of LSG and of Sparse
    Transformers' strided pattern). Blocks are counted on key positions."""

    stride: int
    block_size: int = 64

    def __post_init__(self):
        validate.check_positive_int("stride", self.stride)
        validate.check_positive_int("block_size", self.block_size)

    def mask_mod(self, b, h, q_pos, k_pos):
        return torch.remainder(k_pos // self.block_size, self.stride) == self.stride - 1

    def block_any(self, qlo, qhi, klo, khi):
        ka, kb = klo // self.block_size, khi // self.block_size
        first_hit = ka + torch.remainder(self.stride - 1 - ka, self.stride)
        return first_hit <= kb

    def block_all(self, qlo, qhi, klo, khi):
        ka, kb = klo // self.block_size, khi // self.block_size
        return (ka == kb) & (torch.remainder(ka, self.stride) == self.stride - 1)


@dataclass(frozen=True)
class GlobalTokens(Mask):
    """The first ``tokens`` positions are global: they see every key and every query sees them
    (Longformer / LSG global tokens)."""

    tokens: int

    def __post_init__(self):
        validate.check_positive_int("tokens", self.tokens)

    def mask_mod(self, b, h, q_pos, k_pos):
        return (q_pos < self.tokens) | (k_pos < self.tokens)

    def block_any(self, qlo, qhi, klo, khi):
        return (qlo < self.tokens) | (klo < self.tokens)

    def block_all(self, qlo, qhi, klo, khi):
        return (qhi < self.tokens) | (khi < self.tokens)


@dataclass(frozen=True, eq=False)
class _Pair(Mask):
    """Two masks combined; sizes are checked on both and block grids merged."""

    a: Mask
    b: Mask

    def check(self, batch, tokens_q, tokens_k):
        self.a.check(batch, tokens_q, tokens_k)
        self.b.check(batch, tokens_q, tokens_k)

    def for_sizes(self, tokens_q, tokens_k):
        a, b = self.a.for_sizes(tokens_q, tokens_k), self.b.for_sizes(tokens_q, tokens_k)
        return self if (a is self.a and b is self.b) else type(self)(a, b)

    @property
    def block_size(self) -> int | None:  # type: ignore[override]
        return _merge_block_size(self.a, self.b)

    @property
    def self_causal(self) -> bool:  # type: ignore[override]
        return self.a.self_causal or self.b.self_causal


class And(_Pair):
    """Pairs visible under both masks (``a & b``)."""

    def mask_mod(self, b, h, q_pos, k_pos):
        return self.a.mask_mod(b, h, q_pos, k_pos) & self.b.mask_mod(b, h, q_pos, k_pos)

    def block_any(self, *r):  # may over-report: A and B may hold on disjoint pairs of a block
        return self.a.block_any(*r) & self.b.block_any(*r)

    def block_all(self, *r):
        return self.a.block_all(*r) & self.b.block_all(*r)


class Or(_Pair):
    """Pairs visible under either mask (``a | b``)."""

    def mask_mod(self, b, h, q_pos, k_pos):
        return self.a.mask_mod(b, h, q_pos, k_pos) | self.b.mask_mod(b, h, q_pos, k_pos)

    def block_any(self, *r):
        return self.a.block_any(*r) | self.b.block_any(*r)

    def block_all(self, *r):  # may under-report: A and B may together cover a block
        return self.a.block_all(*r) | self.b.block_all(*r)


def _merge_block_size(a: Mask, b: Mask) -> int | None:
    sizes = [s for s in (a.block_size, b.block_size) if s is not None]
    if not sizes:
        return None
    # the finest grid keeps both masks' block bounds tight when one size divides the other
    return math.gcd(*sizes) if len(sizes) > 1 else sizes[0]


# -- named patterns ----------------------------------------------------------------------------

def a_shape(sinks: int, window: int) -> Mask:
    """Λ-shape / A-shape (StreamingLLM, MInference, Ltri-LLM's Λ observation): sinks + local
    window. Use with ``causal=True``."""
    return Sinks(sinks) | Window(window)


def triangle(sinks: int, window: int, last_queries: int, tokens_k: int) -> Mask:
    """Tri-shape (Ltri-LLM / SCBench): the Λ-shape plus dense rows for the last ``last_queries``
    queries, which in practice carry the question. Use with ``causal=True``."""
    validate.check_positive_int("last_queries", last_queries)
    return a_shape(sinks, window) | QueryRows(tokens_k - last_queries)


def band(left: int | None = None, right: int | None = None) -> Mask:
    """flash-attn's ``window_size=(left, right)``: query at position ``p`` sees keys
    ``p - left … p + right``; ``-1`` or None leaves a side unbounded (see ``Band``)."""
    return Band(left, right)


def power(block_size: int = 64, sinks: int | None = None) -> Mask:
    """PowerAttention's exponentially dilated block pattern, optionally with sinks."""
    m: Mask = PowerDilated(block_size)
    return m | Sinks(sinks) if sinks else m


def lsg(window: int, stride: int, global_tokens: int, block_size: int = 64) -> Mask:
    """LSG attention (Condevaux & Harispe 2023): local window + strided sparse blocks + global
    tokens."""
    return Window(window) | Strided(stride, block_size) | GlobalTokens(global_tokens)


def document(key_ids: Tensor, query_ids: Tensor | None = None) -> Mask:
    """Block-diagonal document mask for packed sequences."""
    return Document(key_ids, query_ids)


def prefix_lm(prefix: int | Tensor) -> Mask:
    """Bidirectional prefix + causal rest; use with ``causal=False``."""
    return PrefixLM(prefix)


def block_map(map: Tensor, block_size: int = 128, q_offset: int = 0) -> Mask:
    """An explicit bool block map ``[n_q_blocks, n_k_blocks]`` (or ``[B, H, nq, nk]``)."""
    return BlockMap(map, block_size, q_offset)


@dataclass(frozen=True, eq=False)
class KeyPadding(Mask):
    """``valid`` bool ``[batch, tokens_k]``: True marks a real key, False a padding key."""

    valid: Tensor

    def mask_mod(self, b, h, q_pos, k_pos):
        return self.valid[b, k_pos]

    def check(self, batch, tokens_q, tokens_k):
        if tuple(self.valid.shape) != (batch, tokens_k):
            raise ValueError(f"key_padding_mask has shape {tuple(self.valid.shape)}, expected [batch, tokens_k] = [{batch}, {tokens_k}]")

    def _block_counts(self, klo, khi):
        pref = torch.zeros(self.valid.shape[0], self.valid.shape[1] + 1, dtype=torch.int64, device=self.valid.device)
        pref[:, 1:] = self.valid.to(torch.int64).cumsum(-1)
        lo, hi = klo.view(-1), khi.view(-1)
        count = pref[:, hi + 1] - pref[:, lo]  # [B, n_k_blocks]
        return count[:, None, None, :], (hi - lo + 1)[None, None, None, :]

    def block_any(self, qlo, qhi, klo, khi):
        count, _ = self._block_counts(klo, khi)
        return count > 0

    def block_all(self, qlo, qhi, klo, khi):
        count, size = self._block_counts(klo, khi)
        return count == size


# -- FlexAttention / attention-gym mask_mods ---------------------------------------------------

#: ``from_mask_mod`` finds exact block bounds by evaluating the mod on every (batch, head, query,
#: key) pair of the blocks while they hold at most this many pairs; beyond, every block is reported
#: partial (``block_any`` True, ``block_all`` False) and the kernel applies the mod on every pair.
MOD_EXACT_PAIRS = 2**26
#: pairs evaluated per step while doing so, which bounds the memory of that pass
MOD_CHUNK_PAIRS = 2**20

ALIGNS = ("top_left", "bottom_right")


@dataclass(frozen=True, eq=False)
class ModMask(Mask):
    """A FlexAttention / attention-gym ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a longattn
    mask. Built by ``from_mask_mod``, which documents the conventions.

    ``sizes`` is ``(tokens_q, tokens_k)`` once bound by ``for_sizes``: ``align="top_left"`` needs it
    to turn longattn's query positions back into FlexAttention's query indices.
    """

    fn: Callable[..., Tensor]
    batch: int = 1
    heads: int = 1
    align: str = "top_left"
    sizes: tuple[int, int] | None = None
    # visible-pair counts of the last block grid asked for: build_layout asks block_any and then
    # block_all for the same grid, and each answer costs a pass over every pair
    _counts: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(self.fn).__name__}")
        validate.check_positive_int("batch", self.batch)
        validate.check_positive_int("heads", self.heads)
        if self.align not in ALIGNS:
            raise ValueError(
                "align must be 'top_left' (FlexAttention) or 'bottom_right' (longattn, flash-attn), "
                f"got {self.align!r}")
        if self.sizes is not None:
            tokens_q, tokens_k = self.sizes
            validate.check_positive_int("tokens_q", tokens_q, allow_zero=True)
            validate.check_positive_int("tokens_k", tokens_k, allow_zero=True)

    def for_sizes(self, tokens_q, tokens_k):
        if self.align == "bottom_right" or self.sizes == (tokens_q, tokens_k):
            return self
        return dataclasses.replace(self, sizes=(tokens_q, tokens_k))

    def check(self, batch, tokens_q, tokens_k):
        if self.batch not in (1, batch):
            raise ValueError(
                f"from_mask_mod(batch={self.batch}) cannot serve inputs of batch {batch}: pass batch=1 when the "
                f"mask_mod ignores b, else the input batch")
        if self.sizes is not None and self.sizes != (tokens_q, tokens_k):
            raise ValueError(
                f"this from_mask_mod mask was bound to (tokens_q, tokens_k) = {self.sizes} by for_sizes, but the "
                f"inputs have ({tokens_q}, {tokens_k})")

    def _q_offset(self) -> int:
        """longattn query position minus the query index the mod expects."""
        if self.align == "bottom_right":
            return 0
        if self.sizes is None:
            raise ValueError(
                "from_mask_mod(align='top_left') needs the input sizes to count queries from 0: masked methods "
                "and Mask.dense bind them; when evaluating the mask yourself call mask.for_sizes(tokens_q, tokens_k)")
        tokens_q, tokens_k = self.sizes
        return tokens_k - tokens_q

    def mask_mod(self, b, h, q_pos, k_pos):
        # batch=1 / heads=1: the mod does not tell rows / heads apart (FlexAttention's B=None /
        # H=None); it is evaluated at 0 so that it may index tensors holding a single row.
        if self.batch == 1:
            b = torch.zeros_like(b)
        if self.heads == 1:
            h = torch.zeros_like(h)
        elif h.dim() and h.numel() != self.heads:  # eager callers pass every head at once
            raise ValueError(f"from_mask_mod(heads={self.heads}) is evaluated on {h.numel()} query heads: pass "
                             "heads=1 when the mask_mod ignores h, else the number of query heads")
        allowed = self.fn(b, h, q_pos - self._q_offset(), k_pos)
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
            got = f"dtype {allowed.dtype}" if isinstance(allowed, torch.Tensor) else type(allowed).__name__
            raise TypeError(f"mask_mod must return a bool tensor (True = may attend), got {got}")
        return allowed

    def block_counts(self, qlo: Tensor, qhi: Tensor, klo: Tensor, khi: Tensor) -> Tensor | None:
        """Visible pairs of each block, int64 ``[batch, heads, n_q_blocks, n_k_blocks]``, by
        evaluating the mod on every pair ``MOD_CHUNK_PAIRS`` at a time; None when the blocks hold
        more than ``MOD_EXACT_PAIRS`` pairs. Bounds as in ``Mask.block_any``."""
        qlo, qhi, klo, khi = (t.reshape(-1) for t in (qlo, qhi, klo, khi))
        key = (str(qlo.device), *(tuple(t.tolist()) for t in (qlo, qhi, klo, khi)))
        if key in self._counts:
            return self._counts[key]
        empty = not (qlo.numel() and klo.numel())
        k_first, k_last = (0, -1) if empty else (int(klo.min()), int(khi.max()))
        pairs = self.batch * self.heads * int((qhi - qlo + 1).sum()) * (k_last - k_first + 1)
        counts = None
        if pairs <= MOD_EXACT_PAIRS:
            counts = torch.zeros(self.batch, self.heads, qlo.numel(), klo.numel(), dtype=torch.int64, device=qlo.device)
            if not empty:
                self._count_pairs(counts, qlo, qhi, klo, khi, k_first, k_last)
        self._counts.clear()
        self._counts[key] = counts
        return counts

    def _count_pairs(self, counts, qlo, qhi, klo, khi, k_first, k_last):
        dev = qlo.device
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=dev).view(1, -1, 1, 1)
        grid = self.batch * self.heads
        cols = min(k_last - k_first + 1, max(1, MOD_CHUNK_PAIRS // grid))
        rows = max(1, MOD_CHUNK_PAIRS // (grid * cols))
        for i, (q0, q1) in enumerate(zip(qlo.tolist(), qhi.tolist())):
            for r0 in range(q0, q1 + 1, rows):
                q_pos = torch.arange(r0, min(r0 + rows, q1 + 1), device=dev).view(-1, 1)
                for c0 in range(k_first, k_last + 1, cols):
                    n = min(cols, k_last + 1 - c0)
                    k_pos = torch.arange(c0, c0 + n, device=dev).view(1, -1)
                    allowed = self.mask_mod(b, h, q_pos, k_pos).broadcast_to(self.batch, self.heads, q_pos.shape[0], n)
                    # visible pairs per key column, summed per key block through prefix sums
                    per_key = torch.zeros(self.batch, self.heads, n + 1, dtype=torch.int64, device=dev)
                    per_key[..., 1:] = allowed.sum(-2).cumsum(-1)
                    lo, hi = (klo - c0).clamp(0, n), (khi + 1 - c0).clamp(0, n)
                    counts[:, :, i] += per_key[..., hi] - per_key[..., lo]

    def block_any(self, qlo, qhi, klo, khi):
        counts = self.block_counts(qlo, qhi, klo, khi)
        return _const(True, qlo) if counts is None else counts > 0

    def block_all(self, qlo, qhi, klo, khi):
        counts = self.block_counts(qlo, qhi, klo, khi)
        if counts is None:
            return _const(False, qlo)
        return counts == (qhi - qlo + 1) * (khi - klo + 1)


def from_mask_mod(mask_mod: Callable[..., Tensor], *, batch: int = 1, heads: int = 1,
                  align: str = "top_left") -> Mask:
    """A FlexAttention ``mask_mod`` (as written for ``create_block_mask`` and in attention-gym) as
    a longattn mask: ``longattn.method("pattern", mask=masks.from_mask_mod(mod))``.

    Args:
        mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` tensor, True = may attend. Eager kernels call
            it with broadcasting int64 tensors (``b [B, 1, 1, 1]``, ``h [1, H, 1, 1]``,
            ``q_idx [m, 1]``, ``kv_idx [1, n]``; the result must broadcast to ``[B, H, m, n]``),
            FlexAttention with 0-d tensors under vmap: write it with tensor ops (``&``, ``|``,
            ``~``, ``torch.where``, indexing captured tensors), as attention-gym's mods are, not
            with Python ``and`` / ``if``.
        batch, heads: how many batch rows / query heads the mod tells apart. 1 (FlexAttention's
            ``B=None`` / ``H=None``) means it ignores ``b`` / ``h`` and is evaluated at 0 for every
            row / head; otherwise the input batch / number of query heads.
        align: how queries are counted. ``"top_left"`` (FlexAttention): query ``i`` has
            ``q_idx = i``, from 0 even when ``tokens_q != tokens_k``. ``"bottom_right"`` (longattn's
            own masks, flash-attn): ``q_idx = i + tokens_k - tokens_q``, the last query aligned with
            the last key.

    Block bounds are exact while ``batch × heads × tokens_q × tokens_k`` is at most
    ``MOD_EXACT_PAIRS`` (the mod is evaluated on every pair once, ``MOD_CHUNK_PAIRS`` at a time);
    beyond, every block is treated as partial: still exact attention, but no block is skipped.

    A mod that carries its own causality (``q_idx >= kv_idx``, top-left) is used with
    ``causal=False``: ``causal=True`` adds longattn's bottom-right causal mask, which is the same
    only when ``tokens_q == tokens_k``.
    """
    return ModMask(mask_mod, batch, heads, align)
