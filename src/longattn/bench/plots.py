"""PNG plots of a benchmark run (``longattn bench --out DIR`` → ``DIR/plots/*.png``).

The suites declare what they contribute (``Suite.panels``: which records, which x and y, one line
per series); this module only draws. ``FIGURES`` lists the figures in report order, each with its
kind of axes:

* ``speedup_vs_length`` — lines, SDPA's time / the method's against length (log 2 x, log y,
  dashed line at 1×): the kernels suite's four CAB patterns, the sparse frontier at 10% density
  when it ran at two lengths or more, the decode step;
* ``passkey_heatmap`` — accuracy per method over needle depth × length (tasks suite);
* ``error_vs_density`` — the sparse frontier: relative error (log) and attention-mass recall
  against density, speed-ups written next to timed points;
* ``memory_vs_length`` — lines, bytes against length: K/V bytes a decode step reads, its peak
  memory, the kernels' prefill peak memory, the recurrent ops' prefill peak memory;
* ``accuracy_vs_state`` — points, MQAR accuracy against the bytes of state a model carries per
  sequence (log 2 x), one line per mixer through its widths (recurrent suite).

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

from longattn.bench.suite import Panel, num

#: figure name -> (kind, title); the report shows them in this order
FIGURES: dict[str, tuple[str, str]] = {
    "speedup_vs_length": ("ratio", "Speed-up over torch SDPA vs length (float32; > 1× = faster)"),
    "passkey_heatmap": ("heatmap", "Passkey retrieval accuracy, depth × length"),
    "error_vs_density": ("density", "Sparse methods: error and recall vs density (float32)"),
    "memory_vs_length": ("bytes", "Memory vs length (float32; RSS figures approximate)"),
    "accuracy_vs_state": ("state", "Associative recall (MQAR) accuracy vs state size"),
}
PLOT_NAMES: tuple[str, ...] = tuple(FIGURES)

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


# -- what the suites declare --------------------------------------------------------------


def _is_ok(rec: dict[str, Any]) -> bool:
    status = rec.get("status", "ok")
    return status is None or str(status).startswith("ok")


def machine_line(results: dict[str, Any]) -> str:
    """``"AMD EPYC (AVX512 + avx512_bf16), 2 threads, torch 2.13.0+cpu"``: what a plot's numbers
    were measured on."""
    m = results.get("machine")
    if not m:
        m = next((s.get("machine") for s in (results.get("suites") or {}).values()
                  if isinstance(s, dict) and s.get("machine")), None) or {}
    parts = [str(m.get("cpu_model") or m.get("machine") or "unknown machine")
             + (f" ({m['cpu_capability']})" if m.get("cpu_capability") else "")]
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} threads")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    return ", ".join(parts)


def panel_data(results: dict[str, Any]) -> dict[str, list[tuple[Panel, list[dict[str, Any]]]]]:
    """``figure -> [(panel, its records)]`` for every panel of every suite that ran with at least
    one usable record (passed, with a finite x and, for lines, a finite y)."""
    from longattn.bench import get_suite

    figures: dict[str, list[tuple[Panel, list[dict[str, Any]]]]] = {name: [] for name in FIGURES}
    for name, res in (results.get("suites") or {}).items():
        try:
            suite = get_suite(name)
        except ValueError:
            continue
        recs = [r for r in (res or {}).get("records") or [] if isinstance(r, dict)]
        for panel in suite.panels:
            kind = FIGURES[panel.plot][0]
            keep = [r for r in recs if (panel.where is None or panel.where(r)) and num(r.get(panel.x)) is not None
                    and (kind == "heatmap" or (_is_ok(r) and num(r.get(panel.y)) is not None))]
            if kind in ("ratio", "bytes"):
                keep = [r for r in keep if num(r[panel.y]) > 0]
            if keep:
                figures[panel.plot].append((panel, keep))
    return figures


def _plotted_names(data: dict[str, list[tuple[Panel, list[dict[str, Any]]]]]) -> list[str]:
    names: list[str] = []
    for entries in data.values():
        batch = sorted({str(p.series(r)) for p, recs in entries for r in recs})
        names += [n for n in batch if n not in names]
    return names


def base_name(name: str) -> str:
    """The method a series belongs to: ``"landmark (pooled)"``, ``"landmark, sink forced"`` and
    ``"landmark [tiled]"`` all give ``"landmark"``."""
    return re.split(r"\s*[\(\[,]", name, maxsplit=1)[0].strip() or name


def series_styles(results: dict[str, Any], data=None) -> dict[str, dict[str, Any]]:
    """``{series name: {"color", "marker", "linestyle"}}`` for every method any plot draws
    (``data``: ``panel_data(results)`` when the caller has it already).

    One colour per method (by ``base_name``), taken from a 20-colour palette in order of first
    appearance (figure by figure in ``FIGURES`` order; sorted within each), SDPA black; past 20
    methods the colours repeat with another marker. Variants of a method keep its colour and marker
    and get a dashed or dotted line. The same results always give the same styles, so every plot of
    one report agrees."""
    styles: dict[str, dict[str, Any]] = {}
    bases: dict[str, int] = {}
    variants: dict[str, int] = {}
    for name in _plotted_names(panel_data(results) if data is None else data):
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


# -- the figures ----------------------------------------------------------------------------


def _panel_title(panel: Panel, recs: list[dict[str, Any]]) -> str:
    return panel.title(recs) if callable(panel.title) else panel.title


def _grid(plt, n: int):
    ncols = min(2, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.5 * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def line_figure(name: str, entries, results: dict[str, Any], styles: dict[str, dict[str, Any]],
                path: str | Path) -> Path | None:
    """Panels of lines (x: tokens, log 2; y: a ratio to SDPA or bytes, log; or for "state" x:
    bytes of state, log 2, y: accuracy 0–1), one legend."""
    kind, title = FIGURES[name]
    plt = _mpl()
    fig, flat = _grid(plt, len(entries))
    for ax, (panel, recs) in zip(flat, entries):
        pts = [(str(panel.series(r)), float(r[panel.x]), float(r[panel.y])) for r in recs]
        for series, group in _group(pts, lambda p: p[0]).items():
            _line(ax, styles, series, [p[1] for p in group], [p[2] for p in group], zorder=3)
        if kind == "state":
            ax.set_xscale("log", base=2)
            _bytes_axis(ax, "x")
            ax.set_xlabel(panel.xlabel)
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("accuracy")
        elif kind == "ratio":
            _token_axis(ax, [p[1] for p in pts], panel.xlabel)
            _ratio_axis(ax, [p[2] for p in pts])
            ax.set_ylabel("speed-up over SDPA (×, log)")
        else:
            _token_axis(ax, [p[1] for p in pts], panel.xlabel)
            ax.set_yscale("log", base=2)
            _bytes_axis(ax)
            ax.set_ylabel("bytes (log)")
        ax.set_title(_panel_title(panel, recs), fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
    for ax in flat[len(entries):]:
        ax.set_visible(False)
    fig.suptitle(f"{title} — {machine_line(results)}", fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, flat[: len(entries)], flat[len(entries)] if len(flat) > len(entries) else None)
    return _save(fig, path)


def density_figure(name: str, entries, results: dict[str, Any], styles: dict[str, dict[str, Any]],
                   path: str | Path) -> Path | None:
    """Panels against density (share of the causal triangle attended): an error panel (log y,
    exact zeros clipped to a floor, ``annotate`` values written next to points) or a recall panel
    (linear, zoomed on the range measured). With several lengths each gets its own line."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(entries), figsize=(5.4 * len(entries), 3.9), squeeze=False)
    flat = list(axes[0])
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    for ax, (panel, recs) in zip(flat, entries):
        lengths = sorted({int(r["tokens"]) for r in recs if num(r.get("tokens"))})
        multi = len(lengths) > 1
        ys_all = [float(r[panel.y]) for r in recs]
        is_error = panel.y != "recall"
        positive = [y for y in ys_all if y > 0]
        floor = min(positive) / 3 if positive else 1e-8

        def key(r):
            return (str(panel.series(r)), int(r["tokens"]) if multi and num(r.get("tokens")) else None)

        for (series, tokens), group in _group(recs, key).items():
            label = series if tokens is None else f"{series} @ {fmt_tokens(tokens)}"
            st = _style(styles, series)
            ls = st["linestyle"] if tokens is None else _VARIANT_LINESTYLES[lengths.index(tokens) % 4]
            group = sorted(group, key=lambda r: float(r[panel.x]))
            xs = [float(r[panel.x]) for r in group]
            ys = [max(float(r[panel.y]), floor) if is_error else float(r[panel.y]) for r in group]
            ax.plot(xs, ys, label=label, color=st["color"], marker=st["marker"], linestyle=ls, linewidth=1.8,
                    markersize=5)
            if panel.annotate:
                for x, y, r in zip(xs, ys, group):
                    v = num(r.get(panel.annotate))
                    # with several lengths, label the longest only: two labels per point overlap
                    if v is not None and (tokens is None or tokens == lengths[-1]):
                        ax.annotate(fmt_ratio(v), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=st["color"])
        xs_all = [float(r[panel.x]) for r in recs]
        log_x = max(xs_all) / max(min(xs_all), 1e-12) > 8
        ticks = sorted(set(xs_all))
        if len(ticks) > 8:
            ticks = ticks[:: math.ceil(len(ticks) / 8)]
        if log_x:
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}".rstrip("0").rstrip(".") if x >= 1
                                                   else f"{100 * x:.3g}%"))
        ax.set_xlabel("density (share of the causal triangle attended" + (", log)" if log_x else ")"))
        ax.grid(True, which="major", alpha=0.3)
        if is_error:
            ax.set_yscale("log")
            ax.set_ylabel("relative output error (log)")
        else:
            lo = min(ys_all)
            # zoom on the range measured (recall near 1 is where the methods differ), never below 0
            ax.set_ylim(max(0.0, lo - 0.15 * (1.0 - lo) - 0.01), 1.005)
            ax.set_ylabel("attention-mass recall (1 = all of it)")
        at = f" at {fmt_tokens(lengths[-1])}" if multi and panel.annotate else ""
        ax.set_title(_panel_title(panel, recs) + at, fontsize=11)
    lengths = sorted({int(r["tokens"]) for _, recs in entries for r in recs if num(r.get("tokens"))})
    where = f"{fmt_tokens(lengths[0])} tokens" if len(lengths) == 1 else "several lengths"
    fig.suptitle(f"{FIGURES[name][1]} ({where}) — {machine_line(results)}", fontsize=12)
    fig.tight_layout()
    _figure_legend(fig, flat)
    return _save(fig, path)


def heatmap_figure(name: str, entries, results: dict[str, Any], styles: dict[str, dict[str, Any]],
                   path: str | Path) -> Path | None:
    """One heat map per series: ``y`` (rows) × ``x`` (columns), the ``value`` (0..1) written in each
    cell, one shared colour bar; cells not run are grey, cells that failed are marked ×."""
    panel, recs = entries[0]
    recs = [r for p, rs in entries for r in rs]
    plt = _mpl()
    import numpy as np

    methods = list(dict.fromkeys(str(panel.series(r)) for r in recs))
    xs = sorted({int(r[panel.x]) for r in recs})
    ys = sorted({round(float(r[panel.y]), 6) for r in recs if num(r.get(panel.y)) is not None})
    cell_w, cell_h = 0.5, 0.3
    panel_w = max(2.2, cell_w * len(xs) + 0.9)
    panel_h = max(1.6, cell_h * len(ys) + 0.9)
    # as many panels per row as fit ~11 inches (1100 px): the report shows it at 100% zoom
    max_cols = max(1, int(10.5 // panel_w))
    nrows = math.ceil(len(methods) / max_cols)
    ncols = math.ceil(len(methods) / nrows)  # balanced rows: 4 methods as 2 × 2, not 3 + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.8), squeeze=False)
    flat = [ax for row in axes for ax in row]
    cmap = plt.get_cmap(HEATMAP_CMAP).with_extremes(bad="#d9d9d9")  # cells not run: grey
    image = None
    n_samples = sorted({int(r["n"]) for r in recs if num(r.get("n"))})
    for ax, method in zip(flat, methods):
        grid = np.full((len(ys), len(xs)), np.nan)
        why = np.full(grid.shape, "", dtype=object)
        for r in recs:
            if str(panel.series(r)) != method or num(r.get(panel.y)) is None:
                continue
            i, j = ys.index(round(float(r[panel.y]), 6)), xs.index(int(r[panel.x]))
            acc = num(r.get(panel.value or "value"))
            if _is_ok(r) and acc is not None:
                grid[i, j] = acc
            else:
                why[i, j] = "×"  # ran and failed / unsupported: see the report's failures list
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                          origin="upper", interpolation="nearest")
        for i in range(len(ys)):
            for j in range(len(xs)):
                v = grid[i, j]
                if np.isnan(v):
                    text, color = (why[i, j] or "–"), "#444444"
                else:
                    text = f"{v:.2f}"
                    # dark end of viridis needs white text, light end black
                    color = "white" if v < 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(xs)), [fmt_tokens(n) for n in xs], fontsize=8)
        ax.set_yticks(range(len(ys)), [f"{d:.0%}" for d in ys], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=9)
        ax.set_ylabel("needle depth", fontsize=9)
        ax.set_title(method, fontsize=11, color=_style(styles, method)["color"], fontweight="bold")
    for ax in flat[len(methods):]:
        ax.set_visible(False)
    n_text = f"{n_samples[0]} samples per cell" if len(n_samples) == 1 else "samples per cell vary"
    fig.suptitle(f"{FIGURES[name][1]} ({n_text}) — {machine_line(results)}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("accuracy (0..1)")
    return _save(fig, path)


_DRAW: dict[str, Callable[..., Path | None]] = {"ratio": line_figure, "bytes": line_figure,
                                                "density": density_figure, "heatmap": heatmap_figure,
                                                "state": line_figure}


def write_all(results: dict[str, Any], plot_dir: str | Path) -> dict[str, Path]:
    """Draw every figure some suite has data for into ``plot_dir/NAME.png``; ``{name: path}`` of
    those written. A figure that fails is reported with a warning and left out, so that one bad
    record does not cost the rest of a long run's report; a missing matplotlib raises ImportError."""
    _mpl()  # fail early, with the install hint, rather than once per plot
    out = Path(plot_dir)
    written: dict[str, Path] = {}
    data = panel_data(results)
    styles = series_styles(results, data)  # one colour per method across every figure
    for name, entries in data.items():
        if not entries:
            continue
        try:
            path = _DRAW[FIGURES[name][0]](name, entries, results, styles, out / f"{name}.png")
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - reported, the other plots still get drawn
            warnings.warn(f"plot {name} failed and is left out of the report: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
            continue
        if path is not None:
            written[name] = path
    return written


__all__ = ["FIGURES", "PLOT_NAMES", "base_name", "fmt_bytes", "fmt_ratio", "fmt_tokens", "machine_line",
           "panel_data", "series_styles", "write_all"]
