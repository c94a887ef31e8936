"""Writing files so that a failed write never leaves a half-written file behind, and checking an
output location before any long work starts.

* ``atomic_write(path, write)`` — ``write(tmp)`` fills a temporary file in the same folder, which
  is flushed to disk and then renamed over ``path`` in one step (``os.replace``): a reader sees the
  old file or the new one, never a torn one, and a crash or an exception inside ``write`` keeps
  the old file (the temporary one is removed).
* ``atomic_write_text`` / ``atomic_write_json`` — the same for text and JSON (non-finite floats
  become the strings "inf", "-inf", "nan", so the file stays standard JSON).
* ``save_safetensors(path, tensors, metadata, what=...)`` — ``safetensors.torch.save_file``
  through ``atomic_write``; a failed write is an ``OSError`` (errno kept) naming ``path``.
* ``output_dir(path, option)`` / ``output_file(path, option)`` — a one-line ``ValueError`` naming
  the option when the place cannot be written (a file where a folder is wanted, a folder where a
  file is wanted, no permission), checked by actually creating a file there.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *,
                     what: str = "the file") -> Path:
    """Write ``tensors`` (``{name: tensor}``) and ``metadata`` to ``path`` as one safetensors file,
    atomically (``atomic_write``: on any failure the previous file stays whole and no temporary
    file is left); returns ``path``.

    Raises:
        OSError: the write failed (full disk, file-size limit, vanished folder, ...): the errno of
            the cause, a message ``"cannot write {what}: {cause}"`` and ``path`` as the filename.
            safetensors reports its I/O failures as ``SafetensorError("... (os error N)")``, not
            as ``OSError``; those become ``OSError`` with errno ``N`` too.
    """
    import safetensors.torch
    from safetensors import SafetensorError

    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, os.fspath(tmp), metadata=metadata))
    except OSError as exc:
        # the cause may name the temporary file; the caller knows only ``path``
        raise OSError(exc.errno, f"cannot write {what}: {exc.strerror or exc}", os.fspath(path)) from exc
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:  # not an I/O failure (a tensor safetensors cannot store): a caller's bug
            raise
        raise OSError(int(code.group(1)), f"cannot write {what}: {exc}", os.fspath(path)) from exc


def json_safe(x: Any) -> Any:
    """A copy of ``x`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats as
    strings, tensors and arrays as lists, paths and other objects as their ``str``."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return json_safe(x.tolist())
    return str(x)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see ``json_safe``)."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def _probe(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (an existing folder), or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".longattn-probe-", dir=folder)
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    return None


def _writable_folder(folder: Path, named: str, option: str) -> None:
    """Create ``folder`` (parents included) and check a file can be made in it; a problem is a
    ``ValueError`` starting ``option named:``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {named}: cannot create the folder {str(folder)!r} ({exc.strerror or exc})") from None
    problem = _probe(folder)
    if problem:
        raise ValueError(f"{option} {named}: {problem}")


def output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``path`` as a folder (parents included) and check it can be written, or raise a
    one-line ``ValueError`` naming ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file; expected a folder to write into")
    _writable_folder(path, repr(str(path)), option)
    return path


def output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that a file can be written at ``path`` (its folder is created), or raise a one-line
    ``ValueError`` naming ``option``. Nothing is written at ``path`` itself."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; expected a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(path.parent)!r} is a file, not a folder")
    _writable_folder(path.parent, repr(str(path)), option)
    return path
