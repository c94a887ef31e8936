"""Per-head KV budgets, found by calibration and checked on any ``Subject``.

Three ways to decide which (layer, key head) keeps its whole context and which keeps only sinks +
a recent window (DuoAttention, Xiao et al. 2024; RazorAttention, Tang et al. 2024), or how wide
each head's window is (MoA, Fu et al. 2024, "Mixture of Sparse Attention"):

* ``razor`` / ``duo`` — the scores of ``longattn calibrate-heads`` (echo + induction mass on a
  repeated passkey; the output change when the head is made streaming), computed here from q/k/v
  captured through the ``Subject`` instead of a transformers eager forward, so they apply to the
  project's own models too;
* ``retrieval`` — Wu et al.'s retrieval scores (``longattn.analysis.retrieval_heads``);
* :func:`moa_windows` — MoA-style elastic windows: each head's attention mass inside sinks + a
  window of each candidate width, profiled on calibration inputs, then a greedy allocation that
  spends a total key budget where it buys the most mass.

A head map is ``[layer][key head]`` of ``True`` (full cache), ``False`` (sinks + the default
window) or an int (sinks + that window). :func:`policy_attend` runs a model under a map — the
same keys the ``heads`` policy of ``LongattnCache`` keeps, as a mask over the prefill — so maps
can be compared on a task at equal budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from longattn.analysis.capture import capture
from longattn.analysis.stats import attention_tiles
from longattn.analysis.subject import Attend, Site, Subject

Tensor = torch.Tensor
HeadMap = list[list[bool | int]]
Say = Callable[[str], None]


def _probabilities(c) -> Tensor:
    """The full attention ``[B, Hq, T, T]`` of one captured layer (calibration lengths only)."""
    return torch.cat([p for _, p, _ in attention_tiles(c.q, c.k, scale=c.site.scale, causal=c.site.causal,
                                                       key_padding_mask=c.site.key_padding_mask)], 2)


def head_scores(subject: Subject, method: str, *, n_samples: int = 8, length: int = 384, span: int = 16,
                seed: int = 0, sinks: int = 4, window: int = 64, say: Say | None = None) -> Tensor:
    """RazorAttention (``"razor"``: echo + induction mass) or DuoAttention-proxy (``"duo"``) scores,
    ``[layers, key heads]`` float64, on ``longattn.memory.calibrate.passkey_batch`` data (the
    calibration of ``longattn calibrate-heads``)."""
    from longattn.memory.calibrate import duo_scores, group_mean, passkey_batch, razor_scores, validate_args

    vocab = getattr(subject, "vocab_size", None)
    validate_args(n_samples=n_samples, length=length, span=span, seed=seed, retrieval_share=0.5, method=method,
                  sinks=sinks, window=window, vocab_size=vocab)
    ids, depth = passkey_batch(n_samples, length, span, vocab, seed=seed, sinks=sinks, window=window)
    sums = torch.zeros(subject.n_layers, subject.n_heads, dtype=torch.float64)
    for s in range(n_samples):
        rec = capture(subject, ids[s:s + 1], values=method == "duo")
        for layer, c in rec.items():
            p = _probabilities(c)
            if method == "razor":
                echo, induction = razor_scores(p, depth[s:s + 1], span)
                sums[layer] += echo + induction
            else:
                sums[layer] += duo_scores(p, c.v, span, sinks=sinks, window=window)
        if say:
            say(f"{method} scores: sample {s + 1}/{n_samples}")
    return group_mean(sums / n_samples, subject.n_kv_heads)


def top_share(scores: Tensor, share: float) -> list[list[bool]]:
    """``[layer][key head]``: True for the top ``share`` of the scores (``select_retrieval``)."""
    from longattn.memory.calibrate import select_retrieval

    return select_retrieval(scores, share).tolist()


# --------------------------------------------------------------------------------------------
# MoA-style elastic windows


def window_coverage(subject: Subject, inputs: Sequence[Tensor], windows: Sequence[int], *, sinks: int = 4,
                    rows: Sequence[Tensor] | None = None) -> Tensor:
    """``[layers, key heads, len(windows)]`` float64: the attention mass each head puts on the first
    ``sinks`` keys and the ``w`` most recent ones (itself included), averaged over the query rows of
    ``inputs`` (``[B, T]`` each, calibration lengths: the layer's full attention is formed) and over
    the query heads that share the key head.

    ``rows``: per input, int64 ``[B, m]`` query positions to profile (MoA weighs heads by their
    effect on the model's answers: for a task, the rows that predict the answer); default every row.
    """
    ws = [int(w) for w in windows]
    if not ws or any(w < 1 for w in ws) or ws != sorted(ws):
        raise ValueError(f"windows must be increasing positive ints, got {list(windows)}")
    if rows is not None and len(rows) != len(inputs):
        raise ValueError(f"rows must give one [B, m] tensor per input ({len(inputs)}), got {len(rows)}")
    g = subject.n_heads // subject.n_kv_heads
    out = torch.zeros(subject.n_layers, subject.n_heads, len(ws), dtype=torch.float64)
    count = 0
    for n, tokens in enumerate(inputs):
        rec = capture(subject, tokens)
        sel = None if rows is None else rows[n].to(torch.long)
        count += tokens.numel() if sel is None else sel.numel()
        for layer, c in rec.items():
            p = _probabilities(c).double()                                       # [B, Hq, T, T]
            tq, tk = p.shape[2], p.shape[3]
            qpos = torch.arange(tk - tq, tk)[:, None]
            kpos = torch.arange(tk)[None, :]
            if sel is not None:
                p = p.gather(2, sel[:, None, :, None].expand(-1, p.shape[1], -1, tk))
                qpos = (sel[0] if sel.shape[0] == 1 else sel)[..., None] + (tk - tq)
            for wi, w in enumerate(ws):
                near = ((kpos > qpos - w) & (kpos <= qpos)) if c.site.causal else ((kpos - qpos).abs() < w)
                keep = (kpos < sinks) | near
                if keep.dim() == 3:        # per-sample rows: [B, m, Tk]
                    keep = keep[:, None]
                out[layer, :, wi] += (p * keep).sum(-1).sum((0, 2))
    out /= max(1, count)
    return out.view(subject.n_layers, subject.n_kv_heads, g, len(ws)).mean(2)


def allocate_windows(coverage: Tensor, windows: Sequence[int], total: int) -> list[list[int]]:
    """MoA's budget allocation: one window per (layer, key head) from ``windows``, their sum at most
    ``total``, maximising the summed attention mass kept (``coverage [layers, key heads, windows]``).

    Solved exactly as a multiple-choice knapsack by dynamic programming over the budget in units of
    the windows' greatest common divisor (a greedy step-by-step choice stalls on heads, such as
    retrieval heads, that gain nothing until their window reaches far back)."""
    import math

    import numpy as np

    ws = [int(w) for w in windows]
    n_l, n_h, _ = coverage.shape
    if total < n_l * n_h * ws[0]:
        raise ValueError(f"total {total} is below every head at the smallest window ({n_l * n_h} × {ws[0]})")
    unit = math.gcd(*ws)
    cap = int(total) // unit
    cost = [w // unit for w in ws]
    cov = coverage.reshape(n_l * n_h, len(ws)).double().numpy()
    best = np.full(cap + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((n_l * n_h, cap + 1), dtype=np.int64)
    for head in range(n_l * n_h):
        new = np.full(cap + 1, -np.inf)
        for i, c in enumerate(cost):
            if c > cap:
                break
            shifted = np.full(cap + 1, -np.inf)
            shifted[c:] = best[:cap + 1 - c] + cov[head, i]
            better = shifted > new
            new[better] = shifted[better]
            choice[head, better] = i
        best = new
    b = int(np.argmax(best))
    picks = [0] * (n_l * n_h)
    for head in range(n_l * n_h - 1, -1, -1):
        picks[head] = int(choice[head, b])
        b -= cost[picks[head]]
    return [[ws[picks[layer * n_h + h]] for h in range(n_h)] for layer in range(n_l)]


def moa_windows(subject: Subject, inputs: Sequence[Tensor], *, uniform: int, windows: Sequence[int] | None = None,
                sinks: int = 4, rows: Sequence[Tensor] | None = None) -> dict[str, Any]:
    """A MoA-style head map: per-head windows spending the same total as ``uniform`` for every head
    (coverage profiled on ``inputs``, at ``rows`` if given: see :func:`window_coverage`).
    Returns ``{"windows": [[int]], "coverage": [[[float]]], "candidates", "uniform", "sinks",
    "uniform_coverage", "moa_coverage"}`` (mean mass kept over heads, uniform vs allocated)."""
    ws = sorted(set(windows if windows is not None else (8, 16, 32, 64, 128, 256, 512, 1024, 2048)) | {int(uniform)})
    cov = window_coverage(subject, inputs, ws, sinks=sinks, rows=rows)
    rows = allocate_windows(cov, ws, uniform * subject.n_layers * subject.n_kv_heads)
    idx = {w: i for i, w in enumerate(ws)}
    moa_cov = sum(float(cov[layer, h, idx[w]]) for layer, row in enumerate(rows) for h, w in enumerate(row))
    uni_cov = float(cov[..., idx[uniform]].sum())
    n = subject.n_layers * subject.n_kv_heads
    return {"windows": rows, "coverage": cov.tolist(), "candidates": ws, "uniform": uniform, "sinks": sinks,
            "uniform_coverage": uni_cov / n, "moa_coverage": moa_cov / n}


# --------------------------------------------------------------------------------------------
# running a model under a head map


def check_head_map(head_map: Any, n_layers: int, n_kv_heads: int) -> HeadMap:
    """``head_map`` (rows, or a dict with ``"retrieval"`` or ``"windows"``) as ``[layer][key head]`` of
    bool / positive int, or a ValueError saying what is wrong."""
    if isinstance(head_map, dict):
        head_map = head_map.get("windows", head_map.get("retrieval"))
    ok_rows = isinstance(head_map, list | tuple) and len(head_map) == n_layers and all(
        isinstance(r, list | tuple) and len(r) == n_kv_heads for r in head_map)
    if not ok_rows:
        raise ValueError(f"head_map must be {n_layers} layers × {n_kv_heads} key heads of bool (True = full cache) "
                         f"or int (a window), got {head_map!r:.200}")
    out: HeadMap = []
    for row in head_map:
        cells = []
        for x in row:
            if isinstance(x, bool):
                cells.append(x)
            elif isinstance(x, int) and x >= 1:
                cells.append(int(x))
            else:
                raise ValueError(f"head_map entries must be bool or a positive int window, got {x!r}")
        out.append(cells)
    return out


def policy_attend(head_map: Any, n_layers: int, n_kv_heads: int, *, sinks: int = 4, window: int = 64) -> Attend:
    """An ``Attend`` in which each key head sees what the ``heads`` KV policy would keep for it: all
    earlier keys (True), or the first ``sinks`` keys and the ``window`` most recent (False; an int
    entry is that head's own window). Exact masked attention, original positions."""
    rows = check_head_map(head_map, n_layers, n_kv_heads)

    def attend(site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not site.causal:
            raise ValueError("head maps describe a causal KV cache; this layer is bidirectional")
        hq, hk = q.shape[1], k.shape[1]
        tq, tk = q.shape[2], k.shape[2]
        qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        causal = kpos <= qpos
        masks = []
        for h in range(hk):
            cell = rows[site.layer][h]
            if cell is True:
                m = causal
            else:
                w = window if cell is False else cell
                m = causal & ((kpos < sinks) | (kpos > qpos - w))
            masks.append(m)
        mask = torch.stack(masks).repeat_interleave(hq // hk, 0)[None]          # [1, Hq, Tq, Tk]
        if site.key_padding_mask is not None:
            mask = mask & site.key_padding_mask.to(torch.bool)[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(hq // hk, 1), v.float().repeat_interleave(hq // hk, 1),
            attn_mask=mask, scale=site.scale)
        return out.to(q.dtype)

    return attend


def kept_keys(head_map: Any, n_layers: int, n_kv_heads: int, length: int, *, sinks: int = 4, window: int = 64) -> int:
    """Keys a ``heads`` cache keeps after ``length`` tokens, summed over layers and key heads: the
    budget two maps are compared at."""
    rows = check_head_map(head_map, n_layers, n_kv_heads)
    return sum(length if c is True else min(length, sinks + (window if c is False else c)) for r in rows for c in r)
