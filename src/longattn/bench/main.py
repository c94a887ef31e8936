"""The main job: every suite in one run, then one report a person wants to read.

``longattn bench`` (``make bench``) runs ``kernels``, ``sparse``, ``decode``, ``tasks``,
``peers`` and ``memory`` one after the other, each into ``OUT/<suite>/`` (its own ``results.json`` and
``report.md``), and then writes

* ``OUT/results.json`` — ``{"machine", "config", "suites": {name: suite results}}``;
* ``OUT/report.md`` — a short summary, then each suite's report;
* ``OUT/plots/*.png`` — speed-up vs length, error vs density, memory vs length, the passkey
  heat map (``longattn.bench.plots``);
* ``OUT/report.html`` — one self-contained page with all of it (``longattn.bench.report_html``).

``quick`` (the default) sizes every suite so the whole job takes about 10 minutes on two cores;
``full`` reaches 64k–128k tokens. A suite that crashes is recorded with its error and the job
goes on; so does one whose optional dependency is missing.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from longattn.bench import harness

#: the suites of the main job, in the order they run
MAIN_SUITES: tuple[str, ...] = ("kernels", "sparse", "decode", "tasks", "peers", "memory")

#: per-suite options of the quick main job (each suite alone keeps its own, larger defaults)
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "kernels": {"lengths": [1024, 4096, 8192]},
    "sparse": {"parts": ("accuracy", "frontier")},
    "decode": {},
    "tasks": {},
    "peers": {},
    "memory": {},
}
FULL_OPTIONS: dict[str, dict[str, Any]] = {
    "kernels": {},
    "sparse": {},
    "decode": {},
    "tasks": {},
    "peers": {},
    "memory": {},
}


def run_all(out_dir: str | Path, *, full: bool = False, lengths=None, methods=None, seed: int = 0,
            suites: tuple[str, ...] | list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the main job into ``out_dir`` (see the module docstring) and return the combined results.

    Args:
        full: the full sizes of every suite instead of the quick ones.
        lengths, methods: not accepted here (each suite has its own lengths and method names);
            run one suite with ``--suite`` to choose them.
        suites: a subset of ``MAIN_SUITES`` (default all).
    """
    from longattn.bench import get_suite

    for given, option in ((lengths, "--lengths"), (methods, "--methods")):
        if given:
            raise ValueError(f"{option} applies to one suite: pick it with --suite (kernels, sparse, decode, tasks, peers, memory)")
    chosen = list(suites) if suites else list(MAIN_SUITES)
    unknown = [s for s in chosen if s not in MAIN_SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)} for the main job; known: {', '.join(MAIN_SUITES)}")
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = FULL_OPTIONS if full else QUICK_OPTIONS
    combined: dict[str, Any] = {
        "machine": harness.machine_info(seed),
        "config": {"mode": "full" if full else "quick", "seed": seed, "suites": chosen,
                   "suite_options": {s: {k: list(v) if isinstance(v, tuple) else v for k, v in options[s].items()}
                                     for s in chosen}},
        "suites": {},
        "suite_status": {},
        "suite_wall_s": {},
    }
    t_start = time.perf_counter()
    for i, name in enumerate(chosen, 1):
        console.print(Rule(f"[bold]{i}/{len(chosen)} · suite {name}[/bold]"))
        t0 = time.perf_counter()
        try:
            runner = get_suite(name)
            res = runner(out / name, full=full, seed=seed, console=console, **options[name])
            combined["suites"][name] = res
            combined["suite_status"][name] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed suite must not lose the others
            combined["suite_status"][name] = harness.classify_exception(exc)
            combined["suites"][name] = {"suite": name, "error": traceback.format_exc(limit=5), "records": []}
            console.print(f"[red]suite {name} failed: {exc}[/red]")
        combined["suite_wall_s"][name] = time.perf_counter() - t0
        _write_json(out / "results.json", combined)
    combined["wall_s"] = time.perf_counter() - t_start
    combined["machine"]["load_average_at_end"] = harness.load_average()
    write_outputs(out, combined, console)
    return combined


def write_outputs(out: Path, combined: dict[str, Any], console: Console) -> None:
    """``results.json``, ``report.md``, the plots and ``report.html`` from the combined results."""
    _write_json(out / "results.json", combined)
    markdown = render_markdown(combined, out)
    plots: dict[str, Path] = {}
    try:
        from longattn.bench import plots as plot_module

        plots = plot_module.write_all(combined, out / "plots")
    except ImportError as exc:
        console.print(f"[yellow]no plots: {exc}[/yellow]")
    if plots:
        markdown += "\n## Plots\n\n" + "\n".join(f"![{name}]({p.relative_to(out)})" for name, p in plots.items()) + "\n"
    (out / "report.md").write_text(markdown)
    from longattn.bench import report_html

    report_html.write_html(out / "report.html", combined, plots, markdown=None)
    console.print(summary_table(combined))
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'} and {len(plots)} plots "
                  f"({combined.get('wall_s', 0):.0f} s)")


def render_markdown(combined: dict[str, Any], out: Path) -> str:
    """The main report: what ran and how long it took, then every suite's own report."""
    mach = combined["machine"]
    lines = [
        "# longattn benchmark",
        "",
        f"- date (UTC): {mach.get('date_utc')}; mode {combined['config']['mode']}; seed {combined['config']['seed']}; "
        f"wall time {combined.get('wall_s', 0):.0f} s",
        f"- machine: {mach.get('cpu_model')}, {mach.get('cpu_count')} CPUs, torch threads {mach.get('torch_threads')}; "
        f"python {mach.get('python')}, torch {mach.get('torch')}, longattn {mach.get('longattn')}",
        "",
        "| suite | status | wall s |",
        "|---|---|---:|",
    ]
    for name in combined["config"]["suites"]:
        lines.append(f"| {name} | {combined['suite_status'].get(name, 'not run')} | "
                     f"{combined['suite_wall_s'].get(name, 0):.0f} |")
    lines.append("")
    for name in combined["config"]["suites"]:
        report = out / name / "report.md"
        if report.exists():
            text = report.read_text()
            # each suite's report starts with a level-1 title: nest it one level down
            lines.append("\n".join(("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()))
            lines.append("")
    return "\n".join(lines) + "\n"


def summary_table(combined: dict[str, Any]) -> Table:
    t = Table(title="longattn bench: suites")
    for col in ("suite", "status", "records", "wall s"):
        t.add_column(col, justify="right" if col in ("records", "wall s") else "left")
    for name in combined["config"]["suites"]:
        res = combined["suites"].get(name, {})
        t.add_row(name, combined["suite_status"].get(name, "not run"), str(len(res.get("records", []))),
                  f"{combined['suite_wall_s'].get(name, 0):.0f}")
    return t


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)
