"""PNG plots of a combined benchmark run (``longattn bench --out DIR`` → ``DIR/plots/*.png``).

Every plot function takes the combined results ``{"machine", "config", "suites": {name: suite}}``
(each suite ``{"suite", "machine", "config", "records", "wall_s"}``, record fields as in the suites'
docstrings) and an output path; it returns the path written, or None when the suite it needs was
not run or has no usable record. ``write_all`` draws them all into a folder.

* ``speedup_vs_length``: kernels suite, time of SDPA / time of the method against sequence length,
  causal and non-causal panels; the sparse suite's prefill points and the decode suite's per-step
  ratios get panels of their own when present.
* ``error_vs_density``: sparse frontier, relative output error (and attention-mass recall) against
  the share of the causal triangle each method attended, speed-up written next to timed points.
* ``memory_vs_length``: decode suite, K/V bytes a step reads (``kv_bytes``) and its peak memory
  against the cache length; the kernels suite's prefill peak memory when present.
* ``passkey_heatmap``: tasks suite, passkey retrieval accuracy per method over needle depth × length.

Colours are fixed per method for a whole run (``series_styles``), so a method looks the same in
every plot; variants of one method (``landmark`` / ``landmark (pooled)``) share its colour and differ
by line style. matplotlib is an optional dependency (``pip install longattn[bench]``), imported only
here and only when a plot is drawn, with the headless Agg backend.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: the plots ``write_all`` draws, in report order: name -> function
PLOT_NAMES: tuple[str, ...] = ("speedup_vs_length", "passkey_heatmap", "error_vs_density", "memory_vs_length")

#: colour of the baseline everywhere; other methods take the palette in order of first appearance
BASELINE_COLOR = "#000000"
_BASELINES = ("sdpa",)
# tab10, then darker tones from tab20b/tab20c: 20 colours distinct enough side by side
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_VARIANT_LINESTYLES = ("-", "--", ":", "-.")
#: colour map of accuracy heat maps (perceptually uniform, readable in grey and by colour-blind readers)
HEATMAP_CMAP = "viridis"
_DPI = 100


def _mpl():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the benchmark plots need matplotlib, which is not installed: pip install 'longattn[bench]'"
        ) from e
    # Agg draws to files only: no display needed, and it never opens a window on a server
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# -- reading the combined results -----------------------------------------------------------


def suite_records(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The records of suite ``name`` (empty when that suite was not run)."""
    suite = (results.get("suites") or {}).get(name)
    if not isinstance(suite, dict):
        return []
    return [r for r in suite.get("records") or [] if isinstance(r, dict)]


def machine_line(results: dict[str, Any]) -> str:
    """``"AMD EPYC, 2 threads, torch 2.13.0+cpu"``: what a plot's numbers were measured on."""
    m = results.get("machine")
    if not m:
        m = next((s.get("machine") for s in (results.get("suites") or {}).values()
                  if isinstance(s, dict) and s.get("machine")), None) or {}
    parts = [str(m.get("cpu_model") or m.get("machine") or "unknown machine")]
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} threads")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    return ", ".join(parts)


def _is_ok(rec: dict[str, Any]) -> bool:
    # records without a status (the sparse frontier) count as measured
    status = rec.get("status", "ok")
    return status is None or str(status).startswith("ok")


def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, None, NaN, inf, not a number)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def kernel_series(rec: dict[str, Any]) -> str:
    """The name a kernels record is plotted under: its label, ``[tiled]`` for a fallback rerun."""
    return str(rec.get("label") or rec.get("method")) + (" [tiled]" if rec.get("fallback_for") else "")


def kernel_shape(rec: dict[str, Any]) -> str:
    """A kernels record's CAB shape, "self" or "cross" (records written before cross ran are self)."""
    return str(rec.get("shape") or "self")


#: CAB's four kernel patterns in report order, as ``(shape, causal)``
KERNEL_PATTERNS: tuple[tuple[str, bool], ...] = (("self", True), ("self", False), ("cross", True), ("cross", False))


def kernel_pattern_records(records: Iterable[dict[str, Any]], shape: str, causal: bool) -> list[dict[str, Any]]:
    """The kernels records of one pattern."""
    return [r for r in records if bool(r.get("causal")) == causal and kernel_shape(r) == shape]


def kernel_pattern_title(shape: str, causal: bool, records: list[dict[str, Any]], *, brief: bool = False) -> str:
    """One pattern's heading, shared by report.md, report.html and the plots: "Causal",
    "Non-causal", "Causal cross (keys / 4 queries, the last query aligned with the last key)",
    "Non-causal cross (keys / 4 queries)"; the ratio comes from the records. ``brief`` (plot
    titles) leaves out the alignment clause."""
    title = "Causal" if causal else "Non-causal"
    if shape != "cross":
        return title
    tq = _num(records[0].get("tokens_q")) if records else None
    ratio = f"keys / {float(records[0]['tokens']) / tq:.0f} queries" if tq else "fewer queries than keys"
    aligned = ", the last query aligned with the last key" if causal and not brief else ""
    return f"{title} cross ({ratio}{aligned})"


def frontier_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Sparse-suite records of the density ↔ error ↔ speed frontier (``part == "frontier"``)."""
    return [r for r in suite_records(results, "sparse") if r.get("part") == "frontier"]


def decode_records(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Decode-suite records of one KV layout, and that layout's name (None when the records carry
    none). The suite runs MHA and GQA; lines mixing them would zigzag, so the plots draw the
    first layout run (its name goes in the panel titles) and the report's table lists all."""
    recs = suite_records(results, "decode")
    layouts = list(dict.fromkeys(r.get("layout") for r in recs))
    if len(layouts) <= 1:
        return recs, (str(layouts[0]) if layouts and layouts[0] is not None else None)
    first = layouts[0]
    return [r for r in recs if r.get("layout") == first], (None if first is None else str(first))


def passkey_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Tasks-suite records of the passkey task."""
    return [r for r in suite_records(results, "tasks") if r.get("task") == "passkey"]


def _plotted_names(results: dict[str, Any]) -> list[str]:
    names: list[str] = []

    def add(seq: Iterable[str]) -> None:
        for n in sorted(set(seq)):
            if n not in names:
                names.append(n)

    add(kernel_series(r) for r in suite_records(results, "kernels"))
    add(str(r.get("method")) for r in frontier_records(results))
    add(str(r.get("method")) for r in decode_records(results)[0])
    add(str(r.get("method")) for r in suite_records(results, "tasks"))
    return names


def base_name(name: str) -> str:
    """The method a series belongs to: ``"landmark (pooled)"``, ``"landmark, sink forced"`` and
    ``"landmark [tiled]"`` all give ``"landmark"``."""
    return re.split(r"\s*[\(\[,]", name, maxsplit=1)[0].strip() or name


def series_styles(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{series name: {"color", "marker", "linestyle"}}`` for every method any plot draws.

    One colour per method (by ``base_name``), taken from a 20-colour palette in order of first
    appearance (kernels, sparse, decode, tasks suites; sorted within each), SDPA black; past 20
    methods the colours repeat with another marker. Variants of a method keep its colour and marker
    and get a dashed or dotted line. The same results always give the same styles, so every plot of
    one report agrees."""
    styles: dict[str, dict[str, Any]] = {}
    bases: dict[str, int] = {}
    variants: dict[str, int] = {}
    for name in _plotted_names(results):
        base = base_name(name)
        if base not in bases:
            bases[base] = len([b for b in bases if b not in _BASELINES])
        i = bases[base]
        color = BASELINE_COLOR if base in _BASELINES else _PALETTE[i % len(_PALETTE)]
        marker = _MARKERS[(i // len(_PALETTE)) % len(_MARKERS)]
        if name == base:
            linestyle = "-"
        else:
            variants[base] = variants.get(base, 0) + 1
            linestyle = _VARIANT_LINESTYLES[variants[base] % len(_VARIANT_LINESTYLES)]
        styles[name] = {"color": color, "marker": marker, "linestyle": linestyle}
    return styles


def _style(styles: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return styles.get(name) or {"color": "#444444", "marker": "o", "linestyle": "-"}


# -- formatting -----------------------------------------------------------------------------


def fmt_tokens(n: float) -> str:
    """``1024 → "1k"``, ``1536 → "1.5k"``, ``131072 → "128k"``, ``1048576 → "1M"``, ``500 → "500"``."""
    n = float(n)
    if n >= 2**20 and n % 2**18 == 0:
        return f"{n / 2**20:g}M"
    if n >= 1024 and n % 256 == 0:
        return f"{n / 1024:g}k"
    return f"{n:g}"


def fmt_bytes(b: float) -> str:
    """Binary units: ``"512 B"``, ``"3 KiB"``, ``"1.5 MiB"``, ``"2 GiB"``."""
    b = float(b)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(r: float) -> str:
    """``2.0 → "2×"``, ``0.25 → "0.25×"``."""
    return f"{r:.3g}×"


def _token_axis(ax, values: Iterable[float], label: str) -> None:
    """Log-2 x axis ticked at the lengths run, written ``1k``, ``2k``, …"""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted({float(v) for v in values})
    ax.set_xscale("log", base=2)
    if ticks:
        if len(ticks) > 9:  # keep the labels from running into each other
            step = math.ceil(len(ticks) / 9)
            ticks = ticks[::step]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_tokens(x)))
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(lo / 1.25, hi * 1.25)
    ax.set_xlabel(label)


def _ratio_axis(ax, values: Iterable[float]) -> None:
    """Log y axis for ratios (2× and 0.5× equally far from 1×), a dashed line at 1×."""
    from matplotlib.ticker import FuncFormatter

    vals = [v for v in values if v > 0]
    ax.set_yscale("log")
    if vals:
        lo, hi = min(min(vals), 1.0), max(max(vals), 1.0)
        ax.set_ylim(lo / 1.5, hi * 1.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_ratio(y)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
    ax.axhline(1.0, color=BASELINE_COLOR, linestyle="--", linewidth=1.2, zorder=1)
    ax.text(0.01, 1.0, " SDPA = 1×", transform=ax.get_yaxis_transform(), va="bottom", ha="left",
            fontsize=8, color=BASELINE_COLOR)


def _bytes_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda b, _: fmt_bytes(b)))


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax, styles, name: str, xs, ys, **kw) -> None:
    pts = sorted(zip(xs, ys))
    st = _style(styles, name)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=st["color"], marker=st["marker"],
            linestyle=st["linestyle"], linewidth=1.8, markersize=5, **kw)


def _group(records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list]:
    out: dict[Any, list] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return out


def _figure_legend(fig, axes, spare=None) -> None:
    """One legend for all panels (deduplicated by label): in the unused panel slot ``spare`` when
    the grid has one, else right of the panels."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        return
    if spare is not None:
        spare.set_visible(True)
        spare.axis("off")
        spare.legend(list(seen.values()), list(seen.keys()), loc="center", fontsize=9, frameon=False,
                     ncol=1 if len(seen) <= 12 else 2, title="method", title_fontsize=10)
    else:
        fig.legend(list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=9, frameon=False, ncol=1 if len(seen) <= 22 else 2, title="method",
                   title_fontsize=10)


def _save(fig, path: str | Path) -> Path:
    plt = _mpl()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


# -- the plots ------------------------------------------------------------------------------


#: the density whose sparse-prefill speed-ups the speed-up plot draws against length
FRONTIER_SPEED_DENSITY = 0.10


def _frontier_speed_points(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(method, tokens, ratio)`` of timed frontier records at the density nearest
    ``FRONTIER_SPEED_DENSITY`` per method and length; empty unless the frontier was timed at two
    lengths or more (one length is a vertical stripe, and ``error_vs_density`` labels it already)."""
    timed = [r for r in frontier_records(results)
             if _num(r.get("ratio_to_sdpa")) and _num(r.get("tokens")) and _num(r.get("density"))]
    if len({int(r["tokens"]) for r in timed}) < 2:
        return []
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in timed:
        key = (str(r.get("method")), int(r["tokens"]))
        gap = abs(math.log(float(r["density"]) / FRONTIER_SPEED_DENSITY))
        if key not in best or gap < abs(math.log(float(best[key]["density"]) / FRONTIER_SPEED_DENSITY)):
            best[key] = r
    return [(m, float(n), float(r["ratio_to_sdpa"])) for (m, n), r in best.items()]


def speedup_vs_length(results: dict[str, Any], path: str | Path) -> Path | None:
    """Speed-up over torch SDPA (its median time / the method's, same run, > 1 = faster) against
    sequence length: kernels suite causal and non-causal panels; sparse prefill and decode-step
    panels when those suites measured ratios. Log-2 x, log y, dashed line at 1×."""
    panels: list[tuple[str, str, list[tuple[str, float, float]]]] = []
    kern = [r for r in suite_records(results, "kernels")
            if _is_ok(r) and _num(r.get("ratio_to_sdpa")) and _num(r.get("tokens"))
            and base_name(kernel_series(r)) not in _BASELINES]
    # CAB's four patterns get a panel each: self and cross timings are different shapes and
    # would zigzag on one line. Cross runs fewer queries (tokens_q) than keys (tokens).
    for shape, causal in KERNEL_PATTERNS:
        group = kernel_pattern_records(kern, shape, causal)
        if not group:
            continue
        title = "exact kernels, " + kernel_pattern_title(shape, causal, group, brief=True).lower()
        xlabel = "keys (tokens)" if shape == "cross" else "sequence length (tokens)"
        panels.append((title, xlabel, [(kernel_series(r), float(r["tokens"]), float(r["ratio_to_sdpa"]))
                                       for r in group]))
    front = _frontier_speed_points(results)
    if front:
        panels.append((f"sparse prefill, causal, density ≈ {FRONTIER_SPEED_DENSITY:.0%} (sparse suite)",
                       "sequence length (tokens)", front))
    dec_recs, layout = decode_records(results)
    dec = [(str(r.get("method")), float(r["cache"]), float(r["ratio_to_sdpa"])) for r in dec_recs
           if _is_ok(r) and _num(r.get("ratio_to_sdpa")) and _num(r.get("cache"))
           and base_name(str(r.get("method"))) not in _BASELINES]
    if dec:
        panels.append((f"one decode step{f', {layout}' if layout else ''} (decode suite)", "tokens in the KV cache",
                       dec))
    if not panels:
        return None
    plt = _mpl()
    styles = series_styles(results)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.5 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, xlabel, pts) in zip(flat, panels):
        for name, group in _group(pts, lambda p: p[0]).items():
            _line(ax, styles, name, [p[1] for p in group], [p[2] for p in group], zorder=3)
        _token_axis(ax, [p[1] for p in pts], xlabel)
        _ratio_axis(ax, [p[2] for p in pts])
        ax.set_ylabel("speed-up over SDPA (×, log)")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Speed-up over torch SDPA vs length (float32; > 1× = faster) — {machine_line(results)}",
                 fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, flat[: len(panels)], flat[len(panels)] if len(flat) > len(panels) else None)
    return _save(fig, path)


def error_vs_density(results: dict[str, Any], path: str | Path) -> Path | None:
    """Sparse frontier: relative output error ``‖out − ref‖ / ‖ref‖`` (log y) and attention-mass
    recall against density (share of the causal triangle attended), one line per method; each timed
    point carries its speed-up over SDPA as a small label."""
    recs = [r for r in frontier_records(results) if _num(r.get("density")) and _num(r.get("rel_err")) is not None]
    if not recs:
        return None
    plt = _mpl()
    styles = series_styles(results)
    lengths = sorted({int(r["tokens"]) for r in recs if _num(r.get("tokens"))})
    multi_len = len(lengths) > 1
    with_recall = any(_num(r.get("recall")) is not None for r in recs)
    ncols = 2 if with_recall else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.4 * ncols, 3.9), squeeze=False)
    ax_err = axes[0][0]
    densities = [float(r["density"]) for r in recs]
    # a rel_err of exactly 0 (an exact method) cannot sit on a log axis: clip it to a floor
    positive = [float(r["rel_err"]) for r in recs if float(r["rel_err"]) > 0]
    floor = min(positive) / 3 if positive else 1e-8

    def key(r):
        return (str(r.get("method")), int(r["tokens"]) if (multi_len and _num(r.get("tokens"))) else None)

    for (method, tokens), group in _group(recs, key).items():
        name = method if tokens is None else f"{method} @ {fmt_tokens(tokens)}"
        st = _style(styles, method)
        ls = st["linestyle"] if tokens is None else _VARIANT_LINESTYLES[lengths.index(tokens) % 4]
        group = sorted(group, key=lambda r: float(r["density"]))
        xs = [float(r["density"]) for r in group]
        ys = [max(float(r["rel_err"]), floor) for r in group]
        ax_err.plot(xs, ys, label=name, color=st["color"], marker=st["marker"], linestyle=ls, linewidth=1.8,
                    markersize=5)
        for x, y, r in zip(xs, ys, group):
            ratio = _num(r.get("ratio_to_sdpa"))
            # with several lengths, label the longest only: two labels per point overlap
            if ratio is not None and (tokens is None or tokens == lengths[-1]):
                ax_err.annotate(fmt_ratio(ratio), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=st["color"])
        if with_recall:
            pts = [(float(r["density"]), float(r["recall"])) for r in group if _num(r.get("recall")) is not None]
            if pts:
                axes[0][1].plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=st["color"],
                                marker=st["marker"], linestyle=ls, linewidth=1.8, markersize=5)
    log_x = max(densities) / max(min(densities), 1e-12) > 8
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted(set(densities))
    if len(ticks) > 8:
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    for ax in [a for row in axes for a in row]:
        if log_x:
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}".rstrip("0").rstrip(".") if x >= 1
                                                   else f"{100 * x:.3g}%"))
        ax.set_xlabel("density (share of the causal triangle attended" + (", log)" if log_x else ")"))
        ax.grid(True, which="major", alpha=0.3)
    ax_err.set_yscale("log")
    ax_err.set_ylabel("relative output error (log)")
    at = f" at {fmt_tokens(lengths[-1])}" if multi_len else ""
    ax_err.set_title(f"error vs density (labels: speed-up over SDPA{at})", fontsize=11)
    if with_recall:
        axes[0][1].set_ylabel("attention-mass recall (1 = all of it)")
        recalls = [float(r["recall"]) for r in recs if _num(r.get("recall")) is not None]
        lo = min(recalls) if recalls else 0.0
        # zoom on the range measured (recall near 1 is where the methods differ), never below 0
        axes[0][1].set_ylim(max(0.0, lo - 0.15 * (1.0 - lo) - 0.01), 1.005)
        axes[0][1].set_title("attention-mass recall vs density", fontsize=11)
    where = f"{fmt_tokens(lengths[0])} tokens" if len(lengths) == 1 else "several lengths"
    fig.suptitle(f"Sparse methods: error vs density ({where}, float32) — {machine_line(results)}", fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, [a for row in axes for a in row])
    return _save(fig, path)


def memory_vs_length(results: dict[str, Any], path: str | Path) -> Path | None:
    """Memory against length, log-log: the decode suite's K/V bytes a step reads (``kv_bytes``) and
    its peak memory per cache length (first KV layout, see ``decode_records``); the kernels suite's
    prefill peak memory (causal) per length."""
    dec_recs, layout = decode_records(results)
    dec = [r for r in dec_recs if _is_ok(r) and _num(r.get("cache"))]
    lay = f", {layout}" if layout else ""
    panels: list[tuple[str, str, list[tuple[str, float, float]]]] = []
    kv = [(str(r.get("method")), float(r["cache"]), float(r["kv_bytes"])) for r in dec if _num(r.get("kv_bytes"))]
    if kv:
        panels.append((f"decode{lay}: K/V bytes read per step", "tokens in the KV cache", kv))
    peak = [(str(r.get("method")), float(r["cache"]), float(r["peak_mem_bytes"])) for r in dec
            if _num(r.get("peak_mem_bytes")) and float(r["peak_mem_bytes"]) > 0]
    if peak:
        panels.append((f"decode{lay}: peak memory per step (RSS growth)", "tokens in the KV cache", peak))
    kern = [(kernel_series(r), float(r["tokens"]), float(r["peak_mem_bytes"]))
            for r in suite_records(results, "kernels")
            if _is_ok(r) and r.get("causal") and kernel_shape(r) == "self" and _num(r.get("tokens"))
            and _num(r.get("peak_mem_bytes"))
            and float(r["peak_mem_bytes"]) > 0]
    if kern:
        panels.append(("prefill, causal: peak memory (RSS growth, kernels suite)", "sequence length (tokens)", kern))
    if not panels:
        return None
    plt = _mpl()
    styles = series_styles(results)
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.5 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, xlabel, pts) in zip(flat, panels):
        for name, group in _group(pts, lambda p: p[0]).items():
            _line(ax, styles, name, [p[1] for p in group], [p[2] for p in group])
        _token_axis(ax, [p[1] for p in pts], xlabel)
        ax.set_yscale("log", base=2)
        _bytes_axis(ax)
        ax.set_ylabel("bytes (log)")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Memory vs length (float32; RSS figures approximate) — {machine_line(results)}", fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, flat[: len(panels)], flat[len(panels)] if len(flat) > len(panels) else None)
    return _save(fig, path)


def passkey_heatmap(results: dict[str, Any], path: str | Path) -> Path | None:
    """Passkey retrieval accuracy (0..1) per method: needle depth (y, 0 = start of the context) ×
    context length (x), the value written in each cell, one shared colour bar. Cells not run or
    failed are grey and marked."""
    recs = [r for r in passkey_records(results) if _num(r.get("length")) and _num(r.get("depth")) is not None]
    if not recs:
        return None
    plt = _mpl()
    import numpy as np

    styles = series_styles(results)
    methods = list(dict.fromkeys(str(r.get("method")) for r in recs))
    lengths = sorted({int(r["length"]) for r in recs})
    depths = sorted({round(float(r["depth"]), 6) for r in recs})
    cell_w, cell_h = 0.5, 0.3
    panel_w = max(2.2, cell_w * len(lengths) + 0.9)
    panel_h = max(1.6, cell_h * len(depths) + 0.9)
    # as many panels per row as fit ~11 inches (1100 px): the report shows it at 100% zoom
    max_cols = max(1, int(10.5 // panel_w))
    nrows = math.ceil(len(methods) / max_cols)
    ncols = math.ceil(len(methods) / nrows)  # balanced rows: 4 methods as 2 × 2, not 3 + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.8), squeeze=False)
    flat = [ax for row in axes for ax in row]
    cmap = plt.get_cmap(HEATMAP_CMAP).with_extremes(bad="#d9d9d9")  # cells not run: grey
    image = None
    n_samples = sorted({int(r["n"]) for r in recs if _num(r.get("n"))})
    for ax, method in zip(flat, methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        why = np.full(grid.shape, "", dtype=object)
        for r in recs:
            if str(r.get("method")) != method:
                continue
            i, j = depths.index(round(float(r["depth"]), 6)), lengths.index(int(r["length"]))
            acc = _num(r.get("accuracy"))
            if _is_ok(r) and acc is not None:
                grid[i, j] = acc
            else:
                why[i, j] = "×"  # ran and failed / unsupported: see the report's failures list
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                          origin="upper", interpolation="nearest")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = grid[i, j]
                if np.isnan(v):
                    text, color = (why[i, j] or "–"), "#444444"
                else:
                    text = f"{v:.2f}"
                    # dark end of viridis needs white text, light end black
                    color = "white" if v < 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(lengths)), [fmt_tokens(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=9)
        ax.set_ylabel("needle depth", fontsize=9)
        ax.set_title(method, fontsize=11, color=_style(styles, method)["color"], fontweight="bold")
    for ax in flat[len(methods):]:
        ax.set_visible(False)
    n_text = f"{n_samples[0]} samples per cell" if len(n_samples) == 1 else "samples per cell vary"
    fig.suptitle(f"Passkey retrieval accuracy, depth × length ({n_text}) — {machine_line(results)}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("accuracy (0..1)")
    return _save(fig, path)


PLOTS: dict[str, Callable[[dict[str, Any], str | Path], Path | None]] = {
    "speedup_vs_length": speedup_vs_length,
    "error_vs_density": error_vs_density,
    "memory_vs_length": memory_vs_length,
    "passkey_heatmap": passkey_heatmap,
}


def write_all(results: dict[str, Any], plot_dir: str | Path) -> dict[str, Path]:
    """Draw every plot whose data is present into ``plot_dir/NAME.png``; ``{name: path}`` of those
    written. A plot that fails is reported with a warning and left out, so that one bad record
    does not cost the rest of a long run's report; a missing matplotlib raises ImportError."""
    _mpl()  # fail early, with the install hint, rather than once per plot
    out = Path(plot_dir)
    written: dict[str, Path] = {}
    for name in PLOT_NAMES:
        try:
            path = PLOTS[name](results, out / f"{name}.png")
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - reported, the other plots still get drawn
            warnings.warn(f"plot {name} failed and is left out of the report: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
            continue
        if path is not None:
            written[name] = path
    return written


__all__ = [
    "PLOT_NAMES", "PLOTS", "base_name", "error_vs_density", "fmt_bytes", "fmt_ratio", "fmt_tokens",
    "machine_line", "memory_vs_length", "passkey_heatmap", "series_styles", "speedup_vs_length",
    "suite_records", "write_all",
]
