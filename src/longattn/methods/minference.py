"""MInference 1.0 (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context
LLMs via Dynamic Sparse Attention"): each head follows one of three sparse patterns, chosen
offline per (layer, head); the pattern's keys are estimated online; attention over them is exact."""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longattn.kernels.eager import attend_scores, visible_rows
from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.sparse.head_patterns import (
    PATTERNS,
    HeadIndices,
    PatternSettings,
    choose,
    estimate_candidates,
    load_head_patterns,
    pattern_recall,
)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], ...]:
    # keyed by modification time and size, so an updated file is read again
    return tuple(tuple(layer) for layer in load_head_patterns(path)["layers"])


def _layers_of(path: str | os.PathLike) -> tuple[tuple[str, ...], ...]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"patterns={str(path)!r}: no such file (expected a JSON file from "
                                "`longattn calibrate-minference` or longattn.sparse.head_patterns.save_head_patterns)")
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@register
@dataclass(frozen=True)
class MInference(Method):
    """MInference 1.0 (Jiang et al. 2024): per head one of A-shape, vertical-slash or
    block-sparse (``longattn.sparse.head_patterns`` defines them), exact attention over the
    pattern's keys, at most ``budget`` keys per query.

    Args:
        budget: keys per query every pattern keeps (sinks and local keys included).
        block: query/key block of the block-sparse pattern.
        sinks: first keys kept by A-shape and vertical-slash.
        window: nearest diagonals always kept by vertical-slash (A-shape keeps ``budget - sinks``).
        last_q: the last queries whose attention estimates vertical-slash indices (and, with no
            pattern file, scores the patterns).
        vertical_share: share of the budget given to vertical columns (the rest to diagonals).
        patterns: path of a head-pattern JSON file (``longattn calibrate-minference``); None picks
            each (batch, head)'s pattern online, by attention-mass recall on the last ``last_q``
            queries (cheaper patterns win ties within ``tie``); that favours vertical-slash, which
            is fitted to those very queries, so an offline file is the paper's way.
        layer: which layer's entry of the file this call uses.
        tie: recall margin counted as a tie in the online choice.
        chunk: queries attended at once (memory ``heads × chunk × tokens_k``).

    Causal only, as in the paper (prefill of decoder models). No query ever sees a key after it,
    and A-shape and block-sparse selections never depend on later keys (block-sparse: per query
    block). Vertical-slash indices, and the online choice, are estimated from the *last* queries,
    so they depend on the whole prompt: an earlier query's output may change when later keys do
    (never when only later values do).
    """

    budget: int = 2048
    block: int = 64
    sinks: int = 64
    window: int = 64
    last_q: int = 64
    vertical_share: float = 0.5
    patterns: str | None = None
    layer: int = 0
    tie: float = 0.005
    chunk: int = 256

    name = "minference"
    capabilities = Capabilities(
        exact=False, non_causal=False, score_bias=False,
        paper="Jiang et al. 2024, MInference 1.0 (A-shape / vertical-slash / block-sparse heads)",
        cost="O(last_q·N) estimate + O(N·budget) attention (eager masked kernel here: O(N²) memory traffic)",
    )

    def __post_init__(self) -> None:
        self.settings()  # validates the shared pattern parameters
        validate.check_positive_int("layer", self.layer, allow_zero=True)
        validate.check_positive_int("chunk", self.chunk)
        if isinstance(self.tie, bool) or not isinstance(self.tie, (int, float)) or not self.tie >= 0:
            raise ValueError(f"tie must be a non-negative number, got {self.tie!r}")
        if self.patterns is not None:
            if not isinstance(self.patterns, (str, os.PathLike)):
                raise TypeError(f"patterns must be a path (str) or None, got {type(self.patterns).__name__}")
            layers = _layers_of(self.patterns)
            if self.layer >= len(layers):
                raise ValueError(f"layer={self.layer} but patterns={str(self.patterns)!r} holds {len(layers)} layer(s)")

    def settings(self) -> PatternSettings:
        return PatternSettings(self.budget, self.block, self.sinks, self.window, self.last_q, self.vertical_share)

    def head_patterns(self, heads: int) -> list[str] | None:
        """This layer's pattern per query head from the file (None without one)."""
        if self.patterns is None:
            return None
        names = _layers_of(self.patterns)[self.layer]
        if len(names) != heads:
            raise ValueError(f"patterns={str(self.patterns)!r} layer {self.layer} lists {len(names)} heads, "
                             f"but q has {heads} heads")
        return list(names)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its estimates ignore it)")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        off = tk - tq
        kpm = call.key_padding_mask
        s = self.settings()
        t0 = time.perf_counter()
        fixed = self.head_patterns(hq)
        if fixed is None:
            cands = estimate_candidates(q, k, s, call.scale, kpm)
            lq = min(self.last_q, tq)
            choice = choose(pattern_recall(q, k, cands, call.scale, kpm, rows=(tq - lq, tq)), self.tie)
        else:
            cands = estimate_candidates(q, k, s, call.scale, kpm, which=sorted(set(fixed), key=PATTERNS.index))
            choice = torch.tensor([PATTERNS.index(p) for p in fixed], device=q.device).expand(b, hq)
        empty = HeadIndices.empty(b, hq, tq, tk, self.block, q.device)
        idx = HeadIndices.merge(choice, [cands.get(p, empty) for p in PATTERNS])
        t_select = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
        visible_pairs = 0.0
        for q0 in range(0, tq, self.chunk):
            q1 = min(q0 + self.chunk, tq)
            m = q1 - q0
            sc = torch.matmul(q[:, :, q0:q1].reshape(b, hk, g * m, d), k.transpose(-1, -2)).view(b, hq, m, tk)
            sc.mul_(call.scale)
            keep = idx.keep(q0, q1, off) & visible_rows(q0, q1, tq, tk, True, kpm, q.device)
            out[:, :, q0:q1], lse[:, :, q0:q1] = attend_scores(sc.masked_fill(~keep, -math.inf), v)
            if call.want_stats:
                visible_pairs += float(keep.sum()) / (b * hq)
        stats = {"selection_s": t_select, "kernel_s": time.perf_counter() - t0, "head_patterns": choice,
                 "pattern_share": {p: float((choice == i).double().mean()) for i, p in enumerate(PATTERNS)}}
        if call.want_stats:
            dense = dense_pairs(tq, tk, True)
            stats["density"] = visible_pairs / dense if dense else 0.0
        return Result(out, lse, "masked-union", stats)
