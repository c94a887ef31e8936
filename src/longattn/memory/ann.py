"""Approximate-nearest-neighbour index over attention keys (RetrievalAttention's retrieval step).

RetrievalAttention (Liu et al. 2024, "RetrievalAttention: Accelerating Long-Context LLM Inference
via Vector Retrieval") keeps most of the KV cache in a vector index over the keys; at each decode
step the query retrieves the keys with the largest inner products ``q·k`` — those are the keys
that get nearly all of the softmax mass — and attention runs over the retrieved keys plus a static
window (sinks + recent tokens). ``KeyIndex`` is that index: ids in, top-k ids out.

Two ways to build the graph for maximum inner-product search (``space``)
----------------------------------------------------------------------
Inner product is not a metric (a key need not be its own best match; long keys are everyone's
best match), and graph indexes (HNSW) were designed for metrics. ``KeyIndex`` offers both
standard answers; the result is the top inner product either way, ``space`` only chooses the
geometry the HNSW graph is built and searched in.

``space="l2"`` — the MIPS→L2 reduction (Bachrach et al. 2014; Neyshabur & Srebro 2015). With a
bound ``M >= max_i ||k_i||``::

    key    k ∈ R^D  ->  k' = [k, sqrt(M² - ||k||²)]    (every k' has norm M)
    query  q ∈ R^D  ->  q' = [q, 0]

    ||q' - k'||² = ||q||² + M² - 2 q·k

``||q||²`` and ``M²`` are the same for every key, so the nearest k' in L2 is the key with the
largest ``q·k``: the reduction is exact, only the graph search is approximate, and the graph is
an ordinary L2 HNSW over ``D+1``-dim vectors.

*A growing index and the norm bound.* Keys arrive as tokens are decoded, and a later key can be
longer than every earlier one — then ``M² - ||k||²`` would be negative and the reduction would
break. ``KeyIndex`` fixes the bound at the first ``add`` with headroom, ``M = NORM_HEADROOM ·
max ||k||``. While new keys stay under it they are appended to the graph as they come. When a
batch exceeds it, ``M`` is raised to ``NORM_HEADROOM ·`` the new maximum and the graph is rebuilt
from the stored keys (every stored key's extra coordinate depends on ``M``). A rebuild happens
only when the largest norm grows past the bound, i.e. by more than the headroom factor since the
last (re)build, so fewer than ``log_{headroom}(final max norm / first max norm)`` of them occur;
``rebuilds`` counts them.

``space="ip"`` (default) — the graph is built directly under the inner product (faiss
``METRIC_INNER_PRODUCT``, hnswlib ``space="ip"``; the "ip-NSW" approach of Morozov & Babenko
2018). No norm bound is needed, so growing norms cost nothing: keys are always just appended.
It is ``KeyIndex``'s default because it measured far better on Gaussian data (faiss-cpu 1.15 / hnswlib 0.8, m=16,
ef_construction=100, ef_search=64, Gaussian keys and queries, D=64): recall@10 at n=5000 about
0.90-0.93 against 0.61-0.63 for the L2 reduction, recall@32 at n=100000 about 0.45-0.47 against
0.11-0.14; with later keys 10x longer, 1.00 against about 0.2 (``tests/test_ann.py``). Gaussian
keys in 64 dimensions are a hard case for any graph index; on 2 CPU cores the exact backend
searched 100 queries over 100000 keys in about 40 ms, against about 10 ms (ef_search=64) to
35 ms (ef_search=256, recall@32 about 0.81) for the graphs, which took 10-14 s to build.
Real attention keys reverse the verdict: they share a large common direction, the inner-product
graph left part of them out of reach (recall about 0.95 at any ``ef_search`` up to 1024 on
stories260K's keys, 0.75 with its real decode queries) while the L2 reduction reached 1.00 from
``ef_search=256`` (0.995-1.000 with the real queries) — so ``memory.retrieval`` builds ``"l2"``.

Either way the returned ids are re-ranked by their exact inner products (a ``[m, k, D]`` gather),
so every row is sorted by score, descending.

The query/key distribution gap
------------------------------
RetrievalAttention's observation is that attention queries and keys are out of distribution for
each other: a query's highest-inner-product keys are not near the query in the geometry the keys
span, so an index built over the keys alone (HNSW, IVF) must visit a large share of the keys to
keep recall high. The paper therefore builds its graph with the query distribution (edges drawn
from the exact top keys of sample prefill queries, projected onto the keys, as in RoarGraph). This
module is the simpler baseline: a key-only HNSW graph for MIPS. Its recall on real,
out-of-distribution decode queries can be lower than on the Gaussian data of the tests; raise
``ef_search`` (the recall/speed dial) or use ``backend="exact"`` where that matters.

Backends
--------
* ``"faiss"`` — ``faiss.IndexHNSWFlat`` (package ``faiss-cpu``).
* ``"hnswlib"`` — ``hnswlib.Index`` (package ``hnswlib``).
* ``"exact"`` — ``torch`` matmul and ``topk``: the oracle, and the fallback with no library.
* ``"auto"`` — faiss if importable, else hnswlib, else exact.

The libraries are imported lazily, inside ``KeyIndex``; they work on float32 numpy arrays on the
CPU (``pip install "longattn[ann]"`` installs both). Inputs of any float dtype or device are
copied to CPU float32; ids come back as an int64 tensor on the queries' device.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

__all__ = ["BACKENDS", "SPACES", "KeyIndex", "available_backends", "recall"]

BACKENDS = ("auto", "faiss", "hnswlib", "exact")
SPACES = ("ip", "l2")
_LIBRARY = {"faiss": "faiss", "hnswlib": "hnswlib"}      # backend name -> module to import
_PACKAGE = {"faiss": "faiss-cpu", "hnswlib": "hnswlib"}  # backend name -> PyPI package
_INSTALL_HINT = 'pip install "longattn[ann]"'

# Elements of one [queries, keys] score block of the exact backend (bounds its memory).
_EXACT_BLOCK = 1 << 24


def _import_library(backend: str):
    """Import the library behind ``backend``; ImportError naming the extra to install."""
    try:
        return importlib.import_module(_LIBRARY[backend])
    except ImportError as err:
        raise ImportError(
            f'KeyIndex backend="{backend}" needs the {_PACKAGE[backend]} package, which is not '
            f'installed: {_INSTALL_HINT} (or use backend="auto" / "exact")') from err


def available_backends() -> list[str]:
    """The backends usable here, in ``"auto"``'s order of preference (``"exact"`` always last)."""
    found = []
    for name in ("faiss", "hnswlib"):
        try:
            _import_library(name)
        except ImportError:
            continue
        found.append(name)
    return found + ["exact"]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class KeyIndex:
    """Top-k inner-product index over attention keys (RetrievalAttention, Liu et al. 2024).

    Keys are appended with ``add`` (ids are their insertion order, ``0 .. len-1``, across calls);
    ``search`` returns, per query, the ids of the ``k`` keys with the (approximately) largest
    ``q·k``, sorted by exact score, descending. See the module docstring for the two graph
    spaces (inner product directly, or the MIPS→L2 reduction) and how keys with growing norms
    are handled.

    Args:
        dim: key/query dimension ``D``.
        backend: ``"auto"`` (faiss, else hnswlib, else exact), ``"faiss"``, ``"hnswlib"`` or
            ``"exact"``. An explicitly named library that is not installed raises ImportError.
        m: HNSW graph degree (neighbours per node per layer; ``M`` in the HNSW paper).
        ef_construction: HNSW candidate-list size while inserting.
        ef_search: HNSW candidate-list size while searching (raised to ``k`` when smaller); the
            recall/speed dial.
        seed: seed of the HNSW level assignment (faiss and hnswlib). Multi-threaded insertion
            can still order the graph's construction differently between runs.
        space: geometry of the HNSW graph: ``"ip"`` (built under the inner product, default)
            or ``"l2"`` (L2 graph over MIPS→L2-augmented ``D+1``-dim keys). Ignored by
            ``"exact"``. Both return the top inner products.

    Attributes:
        backend: the backend in use (``"faiss"``, ``"hnswlib"`` or ``"exact"``; never ``"auto"``).
        dim: ``D``.
        norm_bound: the current ``M`` of the MIPS→L2 reduction (``None`` before the first add,
            and always for ``space="ip"`` and the exact backend).
        rebuilds: how many times a longer key forced the graph to be rebuilt.

    Example::

        index = KeyIndex(64)
        index.add(keys)                 # [n, 64]
        ids = index.search(q, k=32)     # [m, 32] LongTensor, best first
    """

    #: ``M`` is set to this multiple of the largest key norm seen when (re)building the graph.
    NORM_HEADROOM = 1.5

    def __init__(self, dim: int, backend: str = "auto", *, m: int = 16, ef_construction: int = 100,
                 ef_search: int = 64, seed: int = 0, space: str = "ip"):
        self.dim = _positive_int("dim", dim)
        self.m = _positive_int("m", m, minimum=2)
        self.ef_construction = _positive_int("ef_construction", ef_construction)
        self.ef_search = _positive_int("ef_search", ef_search)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        if not isinstance(space, str) or space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(map(repr, SPACES))}, got {space!r}")
        self.space = space
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self._lib = None
        if backend == "auto":
            self.backend = "exact"
            for name in ("faiss", "hnswlib"):
                try:
                    self._lib = _import_library(name)
                except ImportError:
                    continue
                self.backend = name
                break
        else:
            self.backend = backend
            if backend != "exact":
                self._lib = _import_library(backend)
        # every key, float32, in a buffer with geometric capacity (re-ranking and rebuilds)
        self._keys = np.empty((0, self.dim), dtype=np.float32)
        self._n = 0
        self._graph = None          # the faiss / hnswlib index
        self._capacity = 0          # hnswlib's max_elements
        self.norm_bound: float | None = None
        self.rebuilds = 0

    # -------------------------------------------------------------------------------- inputs
    def _as_matrix(self, x: Any, name: str) -> np.ndarray:
        """``x`` ([rows, D] tensor or array) as a C-contiguous float32 numpy array."""
        if isinstance(x, torch.Tensor):
            if x.is_complex() or x.dtype == torch.bool:
                raise ValueError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
            arr = x.detach().to(device="cpu", dtype=torch.float32).numpy()
        else:
            arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [rows, {self.dim}] (dim={self.dim}), "
                             f"got {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return np.ascontiguousarray(arr)

    # -------------------------------------------------------------------------------- public
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"KeyIndex(dim={self.dim}, backend={self.backend!r}, space={self.space!r}, n={self._n}, "
                f"m={self.m}, ef_construction={self.ef_construction}, ef_search={self.ef_search})")

    @property
    def keys(self) -> torch.Tensor:
        """The stored keys, ``[len, D]`` float32 on the CPU (a view: do not modify)."""
        return torch.from_numpy(self._keys[: self._n])

    def add(self, keys: torch.Tensor) -> None:
        """Append keys ``[n, D]``; they get ids ``len(self) .. len(self)+n-1``.

        May be called any number of times as tokens arrive. Keys are stored as float32 (on the
        CPU) and inserted into the graph; with ``space="l2"`` a key longer than the current norm
        bound triggers a rebuild of the graph instead (module docstring).
        """
        new = self._as_matrix(keys, "keys")
        n_new = new.shape[0]
        if n_new == 0:
            return
        start = self._n
        self._append(new)
        if self.backend == "exact":
            return
        if self.space == "ip":
            if self._graph is None:
                self._build()
            else:
                self._insert(self._keys[start:self._n], start)
            return
        top = float(np.sqrt(np.einsum("ij,ij->i", new, new, dtype=np.float64).max()))
        if self._graph is None or top > self.norm_bound:
            # first add, or a key longer than the bound: `top` is now the largest norm stored
            if self._graph is not None:
                self.rebuilds += 1
            self.norm_bound = self.NORM_HEADROOM * top if top > 0 else 1.0   # all-zero keys: any M > 0
            self._build()
        else:
            self._insert(self._vectors(self._keys[start:self._n]), start)

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Ids of the top-``k`` keys by inner product for each query.

        Args:
            queries: ``[m, D]``.
            k: keys wanted per query (>= 1).

        Returns:
            LongTensor ``[m, min(k, len(self))]`` on ``queries``' device: key ids, each row sorted
            by exact score ``q·k``, descending. With fewer than ``k`` keys stored every key is
            returned (``len(self)`` columns; 0 columns for an empty index). The graph backends
            are approximate: a row may miss some of the true top-k.
        """
        k = _positive_int("k", k)
        q = self._as_matrix(queries, "queries")
        device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        kk = min(k, self._n)
        if kk == 0 or q.shape[0] == 0:
            return torch.empty((q.shape[0], kk), dtype=torch.long, device=device)
        if self.backend == "exact":
            ids = self._search_exact(q, kk)
        else:
            ids = self._rerank(q, self._search_graph(q, kk))
        return torch.from_numpy(ids).to(device)

    # ------------------------------------------------------------------------- save / load
    def graph_state(self) -> np.ndarray | None:
        """The faiss graph serialized (``faiss.serialize_index``, a uint8 array), so that a saved
        memory reloads the very graph it searched; None for hnswlib and exact (``restore``
        rebuilds those) and for an empty index."""
        if self.backend != "faiss" or self._graph is None:
            return None
        return np.asarray(self._lib.serialize_index(self._graph))

    def restore(self, keys: torch.Tensor, graph: np.ndarray | None = None) -> None:
        """Make an empty index hold ``keys [n, D]`` (ids ``0 .. n-1``): reuse ``graph`` from
        ``graph_state`` when given (faiss), else build the graph over them as one ``add`` does."""
        if self._n:
            raise RuntimeError(f"restore needs an empty index, this one holds {self._n} keys")
        if graph is None or self.backend != "faiss":
            self.add(keys)
            return
        self._append(self._as_matrix(keys, "keys"))
        restored = self._lib.deserialize_index(np.ascontiguousarray(graph, dtype=np.uint8))
        if restored.ntotal != self._n or restored.d != (self.dim if self.space == "ip" else self.dim + 1):
            raise ValueError(f"saved graph holds {restored.ntotal} vectors of width {restored.d}, "
                             f"expected {self._n} keys of dim {self.dim} (space {self.space!r})")
        self._graph = restored
        if self.space == "l2":  # every stored vector has norm M: recover the bound from the graph
            first = np.asarray(restored.reconstruct(0), dtype=np.float64)
            self.norm_bound = float(np.sqrt(first @ first))

    # ------------------------------------------------------------------------------ storage
    def _append(self, new: np.ndarray) -> None:
        need = self._n + new.shape[0]
        if need > self._keys.shape[0]:
            grown = np.empty((max(need, 2 * self._keys.shape[0], 1024), self.dim), dtype=np.float32)
            grown[: self._n] = self._keys[: self._n]
            self._keys = grown
        self._keys[self._n:need] = new
        self._n = need

    def _vectors(self, keys: np.ndarray) -> np.ndarray:
        """Keys ``[n, D]`` as the graph stores them: themselves (``"ip"``), or ``[n, D+1]`` with
        ``sqrt(M² - ||k||²)`` appended so that every row has norm ``M`` (``"l2"``)."""
        if self.space == "ip":
            return keys
        sq = np.einsum("ij,ij->i", keys, keys, dtype=np.float64)
        extra = np.sqrt(np.maximum(self.norm_bound ** 2 - sq, 0.0))
        return np.ascontiguousarray(np.concatenate([keys, extra.astype(np.float32)[:, None]], axis=1))

    def _query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """Queries ``[m, D]`` as the graph searches with them: themselves (``"ip"``), or
        ``[m, D+1]`` with a zero appended (``"l2"``)."""
        if self.space == "ip":
            return queries
        return np.ascontiguousarray(np.pad(queries, ((0, 0), (0, 1))))

    # -------------------------------------------------------------------------------- graph
    def _build(self) -> None:
        """(Re)build the graph over every stored key (``"l2"``: under the current norm bound)."""
        lib = self._lib
        width = self.dim if self.space == "ip" else self.dim + 1
        if self.backend == "faiss":
            metric = lib.METRIC_INNER_PRODUCT if self.space == "ip" else lib.METRIC_L2
            graph = lib.IndexHNSWFlat(width, self.m, metric)
            graph.hnsw.efConstruction = self.ef_construction
            graph.hnsw.rng = lib.RandomGenerator(self.seed)
        else:
            graph = lib.Index(space=self.space, dim=width)
            self._capacity = max(1024, 2 * self._n)
            graph.init_index(max_elements=self._capacity, M=self.m,
                             ef_construction=self.ef_construction, random_seed=self.seed)
        self._graph = graph
        self._insert(self._vectors(self._keys[: self._n]), 0)

    def _insert(self, vectors: np.ndarray, start: int) -> None:
        """Add graph vectors (from ``_vectors``) whose ids are ``start .. start+len-1``."""
        vectors = np.ascontiguousarray(vectors)
        if self.backend == "faiss":
            self._graph.add(vectors)                  # faiss ids are sequential: start == ntotal
        else:
            end = start + vectors.shape[0]
            if end > self._capacity:
                self._capacity = max(end, 2 * self._capacity)
                self._graph.resize_index(self._capacity)
            self._graph.add_items(vectors, np.arange(start, end, dtype=np.int64))

    def _search_graph(self, q: np.ndarray, k: int) -> np.ndarray:
        """Candidate ids ``[m, k]`` from the graph (-1 where it found fewer than ``k``)."""
        vectors = self._query_vectors(q)
        ef = max(self.ef_search, k)
        if self.backend == "faiss":
            params = self._lib.SearchParametersHNSW()
            params.efSearch = ef
            _, ids = self._graph.search(vectors, k, params=params)
        else:
            self._graph.set_ef(ef)
            try:
                ids, _ = self._graph.knn_query(vectors, k=k)
            except RuntimeError:
                # hnswlib found fewer than k keys for some query (a graph region it could not
                # leave); mark every row short so that _rerank answers them exactly
                ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        return ids.astype(np.int64, copy=False)

    def _rerank(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Sort each row of candidate ids by exact ``q·k``, descending. Rows the graph left short
        (id -1: it found fewer than ``k`` keys, possible on tiny or degenerate graphs) are
        answered exactly."""
        short = (ids < 0).any(axis=1)
        if short.any():
            ids = ids.copy()
            ids[short] = self._search_exact(q[short], ids.shape[1])
        scores = np.einsum("mkd,md->mk", self._keys[ids], q)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1)

    # -------------------------------------------------------------------------------- exact
    def _search_exact(self, q: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k by ``torch`` matmul + topk, in query blocks of bounded size."""
        keys = torch.from_numpy(self._keys[: self._n])
        qt = torch.from_numpy(q)
        rows = max(1, _EXACT_BLOCK // self._n)
        out = [torch.topk(qt[i:i + rows] @ keys.T, k, dim=1, sorted=True).indices
               for i in range(0, qt.shape[0], rows)]
        return torch.cat(out).numpy()


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Recall of ``found`` ids ``[m, k']`` against true top-k ids ``truth`` ``[m, k]``: the mean
    fraction of each row of ``truth`` present in the same row of ``found``."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"found and truth must have the same rows, got {found.shape[0]} and "
                         f"{truth.shape[0]}")
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / max(1, truth.numel())
