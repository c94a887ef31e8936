"""Exact local attention: sliding / dilated window, attention sinks + window (StreamingLLM), and
sinks + a window per head (MoA)."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from longattn.core import validate
from longattn.core.masks import Band, HeadWindow, Sinks, Window
from longattn.methods.base import Capabilities, register
from longattn.methods.masked import MaskedMethod


@register
@dataclass(frozen=True)
class SlidingWindow(MaskedMethod):
    """Sliding / dilated neighbourhood attention (Longformer's local window, Beltagy et al. 2020;
    dilation as in Hassani et al. 2024, "Faster Neighborhood Attention").

    Args:
        window: an int ``w``: a symmetric reach of ``w - 1`` keys on each side, the query itself
            included: with ``causal=True`` each query sees its last ``w`` keys; without,
            ``w - 1`` on each side of it. Or a tuple ``(left, right)``: flash-attn's
            ``window_size``, a query at position ``p`` sees keys ``p - left … p + right``, ``-1``
            leaving a side unbounded (``masks.Band``); with ``causal=True`` the right side stops at
            the query, as in flash-attn. Positions are bottom-right aligned either way (query
            ``i`` at ``i + tokens_k - tokens_q``, as flash-attn).
        dilation: step between attended keys (1 = contiguous; an int ``window`` only).
        backend: "auto" (FlexAttention from 16k keys when it compiles here), "tiled" or "flex".
        block: kernel block size (default 128).

    attention-gym's ``generate_sliding_window(W)`` (``causal & (q_idx - kv_idx <= W)``: the query and
    the ``W`` keys before it) is ``window=W + 1`` with ``causal=True`` (or ``window=(W, 0)``) for
    ``tokens_q == tokens_k``; with fewer queries than keys FlexAttention counts ``q_idx`` from the
    first query (top-left), so use ``masks.from_mask_mod`` there.
    """

    window: int | tuple[int, int] = 1024
    dilation: int = 1
    backend: str = "auto"
    block: int | None = None
    name = "window"
    capabilities = Capabilities(
        half_compute=True,
        exact=True, paper="Beltagy et al. 2020, Longformer; Hassani et al. 2024, Faster Neighborhood Attention",
        cost="O(N·window)",
    )

    def __post_init__(self):
        object.__setattr__(self, "window", _check_window(self.window))
        validate.check_positive_int("dilation", self.dilation)
        if isinstance(self.window, tuple) and self.dilation != 1:
            raise ValueError(f"dilation must be 1 with a (left, right) window, got dilation={self.dilation} "
                             f"and window={self.window}")
        self._check_backend()
        self._check_block()

    def method_mask(self, tokens_q, tokens_k, causal):
        # no query-key distance reaches max(tokens_q, tokens_k), so a longer window or dilation
        # keeps the same keys as that length; capped, the reach (window - 1) · dilation cannot overflow
        span = max(tokens_q, tokens_k, 1)
        if isinstance(self.window, tuple):
            return Band(*(min(side, span) for side in self.window))  # -1 (unbounded) stays -1
        return Window(min(self.window, span), min(self.dilation, span))


def _check_window(window: object) -> int | tuple[int, int]:
    """``window`` is an int >= 1 or flash-attn's ``window_size``: a pair of ints >= -1."""
    expected = "an int >= 1 or a (left, right) tuple of ints >= -1 (flash-attn's window_size, -1 = unbounded)"
    if isinstance(window, (tuple, list)):
        if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window):
            raise TypeError(f"window must be {expected}, got {window!r}")
        if min(window) < -1:
            raise ValueError(f"window must be {expected}, got {tuple(window)!r}")
        return int(window[0]), int(window[1])
    return validate.check_positive_int("window", window)


@register
@dataclass(frozen=True)
class Streaming(MaskedMethod):
    """Attention sinks + recent window (Xiao et al. 2024, "Efficient Streaming Language Models
    with Attention Sinks", StreamingLLM).

    Each query sees the first ``sinks`` keys and its last ``window`` keys (itself included), so a
    query attends to at most ``sinks + window`` keys. Exact on that mask. (Re-assigning positions
    inside the kept cache, which StreamingLLM needs for generation past the trained length, is the
    job of the KV-cache layer.)
    """

    sinks: int = 4
    window: int = 1024
    backend: str = "auto"
    block: int | None = None
    name = "streaming"
    capabilities = Capabilities(
        half_compute=True,
        exact=True, non_causal=False,
        paper="Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks",
        cost="O(N·(sinks+window))",
    )

    def __post_init__(self):
        validate.check_positive_int("sinks", self.sinks)
        validate.check_positive_int("window", self.window)
        self._check_backend()
        self._check_block()

    def method_mask(self, tokens_q, tokens_k, causal):
        return Sinks(self.sinks) | Window(self.window)


@register
@dataclass(frozen=True)
class HeadWindows(MaskedMethod):
    """Attention sinks + a recent window whose width is chosen per head (MoA, Fu et al. 2024,
    "Mixture of Sparse Attention for Automatic Large Language Model Compression"; DuoAttention's
    full / streaming split is the special case of windows 0 and ``w``).

    ``windows`` holds one entry per query head, one per key/value head (each applies to its
    query heads), or a single entry for all; 0 means the whole context. Each query of head ``h``
    sees the first ``sinks`` keys and its last ``windows[h]`` keys. Exact on that mask. A MoA head
    map (``longattn.calibrate.heads.moa_windows``) gives one row per layer: run it in a
    transformers model with ``longattn.hf.apply_head_map``.
    """

    windows: tuple[int, ...] = (1024,)
    sinks: int = 4
    backend: str = "auto"
    block: int | None = None
    name = "head_windows"
    capabilities = Capabilities(
        half_compute=True,
        exact=True, non_causal=False,
        paper="Fu et al. 2024, MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
        cost="O(N·(sinks+window per head))",
    )

    def __post_init__(self):
        ws = tuple(self.windows) if isinstance(self.windows, (tuple, list)) else self.windows
        if not isinstance(ws, tuple) or not ws or any(
                isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0 for w in ws):
            raise ValueError(f"windows must be a non-empty tuple of ints >= 0 (0 = the whole context), got "
                             f"{self.windows!r}")
        object.__setattr__(self, "windows", tuple(int(w) for w in ws))
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        self._check_backend()
        self._check_block()

    def per_query_head(self, heads_q: int, heads_kv: int) -> tuple[int, ...]:
        """``windows`` as one entry per query head, or a ValueError naming the mismatch."""
        ws = self.windows
        if len(ws) == heads_q:
            return ws
        if len(ws) == 1:
            return ws * heads_q
        if len(ws) == heads_kv:
            return tuple(w for w in ws for _ in range(heads_q // heads_kv))
        raise ValueError(f"head_windows has {len(ws)} windows but the inputs have {heads_q} query heads and "
                         f"{heads_kv} key/value heads: give one window per query head, per key/value head, or one")

    def method_mask(self, tokens_q, tokens_k, causal):
        win = HeadWindow.of(self.windows)
        return win if self.sinks == 0 else (Sinks(self.sinks) | win)

    def run(self, q, k, v, call):
        ws = self.per_query_head(q.shape[1], k.shape[1])
        if len(set(ws)) == 1 or call.bias is not None or call.row_bias is not None:
            # one window for all (or a per-head score bias that would need slicing): one masked run
            same = ws[:1] if len(set(ws)) == 1 else ws
            return super().run(q, k, v, call) if same == self.windows else \
                dataclasses.replace(self, windows=same).run(q, k, v, call)
        return self._run_by_width(q, k, v, call, ws)

    def _run_by_width(self, q, k, v, call, ws):
        """Heads that share a width run together on that width's own fast path — the whole context
        on the fused causal kernel (``dense``), a window on ``streaming``'s block layout — instead
        of one layout holding the union of every head's blocks (which computes the widest head's
        work for all of them). Outputs and LSEs are put back in head order."""
        import torch

        from longattn.methods.base import Result
        from longattn.methods.dense import Dense

        g = q.shape[1] // k.shape[1]
        out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse, lse_missing = None, False
        stats: dict = {"groups": {}}
        pairs = 0.0
        for w in sorted(set(ws)):
            heads = [h for h, x in enumerate(ws) if x == w]
            idx = torch.tensor(heads, device=q.device)
            qs, ks, vs = q.index_select(1, idx), k.index_select(1, idx // g), v.index_select(1, idx // g)
            if w == 0:
                res = Dense().run(qs, ks, vs, call)
            else:
                res = Streaming(sinks=max(1, self.sinks), window=w, backend=self.backend, block=self.block).run(
                    qs, ks, vs, call) if self.sinks else SlidingWindow(window=w, backend=self.backend,
                                                                        block=self.block).run(qs, ks, vs, call)
            out[:, idx] = res.out.to(out.dtype)
            lse_missing = lse_missing or res.lse is None
            if res.lse is not None:
                if lse is None:
                    lse = torch.empty(q.shape[:3], dtype=res.lse.dtype, device=q.device)
                lse[:, idx] = res.lse
            stats["groups"][w] = {"heads": heads, "path": res.path}
            pairs += res.stats.get("density", 0.0) * len(heads)
        if call.want_stats:
            stats["density"] = pairs / len(ws)
        return Result(out, None if lse_missing else lse, "by_width", stats)
