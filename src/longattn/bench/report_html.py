"""The benchmark's ``report.html``: one self-contained file to open, attach or archive.

Self-contained means: the PNG plots are inlined as base64 ``data:`` URIs, the CSS is inline, and
there are no scripts and no external URLs, so the page looks the same offline, in a mail
attachment or years later. Every string taken from the results is escaped (``html.escape``):
method names and error messages are data, never markup.

The page: a header (date, machine, versions, seed, wall time), the plots each with a short note on
what it shows, the headline table of every suite that ran (kernels: ratio to SDPA per method ×
length; sparse frontier; decode; tasks: accuracy per method × length; peers; memory: KV policies
and the long tiered decode), the failed or
unsupported cases, and optionally the markdown report as text. Suites that were not run are
named and skipped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from longattn.bench.plots import (KERNEL_PATTERNS, PLOT_NAMES, _is_ok, _num, fmt_bytes, fmt_tokens,
                                  kernel_pattern_records, kernel_pattern_title, machine_line)

#: the suites the main job knows, in report order
SUITE_ORDER: tuple[str, ...] = ("kernels", "sparse", "decode", "tasks", "peers", "memory")

PLOT_TITLES: dict[str, str] = {
    "speedup_vs_length": "Speed-up over SDPA vs length",
    "passkey_heatmap": "Passkey accuracy over depth × length",
    "error_vs_density": "Error vs density (sparse methods)",
    "memory_vs_length": "Memory vs length",
}

#: what each plot shows, in a sentence or three (the plots' own titles give machine and units)
PLOT_NOTES: dict[str, str] = {
    "speedup_vs_length": (
        "Each point is torch SDPA's median time divided by the method's, measured in the same run on the "
        "same inputs (float32): above the dashed 1× line the method is faster. Only cases that passed the "
        "correctness gate have a speed. Exact kernels are drawn for CAB's four patterns (causal and "
        "non-causal, self and cross attention; cross runs a quarter as many queries as keys); the "
        "sparse-prefill and decode-step panels appear when those suites ran. Both axes are logarithmic."
    ),
    "passkey_heatmap": (
        "Share of passkey prompts answered correctly, per method, with the passkey hidden at a depth "
        "(0% = start of the context) inside contexts of each length. 1.00 is every sample right; grey "
        "cells were not run, × marks a case that failed (listed under Failures)."
    ),
    "error_vs_density": (
        "How much each sparse method gives up for how much it skips: the relative error of its output "
        "against exact attention (log scale) and the share of the true softmax mass it kept (recall), "
        "against density, the share of the causal triangle it attended. Labels next to points are the "
        "measured speed-up over SDPA where the point was timed."
    ),
    "memory_vs_length": (
        "Bytes of keys and values a decode step reads, and the peak memory of the step, against "
        "the cache length (log-log): a flat line is a fixed budget, a slope of one is the whole cache. "
        "The prefill panel shows the kernels' peak memory per length. Peak figures are the growth of the "
        "process's resident memory, sampled about every millisecond: approximate."
    ),
}

_CSS = """
:root { --fg:#1b1f24; --muted:#5b6470; --line:#d8dde3; --bg2:#f5f7f9; --good:#17663a; --bad:#a3262a; }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px; color: var(--fg); background: #fff;
       font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 19px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 6px; }
p { margin: 4px 0 8px; }
.muted { color: var(--muted); }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
.meta dt { font-weight: 600; }
.meta dd { margin: 0; }
nav { margin: 10px 0; color: var(--muted); }
nav a { color: inherit; margin-right: 12px; }
figure { margin: 10px 0 22px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { margin: 4px 0; max-width: 900px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
.good { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); }
.status { color: var(--bad); }
.unsupported { color: var(--muted); }
.missing { color: var(--muted); font-style: italic; }
details { margin: 12px 0; }
pre { background: var(--bg2); padding: 10px; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }
footer { margin: 30px 0 10px; color: var(--muted); font-size: 12px; }
"""


# -- small formatting helpers ---------------------------------------------------------------


def _e(x: Any) -> str:
    """Escaped text of anything; None is an em dash."""
    return "—" if x is None else html.escape(str(x), quote=True)



def _fmt(x: Any, spec: str = ".3g") -> str:
    v = _num(x)
    return "—" if v is None else format(v, spec)


def _seconds(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


class _Td(str):
    """An already-rendered ``<td>``: ``_table`` inserts it as is (any other cell is escaped text)."""


_EMPTY = _Td('<td class="num">—</td>')


def _ratio_cell(r: Any) -> str:
    """A ``<td>`` with ``2.31×``, green above 1 (faster than SDPA), red below."""
    v = _num(r)
    if v is None:
        return _EMPTY
    shown = round(v, 2)  # colour what the reader sees: 1.00× is neither faster nor slower
    cls = "good" if shown > 1.0 else "bad" if shown < 1.0 else ""
    return _Td(f'<td class="num {cls}">{v:.2f}×</td>')


def _status_cell(status: Any) -> str:
    """A ``<td>`` with the short form of a non-ok status (first word) and the full text on hover."""
    s = str(status)
    short = s.split(":", 1)[0]
    cls = "unsupported" if s.startswith(("unsupported", "skipped")) else "status"
    return _Td(f'<td class="{cls}" title="{_e(s)}">{_e(short)}</td>')


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """A table; each cell is plain text (escaped here) or a ``_Td`` already rendered."""
    num = set(numeric)
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in num else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            if isinstance(c, _Td):
                cells.append(c)
            else:
                cells.append(f'<td class="num">{_e(c)}</td>' if i in num else f"<td>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pivot(records: list[dict[str, Any]], row_key: Callable, col_key: Callable, cell: Callable,
           row_title: str, col_fmt: Callable = fmt_tokens) -> str:
    """A row × column table: ``cell(list of records in that cell)`` renders one ``<td>``."""
    rows = list(dict.fromkeys(row_key(r) for r in records))
    cols = sorted({col_key(r) for r in records})
    grid: dict[tuple, list] = {}
    for r in records:
        grid.setdefault((row_key(r), col_key(r)), []).append(r)
    out = []
    for rk in rows:
        out.append([str(rk)] + [cell(grid[(rk, c)]) if (rk, c) in grid else _EMPTY for c in cols])
    return _table([row_title] + [col_fmt(c) for c in cols], out, numeric=range(1, len(cols) + 1))


# -- header ---------------------------------------------------------------------------------


def _machine(results: dict[str, Any]) -> dict[str, Any]:
    m = results.get("machine")
    if m:
        return m
    for s in (results.get("suites") or {}).values():
        if isinstance(s, dict) and s.get("machine"):
            return s["machine"]
    return {}


def _wall_s(results: dict[str, Any]) -> float | None:
    if _num(results.get("wall_s")) is not None:
        return float(results["wall_s"])
    walls = [_num(s.get("wall_s")) for s in (results.get("suites") or {}).values() if isinstance(s, dict)]
    walls = [w for w in walls if w is not None]
    return sum(walls) if walls else None


def _header(results: dict[str, Any]) -> str:
    m = _machine(results)
    cfg = results.get("config") or {}
    suites = results.get("suites") or {}
    seed = cfg.get("seed", m.get("seed"))
    wall = _wall_s(results)
    walls = {name: _suite_wall(results, name) for name in suites}
    per_suite = ", ".join(f"{name} {w:.0f} s" for name, w in walls.items() if w is not None)
    cpus = f"{m.get('cpu_count')} CPUs" + (f" ({m.get('cpu_affinity')} usable)" if m.get("cpu_affinity") else "")
    flex = m.get("flex_unavailable_reason")
    items = [
        ("Date (UTC)", m.get("date_utc")),
        ("Machine", f"{m.get('cpu_model') or m.get('machine') or 'unknown'}, {cpus}, "
                    f"torch threads {m.get('torch_threads')}; {m.get('platform')}"),
        ("Versions", f"longattn {m.get('longattn')}, torch {m.get('torch')}, python {m.get('python')}; "
                     f"FlexAttention {'unavailable: ' + str(flex) if flex else 'available'}"),
        ("Seed", seed),
        ("Mode", cfg.get("mode") or ("full" if cfg.get("full") else None)),
        ("Wall time", None if wall is None else f"{wall:.0f} s ({wall / 60:.1f} min)"
                                                + (f": {per_suite}" if per_suite else "")),
        ("Load average", f"{m.get('load_average_at_start')} at start"
                         + (f", {m.get('load_average_at_end')} at end" if m.get("load_average_at_end") else "")
                         + " (other work on the machine distorts timings)" if m.get("load_average_at_start")
                         else None),
    ]
    ran = [n for n in SUITE_ORDER if n in suites] + [n for n in suites if n not in SUITE_ORDER]
    missing = [n for n in SUITE_ORDER if n not in suites]
    items.append(("Suites", ", ".join(ran) + (f" — not run: {', '.join(missing)}" if missing else "")
                  if ran else f"none (not run: {', '.join(missing)})"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v not in (None, ""))
    return f'<header><h1>longattn benchmark report</h1><dl class="meta">{dl}</dl></header>'


def _nav(plot_names: list[str], suites: list[str]) -> str:
    links = ['<a href="#plots">Plots</a>'] if plot_names else []
    links += [f'<a href="#suite-{_e(n)}">{_e(n)}</a>' for n in suites]
    links.append('<a href="#failures">Failures</a>')
    return "<nav>Contents: " + "".join(links) + "</nav>"


# -- plots ----------------------------------------------------------------------------------


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _plots_section(results: dict[str, Any], plots: dict[str, Path]) -> str:
    names = [n for n in PLOT_NAMES if n in plots] + [n for n in plots if n not in PLOT_NAMES]
    parts = ['<section id="plots"><h2>Plots</h2>',
             f'<p class="muted">Measured on {_e(machine_line(results))}.</p>']
    for name in names:
        title = PLOT_TITLES.get(name, name.replace("_", " "))
        parts.append(f'<figure id="plot-{_e(name)}"><h3>{_e(title)}</h3>'
                     f"<figcaption>{_e(PLOT_NOTES.get(name, ''))}</figcaption>"
                     f"{_img(plots[name], title)}</figure>")
    absent = [n for n in PLOT_NAMES if n not in plots]
    if absent:
        parts.append('<p class="missing">Not drawn (the suite they need was not run, or had no usable '
                     f"record): {_e(', '.join(PLOT_TITLES[n] for n in absent))}.</p>")
    parts.append("</section>")
    return "".join(parts)


# -- suite tables ---------------------------------------------------------------------------


def _kernel_label(r: dict[str, Any]) -> str:
    return str(r.get("label") or r.get("method")) + (" [tiled]" if r.get("fallback_for") else "")


def _kernels(recs: list[dict[str, Any]]) -> str:
    def cell(group: list[dict[str, Any]]) -> str:
        r = group[-1]
        if not _is_ok(r):
            return _status_cell(r.get("status"))
        if _kernel_label(r) == "sdpa":
            return _Td(f'<td class="num">{_e(_seconds(r.get("median_s")))}</td>')
        return _ratio_cell(r.get("ratio_to_sdpa"))

    out = ['<p>Ratio to SDPA (SDPA median time / method median time, same run; &gt; 1× = faster). '
           "The SDPA row gives its median time. A failed or unsupported case shows its status.</p>"]
    for shape, causal in KERNEL_PATTERNS:
        mode = [r for r in kernel_pattern_records(recs, shape, causal) if _num(r.get("tokens"))]
        if not mode:
            continue
        corner = "method / keys" if shape == "cross" else "method / tokens"
        out.append(f"<h3>{_e(kernel_pattern_title(shape, causal, mode))}</h3>")
        out.append(_pivot(mode, _kernel_label, lambda r: int(r["tokens"]), cell, corner))
    return "".join(out)


def _sparse(recs: list[dict[str, Any]]) -> str:
    front = sorted((r for r in recs if r.get("part") == "frontier"),
                   key=lambda r: (str(r.get("method")), _num(r.get("tokens")) or 0, _num(r.get("density")) or 0))
    out = []
    if front:
        out.append("<h3>Density ↔ error ↔ speed frontier</h3>"
                   "<p>Relative output error ‖out − ref‖ / ‖ref‖ and attention-mass recall against exact "
                   "attention; speed against SDPA where the point was timed.</p>")
        rows = [[str(r.get("method")), _fmt(r.get("tokens"), ".0f"), _fmt(r.get("density"), ".3f"),
                 _fmt(r.get("rel_err"), ".2e"), _fmt(r.get("recall"), ".3f"), _seconds(r.get("median_s")),
                 _ratio_cell(r.get("ratio_to_sdpa"))] for r in front]
        out.append(_table(["method", "tokens", "density", "rel. error", "recall", "median", "vs SDPA"], rows,
                          numeric=range(1, 7)))
    other = len(recs) - len(front)
    if other:
        out.append(f'<p class="muted">{other} further record(s) of other parts are in results.json.</p>')
    return "".join(out) or '<p class="missing">No records.</p>'


def _decode(recs: list[dict[str, Any]]) -> str:
    layouts = list(dict.fromkeys(r.get("layout") for r in recs))
    with_layout = layouts != [None]
    # stable sort: the suite's own method order within each layout and cache length
    recs = sorted(recs, key=lambda r: (layouts.index(r.get("layout")), _num(r.get("cache")) or 0))
    rows = []
    for r in recs:
        kv, peak = _num(r.get("kv_bytes")), _num(r.get("peak_mem_bytes"))
        row = [str(r.get("layout"))] if with_layout else []
        rows.append(row + [str(r.get("method")), _fmt(r.get("cache"), ".0f"), _fmt(r.get("budget"), ".0f"),
                           _seconds(r.get("step_s")), _ratio_cell(r.get("ratio_to_sdpa")),
                           _fmt(r.get("rel_err"), ".2e"), _fmt(r.get("recall"), ".3f"),
                           "—" if kv is None else fmt_bytes(kv), "—" if peak is None else fmt_bytes(peak),
                           "ok" if _is_ok(r) else _status_cell(r.get("status"))])
    k = 1 if with_layout else 0
    headers = (["layout"] if with_layout else []) + [
        "method", "cache", "budget", "step", "vs SDPA", "rel. error", "recall", "K/V bytes read", "peak memory",
        "status"]
    return ("<p>One decode step (a single new query) over a KV cache: time per step, ratio to SDPA over the "
            "whole cache, error against exact attention, bytes of K/V the step reads.</p>"
            + _table(headers, rows, numeric=range(k + 1, k + 9)))


def _tasks(recs: list[dict[str, Any]]) -> str:
    out = []
    for task in dict.fromkeys(str(r.get("task")) for r in recs):
        group = [r for r in recs if str(r.get("task")) == task and _num(r.get("length"))]
        if not group:
            continue
        perplexity = task == "perplexity" or all(r.get("accuracy") is None and r.get("perplexity") is not None
                                                for r in group)
        field = "perplexity" if perplexity else "accuracy"

        def cell(cell_recs: list[dict[str, Any]], field=field) -> str:
            ok = [float(r[field]) for r in cell_recs if _is_ok(r) and _num(r.get(field)) is not None]
            bad = [r for r in cell_recs if not _is_ok(r)]
            if not ok:
                return _status_cell(bad[0].get("status")) if bad else _EMPTY
            mean = sum(ok) / len(ok)
            mark = f" ({len(bad)} failed)" if bad else ""
            text = f"{mean:.2f}"
            return _Td(f'<td class="num">{_e(text + mark)}</td>')

        depths = {r.get("depth") for r in group if r.get("depth") is not None}
        what = ("perplexity (lower is better)" if perplexity else "accuracy (0..1)")
        over = f", mean over {len(depths)} depths" if len(depths) > 1 else ""
        out.append(f"<h3>{_e(task)}: {what}{_e(over)}</h3>")
        out.append(_pivot(group, lambda r: str(r.get("method")), lambda r: int(r["length"]), cell,
                          "method / length"))
    return "".join(out) or '<p class="missing">No records.</p>'


def _peers(recs: list[dict[str, Any]]) -> str:
    rows = [[str(r.get("peer")), str(r.get("case")), _fmt(r.get("tokens"), ".0f"),
             "—" if r.get("causal") is None else ("causal" if r.get("causal") else "non-causal"),
             _seconds(r.get("median_s")), _ratio_cell(r.get("ratio_to_sdpa")),
             "ok" if _is_ok(r) else _status_cell(r.get("status"))] for r in recs]
    return ("<p>Other implementations on the same inputs: torch SDPA, compiled FlexAttention, kvpress where "
            "it installs, and longattn's own methods for comparison.</p>"
            + _table(["peer", "case", "tokens", "mode", "median", "vs SDPA", "status"], rows, numeric=(2, 4, 5)))


def _memory(recs: list[dict[str, Any]]) -> str:
    from longattn.bench import memory

    out = []
    pol = list(memory.policy_rows(recs))
    if pol:
        out.append("<h3>KV policies on stories260K: continuation NLL at a fixed budget of keys per head</h3>"
                   + _table(memory.POLICY_COLUMNS, pol, numeric=range(2, len(memory.POLICY_COLUMNS))))
    long = list(memory.long_decode_rows(recs))
    if long:
        out.append("<h3>Long prompt through the tiered memory, then decode</h3>"
                   + _table(memory.LONG_COLUMNS, long, numeric=range(1, len(memory.LONG_COLUMNS) - 2)))
    return "".join(out) or '<p class="missing">No records.</p>'


_SUITE_TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], str]]] = {
    "kernels": ("Kernels: exact kernels and masks vs SDPA", _kernels),
    "sparse": ("Sparse: density, error and speed", _sparse),
    "decode": ("Decode: per-step time and memory vs cache length", _decode),
    "tasks": ("Tasks: retrieval accuracy and perplexity", _tasks),
    "peers": ("Peers: other implementations", _peers),
    "memory": ("Memory: KV policies and the tiered memory", _memory),
}


def _suite_wall(results: dict[str, Any], name: str) -> float | None:
    """A suite's wall time: its own ``wall_s``, else the main job's ``suite_wall_s`` entry."""
    suite = (results.get("suites") or {}).get(name)
    wall = _num(suite.get("wall_s")) if isinstance(suite, dict) else None
    return wall if wall is not None else _num((results.get("suite_wall_s") or {}).get(name))


def _suite_section(name: str, suite: dict[str, Any], wall: float | None) -> str:
    title, render = _SUITE_TABLES.get(name, (name, None))
    recs = [r for r in suite.get("records") or [] if isinstance(r, dict)]
    sub = f'<p class="muted">{len(recs)} records' + (f", {wall:.0f} s" if wall is not None else "") + "</p>"
    if suite.get("error"):
        # the main job keeps a crashed suite as {"error": traceback, "records": [...]}
        body = ('<p class="status">The suite stopped with an error (below); what it recorded before is shown.</p>'
                f"<pre>{_e(suite['error'])}</pre>" + (render(recs) if (recs and render) else ""))
    elif not recs:
        body = '<p class="missing">The suite ran but recorded nothing.</p>'
    elif render is None:
        body = '<p class="muted">No table for this suite here; see results.json.</p>'
    else:
        body = render(recs)
    return f'<section id="suite-{_e(name)}"><h2>{_e(title)}</h2>{sub}{body}</section>'


# -- failures -------------------------------------------------------------------------------


def _what(suite: str, r: dict[str, Any]) -> str:
    """A short description of a record's case, per suite."""
    if suite == "kernels":
        mode = "causal" if r.get("causal") else "non-causal"
        return f"{_kernel_label(r)}, {r.get('tokens')} tokens, {mode}"
    if suite == "decode":
        return f"{r.get('method')}, cache {r.get('cache')}" + (f", budget {r['budget']}" if r.get("budget") else "")
    if suite == "tasks":
        depth = r.get("depth")
        return (f"{r.get('task')} / {r.get('method')}, length {r.get('length')}"
                + (f", depth {float(depth):.0%}" if _num(depth) is not None else ""))
    if suite == "peers":
        return f"{r.get('peer')}, {r.get('case')}, {r.get('tokens')} tokens"
    if suite == "memory":
        return f"{r.get('test')}: {r.get('policy')}" + (f", prompt {r['prompt']}" if r.get("prompt") else "")
    if suite == "sparse":
        return f"{r.get('method')}, {r.get('tokens')} tokens, density {r.get('density')}"
    return str(r.get("method") or r.get("label") or r.get("peer") or "?")


def _failures(results: dict[str, Any]) -> str:
    rows = []
    for name, suite in (results.get("suites") or {}).items():
        if isinstance(suite, dict) and suite.get("error"):
            lines = str(suite["error"]).strip().splitlines() or ["error"]
            why = str((results.get("suite_status") or {}).get(name) or lines[-1])
            rows.append([name, "the whole suite", _Td(f'<td class="status">{_e(why)}</td>')])
        for r in (suite or {}).get("records") or []:
            if isinstance(r, dict) and not _is_ok(r):
                s = str(r.get("status"))
                cls = "unsupported" if s.startswith(("unsupported", "skipped")) else "status"
                rows.append([name, _what(name, r), _Td(f'<td class="{cls}">{_e(s)}</td>')])
    head = '<section id="failures"><h2>Failures and unsupported cases</h2>'
    if not rows:
        return head + "<p>None: every case that ran passed.</p></section>"
    return head + _table(["suite", "case", "status"], rows) + "</section>"


# -- the page -------------------------------------------------------------------------------


def render_html(results: dict[str, Any], plots: dict[str, Path], markdown: str | None = None) -> str:
    """The report page as one string.

    Args:
        results: the combined run ``{"machine", "config", "suites": {name: suite}}``; missing suites,
            or a missing machine block, are fine.
        plots: ``{plot name: PNG path}`` as ``plots.write_all`` returns; each file is inlined.
        markdown: ``report.md``'s text, shown (as text) in a collapsed block at the end.
    """
    suites = results.get("suites") or {}
    ran = [n for n in SUITE_ORDER if n in suites] + [n for n in suites if n not in SUITE_ORDER]
    missing = [n for n in SUITE_ORDER if n not in suites]
    body = [_header(results), _nav([n for n in plots], ran)]
    if plots:
        body.append(_plots_section(results, plots))
    for name in ran:
        suite = suites[name]
        body.append(_suite_section(name, suite if isinstance(suite, dict) else {}, _suite_wall(results, name)))
    if missing:
        body.append(f'<p class="missing">Suites not run: {_e(", ".join(missing))}.</p>')
    body.append(_failures(results))
    if markdown:
        body.append("<details><summary>report.md (the same run as text)</summary>"
                    f"<pre>{_e(markdown)}</pre></details>")
    m = _machine(results)
    body.append(f"<footer>Written by longattn {_e(m.get('longattn') or '')}. This file is self-contained: "
                "plots inlined, no scripts, no external resources.</footer>")
    date = m.get("date_utc") or ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>longattn benchmark report {_e(date)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def write_html(path: str | Path, results: dict[str, Any], plots: dict[str, Path],
               markdown: str | None = None) -> Path:
    """Write ``render_html(...)`` to ``path`` (UTF-8), creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results, plots, markdown), encoding="utf-8")
    return path


__all__ = ["PLOT_NOTES", "SUITE_ORDER", "render_html", "write_html"]
