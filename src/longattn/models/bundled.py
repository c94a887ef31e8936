"""The models that ship inside the package, found by one function each.

* ``stories260k()`` — the folder of stories260K, a real Llama-architecture language model
  (260K parameters, 5 layers, 8 query heads over 4 key-value heads, 512-token trained context)
  trained on TinyStories and published in the llama2.c format with its 512-piece tokenizer
  (MIT licence: ``weights/stories260K/LICENSE``; provenance: ``weights/stories260K/README.md``).
  ``$LONGATTN_STORIES260K`` may point at another copy of the same files.
* ``retrieval_tiny()`` — the folder of the tiny retrieval model trained by this project
  (``longattn.models.retrieval``).
* ``landmark_tiny()`` — the same model trained with landmark tokens (Landmark Attention).

Every file of stories260K is checked against its recorded size and SHA-256 before it is
returned, so a truncated download, a corrupted install or a different checkpoint under the same
name is a clear error instead of a model that quietly computes something else. The check reads
about 1 MB once per process (the result is cached by path, size and modification time).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"

#: environment variable that points at another folder holding the stories260K files
STORIES260K_ENV = "LONGATTN_STORIES260K"

#: file -> (bytes, sha256) of the stories260K checkpoint and tokenizer
STORIES260K_FILES: dict[str, tuple[int, str]] = {
    "stories260K.bin": (1_056_540, "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"),
    "tok512.bin": (6_227, "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"),
}

_verified: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _check_file(path: Path, size: int, digest: str, origin: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"stories260K: {path.name} is missing from {path.parent} ({origin})") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _verified.get(key) == digest:
        return
    if st.st_size != size:
        raise ValueError(f"stories260K: {path} has {st.st_size} bytes, expected {size} ({origin}); "
                         "the file is truncated or a different checkpoint")
    got = sha256_of(path)
    if got != digest:
        raise ValueError(f"stories260K: {path} has SHA-256 {got}, expected {digest} ({origin}); "
                         "the file is corrupted or a different checkpoint")
    _verified[key] = digest


def stories260k(verify: bool = True) -> Path:
    """The folder holding ``stories260K.bin`` and ``tok512.bin``.

    ``$LONGATTN_STORIES260K`` (a folder, or the ``stories260K.bin`` file inside it) takes
    precedence over the copy bundled with the package. With ``verify`` (the default) each file's
    size and SHA-256 must match the published checkpoint; a mismatch raises ``ValueError`` and a
    missing file ``FileNotFoundError``, each naming the file. To load some other llama2.c
    checkpoint, pass its path to ``longattn.hf.load_llama2c`` or
    ``longattn.models.llama2c.load_checkpoint`` instead.

    >>> (longattn.models.stories260k() / "stories260K.bin").stat().st_size
    1056540
    """
    env = os.environ.get(STORIES260K_ENV)
    if env:
        folder = Path(env).expanduser()
        if folder.is_file():
            folder = folder.parent
        origin = f"${STORIES260K_ENV}={env}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{origin} is not a folder; unset it to use the bundled copy")
    else:
        folder = WEIGHTS / "stories260K"
        origin = "the copy bundled with longattn"
    for name, (size, digest) in STORIES260K_FILES.items():
        path = folder / name
        if verify:
            _check_file(path, size, digest, origin)
        elif not path.exists():
            raise FileNotFoundError(f"stories260K: {name} is missing from {folder} ({origin})")
    return folder


def retrieval_tiny() -> Path:
    """The folder of the tiny retrieval model trained by this project (``model.safetensors`` and
    ``config.json``; ``longattn.models.retrieval.load`` reads it)."""
    return WEIGHTS / "retrieval-tiny"


def landmark_tiny() -> Path:
    """The folder of the tiny landmark model trained by this project: the retrieval model's size
    and recipe with a landmark token every 64 tokens, trained with ``landmark_trained``
    (``longattn.train.load_model`` reads it; inputs go through
    ``longattn.train.landmarks.with_landmarks``)."""
    return WEIGHTS / "landmark-tiny"
