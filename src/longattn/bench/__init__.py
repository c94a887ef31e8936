"""Benchmarks: a reusable harness (timing, memory, correctness gate, FLOPs) and the suites
``longattn bench --suite NAME`` runs.

Suites are looked up by name in ``SUITES`` and imported only when asked for; ``all`` is the main
job (``longattn.bench.main``): every suite, then the combined report, plots and HTML page.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: suite name -> "module:function"; the function takes ``out_dir`` and keyword options.
SUITES: dict[str, str] = {
    "all": "longattn.bench.main:run_all",
    "kernels": "longattn.bench.kernels:run_kernels_suite",
    "sparse": "longattn.bench.sparse:run_sparse_suite",
    "decode": "longattn.bench.decode:run_decode_suite",
    "tasks": "longattn.bench.tasks:run_tasks_suite",
    "peers": "longattn.bench.peers:run_peers_suite",
    "memory": "longattn.bench.memory:run_memory_suite",
}


def get_suite(name: str) -> Callable[..., Any]:
    """The runner of a named suite; an unknown name raises ``ValueError`` listing the known ones."""
    target = SUITES.get(name)
    if target is None:
        known = ", ".join(sorted(SUITES))
        raise ValueError(f"unknown benchmark suite {name!r}; known suites: {known}")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


__all__ = ["SUITES", "get_suite"]
