"""Saving a memory to one safetensors file and loading it back (prompt reuse).

The file holds every layer's tensors (``layer{i}.{name}``) and, in the safetensors metadata, a
JSON description (format version, the model fingerprint, each layer's configuration) and a
SHA-256 over that description and every tensor's name, dtype, shape and bytes. ``load`` recomputes
the digest before using anything and refuses a file whose digest differs (tampered or corrupt),
and refuses a file made for another model or another memory configuration, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

FORMAT = "longattn-kv-memory/1"


def _digest(tensors: dict[str, torch.Tensor], description: str) -> str:
    h = hashlib.sha256(description.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path: str | os.PathLike, layers: list[tuple[dict[str, torch.Tensor], dict]], fingerprint: dict[str, Any]) -> str:
    """Write ``layers`` (each ``(tensors, meta)`` from a layer memory's ``state()``) to ``path``;
    returns the SHA-256 recorded in the file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for i, (ts, meta) in enumerate(layers):
        metas.append(meta)
        for name, t in ts.items():
            tensors[f"layer{i}.{name}"] = t.detach().cpu().contiguous()
    description = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "layers": metas}, sort_keys=True)
    digest = _digest(tensors, description)
    from longattn.files import atomic_write

    atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata={"longattn": description, "sha256": digest}))
    return digest


def load(path: str | os.PathLike, fingerprint: dict[str, Any]) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Read a file written by ``save``; verifies the checksum and the fingerprint first.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a longattn memory, checksum mismatch, or made for another model.
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
    if info.get("format") != FORMAT:
        raise ValueError(f"{path!r} has format {info.get('format')!r}, expected {FORMAT!r}")
    theirs = info["fingerprint"]
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path!r} was saved from a different model or cache ({detail}); refusing to load it")
    out = []
    for i, meta in enumerate(info["layers"]):
        prefix = f"layer{i}."
        out.append(({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}, meta))
    return out
