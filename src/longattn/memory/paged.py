"""A paged memory that keeps every token, across tiers, and retrieves blocks per head.

The layer's keys and values are cut into pages of ``page`` tokens (the last one open, the
"tail"). Every page has a summary — mean, element-wise min and max of its keys
(``BlockSummaries``), updated as tokens arrive — kept on the fast tier with the padding flags.

One step for a chunk of ``L`` queries lays out, per (row, key head)::

    [sink pages][top-k retrieved pages, in order][recent window][the chunk]

The retrieved pages are scored against the chunk's queries from their summaries alone: Quest's
upper bound ``Σ_d max(q_d·min_d, q_d·max_d)`` (Tang et al. 2024; InfLLM, Xiao et al. 2024, is the
same block-retrieval scheme) or LongHeads' ``q·mean`` (Lu et al. 2024), averaged over the chunk's
queries and maxed over the query heads of a key head. Only the chosen pages are fetched — from the
host or from disk — for the step. With ``positions='cache'`` every key takes the position of its
slot in the layout, so the model never sees a distance longer than the layout (what keeps a
512-token model fluent over 4k tokens). When every candidate page fits in ``topk`` the layout is
the whole context in order and the step is exact.

Tiers: the fast tier holds the sink pages, the pages under the window and the tail — at most
``fast_budget = sink pages·page + window + page`` tokens, checked after every step. Other pages
go to the host; beyond ``host_tokens`` the oldest host pages are written to disk
(``DiskTier``). A disk write that fails (full disk, folder gone) loses nothing: it is a
``RuntimeWarning``, the pages stay on the host (over its budget) and a later step spills them.
``close()`` (or dropping the memory, or interpreter exit) removes the disk segments.

Save / load: ``state()`` gives every page, the tail, the padding flags and the summaries;
``load_state`` checks every one of them against this memory (``store.SavedLayer``) before it
changes anything, so a bad file leaves the memory as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from longattn.memory.kernel import attend_layout
from longattn.memory.policies import _positive_int, check_finite_chunk
from longattn.memory.rotation import KeyRotation
from longattn.memory.store import SavedLayer
from longattn.memory.tiers import DiskTier
from longattn.sparse.select import mean_key_estimate, quest_bound_estimate
from longattn.sparse.summaries import BlockSummaries


class PagedMemory:
    """One layer's paged, tiered memory with per-head block retrieval (see the module docstring).

    Args:
        n_kv_heads: key heads of the layer.
        rotation: the model's ``KeyRotation`` (None: no RoPE).
        page: tokens per page (the retrieval unit).
        sinks: leading tokens always attended (rounded up to whole pages).
        window: recent tokens always attended (extended down to a page boundary).
        topk: pages retrieved per (row, key head) for each chunk.
        score: ``"quest"`` (min/max bound) or ``"mean"`` (LongHeads' mean key).
        host_tokens: tokens the host tier may hold before spilling to disk (None: no disk tier).
        disk_dir: where disk segments go (default: a temporary folder removed with the memory);
            memories may share one folder (their segment names differ).
        positions: ``"cache"`` (layout positions) or ``"original"``.
        device: the fast tier's device (default: where the first keys arrive).
    """

    kind = "paged"

    def __init__(self, n_kv_heads: int, rotation: KeyRotation | None, *, page: int = 64, sinks: int = 64,
                 window: int = 256, topk: int = 4, score: str = "quest", host_tokens: int | None = None,
                 disk_dir=None, positions: str = "cache"):
        self.page = _positive_int("page", page)
        self.sinks = _positive_int("sinks", sinks, allow_zero=True)
        self.window = _positive_int("window", window, allow_zero=True)
        self.topk = _positive_int("topk", topk, allow_zero=True)
        if score not in ("quest", "mean"):
            raise ValueError(f"score must be 'quest' or 'mean', got {score!r}")
        if positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' or 'original', got {positions!r}")
        if host_tokens is not None:
            _positive_int("host_tokens", host_tokens, allow_zero=True)
        self.score, self.positions, self.host_tokens = score, positions, host_tokens
        self.n_kv_heads = n_kv_heads
        self.rotation = rotation if positions == "cache" else None
        self.sink_pages = math.ceil(self.sinks / self.page)
        self.fast_budget = self.sink_pages * self.page + self.window + self.page
        self.disk_dir = disk_dir
        self._reset()

    def _reset(self) -> None:
        self.seen = 0
        self.fast: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.disk: DiskTier | None = None
        self.tail_k: torch.Tensor | None = None
        self.tail_v: torch.Tensor | None = None
        self.ok: torch.Tensor | None = None  # [B, seen] bool
        self.summaries: BlockSummaries | None = None
        self.device = None
        self.peak_fast_tokens = 0
        self.last_layout = 0  # keys in the last step's layout (before the chunk)

    # ------------------------------------------------------------------ geometry
    def _regions(self, seen: int) -> tuple[int, int]:
        """``(s_end, c_end)``: sinks are tokens ``[0, s_end)``, candidate pages ``[s_end, c_end)``,
        the window ``[c_end, seen)``."""
        s_end = min(self.sink_pages * self.page, seen)
        c_end = self.page * (max(seen - self.window, 0) // self.page)
        return s_end, max(s_end, c_end)

    def _stays_fast(self, p: int, seen: int) -> bool:
        """Whether page ``p`` belongs on the fast tier after ``seen`` tokens: a sink page, or one
        the window reaches (the next step attends it by position)."""
        return p < self.sink_pages or p >= self._regions(seen)[1] // self.page

    def _page(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        if p in self.fast:
            return self.fast[p]
        if p in self.host:
            k, v = self.host[p]
            return k.to(self.device), v.to(self.device)
        return self.disk.read(p, self.device)

    def _pages(self, pages: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``_page`` for many pages, reading those on disk together (``DiskTier.read_many``)."""
        on_disk = [p for p in pages if p not in self.fast and p not in self.host]
        read = self.disk.read_many(on_disk, self.device) if on_disk else {}
        return [read[p] if p in read else self._page(p) for p in pages]

    def _range(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens ``[a, b)`` from the fast tier (pages and tail)."""
        if b <= a:  # the tail exists (possibly empty) once anything is stored
            return self.tail_k[:, :, :0], self.tail_v[:, :, :0]
        ks, vs = [], []
        for p in range(a // self.page, (b - 1) // self.page + 1):
            lo, hi = max(a, p * self.page) - p * self.page, min(b, (p + 1) * self.page) - p * self.page
            if p * self.page >= self.n_pages * self.page:  # the tail
                ks.append(self.tail_k[:, :, lo:hi])
                vs.append(self.tail_v[:, :, lo:hi])
            else:
                k, v = self._page(p)
                ks.append(k[:, :, lo:hi])
                vs.append(v[:, :, lo:hi])
        return torch.cat(ks, 2), torch.cat(vs, 2)

    @property
    def n_pages(self) -> int:
        return self.seen // self.page

    # ------------------------------------------------------------------ one step
    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_ok: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Attention of ``q [B, Hq, L, D]`` over the layout, then stores ``k_new, v_new [B, H, L, D]``;
        a chunk with a non-finite key or value is refused before anything changes (ValueError)."""
        check_finite_chunk(k_new, v_new, self.seen)
        b, _, lq, _ = q.shape
        h = k_new.shape[1]
        dev = q.device
        if self.device is None:
            self.device = dev
        if new_ok is None:
            new_ok = torch.ones(b, lq, dtype=torch.bool, device=dev)
        seen = self.seen
        ok_ext = new_ok if self.ok is None else torch.cat([self.ok, new_ok], 1)
        new_idx = torch.arange(seen, seen + lq, device=dev)
        if seen == 0:
            v_lay, idx = v_new, new_idx.expand(b, h, lq)
            k_att = k_new
        else:
            s_end, c_end = self._regions(seen)
            bh = (b, h)
            sink_k, sink_v = self._range(0, s_end)
            win_k, win_v = self._range(c_end, seen)
            sel_k, sel_v, sel_idx = self._retrieve(q, s_end, c_end, scale, v_new.shape[-1])
            old_idx = torch.cat([torch.arange(0, s_end, device=dev).expand(*bh, s_end), sel_idx,
                                 torch.arange(c_end, seen, device=dev).expand(*bh, seen - c_end)], 2)
            k_old = torch.cat([sink_k.expand(b, h, -1, -1), sel_k, win_k.expand(b, h, -1, -1)], 2)
            v_old = torch.cat([sink_v, sel_v, win_v], 2)
            n_old = k_old.shape[2]
            self.last_layout = n_old
            if self.rotation is not None:
                k_old = self.rotation.rotate(k_old, seen - n_old + torch.arange(n_old, device=dev) - old_idx)
            k_att = torch.cat([k_old, k_new], 2)
            v_lay = torch.cat([v_old, v_new], 2)
            idx = torch.cat([old_idx, new_idx.expand(b, h, lq)], 2)
        key_ok = ok_ext[:, None, :].expand(b, h, -1).gather(2, idx)
        out, _ = attend_layout(q, k_att, v_lay, key_ok, scale)
        self._store(k_new, v_new, ok_ext)
        return out

    @property
    def retrieved_tokens(self) -> int:
        """Tokens a step retrieves from the candidate region when it holds more: ``topk`` pages."""
        return self.topk * self.page

    def _retrieve(self, q: torch.Tensor, s_end: int, c_end: int, scale: float, dv: int):
        """The middle of the layout: ``(keys [B, H, M, D], values [B, H, M, Dv], token ids [B, H, M])``
        from the candidate region ``[s_end, c_end)`` (whole pages) for the chunk's queries ``q``; ids
        increase along ``M``. Every candidate when they all fit in ``retrieved_tokens`` (the step is
        then exact), else the subclass's choice (``_choose``)."""
        b, _, _, d = q.shape
        h, dev = self.n_kv_heads, q.device
        n = min(self.retrieved_tokens, c_end - s_end)
        if n == 0:
            return (q.new_empty(b, h, 0, d), q.new_empty(b, h, 0, dv),
                    torch.empty(b, h, 0, dtype=torch.long, device=dev))
        if n == c_end - s_end:
            tokens = torch.arange(s_end, c_end, device=dev).expand(b, h, n)
        else:
            tokens = self._choose(q, s_end, c_end, n, scale)
        k, v = self._gather(tokens)
        return k, v, tokens

    def _choose(self, q: torch.Tensor, s_end: int, c_end: int, n: int, scale: float) -> torch.Tensor:
        """``[B, H, n]`` increasing token ids in ``[s_end, c_end)``: here the tokens of the ``n / page``
        best pages per (row, key head) by their summaries (``_select``)."""
        b, hq, _, _ = q.shape
        sel = self._select(q, s_end // self.page, c_end // self.page, n // self.page, scale, hq // self.n_kv_heads)
        return (sel[..., None] * self.page + torch.arange(self.page, device=q.device)).reshape(b, self.n_kv_heads, -1)

    def _gather(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, M, D]`` of the stored tokens ``tokens [B, H, M]`` (each row and
        key head its own), fetching every page they touch once, from whichever tier holds it."""
        b, h, m = tokens.shape
        dev = tokens.device
        pages = tokens // self.page
        union = torch.unique(pages).tolist()
        where = torch.full((max(union) + 1,), -1, dtype=torch.long, device=dev)
        where[union] = torch.arange(len(union), device=dev)
        got = self._pages(union)
        pk, pv = torch.stack([x[0] for x in got]), torch.stack([x[1] for x in got])  # [U, B, H, P, D]
        bi = torch.arange(b, device=dev)[:, None, None]
        hi = torch.arange(h, device=dev)[None, :, None]
        u, off = where[pages], tokens % self.page
        return pk[u, bi, hi, off], pv[u, bi, hi, off]

    def _select(self, q, c0, c1, kk, scale, g) -> torch.Tensor:
        """``[B, H, kk]`` page ids in ``[c0, c1)``, increasing: the best-scoring per key head."""
        b, hq, lq, _ = q.shape
        estimate = quest_bound_estimate if self.score == "quest" else mean_key_estimate
        est = estimate(q.to(torch.float32), self.summaries.blocks(c0, c1), scale)  # [B, Hq, L, n_cand]
        est = est.view(b, hq // g, g, lq, c1 - c0).mean(3).amax(2)  # [B, H, n_cand]
        return est.topk(kk, dim=-1).indices.sort(-1).values + c0

    def _store(self, k_new, v_new, ok_ext) -> None:
        self.ok = ok_ext
        if self.summaries is None:
            self.summaries = BlockSummaries.build(k_new, self.page)
        else:
            self.summaries.extend(k_new)
        tk = k_new if self.tail_k is None else torch.cat([self.tail_k, k_new], 2)
        tv = v_new if self.tail_v is None else torch.cat([self.tail_v, v_new], 2)
        first = self.n_pages
        full = tk.shape[2] // self.page
        for i in range(full):
            sl = slice(i * self.page, (i + 1) * self.page)
            self.fast[first + i] = (tk[:, :, sl].clone(), tv[:, :, sl].clone())
        self.tail_k, self.tail_v = tk[:, :, full * self.page:].clone(), tv[:, :, full * self.page:].clone()
        self.seen += k_new.shape[2]
        self._rebalance()

    def _rebalance(self) -> None:
        """Pages the next step attends by position stay fast; the rest go to the host, then disk.
        A failed disk write warns and keeps its pages on the host (module docstring)."""
        for p in [p for p in self.fast if not self._stays_fast(p, self.seen)]:
            k, v = self.fast.pop(p)
            self.host[p] = (k.to("cpu"), v.to("cpu"))
        if self.host_tokens is not None and len(self.host) * self.page > self.host_tokens:
            # spill down to half the host budget in one segment, so segments are not one page each
            target = (self.host_tokens // 2) // self.page
            oldest = sorted(self.host)[:len(self.host) - target]
            try:
                if self.disk is None:
                    self.disk = DiskTier(self.disk_dir)
                self.disk.write({p: self.host[p] for p in oldest})  # all or nothing
            except OSError as exc:
                warnings.warn(f"the disk tier could not take {len(oldest)} pages ({exc}); they stay on the host, "
                              f"over its budget of {self.host_tokens} tokens, until a later step spills them",
                              RuntimeWarning, stacklevel=2)
            else:
                for p in oldest:
                    del self.host[p]
        fast = self.fast_tokens()
        self.peak_fast_tokens = max(self.peak_fast_tokens, fast)
        if fast > self.fast_budget:  # an invariant of the geometry above; never expected
            raise RuntimeError(f"fast tier holds {fast} tokens, over its budget {self.fast_budget}")

    def close(self) -> None:
        """Forget every token and remove the disk segments now (with the temporary folder, when
        ``disk_dir`` was None). The memory is empty afterwards and can be used again. Dropping the
        memory removes them too, once it is collected, and interpreter exit at the latest."""
        if self.disk is not None:
            self.disk.close()
        self._reset()

    # ------------------------------------------------------------------ reporting
    def fast_tokens(self) -> int:
        return len(self.fast) * self.page + (0 if self.tail_k is None else self.tail_k.shape[2])

    def tokens_per_head(self) -> torch.Tensor:
        b = 0 if self.ok is None else self.ok.shape[0]
        held = torch.zeros(b, dtype=torch.int64, device="cpu") if self.ok is None else self.ok.sum(1).cpu()
        return held[:, None].expand(b, self.n_kv_heads).clone()

    def slots_per_head(self) -> list[int]:
        return [self.seen] * self.n_kv_heads

    def nbytes(self) -> dict[str, int]:
        per = lambda pages: sum(k.numel() * k.element_size() + v.numel() * v.element_size()  # noqa: E731
                                for k, v in pages.values())
        tail = 0 if self.tail_k is None else self.tail_k.numel() * self.tail_k.element_size() * 2
        meta = 0
        if self.summaries is not None:
            s = self.summaries
            meta = sum(t.numel() * t.element_size() for t in (s.sums, s.kmin, s.kmax, s.count))
            meta += self.ok.numel() * self.ok.element_size()
        return {"fast": per(self.fast) + tail, "host": per(self.host),
                "disk": 0 if self.disk is None else self.disk.nbytes, "metadata": meta}

    def describe(self) -> dict:
        return {"page": self.page, "sinks": self.sinks, "window": self.window, "topk": self.topk,
                "score": self.score}

    # ------------------------------------------------------------------ save / load
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = {"kind": self.kind, "seen": self.seen, "positions": self.positions, **self.describe()}
        if self.seen == 0:
            return {}, meta
        tensors = {"ok": self.ok, "tail_k": self.tail_k, "tail_v": self.tail_v,
                   "sum.sums": self.summaries.sums, "sum.kmin": self.summaries.kmin,
                   "sum.kmax": self.summaries.kmax, "sum.count": self.summaries.count}
        if self.n_pages:
            pages = self._pages(list(range(self.n_pages)))
            tensors["pages_k"] = torch.stack([k for k, _ in pages])
            tensors["pages_v"] = torch.stack([v for _, v in pages])
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> None:
        """Replace the contents with a saved ``state()`` (on ``device``); a ValueError naming the
        first bad field leaves the memory as it was (``stage_state``)."""
        self.stage_state(tensors, meta, device)()

    def stage_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> Callable[[], None]:
        """Check a saved ``state()`` against this memory and prepare it on ``device`` without
        changing anything; returns the step that installs it (it checks nothing more, so that a
        cache can check every layer before it changes any).

        Raises:
            ValueError: another configuration, or a field that is not what this memory would have
                saved (shape, dtype, count, non-finite values, missing or unexpected tensors).
        """
        saved = self._saved(tensors, meta)
        parts = self._read_pages(saved, device)
        saved.finish()
        return lambda: self._install(parts, device)

    def _saved(self, tensors: dict[str, torch.Tensor], meta: dict) -> SavedLayer:
        """``SavedLayer`` over a saved state made with this memory's configuration (else ValueError)."""
        mine = {"kind": self.kind, "positions": self.positions, **self.describe()}
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"saved memory was made with {theirs}, this cache uses {mine}")
        return SavedLayer(tensors, meta)

    def _read_pages(self, saved: SavedLayer, device) -> dict:
        """The checked fields of ``state()``: ``seen``, ``ok`` ``[B, seen]``, the tail
        ``[B, H, seen % page, D]``, the summaries ``[B, H, ⌈seen/page⌉, D]`` (on ``device``), and the
        full pages ``pages_k, pages_v [seen // page, B, H, page, D]`` (CPU), those that belong on
        the fast tier also in ``fast`` (on ``device``)."""
        seen = saved.count("seen")
        parts = {"seen": seen}
        if seen == 0:
            return parts
        h, page = self.n_kv_heads, self.page
        n_pages, n_blocks = seen // page, -(-seen // page)
        if self.rotation is not None:
            saved.dims["D"] = self.rotation.head_dim
        saved.context = f" (seen={seen}, page={page}, {h} key heads)"
        parts["ok"] = saved.tensor("ok", ("B", seen), torch.bool)
        for name in ("tail_k", "tail_v"):
            parts[name] = saved.tensor(name, ("B", h, seen % page, "D"), "kv", finite=True)
        for name in ("sum.sums", "sum.kmin", "sum.kmax"):
            parts[name] = saved.tensor(name, ("B", h, n_blocks, "D"), torch.float32, finite=True)
        count = saved.tensor("sum.count", (n_blocks,), torch.int64)
        want = torch.full((n_blocks,), page, dtype=torch.int64, device=count.device)
        want[-1] = seen - (n_blocks - 1) * page
        if not torch.equal(count, want):
            j = int((count != want).nonzero()[0])
            raise ValueError(f"sum.count[{j}] is {int(count[j])}, expected {int(want[j])} (tokens in page {j}; "
                             f"seen={seen}, page={page})")
        if bool((parts["sum.kmin"] > parts["sum.kmax"]).any()):
            raise ValueError("sum.kmin exceeds sum.kmax somewhere, expected kmin <= kmax (element-wise extremes)")
        parts["sum.count"] = count
        parts = {name: t.to(device) if torch.is_tensor(t) else t for name, t in parts.items()}
        parts["fast"] = {}
        if n_pages:
            for name in ("pages_k", "pages_v"):
                parts[name] = saved.tensor(name, (n_pages, "B", h, page, "D"), "kv", finite=True).to("cpu")
            parts["fast"] = {p: (parts["pages_k"][p].to(device), parts["pages_v"][p].to(device))
                             for p in range(n_pages) if self._stays_fast(p, seen)}
        return parts

    def _install(self, parts: dict, device) -> None:
        """Replace the contents with ``parts`` from ``_read_pages`` (the old disk segments go)."""
        self.close()
        self.device = torch.device(device)
        self.seen = parts["seen"]
        if self.seen == 0:
            return
        self.ok, self.tail_k, self.tail_v = parts["ok"], parts["tail_k"], parts["tail_v"]
        self.summaries = BlockSummaries(block=self.page, sums=parts["sum.sums"], kmin=parts["sum.kmin"],
                                        kmax=parts["sum.kmax"], count=parts["sum.count"], tokens=self.seen)
        self.fast = dict(parts["fast"])
        self.host = {p: (parts["pages_k"][p], parts["pages_v"][p]) for p in range(self.n_pages) if p not in self.fast}
        self._rebalance()
