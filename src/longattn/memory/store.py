"""Saving a memory to one safetensors file and loading it back (prompt reuse).

The file holds every layer's tensors (``layer{i}.{name}``) and, in the safetensors metadata, a
JSON description (format version, the model fingerprint, each layer's configuration) and a
SHA-256 over that description and every tensor's name, dtype, shape and bytes. ``load`` recomputes
the digest before using anything and refuses a file whose digest differs, and refuses a file made
for another model or another memory configuration, naming what differs. The digest is unkeyed: it
catches accidental corruption (a torn copy, flipped bits), not deliberate tampering — whoever can
edit the file can recompute it. So each memory's ``load_state`` also checks every field against
itself before it changes anything (``SavedLayer``): shapes, dtypes, counts, ranges, finiteness.

``save`` writes through a temporary file renamed over ``path`` (``files.save_safetensors``): a
failed or killed save keeps the previous file, and a failed write is an ``OSError`` naming ``path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

from longattn.files import save_safetensors

FORMAT = "longattn-kv-memory/1"


def _digest(tensors: dict[str, torch.Tensor], description: str) -> str:
    h = hashlib.sha256(description.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path: str | os.PathLike, layers: list[tuple[dict[str, torch.Tensor], dict]], fingerprint: dict[str, Any]) -> str:
    """Write ``layers`` (each ``(tensors, meta)`` from a layer memory's ``state()``) to ``path``,
    atomically; returns the SHA-256 recorded in the file.

    Raises:
        OSError: the file could not be written (errno of the cause, ``path`` named); the previous
            file at ``path``, if any, is untouched and no temporary file is left.
    """
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for i, (ts, meta) in enumerate(layers):
        metas.append(meta)
        for name, t in ts.items():
            tensors[f"layer{i}.{name}"] = t.detach().cpu().contiguous()
    description = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "layers": metas}, sort_keys=True)
    digest = _digest(tensors, description)
    save_safetensors(path, tensors, {"longattn": description, "sha256": digest}, what="the KV memory")
    return digest


def load(path: str | os.PathLike, fingerprint: dict[str, Any]) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Read a file written by ``save``; verifies the checksum and the fingerprint first. Returns
    ``[(tensors, meta)]`` per layer, for the layer memories' ``load_state`` (which check the fields).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a longattn memory, checksum mismatch, made for another model, or tensors
            that belong to no layer.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved memory at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise ValueError(f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    description, recorded = header.get("longattn"), header.get("sha256")
    if description is None or recorded is None:
        raise ValueError(f"{path!r} is not a longattn KV memory (no 'longattn' description or 'sha256' in its metadata)")
    actual = _digest(tensors, description)
    if actual != recorded:
        raise ValueError(f"{path!r} failed its checksum (recorded sha256 {recorded[:16]}…, contents give "
                         f"{actual[:16]}…): the file was modified or is corrupt; refusing to load it")
    info = json.loads(description)
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise ValueError(f"{path!r} has format {found!r}, expected {FORMAT!r}")
    theirs = info.get("fingerprint")
    if not isinstance(theirs, dict):
        raise ValueError(f"{path!r} has a fingerprint of type {type(theirs).__name__}, expected a dict")
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path!r} was saved from a different model or cache ({detail}); refusing to load it")
    metas = info.get("layers")
    if not isinstance(metas, list) or not all(isinstance(m, dict) for m in metas):
        raise ValueError(f"{path!r} describes its layers as {type(metas).__name__}, expected a list of dicts")
    out = [({}, meta) for meta in metas]
    for name, t in tensors.items():
        m = re.fullmatch(r"layer(0|[1-9][0-9]*)\.(.+)", name)
        if m is None or int(m[1]) >= len(out):
            raise ValueError(f"{path!r} holds a tensor {name!r} of no layer; expected names layer0.* .. "
                             f"layer{len(out) - 1}.*")
        out[int(m[1])][0][m[2]] = t
    return out


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SavedLayer:
    """One layer of a saved memory (``tensors, meta`` from ``load``), read field by field by the
    memory's ``load_state``, every field checked before the memory changes anything.

    A problem is a ``ValueError`` naming the field, what it holds and what was expected; the
    memory sets ``context`` to what the expectations follow from (``" (seen=299, page=16)"``). In
    a shape a dimension given by name (``"B"``, ``"D"``) takes its size from its first use, or from
    ``dims`` set beforehand, and must agree after; None is any size. A dtype given by name
    (``"kv"``) is a float dtype that every tensor naming it shares. ``finish`` refuses the tensors
    nothing read.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.tensors, self.meta = tensors, meta
        self.dims: dict[str, int] = {}
        self.context = ""
        self._dtypes: dict[str, tuple[str, torch.dtype]] = {}  # dtype name -> (first tensor, its dtype)
        self._read: set[str] = set()

    def count(self, key: str) -> int:
        """The metadata field ``key``: a non-negative integer."""
        value = self.meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is {value!r}, expected a non-negative integer")
        return value

    def _shape(self, shape) -> str:
        named = lambda d: d if d not in self.dims else f"{d}={self.dims[d]}"  # noqa: E731
        return "(" + ", ".join("any" if d is None else named(d) if isinstance(d, str) else str(d) for d in shape) + ")"

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype | str, *, finite: bool = False,
               optional: bool = False) -> torch.Tensor | None:
        """The tensor ``name``, checked: ``shape`` (ints, dimension names, None), ``dtype`` (a torch
        dtype or a name, class docstring), every value finite if ``finite``. None when it is absent
        and ``optional``."""
        t = self.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ValueError(f"{name} is missing from the saved memory, expected a tensor of shape "
                             f"{self._shape(shape)}{self.context}")
        self._read.add(name)
        if isinstance(dtype, str):
            first, want = self._dtypes.setdefault(dtype, (name, t.dtype))
            if t.dtype not in _FLOATS:
                raise ValueError(f"{name} has dtype {t.dtype}, expected one of {', '.join(map(str, _FLOATS))}")
            if t.dtype != want:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {want} (the dtype of {first})")
        elif t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
        wanted = [self.dims.get(d) if isinstance(d, str) else d for d in shape]
        if t.dim() != len(shape) or any(w is not None and t.shape[i] != w for i, w in enumerate(wanted)):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {self._shape(shape)}{self.context}")
        for i, d in enumerate(shape):
            if isinstance(d, str):
                self.dims.setdefault(d, t.shape[i])
        if finite:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{name} holds non-finite values (NaN or inf) in {bad} of its {t.numel()} elements, "
                                 "expected only finite values")
        return t

    def finish(self) -> None:
        """Refuse the tensors that no ``tensor`` call read."""
        extra = sorted(set(self.tensors) - self._read)
        if extra:
            raise ValueError(f"unexpected tensors {extra} in the saved memory{self.context}; expected only "
                             f"{sorted(self._read)}")
