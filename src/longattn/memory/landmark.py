"""Landmark Attention's memory: a context of any length with only the retrieved blocks hot.

Mohtashami & Jaggi (2023) retrieve, at inference, the top-k earlier blocks of each query block by
their landmark keys and run the grouped softmax over those (``landmark_trained``,
:mod:`longattn.sparse.landmark`). The landmark keys — one key per block of ``block`` tokens — are
all that choosing needs, so the blocks themselves can live off the fast tier: this memory keeps
hot the landmark keys and the open block (the tokens since the last complete block), and every
closed block on the host, or on disk past ``host_tokens`` (``DiskTier``: memory-mapped
safetensors segments, written all or nothing).

One call, :meth:`LandmarkMemory.attend`, takes a chunk of new queries, keys and values (any
length, unrotated: the method lays out its own rotary positions) and returns the chunk's
attention output. It

1. scores every complete block's landmark (the stored ones and those completed inside the chunk)
   against the chunk's queries (``score_landmarks``) and keeps ``top_k`` blocks per query block and
   query head (``select_landmark_blocks``);
2. fetches the union of the kept *stored* blocks from the host or disk, and lays them out before
   the open block and the chunk (``[kept blocks][open block][chunk]``), the selection renumbered
   into that layout;
3. runs ``grouped_attention`` over that layout, then stores the chunk: blocks it completes leave
   the fast tier, their landmark keys stay.

Because selection is per query block from the queries it is given, the output equals
``landmark_trained`` (same ``block``, ``top_k``, ``local``) called with the same queries over the
whole context: bit for bit in float32 up to the order of additions (tested to 1e-5); a chunk of
whole blocks equals the method over the whole sequence for those queries. The hot tokens of a step
are the open block, the chunk and the fetched blocks: ``(top_k + 1)·block`` per query block and
head at most, whatever the context length.
"""

from __future__ import annotations

import math
import warnings

import torch

from longattn.memory.tiers import DiskTier
from longattn.sparse.landmark import grouped_attention, score_landmarks, select_landmark_blocks

Tensor = torch.Tensor


def _check_int(name: str, value, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


class LandmarkMemory:
    """One attention layer's memory for a model trained with landmark tokens (module docstring).

    Args:
        block: tokens per block, its landmark (the last slot) included; must match the model's
            training (the bundled landmark model: 64).
        top_k: earlier blocks each query block attends (``local`` nearest ones included).
        local: the nearest earlier blocks always kept.
        host_tokens: closed-block tokens the host may hold before the oldest blocks are written to
            disk (None: no disk tier).
        disk_dir: folder for the disk segments (default: a temporary folder removed with the memory).

    Use it as an attention block's state in :class:`longattn.train.LanguageModel` (one memory per
    layer: :func:`landmark_memories`), or call :meth:`attend` directly.
    """

    kind = "landmark"

    def __init__(self, *, block: int = 64, top_k: int = 4, local: int = 1, host_tokens: int | None = None,
                 disk_dir=None):
        self.block = _check_int("block", block, least=2)
        self.top_k = _check_int("top_k", top_k, least=1)
        self.local = _check_int("local", local, least=0)
        if local > top_k:
            raise ValueError(f"local={local} nearest blocks do not fit in top_k={top_k}")
        if host_tokens is not None:
            _check_int("host_tokens", host_tokens, least=0)
        self.host_tokens, self.disk_dir = host_tokens, disk_dir
        self.seen = 0
        self.tail_k: Tensor | None = None  # [B, Hkv, seen % block, D]: the open block, unrotated
        self.tail_v: Tensor | None = None
        self.landmarks: Tensor | None = None  # [B, Hkv, closed blocks, D]
        self.host: dict[int, tuple[Tensor, Tensor]] = {}  # block id -> (k, v) [B, Hkv, block, D]
        self.disk: DiskTier | None = None
        self.peak_hot_tokens = 0  # most tokens of k/v one step held on the fast tier
        self.fetched_blocks = 0  # blocks read from the host or disk, over all steps

    # ------------------------------------------------------------------ geometry
    @property
    def closed_blocks(self) -> int:
        return self.seen // self.block

    @property
    def fast_tokens(self) -> int:
        """Tokens of k/v on the fast tier between steps: the open block's (landmark keys apart)."""
        return 0 if self.tail_k is None else self.tail_k.shape[2]

    def nbytes(self) -> dict[str, int]:
        """Bytes of k/v per tier: ``fast`` (open block + landmark keys), ``host``, ``disk``."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()
        return {"fast": size(self.tail_k) + size(self.tail_v) + size(self.landmarks),
                "host": sum(size(k) + size(v) for k, v in self.host.values()),
                "disk": 0 if self.disk is None else self.disk.nbytes}

    # ------------------------------------------------------------------ the step
    def attend(self, q: Tensor, k_new: Tensor, v_new: Tensor, *, scale: float | None = None,
               position=None) -> Tensor:
        """Attention of ``q`` over everything stored plus the chunk, then store the chunk.

        Args:
            q: ``[B, Hq, T, D]``, the queries of the chunk's ``T`` tokens, unrotated.
            k_new, v_new: ``[B, Hkv, T, D]``, the chunk's keys and values, unrotated.
            scale: score scale (default ``D**-0.5``).
            position: the model's rotary encoding (``longattn.RoPE``), or None.

        Returns:
            ``[B, Hq, T, D]`` float32 (float64 for float64 inputs). No gradient is kept.
        """
        self._check(q, k_new, v_new)
        L = self.block
        b, hq, t, d = q.shape
        scale = d ** -0.5 if scale is None else float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        with torch.no_grad():
            c0 = self.closed_blocks
            region_k = k_new if self.tail_k is None else torch.cat([self.tail_k, k_new], 2)
            region_v = v_new if self.tail_v is None else torch.cat([self.tail_v, v_new], 2)
            n_new_closed = region_k.shape[2] // L
            new_landmarks = region_k[:, :, L - 1:n_new_closed * L:L]
            landmarks = new_landmarks if self.landmarks is None else torch.cat([self.landmarks, new_landmarks], 2)
            tk = self.seen + t
            scores = score_landmarks(q, landmarks, tk=tk, block=L, scale=scale, position=position)
            selection = select_landmark_blocks(scores, first_block=c0, top_k=self.top_k, local=self.local)
            stored = selection[(selection >= 0) & (selection < c0)]
            union = torch.unique(stored)  # sorted block ids to fetch
            pages = self._fetch(union.tolist())
            # renumber: fetched block i -> slot i, region block c0 + j -> slot len(union) + j
            n_union = union.numel()
            renum = torch.where(selection < c0, torch.searchsorted(union, selection.clamp(min=0)),
                                selection - c0 + n_union)
            renum = torch.where(selection < 0, selection, renum)
            ks = [k for k, _ in pages] + [region_k]
            vs = [v for _, v in pages] + [region_v]
            lay_k, lay_v = torch.cat(ks, 2), torch.cat(vs, 2)
            self.peak_hot_tokens = max(self.peak_hot_tokens, lay_k.shape[2])
            out, _ = grouped_attention(q, lay_k, lay_v, renum, block=L, scale=scale, position=position)
            self._store(region_k, region_v, new_landmarks, n_new_closed, c0)
            self.seen = tk
        return out

    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        for name, x in (("q", q), ("k_new", k), ("v_new", v)):
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            if not x.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {x.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k_new and v_new must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q {tuple(q.shape)} and k_new {tuple(k.shape)} must agree in batch, tokens and head_dim")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k_new's {k.shape[1]}")
        if q.shape[2] == 0:
            raise ValueError("the chunk is empty (T = 0): nothing to attend")
        ref = self.tail_k if self.tail_k is not None else self.landmarks
        if ref is not None and (ref.shape[0], ref.shape[1], ref.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(f"k_new {tuple(k.shape)} does not continue this memory's [B, Hkv, ·, D] = "
                             f"{(ref.shape[0], ref.shape[1], '·', ref.shape[3])}")
        if ref is not None and (ref.dtype, ref.device) != (k.dtype, k.device):
            raise ValueError(f"k_new is {k.dtype} on {k.device}; this memory holds {ref.dtype} on {ref.device}")
        for name, x in (("q", q), ("k_new", k), ("v_new", v)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} holds NaN or Inf: a stored non-finite key or value would reach "
                                 "every later step")

    def _fetch(self, blocks: list[int]) -> list[tuple[Tensor, Tensor]]:
        dev = (self.tail_k if self.tail_k is not None else self.landmarks).device if blocks else None
        on_disk = [p for p in blocks if p not in self.host]
        read = self.disk.read_many(on_disk, dev) if on_disk else {}
        self.fetched_blocks += len(blocks)
        return [(self.host[p][0].to(dev), self.host[p][1].to(dev)) if p in self.host else read[p] for p in blocks]

    def _store(self, region_k: Tensor, region_v: Tensor, new_landmarks: Tensor, n_closed: int, c0: int) -> None:
        L = self.block
        for j in range(n_closed):
            self.host[c0 + j] = (region_k[:, :, j * L:(j + 1) * L].detach().cpu().clone(),
                                 region_v[:, :, j * L:(j + 1) * L].detach().cpu().clone())
        self.landmarks = new_landmarks.detach().clone() if self.landmarks is None else \
            torch.cat([self.landmarks, new_landmarks.detach()], 2)
        self.tail_k = region_k[:, :, n_closed * L:].detach().clone()
        self.tail_v = region_v[:, :, n_closed * L:].detach().clone()
        self._spill()

    def _spill(self) -> None:
        """Write the oldest host blocks to disk while the host holds more than ``host_tokens``. A
        failed write loses nothing: the blocks stay on the host (a ``RuntimeWarning``)."""
        if self.host_tokens is None:
            return
        over = len(self.host) * self.block - self.host_tokens
        if over <= 0:
            return
        oldest = sorted(self.host)[:math.ceil(over / self.block)]
        if self.disk is None:
            self.disk = DiskTier(self.disk_dir)
        try:
            self.disk.write({p: self.host[p] for p in oldest})
        except (OSError, RuntimeError) as e:
            warnings.warn(f"landmark memory: writing {len(oldest)} blocks to disk failed ({e}); they stay on the "
                          "host", RuntimeWarning, stacklevel=3)
            return
        for p in oldest:
            del self.host[p]

    def close(self) -> None:
        """Remove the disk segments (also done when the memory is collected or at exit)."""
        if self.disk is not None:
            self.disk.close()


def landmark_memories(n_layers: int, **options) -> list[LandmarkMemory]:
    """One :class:`LandmarkMemory` per attention layer: the ``state`` list to pass to
    ``LanguageModel.forward`` (``options`` as for the memory)."""
    return [LandmarkMemory(**options) for _ in range(n_layers)]
