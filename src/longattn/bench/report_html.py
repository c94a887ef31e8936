"""The benchmark's ``report.html``: one self-contained file to open, attach or archive.

Self-contained means: the PNG plots are inlined as base64 ``data:`` URIs, the CSS is inline, and
there are no scripts and no external URLs, so the page looks the same offline, in a mail
attachment or years later. Every string taken from the results is escaped (``html.escape``):
method names and error messages are data, never markup.

The page: the status of every suite (one line each: which failed and why), the header (date,
machine, versions, seed, wall time), the plots each with a short note on what it shows, then one
section per suite with the tables its declaration marks for HTML (``Suite.tables``, rendered by the
same code as report.md), and the failed or unsupported cases. Suites that were not run are named.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from longattn.bench.plots import PLOT_NAMES, machine_line
from longattn.bench.suite import NOT_SELECTED, num, render_tables, status_line

PLOT_TITLES: dict[str, str] = {
    "speedup_vs_length": "Speed-up over SDPA vs length",
    "passkey_heatmap": "Passkey accuracy over depth × length",
    "error_vs_density": "Error vs density (sparse methods)",
    "memory_vs_length": "Memory vs length",
    "accuracy_vs_state": "Associative recall vs state size",
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
    "accuracy_vs_state": (
        "Multi-query associative recall learned from scratch: each point is a 2-layer model of one mixer "
        "at one width, placed by the bytes of state it carries per sequence (softmax attention: its KV "
        "cache at the task's length) and its share of samples with every queried value right. Zoology's "
        "and Based's finding is that attention solves it at every size while fixed-state mixers need "
        "state that grows with the number of pairs."
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


class _Td(str):
    """An already-rendered ``<td>``: ``_table`` inserts it as is (any other cell is escaped text)."""


_EMPTY = _Td('<td class="num">—</td>')


def _ratio_cell(r: Any) -> str:
    """A ``<td>`` with ``2.31×``, green above 1 (faster than SDPA), red below."""
    v = num(r)
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
    if num(results.get("wall_s")) is not None:
        return float(results["wall_s"])
    walls = [num(s.get("wall_s")) for s in (results.get("suites") or {}).values() if isinstance(s, dict)]
    walls = [w for w in walls if w is not None]
    return sum(walls) if walls else None


def _header(results: dict[str, Any]) -> str:
    m = _machine(results)
    cfg = results.get("config") or {}
    suites = results.get("suites") or {}
    seed = cfg.get("seed", m.get("seed"))
    wall = _wall_s(results)
    walls = {name: num(res.get("wall_s")) for name, res in suites.items() if isinstance(res, dict)}
    per_suite = ", ".join(f"{name} {w:.0f} s" for name, w in walls.items() if w is not None)
    cpus = f"{m.get('cpu_count')} CPUs" + (f" ({m.get('cpu_affinity')} usable)" if m.get("cpu_affinity") else "")
    flex = m.get("flex_unavailable_reason")
    items = [
        ("Date (UTC)", m.get("date_utc")),
        ("Machine", f"{m.get('cpu_model') or m.get('machine') or 'unknown'}"
                    + (f" ({m['cpu_capability']})" if m.get("cpu_capability") else "") + f", {cpus}, "
                    f"torch threads {m.get('torch_threads')}; {m.get('platform')}"),
        ("Versions", f"longattn {m.get('longattn')}, torch {m.get('torch')}, python {m.get('python')}; "
                     f"FlexAttention {'unavailable: ' + str(flex) if flex else 'available'}; native C kernels "
                     + ("unavailable: " + "; ".join(f"{k} ({v})" for k, v in m["native_unavailable"].items())
                        if m.get("native_unavailable") else "available")),
        ("Seed", seed),
        ("Mode", cfg.get("mode") or ("full" if cfg.get("full") else None)),
        ("Wall time", None if wall is None else f"{wall:.0f} s ({wall / 60:.1f} min)"
                                                + (f": {per_suite}" if per_suite else "")),
        ("Load average", f"{m.get('load_average_at_start')} at start"
                         + (f", {m.get('load_average_at_end')} at end" if m.get("load_average_at_end") else "")
                         + " (other work on the machine distorts timings)" if m.get("load_average_at_start")
                         else None),
    ]
    from longattn.bench import MAIN_SUITES

    ran = [n for n in MAIN_SUITES if n in suites] + [n for n in suites if n not in MAIN_SUITES]
    # one suite's own page lists no "suites not run"
    missing = [n for n in MAIN_SUITES if n not in suites] if results.get("kind") != "suite" else []
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


# -- suite sections ---------------------------------------------------------------------------

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    """Escaped text with markdown's ``code`` and **bold** as HTML (nothing else is markup)."""
    out = _e(text)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)


def _prose(markdown: str) -> str:
    """A suite's ``about`` text: paragraphs and "- " lists."""
    out, items = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("- "):
            items.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "".join(out)


def _status_td(text: str, full: str) -> _Td:
    cls = "unsupported" if full.startswith(("unsupported", "skipped")) else "status"
    return _Td(f'<td class="{cls}" title="{_e(full)}">{_e(text)}</td>')


def _rendered_table(r) -> str:
    rows = []
    for row, titles in zip(r.rows, r.titles or [[""] * len(r.headers)] * len(r.rows)):
        cells: list[str] = []
        for i, (text, full) in enumerate(zip(row, titles)):
            if full and not full.startswith("ok"):
                cells.append(_status_td(text, full))
            elif text.endswith("×") and num(text[:-1]) is not None:
                cells.append(_ratio_cell(float(text[:-1])))
            else:
                cells.append(text)
        rows.append(cells)
    numeric = [i for i, a in enumerate(r.align) if a == "right"]
    head = f"<h3>{_inline(r.title)}</h3>" if r.title else ""
    note = f'<p class="muted">{_inline(r.note)}</p>' if r.note else ""
    return head + note + _table(r.headers, rows, numeric)


def _suite_section(name: str, res: dict[str, Any]) -> str:
    from longattn.bench import get_suite

    line = status_line(name, res)
    bad = res.get("status") == "failed"
    sub = f'<p class="{"status" if bad else "muted"}">{_e(line)}</p>'
    try:
        suite = get_suite(name)
    except ValueError:
        return f'<section id="suite-{_e(name)}"><h2>{_e(name)}</h2>{sub}</section>'
    title = suite.title
    if res.get("error"):
        body = '<p class="status">The suite did not run (see errors.log beside this page).</p>'
    else:
        about = suite.about(res) if callable(suite.about) else suite.about
        tables = [_rendered_table(r) for r in render_tables(suite, res, target="html")]
        body = _prose(about or "") + ("".join(tables) if tables else
                                      '<p class="missing">The suite ran but recorded nothing to show.</p>')
    return f'<section id="suite-{_e(name)}"><h2>{_e(title)}</h2>{sub}{body}</section>'


# -- failures -------------------------------------------------------------------------------


def _failures(results: dict[str, Any]) -> str:
    from longattn.bench import get_suite
    from longattn.bench.suite import one_line

    rows = []
    for name, res in (results.get("suites") or {}).items():
        if not isinstance(res, dict):
            continue
        if res.get("error"):
            rows.append([name, "the whole suite", _status_td("error", str(res["error"]))])
        for pname, p in (res.get("parts") or {}).items():
            if p.get("status") not in ("ok", None, NOT_SELECTED):
                rows.append([name, f"part {pname}", _status_td(f"{p['status']}: {p.get('reason')}",
                                                               str(p.get("status")))])
        try:
            describe = get_suite(name).describe
        except ValueError:
            describe = lambda r: str(r.get("method") or "?")  # noqa: E731
        for r in res.get("records") or []:
            if isinstance(r, dict) and not str(r.get("status", "ok")).startswith("ok"):
                s = str(r.get("status"))
                try:
                    what = describe(r)
                except Exception:  # noqa: BLE001 - a record missing a field still gets listed
                    what = str(r.get("method") or r.get("label") or "?")
                rows.append([name, what, _status_td(one_line(s, 300), s)])
    head = '<section id="failures"><h2>Failures and unsupported cases</h2>'
    if not rows:
        return head + "<p>None: every case that ran passed.</p></section>"
    return head + _table(["suite", "case", "status"], rows) + "</section>"


def _status_box(results: dict[str, Any]) -> str:
    from longattn.bench.main import summary_lines

    lines = summary_lines(results) if results.get("suites") else []
    if not lines:
        return ""
    status = results.get("status", "ok")
    cls = {"ok": "good", "failed": "bad"}.get(status, "")
    items = "".join(f"<li>{_e(x)}</li>" for x in lines[:-1])
    return (f'<section id="status"><h2>Status: <span class="{cls}">{_e(lines[-1])}</span></h2>'
            f"<ul>{items}</ul></section>")


# -- the page -------------------------------------------------------------------------------


def render_html(results: dict[str, Any], plots: dict[str, Path], markdown: str | None = None) -> str:
    """The report page as one string.

    Args:
        results: the combined run ``{"machine", "config", "status", "suites": {name: suite}}``;
            missing suites, or a missing machine block, are fine.
        plots: ``{plot name: PNG path}`` as ``plots.write_all`` returns; each file is inlined.
        markdown: ``report.md``'s text, shown (as text) in a collapsed block at the end.
    """
    from longattn.bench import MAIN_SUITES

    suites = results.get("suites") or {}
    ran = [n for n in MAIN_SUITES if n in suites] + [n for n in suites if n not in MAIN_SUITES]
    # one suite's own page lists no "suites not run"
    missing = [n for n in MAIN_SUITES if n not in suites] if results.get("kind") != "suite" else []
    body = [_header(results), _status_box(results), _nav([n for n in plots], ran)]
    if plots:
        body.append(_plots_section(results, plots))
    for name in ran:
        res = suites[name]
        body.append(_suite_section(name, res if isinstance(res, dict) else {}))
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
    """Write ``render_html(...)`` to ``path`` (UTF-8) atomically; returns the path."""
    from longattn.files import atomic_write_text

    return atomic_write_text(path, render_html(results, plots, markdown))


__all__ = ["PLOT_NOTES", "render_html", "write_html"]
