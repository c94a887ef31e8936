"""RetrievalAttention over the paged memory: each query finds its own keys in a vector index.

RetrievalAttention (Liu et al. 2024) keeps the long middle of the KV cache out of the attention
step and, per decode step, retrieves from an approximate-nearest-neighbour index the keys with
the largest ``q·k`` — the few that carry nearly all of the softmax mass — then attends over those
plus a static part (attention sinks and the recent window). Unlike block retrieval (Quest,
InfLLM, LongHeads: ``PagedMemory``), the unit is one token, found by its own key rather than by a
page summary.

``RetrievalMemory`` is a ``PagedMemory`` (same pages, tiers, summaries, positions and save/load)
whose middle of the layout is chosen this way. One step for a chunk of ``L`` queries lays out,
per (row, key head)::

    [sink pages][`retrieve` retrieved tokens, in order][recent window][the chunk]

Retrieval, per (row, key head) with ``g`` query heads: the ``retrieve`` candidate keys with the
best exact ``q·k`` over the chunk's ``g·L`` queries are kept. A decode step (``L = 1``) finds them
through the head's ``KeyIndex``: each of the ``g`` queries asks it for its top-``retrieve`` keys
and the union is ranked by that best score. A chunk of several queries (prefill) ranks every
candidate exactly instead (``exact_chunks``, default): one ``[g·L, candidates]`` product is far
cheaper than thousands of graph searches — measured here, a 2048-token chunk of a tiny Llama
over 16k candidates took 0.74 s per key head in faiss at ``retrieve=512`` — and RetrievalAttention
itself runs full attention at prefill and uses its index for decoding. Keys enter the index when they leave the recent window
(the candidate region ``[sink pages, window)`` of ``PagedMemory``), so the index covers exactly
the tokens that can be retrieved. With no more candidates than ``retrieve`` every candidate is
taken and the step is exact, as in ``PagedMemory``.

The index stores float32 keys on the host beside the pages (what the graph search and the exact
re-ranking read); its bytes are reported under ``index`` in ``nbytes``. Its ids are positions
within the candidate region; tokens that are padding can be retrieved but are masked in the step,
so they only cost a slot. Keys are indexed as the model produced them (rotated at their original
positions): retrieval ranks by the real ``q·k``, and with ``positions='cache'`` the retrieved keys
are then moved to their slots in the layout like every other kept key.

The graph is built in the MIPS→L2 reduction (``space="l2"``) by default. Real attention keys
share a large common direction (stories260K layer 2: mean key norm 16, norm of the mean key 12),
and a graph built directly under the inner product leaves part of them unreachable: on stories260K
reading 2,304 tokens with 64 retrieved tokens per step, recall against exact ranking was 0.735
(faiss) and 0.76 (hnswlib) under ``"ip"`` and barely moved with ``ef_search`` (0.753 at 256), against
0.995 at ``ef_search=64`` and 1.000 from 128 under ``"l2"`` (both libraries). Gaussian test keys
show the opposite (``memory.ann``), which is why ``KeyIndex`` itself keeps ``"ip"``.

Save and load keep the pages; the index is saved too for faiss (``faiss.serialize_index``) so a
reloaded memory searches the same graph, and rebuilt from the stored keys for ``exact`` (the
same answer by construction) and ``hnswlib`` (whose graph can then differ from the original; its
answers are approximate either way). A load builds the indexes before it changes anything, so a
file the index refuses leaves the memory as it was.

The index cannot hold a non-finite key, and a key enters it only once it leaves the window, steps
after it was stored: ``attend`` refuses a chunk with a NaN or infinite key up front (ValueError)
rather than store it and fail at every later step (as every memory does: ``check_finite_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longattn.memory.ann import KeyIndex
from longattn.memory.paged import PagedMemory
from longattn.memory.policies import _positive_int
from longattn.memory.rotation import KeyRotation
from longattn.memory.store import SavedLayer


class RetrievalMemory(PagedMemory):
    """One layer's paged memory with per-token RetrievalAttention (module docstring).

    Args:
        n_kv_heads: key heads of the layer.
        rotation: the model's ``KeyRotation`` (None: no RoPE).
        retrieve: tokens retrieved per (row, key head) for each chunk.
        page: tokens per page (the storage and tiering unit; sinks and window are whole pages).
        sinks, window, host_tokens, disk_dir, positions: as for ``PagedMemory``.
        backend, m, ef_construction, ef_search, space, seed: the ``KeyIndex`` of each (row, key
            head) (``backend="auto"``: faiss, else hnswlib, else exact). ``space`` defaults to
            ``"l2"`` here, unlike ``KeyIndex``: on real attention keys the MIPS→L2 graph found the
            exact choice and the inner-product graph did not (module docstring).
        exact_chunks: rank the candidates exactly for chunks of more than one query (default);
            False sends every query of a chunk through the index.
        measure_recall: also rank every candidate exactly at each retrieval and count how many of
            the exact choice the index found (``recall``; costs a ``[g·L, candidates]`` product per
            row and key head; chunks ranked exactly are not counted). Settable later.

    Attributes:
        recall_hits, recall_total: retrieved tokens that the exact ranking also chose, and tokens
            retrieved, summed over the steps measured (``recall`` is their ratio).
    """

    kind = "retrieval"

    def __init__(self, n_kv_heads: int, rotation: KeyRotation | None, *, retrieve: int = 256, page: int = 64,
                 sinks: int = 64, window: int = 256, host_tokens: int | None = None, disk_dir=None,
                 positions: str = "cache", backend: str = "auto", m: int = 16, ef_construction: int = 100,
                 ef_search: int = 64, space: str = "l2", seed: int = 0, exact_chunks: bool = True,
                 measure_recall: bool = False):
        self.exact_chunks = bool(exact_chunks)
        self.measure_recall = bool(measure_recall)
        self.recall_hits = self.recall_total = 0
        self.retrieve = _positive_int("retrieve", retrieve, allow_zero=True)
        # validated (and the backend resolved, so a missing library fails here, not mid-prefill)
        probe = KeyIndex(1, backend, m=m, ef_construction=ef_construction, ef_search=ef_search, space=space, seed=seed)
        self.index_options = {"backend": probe.backend, "m": m, "ef_construction": ef_construction,
                              "ef_search": ef_search, "space": space, "seed": seed}
        super().__init__(n_kv_heads, rotation, page=page, sinks=sinks, window=window, topk=0, score="quest",
                         host_tokens=host_tokens, disk_dir=disk_dir, positions=positions)

    def _reset(self) -> None:
        super()._reset()
        self.indexes: list[list[KeyIndex]] | None = None  # [row][key head]
        self.indexed = 0  # tokens [sink pages·page, indexed) are in the indexes

    # ------------------------------------------------------------------ retrieval
    @property
    def retrieved_tokens(self) -> int:
        return self.retrieve

    def _choose(self, q: torch.Tensor, s_end: int, c_end: int, n: int, scale: float) -> torch.Tensor:
        """``[B, H, n]`` increasing token ids in ``[s_end, c_end)``: per (row, key head) the ``n``
        candidates with the best ``q·k`` over the chunk's queries — exactly for a chunk of several
        queries (``exact_chunks``), else through the index (module docstring)."""
        b, hq, lq, d = q.shape
        h = self.n_kv_heads
        if self.indexed != c_end:  # an invariant of _store; never expected
            raise RuntimeError(f"index covers tokens up to {self.indexed}, candidates end at {c_end}")
        qg = q.detach().to("cpu", torch.float32).reshape(b, h, hq // h * lq, d)
        exact = self.exact_chunks and lq > 1
        tokens = torch.empty(b, h, n, dtype=torch.long, device=qg.device)
        for r in range(b):
            for head in range(h):
                index, queries = self.indexes[r][head], qg[r, head]
                if exact:
                    tokens[r, head] = self._exact_top(index, queries, n).sort().values
                    continue
                tokens[r, head] = self._top_tokens(index, queries, n)
                if self.measure_recall:
                    self._count_recall(index, queries, tokens[r, head], n)
        return tokens.add_(s_end).to(q.device)

    @staticmethod
    def _top_tokens(index: KeyIndex, queries: torch.Tensor, kk: int) -> torch.Tensor:
        """``[kk]`` increasing index ids: the union of each query's top-``kk`` keys, ranked by the
        best exact ``q·k`` over the queries."""
        ids = index.search(queries, kk)  # [Q, kk], each row best first
        if ids.shape[0] == 1:
            return ids[0].sort().values
        hit = torch.zeros(len(index), dtype=torch.bool, device=ids.device)
        hit[ids.reshape(-1)] = True  # cheaper than torch.unique for a few thousand ids
        union = hit.nonzero()[:, 0]
        best = (queries @ index.keys[union].T).amax(0)  # [U]
        return union[best.topk(kk).indices].sort().values

    @staticmethod
    def _exact_top(index: KeyIndex, queries: torch.Tensor, kk: int) -> torch.Tensor:
        """``[kk]`` ids of the keys with the best ``q·k`` over ``queries [Q, D]``, exactly, in key
        blocks so that the score block stays near 16M elements."""
        keys = index.keys
        block = max(kk, (1 << 24) // max(1, queries.shape[0]))
        best = torch.cat([(queries @ keys[i:i + block].T).amax(0) for i in range(0, keys.shape[0], block)])
        return best.topk(kk).indices

    def _count_recall(self, index: KeyIndex, queries: torch.Tensor, found: torch.Tensor, kk: int) -> None:
        """Add to the recall counters: ``found`` ids against the exact top-``kk`` by the same rule."""
        exact = self._exact_top(index, queries, kk)
        hit = torch.zeros(len(index), dtype=torch.bool, device=exact.device)
        hit[exact] = True
        self.recall_hits += int(hit[found].sum())
        self.recall_total += kk

    @property
    def recall(self) -> float | None:
        """Share of the exactly-chosen tokens the index retrieved, over the measured steps (None
        when nothing was measured: ``measure_recall`` off, or every step exact)."""
        return self.recall_hits / self.recall_total if self.recall_total else None

    # ------------------------------------------------------------------ storage
    def _store(self, k_new, v_new, ok_ext) -> None:
        super()._store(k_new, v_new, ok_ext)
        self._index_upto(self._regions(self.seen)[1])

    def _index_upto(self, c_end: int) -> None:
        """Add the keys of tokens ``[indexed, c_end)`` — those that just left the window — to the
        (row, key head) indexes, creating them at the first call."""
        b = self.ok.shape[0]
        if self.indexes is None:
            self._new_indexes()
        if c_end <= self.indexed:
            return
        keys = self._index_keys(c_end)
        for r in range(b):
            for head in range(self.n_kv_heads):
                self.indexes[r][head].add(keys[r, head])
        self.indexed = c_end

    def _new_indexes(self) -> None:
        """Empty indexes for every (row, key head); candidates start after the sink pages."""
        d = self.summaries.sums.shape[-1]
        self.indexes = [[KeyIndex(d, **self.index_options) for _ in range(self.n_kv_heads)]
                        for _ in range(self.ok.shape[0])]
        self.indexed = self.sink_pages * self.page

    def _index_keys(self, end: int) -> torch.Tensor:
        """Keys ``[B, H, n, D]`` (CPU float32) of tokens ``[indexed, end)``, as the index stores them."""
        return self._range(self.indexed, end)[0].detach().to("cpu", torch.float32)

    # ------------------------------------------------------------------ reporting
    def nbytes(self) -> dict[str, int]:
        out = super().nbytes()
        out["index"] = 0 if self.indexes is None else sum(len(ix) * ix.dim * 4 for row in self.indexes for ix in row)
        return out

    def describe(self) -> dict:
        return {"page": self.page, "sinks": self.sinks, "window": self.window, "retrieve": self.retrieve,
                "exact_chunks": self.exact_chunks, **self.index_options}

    # ------------------------------------------------------------------ save / load
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        meta["indexed"] = self.indexed
        for r, row in enumerate(self.indexes or []):
            for head, ix in enumerate(row):
                saved = ix.graph_state()
                if saved is not None:
                    tensors[f"index.{r}.{head}"] = torch.from_numpy(saved)
        return tensors, meta

    def stage_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> Callable[[], None]:
        """``PagedMemory.stage_state``, with ``indexed`` checked and the indexes built (faiss: from
        the saved graphs) before anything changes."""
        saved = self._saved(tensors, meta)
        parts = self._read_pages(saved, device)
        graphs = self._read_graphs(saved, parts)
        saved.finish()
        indexes, indexed = self._build_indexes(parts, graphs)

        def install() -> None:
            self._install(parts, device)
            self.indexes, self.indexed = indexes, indexed
        return install

    def _read_graphs(self, saved: SavedLayer, parts: dict) -> dict[tuple[int, int], torch.Tensor]:
        """Check ``indexed`` (the tokens that have left the window, a function of ``seen``) and read
        the saved faiss graphs: ``{(row, key head): uint8 [bytes]}``."""
        seen = parts["seen"]
        want = 0 if seen == 0 else max(self.sink_pages * self.page, self._regions(seen)[1])
        got = saved.count("indexed")
        if got != want:
            raise ValueError(f"indexed is {got}, expected {want} (sink pages and the tokens that have left the "
                             f"window, for seen={seen}, page={self.page}, sinks={self.sinks}, window={self.window})")
        if seen == 0 or self.index_options["backend"] != "faiss":  # only faiss graphs are saved
            return {}
        graphs = {}
        for r in range(parts["ok"].shape[0]):
            for head in range(self.n_kv_heads):
                blob = saved.tensor(f"index.{r}.{head}", (None,), torch.uint8, optional=True)
                if blob is not None:
                    graphs[r, head] = blob
        return graphs

    def _build_indexes(self, parts: dict, graphs: dict) -> tuple[list[list[KeyIndex]] | None, int]:
        """``(indexes [row][key head], indexed)`` over the keys of tokens ``[sink pages·page,
        indexed)`` — whole pages of ``parts`` — as ``_index_upto`` would have built them."""
        seen = parts["seen"]
        if seen == 0:
            return None, 0
        b, h, d = parts["ok"].shape[0], self.n_kv_heads, parts["tail_k"].shape[-1]
        start = self.sink_pages * self.page
        end = max(start, self._regions(seen)[1])
        if end > start:  # [n, B, H, page, D] -> [B, H, n·page, D]
            keys = parts["pages_k"][start // self.page:end // self.page].permute(1, 2, 0, 3, 4)
            keys = keys.reshape(b, h, end - start, d).to(torch.float32)
        else:
            keys = torch.zeros(b, h, 0, d, device=parts["tail_k"].device)
        indexes = [[KeyIndex(d, **self.index_options) for _ in range(h)] for _ in range(b)]
        for r, row in enumerate(indexes):
            for head, ix in enumerate(row):
                blob = graphs.get((r, head))
                try:
                    ix.restore(keys[r, head], None if blob is None else blob.numpy())
                except (RuntimeError, ValueError) as exc:  # faiss cannot read the blob, or it holds other keys
                    if blob is None:
                        raise
                    raise ValueError(f"index.{r}.{head} is not a faiss graph of the saved keys ({exc}); expected "
                                     f"the graph over the {end - start} indexed keys of row {r}, key head {head}") from None
        return indexes, end
