"""Where a memory's pages live: the fast tier (the compute device), the host (CPU RAM) and disk.

Disk pages are written in segments, one safetensors file each (``k``, ``v``: ``[pages, B, H, P,
D]``), and read back through safetensors' memory-mapped ``safe_open``: fetching a page reads only
that page's bytes from the file, so a 128k-token context costs disk, not RAM.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class DiskTier:
    """Append-only page store on disk (memory-mapped safetensors segments)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._own = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="longattn-kv-")) if directory is None else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._handles: list = []  # safe_open handles, one per segment
        self.where: dict[int, tuple[int, int]] = {}  # page id -> (segment, row)
        self.nbytes = 0

    def write(self, pages: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write ``{page id: (k, v)}`` as one new segment."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        if not pages:
            return
        ids = sorted(pages)
        k = torch.stack([pages[i][0].cpu() for i in ids])
        v = torch.stack([pages[i][1].cpu() for i in ids])
        seg = len(self._handles)
        path = self.directory / f"segment-{seg:06d}.safetensors"
        save_file({"k": k.contiguous(), "v": v.contiguous()}, str(path))
        self._handles.append(safe_open(str(path), framework="pt"))
        for row, i in enumerate(ids):
            self.where[i] = (seg, row)
        self.nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()

    def read(self, page: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Page ``(k, v)`` ``[B, H, P, D]``: only its rows are read from the mapped file."""
        seg, row = self.where[page]
        f = self._handles[seg]
        return f.get_slice("k")[row:row + 1][0].to(device), f.get_slice("v")[row:row + 1][0].to(device)

    def read_many(self, pages: list[int], device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{page: (k, v)}`` for many pages: one read per segment, of the row span they cover
        (a retrieval step touches hundreds of pages; one slice each cost more than the bytes)."""
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for p in pages:
            seg, row = self.where[p]
            by_segment.setdefault(seg, []).append((row, p))
        out = {}
        for seg, rows in by_segment.items():
            lo, hi = min(r for r, _ in rows), max(r for r, _ in rows) + 1
            f = self._handles[seg]
            k, v = f.get_slice("k")[lo:hi].to(device), f.get_slice("v")[lo:hi].to(device)
            for r, p in rows:
                out[p] = (k[r - lo], v[r - lo])
        return out

    def __contains__(self, page: int) -> bool:
        return page in self.where

    def __len__(self) -> int:
        return len(self.where)

    def close(self) -> None:
        self._handles.clear()
        if self._own:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self):  # temporary segments go with the memory
        try:
            self.close()
        except Exception:
            pass
