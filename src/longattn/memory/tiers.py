"""Where a memory's pages live: the fast tier (the compute device), the host (CPU RAM) and disk.

Disk pages are written in segments, one safetensors file each (``k``, ``v``: ``[pages, B, H, P,
D]``, written by ``safetensors.torch.save_file``), and read back through a read-only memory map of
each tensor: a safetensors file is a JSON header followed by the raw little-endian arrays at the
offsets the header gives, a layout made for zero-copy mapping. Fetching pages reads only their
bytes, so a 128k-token context costs disk, not RAM, and a step that needs hundreds of scattered
pages (token retrieval) gathers them with one fancy index per segment — ``safe_open``'s
``get_slice`` takes ranges only, and one call per page cost ~75 µs, more than the bytes.

A segment is written atomically (a temporary file in the same folder, fsync, rename: a failed
write leaves no segment and changes nothing) under a name unique to its tier
(``segment-{tier id}-{n}.safetensors``), so tiers sharing a folder — every layer of a cache
given one ``disk_dir`` — never overwrite each other. A tier's segments go when it is closed or
garbage-collected, and at interpreter exit at the latest (``weakref.finalize``); a temporary
folder it made goes with them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

from longattn.files import save_safetensors

#: safetensors dtype -> (numpy dtype of the same width to map it with, torch dtype to view it as)
_DTYPES = {"F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
           "BF16": ("<i2", torch.bfloat16), "F64": ("<f8", torch.float64)}


def _map_tensors(path: Path) -> dict[str, tuple[np.memmap, torch.dtype]]:
    """Read-only memory maps of every tensor in a safetensors file: ``{name: (array, torch dtype)}``."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, torch_dtype = _DTYPES[info["dtype"]]
        start = info["data_offsets"][0]
        out[name] = (np.memmap(path, dtype=np_dtype, mode="r", offset=8 + n + start, shape=tuple(info["shape"])),
                     torch_dtype)
    return out


def _rows(mapped: tuple[np.memmap, torch.dtype], rows) -> torch.Tensor:
    """The given rows of a mapped tensor, copied into a torch tensor of its dtype."""
    arr, dtype = mapped
    return torch.from_numpy(np.array(arr[rows])).view(dtype)  # a copy: the map is read-only


def _remove_segments(folder: Path | None, segments: list[Path]) -> None:
    """A ``DiskTier``'s finalizer: its temporary ``folder`` if it made one, else its own ``segments``
    (holding no reference to the tier, so that it can run when the tier is collected)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    for path in segments:
        path.unlink(missing_ok=True)


class DiskTier:
    """Append-only page store on disk (memory-mapped safetensors segments, module docstring).

    Args:
        directory: the folder for the segments (created if missing; other tiers may share it), or
            None for a temporary folder of its own (``longattn-kv-*`` under ``tempfile.gettempdir()``).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        own = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="longattn-kv-")) if own else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prefix = f"segment-{uuid.uuid4().hex}-"
        self._paths: list[Path] = []  # per segment: its file
        self._segments: list[dict] = []  # per segment: {"k": mapped, "v": mapped}
        self.where: dict[int, tuple[int, int]] = {}  # page id -> (segment, row)
        self.nbytes = 0
        # runs once: at close(), when the tier is collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, _remove_segments, self.directory if own else None, self._paths)

    def write(self, pages: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write ``{page id: (k, v)}`` (each ``[B, H, P, D]``) as one new segment, all or nothing:
        when it raises, no file was added and the tier holds what it held.

        Raises:
            OSError: the segment could not be written (errno of the cause, the segment's path).
            TypeError: pages of a dtype the tier does not store.
            RuntimeError: the tier is closed.
        """
        if not self._finalizer.alive:
            raise RuntimeError(f"this disk tier ({self.directory}) is closed")
        if not pages:
            return
        ids = sorted(pages)
        k = torch.stack([pages[i][0].cpu() for i in ids])
        v = torch.stack([pages[i][1].cpu() for i in ids])
        if k.dtype not in [t for _, t in _DTYPES.values()]:
            raise TypeError(f"the disk tier stores float16/bfloat16/float32/float64 pages, got {k.dtype}")
        seg = len(self._segments)
        path = self.directory / f"{self._prefix}{seg:06d}.safetensors"
        save_safetensors(path, {"k": k.contiguous(), "v": v.contiguous()}, what="a disk-tier segment")
        try:
            mapped = _map_tensors(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._paths.append(path)
        self._segments.append(mapped)
        for row, i in enumerate(ids):
            self.where[i] = (seg, row)
        self.nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()

    def read(self, page: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ``(k, v)`` ``[B, H, P, D]``: only its rows are read from the mapped file."""
        return self.read_many([page], device)[page]

    def read_many(self, pages: list[int], device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{page: (k, v)}`` for many pages: one gather per segment of exactly their rows."""
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for p in pages:
            seg, row = self.where[p]
            by_segment.setdefault(seg, []).append((row, p))
        out = {}
        for seg, rows in by_segment.items():
            idx = [r for r, _ in rows]
            mapped = self._segments[seg]
            k, v = _rows(mapped["k"], idx).to(device), _rows(mapped["v"], idx).to(device)
            for i, (_, p) in enumerate(rows):
                out[p] = (k[i], v[i])
        return out

    def __contains__(self, page: int) -> bool:
        return page in self.where

    def __len__(self) -> int:
        return len(self.where)

    def close(self) -> None:
        """Forget every page and remove this tier's segments (and its temporary folder, if it made
        one; a folder given to it stays). The tier cannot be written again."""
        self._segments.clear()
        self.where.clear()
        self.nbytes = 0
        self._finalizer()
