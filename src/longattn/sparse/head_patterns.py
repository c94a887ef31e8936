"""MInference head patterns (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention"): the three patterns a head may follow, how each
pattern's keys are estimated online, the criterion that picks a head's pattern, the offline
search over captured q/k, and the JSON file that stores its result.

Patterns, all at the same ``budget`` of keys per query (causal attention only):

* ``a_shape`` — the first ``sinks`` keys and the last ``budget - sinks`` up to the query.
* ``vertical_slash`` — ``n_vertical`` key columns (every query sees them) and ``n_slash``
  diagonals (offsets ``o``: query ``p`` sees key ``p - o``), both estimated from the attention
  of the last ``last_q`` queries: summed per column and per diagonal, the highest kept. The
  first ``sinks`` columns and the ``window`` nearest diagonals are always among them.
* ``block_sparse`` — per query block of ``block`` queries, the ``budget // block`` key blocks
  ranked highest by the pooled estimate (mean query × mean key, ``threshold.pooled_block_mass``);
  the blocks overlapping the query block are always kept.

A pattern is scored by its *attention-mass recall*: the share of the true softmax mass of a set
of queries that falls on the keys the pattern keeps. Offline (``search_head_patterns``) that set
is every query of the captured layers; online (``minference`` with no pattern file) it is the
last ``last_q`` queries, the ones vertical-slash is estimated from, so online choice favours
vertical-slash somewhat. Patterns within ``tie`` of the best recall count as ties, won by the
cheaper pattern in the order of ``PATTERNS``.

A budget that covers every key (``budget >= tokens_k``) makes every pattern dense.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from longattn.core import validate
from longattn.sparse.select import select_blocks
from longattn.sparse.threshold import pooled_block_mass

#: the patterns, cheapest to estimate first (ties in recall go to the earlier one)
PATTERNS = ("a_shape", "block_sparse", "vertical_slash")
FORMAT = "longattn.minference.head_patterns"
VERSION = 1


@dataclass(frozen=True)
class PatternSettings:
    """The shared budget and shape parameters of the three patterns (see the module docstring).

    ``vertical_share`` of the budget goes to vertical columns, the rest to diagonals.
    """

    budget: int = 2048
    block: int = 64
    sinks: int = 64
    window: int = 64
    last_q: int = 64
    vertical_share: float = 0.5

    def __post_init__(self) -> None:
        validate.check_positive_int("budget", self.budget)
        validate.check_positive_int("block", self.block)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        validate.check_positive_int("window", self.window, allow_zero=True)
        validate.check_positive_int("last_q", self.last_q)
        share = self.vertical_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"vertical_share must be a number in [0, 1], got {share!r}")
        if self.budget < 2 * self.block:
            raise ValueError(
                f"budget={self.budget} is below 2 * block = {2 * self.block}: block-sparse heads need room for "
                "the (up to two) key blocks overlapping their query block"
            )
        if self.sinks > self.budget:
            raise ValueError(f"sinks={self.sinks} exceeds budget={self.budget}")
        if self.sinks > self.n_vertical:
            raise ValueError(
                f"sinks={self.sinks} exceeds the {self.n_vertical} vertical columns that vertical_share="
                f"{share} leaves of budget={self.budget}: lower sinks or raise vertical_share"
            )
        if self.window > self.n_slash:
            raise ValueError(
                f"window={self.window} exceeds the {self.n_slash} diagonals that vertical_share={share} leaves "
                f"of budget={self.budget}: lower window or vertical_share"
            )

    @property
    def n_vertical(self) -> int:
        return int(round(self.vertical_share * self.budget))

    @property
    def n_slash(self) -> int:
        return self.budget - self.n_vertical


@dataclass
class HeadIndices:
    """The keys each query keeps, per (batch, query head), as the union of three parts.

    ``cols [B, H, Tk]``: key columns every query may see; ``offsets [B, H, Tk]``: diagonals, query
    at position ``p`` may see key ``p - o`` for ``offsets[..., o]``; ``blocks [B, H, n_q_blocks,
    n_blocks]``: key blocks per query block (query rows cut into blocks of ``block``). Causality
    and key padding are applied on top by ``keep``'s caller.
    """

    cols: torch.Tensor
    offsets: torch.Tensor
    blocks: torch.Tensor
    block: int

    def keep(self, q0: int, q1: int, offset: int) -> torch.Tensor:
        """``[B, H, q1-q0, Tk]`` bool for query rows ``q0..q1-1`` (positions ``+ offset``)."""
        tk = self.cols.shape[-1]
        dev = self.cols.device
        rows = torch.arange(q0, q1, device=dev)
        k_pos = torch.arange(tk, device=dev)
        diff = (rows[:, None] + offset) - k_pos[None, :]  # [m, Tk]: the diagonal through each pair
        keep = self.cols[:, :, None, :] | (self.offsets[:, :, diff.clamp(min=0)] & (diff >= 0))
        if bool(self.blocks.any()):
            keep = keep | self.blocks[:, :, rows // self.block][..., k_pos // self.block]
        return keep

    @classmethod
    def empty(cls, b: int, h: int, tq: int, tk: int, block: int, device=None) -> HeadIndices:
        n_qb, n = math.ceil(tq / block), math.ceil(tk / block)
        z = torch.zeros(b, h, tk, dtype=torch.bool, device=device)
        return cls(z, z.clone(), torch.zeros(b, h, n_qb, n, dtype=torch.bool, device=device), block)

    @classmethod
    def merge(cls, choice: torch.Tensor, candidates: Sequence[HeadIndices]) -> HeadIndices:
        """Per (batch, head) the parts of ``candidates[choice[b, h]]``; ``choice [B, H]`` int."""
        first = candidates[0]
        out = cls(first.cols.clone(), first.offsets.clone(), first.blocks.clone(), first.block)
        for i, c in enumerate(candidates[1:], start=1):
            pick = choice == i
            out.cols[pick] = c.cols[pick]
            out.offsets[pick] = c.offsets[pick]
            out.blocks[pick] = c.blocks[pick]
        return out


def _scores(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, Hq, m, Tk]`` scaled scores; GQA heads share their key head without a copy."""
    b, hq, m, d = q_rows.shape
    hk, tk = k.shape[1], k.shape[2]
    return torch.matmul(q_rows.reshape(b, hk, (hq // hk) * m, d), k.transpose(-1, -2)).view(b, hq, m, tk) * scale


def attention_rows(q: torch.Tensor, k: torch.Tensor, q0: int, q1: int, scale: float, causal: bool,
                   key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Exact attention probabilities ``[B, Hq, q1-q0, Tk]`` of query rows ``q0..q1-1`` (rows that
    see no key are 0)."""
    tq, tk = q.shape[2], k.shape[2]
    s = _scores(q[:, :, q0:q1], k, scale)
    if causal:
        q_pos = torch.arange(q0, q1, device=q.device)[:, None] + (tk - tq)
        s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > q_pos, -math.inf)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0)


def vertical_slash_scores(p: torch.Tensor, q_pos: torch.Tensor, tokens_q: int,
                          tokens_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``p [B, H, m, Tk]`` of queries at positions ``q_pos [m]`` summed per key column
    and per diagonal.

    Returns ``vertical [B, H, Tk]`` and ``slash [B, H, Tq + Tk - 1]``, where ``slash[..., o + Tq - 1]``
    is the mass at offset ``o = q_pos - k_pos`` (offsets run from ``1 - Tq`` to ``Tk - 1`` for
    queries at positions ``i + Tk - Tq``; negative ones hold mass only without causality).
    """
    b, h, m, tk = p.shape
    vertical = p.sum(2)
    diff = q_pos[:, None] - torch.arange(tk, device=p.device)[None, :] + (tokens_q - 1)  # [m, Tk]
    slash = torch.zeros(b, h, tokens_q + tk - 1, dtype=p.dtype, device=p.device)
    slash.scatter_add_(-1, diff.reshape(1, 1, m * tk).expand(b, h, -1), p.reshape(b, h, m * tk))
    return vertical, slash


def _top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n > 0:
        mask.scatter_(-1, scores.topk(min(n, scores.shape[-1]), dim=-1).indices, True)
    return mask


def a_shape_indices(b: int, h: int, tq: int, tk: int, s: PatternSettings, device=None) -> HeadIndices:
    idx = HeadIndices.empty(b, h, tq, tk, s.block, device)
    pos = torch.arange(tk, device=device)
    idx.cols[:] = pos < s.sinks
    idx.offsets[:] = pos < s.budget - s.sinks
    return idx


def vertical_slash_indices(q: torch.Tensor, k: torch.Tensor, s: PatternSettings, scale: float,
                           key_padding_mask: torch.Tensor | None) -> HeadIndices:
    """Columns and diagonals from the attention of the last ``s.last_q`` queries (causal)."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    lq = min(s.last_q, tq)
    p = attention_rows(q, k, tq - lq, tq, scale, True, key_padding_mask)
    q_pos = torch.arange(tq - lq, tq, device=q.device) + (tk - tq)
    vertical, slash = vertical_slash_scores(p, q_pos, tq, tk)
    slash = slash[..., tq - 1:]  # offsets 0..Tk-1: causal queries see no key ahead of them
    pos = torch.arange(tk, device=q.device)
    vertical = vertical.masked_fill(pos < s.sinks, math.inf)  # sinks and the local diagonals
    slash = slash.masked_fill(pos < s.window, math.inf)  # always kept, as MInference does
    idx = HeadIndices.empty(b, hq, tq, tk, s.block, q.device)
    idx.cols = _top_mask(vertical, s.n_vertical)
    idx.offsets = _top_mask(slash, s.n_slash)
    return idx


def block_sparse_indices(q: torch.Tensor, k: torch.Tensor, s: PatternSettings, scale: float) -> HeadIndices:
    """Top ``budget // block`` key blocks per query block by the pooled estimate (causal)."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    mass = pooled_block_mass(q, k, q_block=s.block, block=s.block, scale=scale, causal=True)

    def rows(q0: int, q1: int) -> torch.Tensor:
        # select_blocks sums per-query scores over a query block: hand it the block's pooled share
        # spread evenly over its rows (the ranking within a block is all that matters)
        per_block = mass[:, :, q0 // s.block: math.ceil(q1 / s.block)]
        return per_block.repeat_interleave(s.block, dim=2)[:, :, : q1 - q0] / s.block

    sel = select_blocks(q, tk, rows, q_block=s.block, block=s.block, n_sel=s.budget // s.block, sinks=0, window=0,
                        causal=True)
    idx = HeadIndices.empty(b, hq, tq, tk, s.block, q.device)
    n = idx.blocks.shape[-1]
    chosen = sel.indices.masked_fill(sel.indices < 0, n)  # unused slots go to a spare column, dropped
    grid = torch.zeros(*chosen.shape[:-1], n + 1, dtype=torch.bool, device=q.device)
    idx.blocks = grid.scatter_(-1, chosen, True)[..., :n]
    return idx


def estimate_candidates(q: torch.Tensor, k: torch.Tensor, s: PatternSettings, scale: float,
                        key_padding_mask: torch.Tensor | None = None,
                        which: Iterable[str] = PATTERNS) -> dict[str, HeadIndices]:
    """Each pattern's keys for ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]`` (causal, float32)."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    out: dict[str, HeadIndices] = {}
    for name in which:
        if s.budget >= tk:  # every key fits the budget: nothing to estimate
            idx = HeadIndices.empty(b, hq, tq, tk, s.block, q.device)
            idx.cols[:] = True
        elif name == "a_shape":
            idx = a_shape_indices(b, hq, tq, tk, s, q.device)
        elif name == "vertical_slash":
            idx = vertical_slash_indices(q, k, s, scale, key_padding_mask)
        elif name == "block_sparse":
            idx = block_sparse_indices(q, k, s, scale)
        else:
            raise ValueError(f"unknown head pattern {name!r}; expected one of {', '.join(PATTERNS)}")
        out[name] = idx
    return out


def pattern_recall(q: torch.Tensor, k: torch.Tensor, candidates: dict[str, HeadIndices], scale: float,
                   key_padding_mask: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                   chunk: int = 256) -> dict[str, torch.Tensor]:
    """Attention-mass recall ``[B, H]`` of each candidate over query rows ``rows`` (default all):
    the true softmax mass on the kept keys, averaged over the queries that see any key."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    off = tk - tq
    r0, r1 = rows if rows is not None else (0, tq)
    kept = {name: torch.zeros(b, hq, dtype=torch.float64, device=q.device) for name in candidates}
    live = torch.zeros(b, hq, dtype=torch.float64, device=q.device)
    for q0 in range(r0, r1, chunk):
        q1 = min(q0 + chunk, r1)
        p = attention_rows(q, k, q0, q1, scale, True, key_padding_mask)
        live += (p.sum(-1) > 0).sum(-1)
        for name, idx in candidates.items():
            kept[name] += (p * idx.keep(q0, q1, off)).sum(-1).sum(-1).double()
    return {name: v / live.clamp(min=1) for name, v in kept.items()}


def choose(recall: dict[str, torch.Tensor], tie: float) -> torch.Tensor:
    """Index into ``PATTERNS`` per entry: the cheapest pattern within ``tie`` of the best recall."""
    names = [p for p in PATTERNS if p in recall]
    stacked = torch.stack([recall[p] for p in names], dim=-1)  # [..., P]
    best = stacked.max(-1, keepdim=True).values
    first_ok = (stacked >= best - tie).to(torch.int8).argmax(-1)  # first pattern within the tie
    codes = torch.tensor([PATTERNS.index(p) for p in names], device=stacked.device)
    return codes[first_ok]


def search_head_patterns(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    budget: int,
    *,
    block: int = 64,
    sinks: int = 64,
    window: int = 64,
    last_q: int = 64,
    vertical_share: float = 0.5,
    scale: float | None = None,
    tie: float = 0.005,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """MInference's offline search: per layer and query head, the pattern with the highest
    attention-mass recall over all queries at ``budget`` keys per query (causal).

    Args:
        layers: per layer ``(q [B, Hq, T, D], k [B, Hkv, T, D], v)`` captured from a model (e.g.
            ``longattn.bench.sparse.capture_real_qkv``); recall is averaged over the batch.
        budget, block, sinks, window, last_q, vertical_share: as for the ``minference`` method
            (``PatternSettings``); use the same values there.
        tie: recall differences up to this count as ties, won by the cheaper pattern.
        progress: called with ``(layer, n_layers)`` after each layer.

    Returns:
        the document ``save_head_patterns`` writes: ``{"format", "version", "settings",
        "layers": [[pattern per head] per layer], "recall": [{pattern: [recall per head]}]}``.
    """
    settings = PatternSettings(budget, block, sinks, window, last_q, vertical_share)
    if not isinstance(tie, (int, float)) or isinstance(tie, bool) or not tie >= 0:
        raise ValueError(f"tie must be a non-negative number, got {tie!r}")
    if len(layers) == 0:
        raise ValueError("layers is empty: pass at least one (q, k, v) per layer")
    chosen, recalls = [], []
    for li, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 3:
            raise ValueError(f"layers[{li}] must be a (q, k, v) triple, got {type(layer).__name__}")
        q, k, v = layer
        validate.check_qkv(q, k, v, causal=True)
        q32, k32 = q.to(torch.float32), k.to(torch.float32)
        sc = validate.check_scale(scale, q.shape[-1])
        with torch.no_grad():
            cands = estimate_candidates(q32, k32, settings, sc)
            rec = {name: r.mean(0) for name, r in pattern_recall(q32, k32, cands, sc).items()}  # [Hq]
        codes = choose(rec, tie)
        chosen.append([PATTERNS[int(c)] for c in codes])
        recalls.append({name: [round(float(x), 6) for x in r] for name, r in rec.items()})
        if progress is not None:
            progress(li + 1, len(layers))
    return {"format": FORMAT, "version": VERSION, "settings": asdict(settings), "layers": chosen,
            "recall": recalls}


def _check_document(doc: Any, source: str) -> dict[str, Any]:
    def bad(what: str) -> ValueError:
        return ValueError(f"{source} is not a valid MInference head-pattern file: {what}")

    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object at the top level, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise bad(f"'format' is {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise bad(f"'version' is {doc.get('version')!r}; this longattn reads version {VERSION}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise bad("'layers' must be a non-empty list (one list of head patterns per layer)")
    for li, heads in enumerate(layers):
        if not isinstance(heads, list) or not heads:
            raise bad(f"layers[{li}] must be a non-empty list of pattern names, got {heads!r}")
        for hi, name in enumerate(heads):
            if name not in PATTERNS:
                raise bad(f"layers[{li}][{hi}] is {name!r}; expected one of {', '.join(PATTERNS)}")
    return doc


def save_head_patterns(path: str | os.PathLike, patterns: dict[str, Any]) -> Path:
    """Write ``patterns`` (from ``search_head_patterns``) as JSON; returns the path."""
    from longattn.files import atomic_write_text

    _check_document(patterns, "the patterns to save")
    return atomic_write_text(path, json.dumps(patterns, indent=1) + "\n")


def load_head_patterns(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by ``save_head_patterns``; ``ValueError`` naming the file and the
    problem when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MInference head-pattern file {str(path)!r} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid MInference head-pattern file: not JSON ({exc})") from None
    return _check_document(doc, str(path))
