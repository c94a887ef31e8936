"""The main job: every suite in one run, then one report a person wants to read.

``longattn bench`` (``make bench``) runs the suites of ``MAIN_SUITES`` one after the other, each
into ``OUT/<suite>/`` (its own ``results.json``, ``report.md`` and, when a part failed,
``errors.log``) at the same sizes as ``longattn bench --suite NAME`` alone, and then writes

* ``OUT/results.json`` — ``{"kind": "main", "machine", "config", "status", "suites": {name: suite
  results}}``;
* ``OUT/report.md`` — one status line per suite, then each suite's report;
* ``OUT/plots/*.png`` — the panels the suites declare (``longattn.bench.plots``);
* ``OUT/report.html`` — one self-contained page with all of it (``longattn.bench.report_html``);
* ``OUT/errors.log`` — the tracebacks of every part that failed (none: no file).

A suite or part that fails is recorded with a one-line reason and the job goes on; the status of
the whole job is the worst of its suites', and ``longattn bench`` exits non-zero when it is
``"failed"``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from longattn.bench import MAIN_SUITES, get_suite, harness
from longattn.bench.suite import (KIND_MAIN, Results, claim_folder, console_table, one_line, render_markdown,
                                  render_tables, status_line)
from longattn.files import atomic_write_json, atomic_write_text

_ORDER = {"ok": 0, "partial": 1, "failed": 2}


def run_all(out_dir: str | Path, *, full: bool = False, seed: int = 0, suites: Sequence[str] | None = None,
            console: Console | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
            results_page: str | Path | None = None) -> Results:
    """Run the main job into ``out_dir`` (see the module docstring) and return the combined results.

    Args:
        full: every suite at its full sizes instead of its quick ones.
        suites: a subset of ``MAIN_SUITES`` (default all), in their order.
        options: per-suite overrides of their options (tests shrink sizes this way).
        results_page: a markdown page (the docs' results page) whose generated section is
            rewritten from this run (``update_results_page``).
    """
    chosen = list(suites) if suites else list(MAIN_SUITES)
    unknown = [s for s in chosen if s not in MAIN_SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)} for the main job; known: {', '.join(MAIN_SUITES)}")
    options = dict(options or {})
    console = console or Console()
    out = claim_folder(Path(out_dir), KIND_MAIN, "all")
    (out / "errors.log").unlink(missing_ok=True)
    combined: Results = {
        "kind": KIND_MAIN,
        "machine": harness.machine_info(seed),
        "config": {"mode": "full" if full else "quick", "seed": seed, "suites": chosen},
        "suites": {},
    }
    t_start = time.perf_counter()
    for i, name in enumerate(chosen, 1):
        console.print(Rule(f"[bold]{i}/{len(chosen)} · suite {name}[/bold]"))
        t0 = time.perf_counter()
        try:
            res = _run_one(name, out, full=full, seed=seed, console=console, options=options.get(name) or {})
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed suite must not lose the others
            # the suite could not even start (its options, its module): one line here, the rest in the log
            res = {"kind": "suite", "suite": name, "status": "failed", "error": one_line(exc), "records": [],
                   "parts": {}, "wall_s": time.perf_counter() - t0}
            import traceback

            _append(out / "errors.log", f"== {name} ==\n{traceback.format_exc()}\n")
        combined["suites"][name] = res
        log = out / name / "errors.log"
        if log.exists():
            _append(out / "errors.log", log.read_text())
        console.print(status_line(name, res))
        atomic_write_json(out / "results.json", combined)
    combined["wall_s"] = time.perf_counter() - t_start
    combined["machine"]["load_average_at_end"] = harness.load_average()
    combined["status"] = max((r.get("status", "failed") for r in combined["suites"].values()),
                             key=lambda s: _ORDER.get(s, 2), default="ok")
    write_outputs(out, combined, console, results_page)
    return combined


def _run_one(name: str, out: Path, *, full: bool, seed: int, console: Console, options: Mapping[str, Any]) -> Results:
    from longattn.bench.suite import run_suite

    return run_suite(get_suite(name), out / name, full=full, seed=seed, console=console, part_of_main=True,
                     **options)


def _append(path: Path, text: str) -> None:
    previous = path.read_text() if path.exists() else ""
    atomic_write_text(path, previous + text)


def write_outputs(out: Path, combined: Results, console: Console, results_page: str | Path | None = None) -> None:
    """``results.json``, ``report.md``, the plots and ``report.html`` from the combined results
    (and the generated section of ``results_page``); the console gets each suite's tables, then
    one status line per suite as its last lines."""
    atomic_write_json(out / "results.json", combined)
    markdown = render_report(combined)
    plots: dict[str, Path] = {}
    try:
        from longattn.bench import plots as plot_module

        plots = plot_module.write_all(combined, out / "plots")
    except ImportError as exc:
        console.print(f"[yellow]no plots: {exc}[/yellow]")
    if plots:
        markdown += "\n## Plots\n\n" + "\n".join(f"![{name}]({p.relative_to(out).as_posix()})"
                                                 for name, p in plots.items()) + "\n"
    atomic_write_text(out / "report.md", markdown)
    from longattn.bench import report_html

    report_html.write_html(out / "report.html", combined, plots)
    if results_page is not None:
        update_results_page(results_page, combined, plots)
        console.print(f"updated the results page {results_page}")
    for name, res in combined["suites"].items():
        if res.get("error"):
            continue
        for rendered in render_tables(get_suite(name), res, target="console"):
            console.print(console_table(rendered, console.width))
    log = out / "errors.log"
    console.print(f"wrote {out / 'report.html'}, {out / 'report.md'}, {out / 'results.json'} and {len(plots)} plots"
                  + (f"; tracebacks in {log}" if log.exists() else ""))
    console.print(Rule("[bold]longattn bench[/bold]"))
    for line in summary_lines(combined):  # the last lines: which suites failed and why
        console.print(line)


def summary_lines(combined: Results) -> list[str]:
    """One line per suite, then the job's verdict: what the console ends with and report.md and
    report.html start with."""
    lines = [status_line(name, res) for name, res in combined["suites"].items()]
    status = combined.get("status", "ok")
    failed = [n for n, r in combined["suites"].items() if r.get("status") == "failed"]
    wall = combined.get("wall_s")
    verdict = (f"all {len(lines)} suites ok" if status == "ok" else
               f"{len(failed)} of {len(lines)} suites FAILED: {', '.join(failed)}" if failed else
               f"{len(lines)} suites ran, some parts were skipped")
    lines.append(verdict + (f" ({wall:.0f} s)" if wall is not None else ""))
    return lines


def render_report(combined: Results) -> str:
    """The main report: the status of every suite first, then each suite's own report."""
    from longattn.bench.suite import machine_lines

    lines = ["# longattn benchmark", "", "## Status", ""]
    lines += [f"- {line}" for line in summary_lines(combined)]
    lines += ["", *machine_lines(combined), ""]
    for name, res in combined["suites"].items():
        if res.get("error"):
            lines += [f"## {name}", "", f"Did not run: {res['error']}", ""]
            continue
        text = render_markdown(get_suite(name), res, machine=False)
        # each suite's report starts with a level-1 title: nest it one level down
        lines.append("\n".join(("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()))
        lines.append("")
    return "\n".join(lines) + "\n"


# -- the docs' results page -------------------------------------------------------------------

RESULTS_BEGIN = "<!-- begin: written by `longattn bench --results-page`; edit outside these markers -->"
RESULTS_END = "<!-- end: written by `longattn bench --results-page` -->"


def results_markdown(combined: Results, plot_dir: str | None = None) -> str:
    """The latest main job as a results page section: status, machine, each suite's headline
    tables (those its declaration shows in report.html) and, with ``plot_dir``, the plots."""
    from longattn.bench.suite import machine_lines, markdown_lines

    mode = (combined.get("config") or {}).get("mode", "quick")
    lines = [f"## Latest main job (`longattn bench`{' --full' if mode == 'full' else ''})", ""]
    lines += machine_lines(combined) + [""]
    lines += [f"- {line}" for line in summary_lines(combined)] + [""]
    for name, res in combined["suites"].items():
        if res.get("error"):
            lines += [f"### {name}", "", f"Did not run: {res['error']}", ""]
            continue
        suite = get_suite(name)
        lines += [f"### {suite.title}", "", status_line(name, res), ""]
        for rendered in render_tables(suite, res, target="html"):
            lines += markdown_lines(rendered, level=4)
    if plot_dir:
        for name in ("speedup_vs_length", "passkey_heatmap", "error_vs_density", "memory_vs_length"):
            lines += [f"![{name}]({plot_dir}/{name}.png)", ""]
    return "\n".join(lines)


def update_results_page(page: str | Path, combined: Results, plots: Mapping[str, Path]) -> Path:
    """Replace the generated section of ``page`` (between ``RESULTS_BEGIN`` and ``RESULTS_END``,
    appended when absent) with ``results_markdown``; the plots are copied next to the page into
    ``plots/``. The rest of the page (hand-written analysis, earlier runs) is kept."""
    import shutil

    page = Path(page)
    text = page.read_text() if page.exists() else "# Results\n\n"
    folder = page.parent / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in plots.items():
        shutil.copyfile(path, folder / f"{name}.png")
    block = f"{RESULTS_BEGIN}\n\n{results_markdown(combined, 'plots' if plots else None)}\n{RESULTS_END}"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return atomic_write_text(page, text)
