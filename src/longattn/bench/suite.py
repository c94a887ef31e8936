"""What a benchmark suite is, and the one runner and the renderers every suite shares.

A suite is a declaration (``Suite``): its **parts** (each a generator of records: one dict per
measured case), the options of its quick and full runs, the **tables** its reports show (columns,
optionally pivoted), the **panels** it contributes to the plots, a one-line description of a
record, and the columns of the live line printed as each record arrives. Everything a user sees
comes from that declaration through the shared code here:

* ``run_suite`` — checks the options, ``--methods`` and ``--out`` before any work; runs each part
  in turn (a part whose optional dependency is missing, or whose methods were not selected, is
  recorded as skipped with the reason; a part that raises is recorded as failed with a one-line
  reason while its traceback goes to ``errors.log``, and the other parts still run); prints a live
  line per record; rewrites ``results.json`` atomically after each record, so an interrupted run
  keeps what it measured; then writes ``report.md`` (and, run on its own, ``report.html``) and
  prints the tables and a status line.
* ``markdown_tables`` / ``console_tables`` / ``html_tables`` — the same table declarations as
  markdown, as rich tables that fit the console (lower-priority columns are dropped first, names
  are never cut), and as HTML (``report_html``).
* ``status_line`` / ``failure_lines`` — one line per suite saying whether it ran, and every case
  that did not pass.

A record's ``status`` is ``"ok"`` (also ``"ok, …"``), ``"FAILED …"`` (a correctness gate or a
check failed: no speed figure), ``"error: …"`` (the case raised), ``"oom…"``, ``"unsupported: …"``
or ``"skipped: …"``. A suite's own status is ``"ok"``, ``"partial"`` (some part skipped) or
``"failed"`` (a part raised, or a case failed or raised); ``longattn bench`` exits non-zero on
``"failed"`` unless ``--allow-partial``.
"""

from __future__ import annotations

import importlib.util
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from longattn.files import atomic_write_json, atomic_write_text, output_dir

Record = dict[str, Any]
Results = dict[str, Any]

#: the extras that provide each optional module a part may require
EXTRAS: dict[str, str] = {"transformers": "hf", "matplotlib": "bench", "faiss": "ann", "hnswlib": "ann"}


# -- formatting ---------------------------------------------------------------------------------


def num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, None, a bool, NaN, inf, not a number)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def short_status(status: Any) -> str:
    """The first words of a status: "ok", "ok, no flex", "FAILED accuracy", "error", "oom",
    "unsupported", "skipped"."""
    s = str(status or "")
    if s.startswith("ok") or s.startswith("FAILED"):
        return s.split(":", 1)[0]
    return s.split(":", 1)[0].split(" (", 1)[0] or "—"


def _ratio(x: float) -> str:
    return f"{x:.2f}×"


#: named cell formats (any other string is a ``format`` spec such as ".3f")
FORMATS: dict[str, Callable[[float], str]] = {
    "ratio": _ratio,
    "ms": lambda x: f"{x * 1e3:.2f}",
    "us": lambda x: f"{x * 1e6:.0f}",
    "mib": lambda x: f"{x / 2**20:.1f}",
    "kib": lambda x: f"{x / 1024:,.0f}",
    "int": lambda x: f"{x:,.0f}",
}


def format_value(value: Any, fmt: str | Callable[[Any], str] = "") -> str:
    """A cell's text: ``—`` for a missing value, else the named format, the format spec or the
    callable applied; non-finite numbers are written as they are ("inf")."""
    if callable(fmt):
        out = fmt(value)
        return "—" if out is None else str(out)
    if value is None or value == "":
        return "—"
    if fmt == "status":
        return short_status(value)
    if not fmt or isinstance(value, str):
        return str(value)
    v = num(value)
    if v is None:
        return str(value)
    if fmt in FORMATS:
        return FORMATS[fmt](v)
    return format(v, fmt)


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"():,]+/)+([^\s/'\"():,]+)")


def one_line(exc: BaseException | str, limit: int = 240) -> str:
    """``Type: first line of the message`` with absolute paths cut to their last part, at most
    ``limit`` characters: what a report shows of a failure (the traceback goes to a log)."""
    if isinstance(exc, BaseException):
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _ABS_PATH.sub(lambda m: "…/" + m.group(1), text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the declaration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a table: ``key`` (a record field, or a function of the record), its header,
    how a value is written (``fmt``: a format spec, a name in ``FORMATS``, "status", or a
    function), and ``keep``: on a narrow console the columns with the highest ``keep`` are left
    out first (0: always shown)."""

    header: str
    key: str | Callable[[Record], Any]
    fmt: str | Callable[[Any], str] = ""
    keep: int = 0
    align: str = "right"

    def value(self, rec: Record) -> Any:
        return self.key(rec) if callable(self.key) else rec.get(self.key)

    def text(self, rec: Record) -> str:
        return format_value(self.value(rec), self.fmt)


def label(header: str, key: str | Callable[[Record], Any], keep: int = 0) -> Column:
    """A left-aligned text column (names, modes, statuses)."""
    return Column(header, key, "", keep, "left")


def status_column(keep: int = 0) -> Column:
    return Column("status", "status", "status", keep, "left")


@dataclass(frozen=True)
class Pivot:
    """A table whose rows are ``row`` values, whose columns are the distinct ``col`` values (in
    the order first seen, or sorted when they are numbers) and whose cells are ``cell`` of the
    last record at each (row, col)."""

    row: Column
    col: str | Callable[[Record], Any]
    cell: Column
    col_header: Callable[[Any], str] = str

    def col_of(self, rec: Record) -> Any:
        return self.col(rec) if callable(self.col) else rec.get(self.col)


Text = str | Callable[[Results], str]


@dataclass(frozen=True)
class Table:
    """A view of a suite's records: those of ``part`` (all parts when None) that pass ``where``,
    as ``columns`` or as a ``pivot``; ``group`` splits it into one table per group value (the
    value replaces ``{group}`` in the title, or follows it). ``source`` gives other rows than the
    records (figures derived over them). ``note`` (markdown) is written under the heading."""

    title: Text
    columns: tuple[Column, ...] = ()
    #: rows from somewhere other than the records (figures derived over all of them)
    source: Callable[[Results], list[Record]] | None = None
    part: str | None = None
    where: Callable[[Record], bool] | None = None
    pivot: Pivot | None = None
    group: Callable[[Record], Any] | None = None
    note: Text = ""
    console: bool = True
    markdown: bool = True
    html: bool = True


@dataclass(frozen=True)
class Panel:
    """One panel of a plot: ``y`` against ``x`` of the records that pass ``where``, a line per
    ``series``. ``plot`` names the figure (``plots.FIGURES``: "speedup_vs_length",
    "memory_vs_length", "error_vs_density" (an error panel, or a recall panel when ``y`` is
    "recall"), "passkey_heatmap"); ``annotate`` writes that field next to each point; for a heat
    map ``series`` gives one panel per value and ``value`` the cell."""

    plot: str
    title: str | Callable[[list[Record]], str]
    x: str
    y: str
    series: Callable[[Record], str]
    where: Callable[[Record], bool] | None = None
    xlabel: str = "sequence length (tokens)"
    value: str | None = None
    annotate: str | None = None


@dataclass
class Context:
    """What a part's generator gets: the resolved options, the seed, the selected methods, the
    records so far (every part of this run), a console line (``say``) and the progress bar."""

    suite: Suite
    options: dict[str, Any]
    seed: int
    full: bool
    methods: list[str] | None
    console: Console
    records: list[Record]
    out: Path
    _progress: Progress | None = None
    _task: Any = None

    def wants(self, name: str) -> bool:
        """Whether ``--methods`` selected ``name`` (everything is selected when none were named)."""
        return self.methods is None or name in self.methods

    def say(self, msg: str) -> None:
        self.console.print(f"[dim]{msg}[/dim]")

    def plan(self, total: int) -> None:
        """Set the number of steps of the progress bar of this part."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=0)

    def step(self, description: str, advance: int = 1) -> None:
        """Describe what runs now and count the previous step done."""
        if self._progress is not None:
            self._progress.update(self._task, description=description, advance=advance)


@dataclass(frozen=True)
class Part:
    """A piece of a suite that runs on its own: ``run(ctx)`` yields records. ``requires``: modules
    it imports (missing ones skip the part with an install hint); ``methods``: the names
    ``--methods`` may select in it (a function of the run's options, so the registry is read only
    when asked)."""

    name: str
    run: Callable[[Context], Iterable[Record]]
    requires: tuple[str, ...] = ()
    methods: Callable[[Mapping[str, Any]], Iterable[str]] | None = None


@dataclass(frozen=True)
class Suite:
    """A benchmark suite (see the module docstring)."""

    name: str
    title: str
    about: Text
    parts: tuple[Part, ...]
    quick: Mapping[str, Any]
    full: Mapping[str, Any]
    describe: Callable[[Record], str]
    tables: tuple[Table, ...] = ()
    live: tuple[Column, ...] = ()
    panels: tuple[Panel, ...] = ()
    #: the option ``--lengths`` sets (None: the suite takes no lengths)
    lengths: str | None = "lengths"
    #: names ``--methods`` always accepts (the baseline runs anyway)
    always: tuple[str, ...] = ("sdpa",)
    #: derived figures over all records once the parts are done (e.g. efficiency lengths)
    finish: Callable[[Results], None] | None = None
    #: raises ``ValueError`` for options the parts cannot run with (checked before any work)
    check: Callable[[Mapping[str, Any]], None] | None = None

    def known_methods(self, options: Mapping[str, Any] | None = None) -> list[str]:
        """Every name ``--methods`` accepts with these options (default: the quick ones)."""
        options = dict(self.quick) if options is None else options
        names = list(self.always)
        for p in self.parts:
            if p.methods is not None:
                names += [n for n in p.methods(options) if n not in names]
        return names


# -- options ------------------------------------------------------------------------------------


def resolve_options(suite: Suite, *, full: bool, lengths: Sequence[int] | None,
                    methods: Sequence[str] | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """The options of a run (quick or full, then ``--lengths`` and any overrides) and the
    selected methods; every problem is a ``ValueError`` naming the option, before any work."""
    options = dict(suite.full if full else suite.quick)
    known = set(suite.quick) | set(suite.full) | {"parts"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the {suite.name} suite; "
                         f"known: {', '.join(sorted(known))}")
    options.update(overrides)
    if lengths:
        if suite.lengths is None:
            raise ValueError(f"--lengths: the {suite.name} suite takes no lengths")
        options[suite.lengths] = tuple(sorted({int(n) for n in lengths}))
    if suite.check is not None:
        suite.check(options)
    parts = options.get("parts")
    if parts is not None:
        names = [p.name for p in suite.parts]
        bad = [p for p in parts if p not in names]
        if bad:
            raise ValueError(f"unknown part(s) {', '.join(bad)} of the {suite.name} suite; known: {', '.join(names)}")
    chosen = None
    if methods is not None:
        chosen = [m.strip() for m in methods if m.strip()]
        if not chosen:
            raise ValueError("--methods: no method named")
        known_names = suite.known_methods(options)
        bad = [m for m in chosen if m not in known_names]
        if bad:
            raise ValueError(f"--methods: unknown method(s) {', '.join(bad)} for the {suite.name} suite; "
                             f"known: {', '.join(known_names)}")
    return options, chosen


# -- where results go ---------------------------------------------------------------------------

#: a part this run did not ask for (its options or ``--methods``): neither run nor missed
NOT_SELECTED = "not selected"

#: ``results.json`` field saying what wrote a folder: a suite run alone, or the main job
KIND_SUITE, KIND_MAIN = "suite", "main"


def claim_folder(out: Path, kind: str, name: str, *, inside_main: bool = False) -> Path:
    """Check ``out`` can be written and holds nothing this run would clobber: a run writes only
    into an empty folder or one an earlier run of the same kind (the same suite, or the main job)
    wrote. A single suite never writes into the main job's folder or into one of its suite
    folders, so the main job's results and reports never contradict each other."""
    import json

    out = output_dir(out, "--out")
    existing = out / "results.json"
    if not existing.exists():
        return out
    try:
        prev = json.loads(existing.read_text())
    except (OSError, ValueError):
        prev = {}
    if not isinstance(prev, dict) or not prev:
        raise ValueError(f"--out {str(out)!r} holds a results.json that is not a longattn run's; choose another "
                         "folder or delete that one")
    # files written before runs said their kind: the main job's had "suites"
    prev_kind = prev.get("kind") or (KIND_MAIN if "suites" in prev else KIND_SUITE)
    prev_name = prev.get("suite")
    if kind == KIND_MAIN and prev_kind == KIND_MAIN:
        return out
    if kind == KIND_SUITE and prev_kind == KIND_SUITE and prev_name == name and \
            bool(prev.get("part_of_main")) == inside_main:
        return out
    what = "the main job's results" if prev_kind == KIND_MAIN else (
        f"the {prev_name} suite's results" + (" of a main job" if prev.get("part_of_main") else ""))
    raise ValueError(f"--out {str(out)!r} holds {what}; choose another folder (a single suite's default is "
                     f"bench-out-<suite>) or delete that one")


# -- running ------------------------------------------------------------------------------------


def _missing(modules: Iterable[str]) -> str | None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            extra = EXTRAS.get(m)
            hint = f" (pip install 'longattn[{extra}]')" if extra else ""
            return f"{m} is not installed{hint}"
    return None


def case_failures(records: Iterable[Record]) -> list[Record]:
    """Records whose status is a failure: ``FAILED …`` or ``error…`` (unsupported, skipped and
    out-of-memory cases are reported but are not failures of the code under test)."""
    return [r for r in records if str(r.get("status", "ok")).startswith(("FAILED", "error", "gate error"))]


def suite_status(results: Results) -> str:
    """``"failed"`` when a part raised or a case failed, ``"partial"`` when a part was skipped or
    interrupted, else ``"ok"``."""
    parts = results.get("parts") or {}
    if any(p.get("status") == "error" for p in parts.values()) or case_failures(results.get("records") or []):
        return "failed"
    if any(p.get("status") not in ("ok", NOT_SELECTED) for p in parts.values()):
        return "partial"
    return "ok"


def run_suite(suite: Suite, out: str | Path, *, full: bool = False, lengths: Sequence[int] | None = None,
              methods: Sequence[str] | None = None, seed: int = 0, console: Console | None = None,
              part_of_main: bool = False, **overrides: Any) -> Results:
    """Run ``suite`` into ``out`` (``results.json``, ``report.md``, ``errors.log`` when a part
    failed) and return its results: ``{"kind", "suite", "machine", "config", "parts": {name:
    {"status", "reason", "wall_s", "records"}}, "records", "status", "wall_s"}``.

    Args:
        full: the suite's full sizes instead of its quick ones (the main job's).
        lengths: sets the suite's length option (``Suite.lengths``).
        methods: only these methods (``Suite.known_methods``; the baseline always runs).
        part_of_main: the main job runs this suite into one of its folders.
        overrides: any of the suite's options (tests shrink sizes this way), and ``parts``.
    """
    from longattn.bench import harness

    options, chosen = resolve_options(suite, full=full, lengths=lengths, methods=methods, overrides=overrides)
    out = claim_folder(Path(out), KIND_SUITE, suite.name, inside_main=part_of_main)
    console = console or Console()
    log = out / "errors.log"
    log.unlink(missing_ok=True)
    config = {"mode": "full" if full else "quick", "seed": seed, "methods": chosen,
              **{k: v for k, v in options.items() if k != "parts"}}
    results: Results = {"kind": KIND_SUITE, "suite": suite.name, "part_of_main": part_of_main,
                        "machine": harness.machine_info(seed), "config": config, "parts": {}, "records": []}
    selected = options.get("parts")
    t_start = time.perf_counter()
    try:
        for part in suite.parts:
            entry: dict[str, Any] = {"status": "ok", "reason": "", "wall_s": 0.0, "records": 0}
            results["parts"][part.name] = entry
            if selected is not None and part.name not in selected:
                entry.update(status=NOT_SELECTED, reason="not in this run's parts (" + ", ".join(selected) + ")")
                continue
            if chosen is not None and part.methods is not None and \
                    not any(m in chosen for m in part.methods(options)):
                entry.update(status=NOT_SELECTED, reason="none of the selected methods belongs to this part")
                continue
            missing = _missing(part.requires)
            if missing:
                entry.update(status="skipped", reason=missing)
                continue
            _run_part(suite, part, entry, results, options, chosen, seed, full, console, out)
    except KeyboardInterrupt:
        for entry in results["parts"].values():
            if entry["status"] == "running":
                entry.update(status="interrupted", reason="interrupted (Ctrl-C)")
        results["wall_s"] = time.perf_counter() - t_start
        results["status"] = "partial"
        atomic_write_json(out / "results.json", results)
        raise
    if suite.finish is not None:
        try:
            suite.finish(results)
        except Exception as exc:  # noqa: BLE001 - the measured records are kept
            results["parts"]["finish"] = {"status": "error", "reason": one_line(exc), "wall_s": 0.0, "records": 0}
            _log(log, suite.name, "finish", exc)
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["load_average_at_end"] = harness.load_average()
    results["status"] = suite_status(results)
    atomic_write_json(out / "results.json", results)
    markdown = render_markdown(suite, results)
    atomic_write_text(out / "report.md", markdown)
    if not part_of_main:
        # a suite run on its own gets its page too (the main job writes one page for all suites)
        from longattn.bench import report_html

        report_html.write_html(out / "report.html", {"kind": KIND_SUITE, "machine": results["machine"],
                                                     "status": results["status"], "suites": {suite.name: results}},
                               {}, markdown)
        for t in console_tables(suite, results, console.width):
            console.print(t)
        console.print(f"wrote {out / 'results.json'}, {out / 'report.md'} and {out / 'report.html'}"
                      + (f" (tracebacks in {log})" if log.exists() else ""))
        console.print(status_line(suite.name, results))
    return results


def _run_part(suite: Suite, part: Part, entry: dict[str, Any], results: Results, options, chosen, seed, full,
              console: Console, out: Path) -> None:
    records = results["records"]
    entry["status"] = "running"
    t0 = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"{suite.name} · {part.name}", total=None)
        ctx = Context(suite, options, seed, full, chosen, progress.console, records, out, progress, task)
        try:
            for rec in part.run(ctx):
                rec.setdefault("part", part.name)
                rec.setdefault("status", "ok")
                records.append(rec)
                entry["records"] += 1
                if suite.live:
                    progress.console.print(live_line(suite, rec))
                atomic_write_json(out / "results.json", results)
        except KeyboardInterrupt:
            entry["wall_s"] = time.perf_counter() - t0
            raise
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
            entry.update(status="error", reason=one_line(exc))
            _log(out / "errors.log", suite.name, part.name, exc)
            progress.console.print(f"[red]{suite.name} · {part.name} failed: {entry['reason']}[/red]")
    if entry["status"] == "running":
        entry["status"] = "ok"
    entry["wall_s"] = time.perf_counter() - t0


def _log(path: Path, suite: str, part: str, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    previous = path.read_text() if path.exists() else ""
    atomic_write_text(path, previous + f"== {suite} · {part} ==\n{text}\n")


# -- one line per record and per suite ----------------------------------------------------------

_MARK = {"ok": "[green]✓[/green]", "FAILED": "[bold red]✗[/bold red]", "error": "[red]✗[/red]"}


def live_line(suite: Suite, rec: Record) -> str:
    """``✓ dense, 4096 tokens, causal — median 0.056 s · 1.02×`` (never cut: the console wraps it)."""
    status = str(rec.get("status", "ok"))
    mark = next((m for k, m in _MARK.items() if status.startswith(k)), "[dim]·[/dim]")
    parts = []
    for c in suite.live:
        v = c.value(rec)
        if v is None:
            continue
        parts.append(f"{c.header} {c.text(rec)}" if c.header else c.text(rec))
    tail = ""
    if status != "ok":
        style = "red" if case_failures([rec]) else "dim"
        tail = f" [{style}]{escape(one_line(status, 120))}[/{style}]"
    return f"{mark} {escape(suite.describe(rec))}" + (" — " + escape(" · ".join(parts)) if parts else "") + tail


def status_line(name: str, results: Results) -> str:
    """``kernels: ok (64 records, 91 s)`` / ``sparse: FAILED — part accuracy: FileNotFoundError: …``:
    one line, no traceback, no absolute path."""
    status = results.get("status") or suite_status(results)
    n = len(results.get("records") or [])
    wall = results.get("wall_s")
    tail = f"{n} records" + (f", {wall:.0f} s" if wall is not None else "")
    problems = []
    for pname, p in (results.get("parts") or {}).items():
        if p.get("status") not in ("ok", None, NOT_SELECTED):
            problems.append(f"part {pname} {p['status']}: {p.get('reason')}")
    bad = case_failures(results.get("records") or [])
    if bad:
        problems.append(f"{len(bad)} case(s) failed")
    if results.get("error"):
        problems.append(one_line(results["error"]))
    word = {"ok": "ok", "partial": "partial", "failed": "FAILED"}.get(status, status)
    return f"{name}: {word} ({tail})" + (" — " + "; ".join(problems) if problems else "")


def failure_lines(suite: Suite, results: Results) -> list[str]:
    """The markdown "Failures" list: every part that did not run and every record that did not
    pass, with its status."""
    lines = []
    for pname, p in (results.get("parts") or {}).items():
        if p.get("status") not in ("ok", None, NOT_SELECTED):
            lines.append(f"- part `{pname}` {p['status']}: {p.get('reason')}")
    for r in results.get("records") or []:
        s = str(r.get("status", "ok"))
        if s.startswith("ok"):
            continue
        g = r.get("gate") or {}
        why = f" ({g['reason']})" if g.get("reason") and g["reason"] not in s else ""
        lines.append(f"- {suite.describe(r)}: {one_line(s, 300)}{why}")
    return lines


# -- tables -------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A table ready to print: title, headers, alignments, rows of text, the ``keep`` of each
    column and the markdown note."""

    title: str
    headers: list[str]
    align: list[str]
    rows: list[list[str]]
    keep: list[int] = field(default_factory=list)
    note: str = ""
    #: the full status of each row's cells, for HTML hover text (same shape as rows; "" when none)
    titles: list[list[str]] = field(default_factory=list)


def _text(t: Text, results: Results) -> str:
    return t(results) if callable(t) else t


def _sort_key(v: Any):
    n = num(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))


def table_records(table: Table, results: Results) -> list[Record]:
    recs = table.source(results) if table.source is not None else (results.get("records") or [])
    if table.part is not None:
        recs = [r for r in recs if r.get("part") == table.part]
    if table.where is not None:
        recs = [r for r in recs if table.where(r)]
    return recs


def render_tables(suite: Suite, results: Results, *, target: str) -> list[Rendered]:
    """Every table of ``suite`` shown in ``target`` ("console", "markdown", "html") that has rows."""
    out = []
    for table in suite.tables:
        if not getattr(table, target):
            continue
        recs = table_records(table, results)
        if not recs:
            continue
        title = _text(table.title, results)
        groups = [(None, recs)]
        if table.group is not None:
            keys = list(dict.fromkeys(table.group(r) for r in recs))
            groups = [(k, [r for r in recs if table.group(r) == k]) for k in keys]
        for key, grecs in groups:
            if key is None:
                full_title = title
            elif "{group}" in title:
                full_title = title.format(group=key)
            else:
                full_title = f"{title}: {key}" if title else str(key)
            out.append(_render_one(table, grecs, full_title, _text(table.note, results)))
    return out


def _render_one(table: Table, recs: list[Record], title: str, note: str) -> Rendered:
    if table.pivot is None:
        cols = table.columns
        rows = [[c.text(r) for c in cols] for r in recs]
        titles = [[str(r.get("status", "")) if c.fmt == "status" else "" for c in cols] for r in recs]
        return Rendered(title, [c.header for c in cols], [c.align for c in cols], rows, [c.keep for c in cols], note,
                        titles)
    p = table.pivot
    col_values = list(dict.fromkeys(p.col_of(r) for r in recs))
    if all(num(v) is not None for v in col_values):
        col_values.sort(key=_sort_key)
    row_values = list(dict.fromkeys(p.row.text(r) for r in recs))
    cells: dict[tuple[str, Any], Record] = {}
    for r in recs:
        cells[(p.row.text(r), p.col_of(r))] = r
    rows, titles = [], []
    for rv in row_values:
        row, tit = [rv], [""]
        for cv in col_values:
            r = cells.get((rv, cv))
            row.append("—" if r is None else p.cell.text(r))
            tit.append("" if r is None or str(r.get("status", "ok")).startswith("ok") else str(r.get("status")))
        rows.append(row)
        titles.append(tit)
    headers = [p.row.header] + [p.col_header(v) for v in col_values]
    return Rendered(title, headers, ["left"] + ["right"] * len(col_values), rows,
                    [0] * len(headers), note, titles)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_lines(rendered: Rendered, level: int = 2) -> list[str]:
    lines = [f"{'#' * level} {rendered.title}", ""] if rendered.title else []
    if rendered.note:
        lines += [rendered.note, ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in rendered.headers) + " |")
    lines.append("|" + "".join("---:|" if a == "right" else "---|" for a in rendered.align))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rendered.rows]
    lines.append("")
    return lines


def machine_lines(results: Results) -> list[str]:
    """What a run was measured on, as markdown list items: processor, threads, versions, load."""
    m = results.get("machine") or {}
    cfg = results.get("config") or {}
    caps = m.get("cpu_capability")
    lines = [
        f"- date (UTC) {m.get('date_utc')}; {cfg.get('mode', 'quick')} run, seed {cfg.get('seed')}"
        + (f"; wall time {results['wall_s']:.0f} s" if results.get("wall_s") is not None else ""),
        f"- machine: {m.get('cpu_model')}" + (f" ({caps})" if caps else "")
        + f", {m.get('cpu_affinity') or m.get('cpu_count')} usable CPUs, torch threads {m.get('torch_threads')}",
        f"- matmul unit: {m.get('isa', 'unknown')}; half inputs compute in: "
        + ", ".join(f"{k} → {v}" for k, v in (m.get("compute_dtype_rule") or {}).items())
        + (f"; device {m.get('device')}" + (f" ({m.get('device_name')})" if m.get("device_name") else "")
           if m.get("device") not in (None, "cpu") else ""),
        f"- python {m.get('python')}, torch {m.get('torch')}, longattn {m.get('longattn')}; FlexAttention: "
        f"{m.get('flex_unavailable_reason') or 'available'}; native C kernels: "
        + ("; ".join(f"{k} unavailable ({v})" for k, v in m["native_unavailable"].items())
           if m.get("native_unavailable") else "available"),
        f"- load average at start {m.get('load_average_at_start')}, at end {m.get('load_average_at_end')} "
        "(other work on the machine distorts timings)",
    ]
    return lines


def render_markdown(suite: Suite, results: Results, *, machine: bool = True) -> str:
    """``report.md`` of one suite: title, status, the machine (unless ``machine=False``: the main
    report says it once), what it measured, the tables, the failures."""
    lines = [f"# {suite.title}", "", f"**Status:** {status_line(suite.name, results)}", ""]
    if machine:
        lines += machine_lines(results) + [""]
    about = _text(suite.about, results)
    if about:
        lines += [about, ""]
    for rendered in render_tables(suite, results, target="markdown"):
        lines += markdown_lines(rendered)
    fails = failure_lines(suite, results)
    lines += ["## Failures", ""] + (fails or ["None: every part ran and every case passed."]) + [""]
    return "\n".join(lines)


def _width(rendered: Rendered, keep_cols: list[int]) -> int:
    total = 0
    for i in keep_cols:
        w = max([len(rendered.headers[i])] + [len(row[i]) for row in rendered.rows])
        total += w + 2
    return total


def fit_columns(rendered: Rendered, width: int) -> list[int]:
    """The columns to print within ``width`` characters: drop the highest ``keep`` first (the
    rightmost of equal ``keep``), never a column with ``keep`` 0."""
    cols = list(range(len(rendered.headers)))
    keep = rendered.keep or [0] * len(cols)
    while _width(rendered, cols) > width:
        droppable = [i for i in cols if keep[i] > 0]
        if not droppable:
            break
        worst = max(droppable, key=lambda i: (keep[i], i))
        cols.remove(worst)
    return cols


def console_table(rendered: Rendered, width: int) -> RichTable:
    cols = fit_columns(rendered, width)
    t = RichTable(title=rendered.title or None, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  padding=(0, 1), title_justify="left")
    for i in cols:
        # names wrap onto a second line instead of being cut: six "landmark…" rows would look alike
        t.add_column(rendered.headers[i], justify=rendered.align[i], overflow="fold")  # type: ignore[arg-type]
    for row in rendered.rows:
        t.add_row(*(row[i] for i in cols))
    return t


def console_tables(suite: Suite, results: Results, width: int = 80) -> list[RichTable]:
    return [console_table(r, width) for r in render_tables(suite, results, target="console")]


def efficiency_text(row: dict[str, Any]) -> str:
    """The efficiency length of a ``crossovers`` row as written in the reports."""
    eff = row["efficiency_length"]
    if eff is None:
        return "never (in the lengths run)"
    return f"≤ {eff}" if row["ahead_from_smallest"] else str(eff)


def efficiency_columns(key_header: str) -> tuple[Column, ...]:
    """The efficiency-length table's columns (also the peers suite's)."""
    return (label("method", "method"), label(key_header, "key"), label("efficiency length", efficiency_text),
            Column("estimate", "crossover_estimate", ".0f"),
            label("lengths timed", lambda r: ", ".join(map(str, r["lengths_timed"])) or "—"))


# -- records helpers a suite's part uses --------------------------------------------------------


def guarded_record(base: Record, fn: Callable[[], Record]) -> Record:
    """``{**base, **fn()}``, or ``base`` with the error status when ``fn`` raised (a case never
    stops its part)."""
    from longattn.bench import harness

    res, status = harness.guarded(fn)
    return {**base, **res} if status is None else {**base, "status": status}
