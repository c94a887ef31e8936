"""Benchmarks: the harness (timing, memory, correctness gate, FLOPs), the suite declarations and
the runner they share (``longattn.bench.suite``), and the main job (``longattn.bench.main``).

Each suite is a ``Suite`` declaration in its own module, looked up by name in ``SUITES`` and
imported only when asked for. ``longattn bench`` runs the main job (every suite in ``MAIN_SUITES``,
then one report with plots); ``longattn bench --suite NAME`` runs one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from longattn.bench.suite import Suite

#: suite name -> module holding its ``SUITE`` declaration, in the main job's order
SUITES: dict[str, str] = {
    "kernels": "longattn.bench.kernels",
    "sparse": "longattn.bench.sparse",
    "decode": "longattn.bench.decode",
    "tasks": "longattn.bench.tasks",
    "peers": "longattn.bench.peers",
    "memory": "longattn.bench.memory",
    "recurrent": "longattn.bench.recurrent",
    "distributed": "longattn.bench.distributed",
    "trainable": "longattn.bench.trainable",
}

#: the suites of the main job, in the order they run (``distributed`` spawns process groups and runs
#: on its own: ``longattn bench --suite distributed``; ``trainable`` trains models: ``longattn bench
#: --suite trainable``)
MAIN_SUITES: tuple[str, ...] = tuple(n for n in SUITES if n not in ("distributed", "trainable"))


def get_suite(name: str) -> Suite:
    """The declaration of a named suite; an unknown name raises ``ValueError`` listing the known ones."""
    module = SUITES.get(name)
    if module is None:
        raise ValueError(f"unknown benchmark suite {name!r}; known suites: {', '.join(SUITES)} (or all)")
    return importlib.import_module(module).SUITE


__all__ = ["MAIN_SUITES", "SUITES", "get_suite"]
