"""Real English sentences and natural text available offline, for analysis inputs.

* :func:`stdlib_sentences` — prose sentences from the docstrings of Python's standard library
  (text that ships with every Python, written by people, not generated), used for the MiniLM
  What-Does-BERT-Look-At analysis.
* :func:`stories` — stories260K's own sampled TinyStories-style text (token ids).
"""

from __future__ import annotations

import importlib
import inspect
import re

import torch

#: standard-library modules whose docstrings are mostly prose
_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
            "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext",
            "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io",
            "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes", "operator", "os",
            "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve",
            "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
            "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
            "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile", "zoneinfo")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'\-()]+[a-z][.!?]$")


def stdlib_sentences(n: int = 300, *, min_words: int = 6, max_words: int = 30) -> list[str]:
    """Up to ``n`` distinct prose sentences (``min_words`` … ``max_words`` words, letters and light
    punctuation only — no code) from standard-library docstrings, in a fixed order (the same on
    every machine with the same Python)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[str] = set()
    out: list[str] = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module missing from a trimmed Python
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                for sent in _SPLIT.split(text):
                    words = sent.split()
                    if min_words <= len(words) <= max_words and _PROSE.match(sent) and sent not in seen:
                        seen.add(sent)
                        out.append(sent)
                        if len(out) >= n:
                            return out
    return out


def stories(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` int64: stories260K's own sampled stories, BOS-separated (stories260K's
    vocabulary)."""
    from longattn.bench.tasks import stories_text

    return stories_text(n_tokens, seed)[1]
