"""The ``kernels`` suite: exact kernels and exact masked methods against torch SDPA.

It covers CAB's four attention patterns, {causal, non-causal} × {self, cross}: for each length
(float32, batch 1, 8 heads, head_dim 64, seeded random q/k/v) self attention has ``tokens``
queries over ``tokens`` keys, cross attention ``tokens // CROSS_QUERY_DIVISOR`` queries over
``tokens`` keys (the shape of a chunked prefill or of a decoder reading an encoder's output);
causal cross aligns the last query with the last key (DESIGN.md), so its SDPA baseline is
``attn_mask=causal_lower_right(tokens_q, tokens_k)`` (``is_causal=True`` would align the first
query with the first key). Each pattern times torch's ``scaled_dot_product_attention`` as the
baseline in the same run, then every method case: correctness gate first, then timing. Records
carry ``shape`` ("self" / "cross"), ``tokens_q`` and ``tokens_k``; ``tokens`` is the key count. Records go to
``DIR/results.json`` (rewritten after every case, so an interrupted run keeps what it measured)
and ``DIR/report.md``.

Methods with ``backend="auto"`` switch to compiled FlexAttention from ``FLEX_MIN_TOKENS`` keys; their first call
compiles (tens of seconds on a small CPU) and is reported as ``first_call_s``, outside the timed
samples. When the library cannot compile a mask structure it runs the exact tiled kernel instead
(``stats.extra["flex_error"]``); the record then says path "tiled" and carries that note. When the
FlexAttention path fails in any other way (an error, a failed gate) the case is recorded as it
failed and run again with ``backend="tiled"`` as a separate, labelled record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import longattn
from longattn.bench import harness
from longattn.bench.plots import KERNEL_PATTERNS, kernel_pattern_records, kernel_pattern_title
from longattn.core import masks
from longattn.kernels import flex
from longattn.methods.base import Method
from longattn.methods.masked import FLEX_MIN_TOKENS

QUICK_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
FULL_LENGTHS: tuple[int, ...] = QUICK_LENGTHS + (32768, 65536)
BASELINE = "sdpa"
#: the length the report's speed-up summary is about (the largest run length when absent)
SUMMARY_TOKENS = 16384
#: a case stops taking timed repeats once it has spent this long (it always gets one sample)
CASE_MAX_SECONDS = 30.0
#: CAB's {self, cross} axis; cross attention runs ``tokens // CROSS_QUERY_DIVISOR`` queries
SHAPES: tuple[str, ...] = ("self", "cross")
CROSS_QUERY_DIVISOR = 4


def query_tokens(tokens: int, shape: str) -> int:
    """Queries of a case with ``tokens`` keys: all of them for self attention, a quarter for cross."""
    if shape == "self":
        return tokens
    if shape == "cross":
        return max(1, tokens // CROSS_QUERY_DIVISOR)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def repeats_for(tokens: int) -> int:
    """Timed repeats by size: 3 up to 16k tokens (a median of 2 is just their mean, and single
    samples of several seconds vary by tens of percent on a shared 2-core VM), 2 at 32k, 1 beyond.
    Slow cases also stop once they have spent ``CASE_MAX_SECONDS``."""
    if tokens <= 16384:
        return 3
    if tokens <= 32768:
        return 2
    return 1


@dataclass(frozen=True)
class KernelCase:
    """One method configuration of the suite.

    ``make(tokens, seed)`` builds the method object for a length (patterns such as documents or
    a random block map depend on it); ``modes`` lists the causal settings it runs in and
    ``shapes`` the CAB shapes ("self", "cross"). A method without cross attention in its
    capability sheet is recorded as unsupported for cross, not skipped.
    """

    label: str
    make: Callable[[int, int], Method]
    modes: tuple[bool, ...] = (True, False)
    params: str = ""
    shapes: tuple[str, ...] = SHAPES


def _document_ids(tokens: int, doc_tokens: int = 2048) -> torch.Tensor:
    return torch.arange(tokens) // doc_tokens


def random_block_map(tokens: int, seed: int, keep: float = 0.10, block: int = 128) -> torch.Tensor:
    """Seeded bool ``[nb, nb]`` map keeping about ``keep`` of the blocks, diagonal always kept."""
    nb = -(-tokens // block)
    g = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    m = torch.rand(nb, nb, generator=g) < keep
    return m | torch.eye(nb, dtype=torch.bool)


def default_cases() -> list[KernelCase]:
    """The methods the suite compares with SDPA."""
    m = longattn.method
    return [
        KernelCase("dense", lambda n, s: m("dense")),
        KernelCase("dense_chunked", lambda n, s: m("dense_chunked")),
        KernelCase("window", lambda n, s: m("window", window=1024), params="window=1024"),
        KernelCase("streaming", lambda n, s: m("streaming", sinks=64, window=1024), (True,),
                   params="sinks=64, window=1024"),
        KernelCase("pattern:a_shape", lambda n, s: m("pattern", mask=masks.a_shape(64, 1024)), (True,),
                   params="a_shape(64, 1024)"),
        KernelCase("pattern:power", lambda n, s: m("pattern", mask=masks.power(128)), params="power(128)"),
        KernelCase("pattern:lsg",
                   lambda n, s: m("pattern", mask=masks.lsg(window=512, stride=8, global_tokens=64, block_size=128)),
                   params="lsg(window=512, stride=8, global_tokens=64, block_size=128)"),
        KernelCase("pattern:document", lambda n, s: m("pattern", mask=masks.document(_document_ids(n))),
                   params="document(ids), 2048-token documents"),
        KernelCase("pattern:prefix_lm", lambda n, s: m("pattern", mask=masks.prefix_lm(n // 4)), (False,),
                   params="prefix_lm(tokens // 4)"),
        KernelCase("pattern:block_map", lambda n, s: m("pattern", mask=masks.block_map(random_block_map(n, s))),
                   params="block_map(random ~10% of 128-blocks + diagonal, seeded)"),
    ]


def select_cases(cases: Sequence[KernelCase], names: Iterable[str] | None) -> list[KernelCase]:
    """Cases whose label, or method name before ``:``, is in ``names`` (None: all).

    ``"pattern"`` selects every pattern, ``"pattern:lsg"`` or ``"lsg"`` one of them; ``"sdpa"``
    is accepted (the baseline always runs). Unknown names raise ``ValueError`` listing the known.
    """
    if names is None:
        return list(cases)
    wanted = [n.strip() for n in names if n.strip()]
    known = {c.label for c in cases} | {c.label.split(":")[0] for c in cases} | {
        c.label.split(":", 1)[1] for c in cases if ":" in c.label} | {BASELINE}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"unknown method(s) for the kernels suite: {', '.join(unknown)}; known: "
            f"{', '.join([BASELINE] + [c.label for c in cases])}"
        )
    keep = []
    for c in cases:
        base, _, sub = c.label.partition(":")
        if c.label in wanted or base in wanted or (sub and sub in wanted):
            keep.append(c)
    return keep


def make_inputs(tokens: int, seed: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64):
    """Seeded float32 ``q, k, v`` of shape ``[batch, heads, tokens, head_dim]``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    return tuple(torch.randn(batch, heads, tokens, head_dim, generator=g) for _ in range(3))


def cross_queries(q: torch.Tensor, tokens_q: int) -> torch.Tensor:
    """The last ``tokens_q`` queries of a self-attention ``q`` (contiguous), for the cross shape:
    with bottom-right causal alignment they are exactly the rows self attention gives them."""
    return q[:, :, q.shape[2] - tokens_q:].contiguous()


def _with_backend(method: Method, backend: str) -> Method | None:
    if any(f.name == "backend" for f in dataclasses.fields(method)):  # type: ignore[arg-type]
        return dataclasses.replace(method, backend=backend)  # type: ignore[type-var]
    return None


def _uses_auto_flex(method: Method, tokens: int) -> bool:
    return (getattr(method, "backend", None) == "auto" and tokens >= FLEX_MIN_TOKENS
            and flex.flex_unavailable_reason() is None)


# -- the run -----------------------------------------------------------------------------------


def run_kernels_suite(
    out_dir: str | Path,
    *,
    full: bool = False,
    lengths: Sequence[int] | None = None,
    methods: Iterable[str] | None = None,
    seed: int = 0,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    n_rows: int = 64,
    cases: Sequence[KernelCase] | None = None,
    shapes: Sequence[str] = SHAPES,
    fallback_tiled: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the suite, write ``results.json`` and ``report.md`` into ``out_dir``, return the results.

    Args:
        full: lengths up to 65536 (default: the quick set up to 16384).
        lengths: explicit lengths (overrides ``full``).
        methods: case labels or method names to keep (see ``select_cases``); SDPA always runs.
        cases: replace the default case list (tests inject their own methods this way).
        shapes: which of CAB's shapes run: "self" (tokens queries) and / or "cross"
            (``tokens // CROSS_QUERY_DIVISOR`` queries over ``tokens`` keys).
        fallback_tiled: when an ``auto`` case on the FlexAttention path fails, also run it with
            ``backend="tiled"`` as a separate record.
        console: where the live table and progress bar go.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    lens = sorted({int(n) for n in lengths}) if lengths else list(FULL_LENGTHS if full else QUICK_LENGTHS)
    if any(n < 1 for n in lens):
        raise ValueError(f"lengths must be positive, got {lens}")
    shapes = tuple(dict.fromkeys(shapes))
    if not shapes or any(sh not in SHAPES for sh in shapes):
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {list(shapes)}")
    chosen = select_cases(cases if cases is not None else default_cases(), methods)
    plan = [(n, shape, causal, c) for n in lens for shape in shapes for causal in (True, False)
            for c in [None, *chosen] if c is None or (causal in c.modes and shape in c.shapes)]
    results: dict[str, Any] = {
        "suite": "kernels",
        "machine": harness.machine_info(seed),
        "config": {
            "lengths": lens, "shapes": list(shapes), "cross_query_divisor": CROSS_QUERY_DIVISOR,
            "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": "float32",
            "seed": seed, "gate_rows": n_rows, "gate_atol": harness.ATOL, "gate_rtol": harness.RTOL,
            "repeats": {str(n): repeats_for(n) for n in lens}, "case_max_seconds": CASE_MAX_SECONDS,
            "flex_min_tokens": FLEX_MIN_TOKENS,
            "baseline": "torch.nn.functional.scaled_dot_product_attention (causal cross: "
                        "attn_mask=torch.nn.attention.bias.causal_lower_right)",
            "cases": {c.label: c.params for c in chosen},
        },
        "records": [],
    }
    records: list[dict[str, Any]] = results["records"]
    t_start = time.perf_counter()
    printer = _RowPrinter(console)
    try:
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("kernels", total=len(plan))
            inputs_for: tuple[int, str] | None = None
            q = k = v = None
            sdpa_time: dict[tuple[int, bool, str], float | None] = {}
            for n, shape, causal, case in plan:
                if inputs_for != (n, shape):
                    q = k = v = None
                    q, k, v = make_inputs(n, seed, batch=batch, heads=heads, head_dim=head_dim)
                    if shape == "cross":
                        q = cross_queries(q, query_tokens(n, shape))
                    inputs_for = (n, shape)
                label = BASELINE if case is None else case.label
                progress.update(task, description=f"{label} · {n} · {_mode(causal, shape)}")
                common = dict(suite="kernels", tokens=n, tokens_q=q.shape[2], tokens_k=n, shape=shape,
                              causal=causal, batch=batch, heads=heads, head_dim=head_dim, dtype="float32",
                              repeats=repeats_for(n))
                if case is None:
                    rec = _run_baseline(q, k, v, causal, n, seed, n_rows)
                    params = ("attn_mask=causal_lower_right" if causal and shape == "cross"
                              else "is_causal" if causal else "")
                    rec.update(label=BASELINE, method=BASELINE, backend="sdpa", params=params, **common)
                    sdpa_time[(n, causal, shape)] = rec.get("median_s")
                    _finish(rec, sdpa_time, records, printer, progress, out, results)
                    progress.advance(task)
                    continue
                method, status = harness.guarded(lambda: case.make(n, seed))
                auto_flex = method is not None and _uses_auto_flex(method, n)
                if status is not None:
                    rec = {"status": status, "wall_s": 0.0}
                else:
                    rec = _timed_case(method, q, k, v, causal, n, seed, n_rows)
                rec.update(label=case.label, method=getattr(method, "name", case.label.split(":")[0]),
                           backend=getattr(method, "backend", None), params=case.params, **common)
                _finish(rec, sdpa_time, records, printer, progress, out, results)
                failed_flex = auto_flex and rec["status"] != "ok" and not rec["status"].startswith("unsupported")
                if failed_flex:
                    tiled = _with_backend(method, "tiled") if fallback_tiled else None
                    if tiled is not None:
                        progress.update(task, total=progress.tasks[0].total + 1,
                                        description=f"{case.label} [tiled fallback] · {n} · "
                                                    f"{_mode(causal, shape)}")
                        rec2 = _timed_case(tiled, q, k, v, causal, n, seed, n_rows)
                        rec2.update(label=case.label, method=tiled.name, backend="tiled", params=case.params,
                                    fallback_for="auto", note="FlexAttention path failed; eager tiled kernel",
                                    **common)
                        _finish(rec2, sdpa_time, records, printer, progress, out, results)
                        progress.advance(task)
                progress.advance(task)
    finally:
        results["wall_s"] = time.perf_counter() - t_start
        results["machine"]["load_average_at_end"] = harness.load_average()
        results["time_spent"] = time_spent(records)
        results["efficiency_length"] = efficiency_lengths(records)
        _write_json(out / "results.json", results)
        (out / "report.md").write_text(render_report(results))
    console.print(summary_table(results))
    console.print(f"wrote {out / 'results.json'} and {out / 'report.md'} "
                  f"({len(records)} records, {results['wall_s']:.0f} s)")
    return results


def _mode(causal: bool, shape: str) -> str:
    return ("causal" if causal else "non-causal") + (" cross" if shape == "cross" else "")


def rec_mode(rec: dict[str, Any]) -> str:
    """"causal", "non-causal", "causal cross" or "non-causal cross" (records without a shape are self)."""
    return _mode(bool(rec["causal"]), rec.get("shape", "self"))


def sdpa_baseline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """torch SDPA as a user calls it: ``is_causal`` for self attention; for causal cross attention
    the lower-right causal bias, which aligns the last query with the last key as longattn does
    (``is_causal=True`` would align the first query with the first key and be a different mask)."""
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq != tk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(tq, tk))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _run_baseline(q, k, v, causal, n, seed, n_rows) -> dict[str, Any]:
    t0 = time.perf_counter()

    def sdpa():
        return sdpa_baseline(q, k, v, causal)

    rec = harness.run_callable_case(sdpa, q, k, v, causal=causal, path="sdpa", repeats=repeats_for(n),
                                    max_seconds=CASE_MAX_SECONDS, n_rows=n_rows, seed=seed)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _timed_case(method, q, k, v, causal, n, seed, n_rows) -> dict[str, Any]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the library warns when it runs the tiled kernel instead of a FlexAttention kernel that
        # does not compile; the record keeps that as a note instead of a warning per call.
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = harness.run_attention_case(method, q, k, v, causal=causal, repeats=repeats_for(n),
                                         max_seconds=CASE_MAX_SECONDS, n_rows=n_rows, seed=seed)
    rec["wall_s"] = time.perf_counter() - t0
    flex_error = (rec.get("extra") or {}).get("flex_error")
    if flex_error:
        rec["note"] = f"library fell back to the tiled kernel: {flex_error}"
    return rec


def _finish(rec, sdpa_time, records, printer, progress, out, results) -> None:
    base = sdpa_time.get((rec["tokens"], rec["causal"], rec.get("shape", "self")))
    rec["sdpa_median_s"] = base
    med = rec.get("median_s")
    rec["ratio_to_sdpa"] = base / med if (base and med) else None
    records.append(rec)
    printer.print(rec, progress.console)
    _write_json(out / "results.json", results)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def time_spent(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall seconds per case label, per length and per causal mode (gate and warm-up included)."""
    by_label: dict[str, float] = {}
    by_tokens: dict[str, float] = {}
    by_mode: dict[str, float] = {}
    first_calls = 0.0
    for r in records:
        w = float(r.get("wall_s") or 0.0)
        lab = r["label"] + (" [tiled fallback]" if r.get("fallback_for") else "")
        by_label[lab] = by_label.get(lab, 0.0) + w
        by_tokens[str(r["tokens"])] = by_tokens.get(str(r["tokens"]), 0.0) + w
        mode = rec_mode(r)
        by_mode[mode] = by_mode.get(mode, 0.0) + w
        first_calls += float(r.get("first_call_s") or 0.0)
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    return {"by_label": order(by_label), "by_tokens": by_tokens, "by_mode": by_mode,
            "first_calls_s": first_calls, "cases_s": sum(by_label.values())}


def efficiency_lengths(records: Sequence[dict[str, Any]]) -> dict[str, int | None]:
    """``"label · causal|non-causal" -> efficiency length`` (``harness.efficiency_length``: the
    smallest length from which the method keeps up with SDPA) for every method case run."""
    out: dict[str, int | None] = {}
    for r in records:
        if r["label"] == BASELINE:
            continue
        key = f"{_label(r)} · {rec_mode(r)}"
        if key in out:
            continue
        pts = [(x["tokens"], x.get("ratio_to_sdpa")) for x in records
               if _label(x) == _label(r) and rec_mode(x) == rec_mode(r)]
        out[key] = harness.efficiency_length(pts)
    return out


# -- formatting --------------------------------------------------------------------------------


def _short_status(rec: dict[str, Any]) -> str:
    s = rec.get("status", "")
    if s == "ok":
        return "ok, no flex" if (rec.get("extra") or {}).get("flex_error") else "ok"
    if s == "FAILED accuracy":
        return "FAILED accuracy"
    if s.startswith("unsupported"):
        return "unsupported"
    if s == "oom":
        return "oom"
    return "error"


def _fmt(x: Any, spec: str, missing: str = "—") -> str:
    if x is None:
        return missing
    try:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _mb(x: Any) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def _label(rec: dict[str, Any]) -> str:
    return rec["label"] + (" [tiled]" if rec.get("fallback_for") else "")


_STATUS_STYLE = {"ok": "green", "ok, no flex": "yellow", "FAILED accuracy": "bold red", "unsupported": "dim"}


def _short_mode(rec: dict[str, Any], narrow: bool) -> str:
    """The live table's mode cell: "causal" / "full", with "cross" for CAB's cross shape
    ("c·cross" / "f·cross" on a narrow console)."""
    causal = bool(rec["causal"])
    if rec.get("shape", "self") != "cross":
        return "causal" if causal else "full"
    if narrow:
        return "c·cross" if causal else "f·cross"
    return "causal cross" if causal else "full cross"


class _RowPrinter:
    """Prints one aligned table row per finished case (header once); fewer columns on a narrow
    console."""

    WIDE = (("tokens", 6, "right"), ("mode", 12, "left"), ("method", 26, "left"), ("path", 5, "left"),
            ("density", 7, "right"), ("computed", 8, "right"), ("median s", 9, "right"),
            ("spread", 8, "right"), ("vs SDPA", 8, "right"), ("peak MB", 7, "right"),
            ("TFLOP/s", 7, "right"), ("gate err", 8, "right"), ("status", 22, "left"))
    NARROW = ("tokens", "mode", "method", "path", "density", "median s", "vs SDPA", "peak MB", "status")
    NARROW_WIDTHS = {"tokens": 6, "mode": 7, "method": 17, "density": 7, "median s": 8, "vs SDPA": 7, "peak MB": 5,
                     "status": 11}
    NARROW_HEADERS = {"peak MB": "MB"}

    def __init__(self, console: Console):
        self.console = console
        self.header_done = False

    def _columns(self, console: Console):
        if console.width >= 150:
            return self.WIDE
        by_name = {c[0]: c for c in self.WIDE}
        return tuple((n, self.NARROW_WIDTHS.get(n, by_name[n][1]), by_name[n][2]) for n in self.NARROW)

    def print(self, rec: dict[str, Any], console: Console | None = None) -> None:
        console = console or self.console
        cols = self._columns(console)
        t = Table(show_header=not self.header_done, box=None, pad_edge=False, collapse_padding=True,
                  header_style="bold")
        narrow = cols is not self.WIDE
        for name, width, justify in cols:
            header = self.NARROW_HEADERS.get(name, name) if narrow else name
            t.add_column(header, width=width, justify=justify,  # type: ignore[arg-type]
                         no_wrap=True, overflow="ellipsis")
        gate = rec.get("gate") or {}
        ratio = rec.get("ratio_to_sdpa")
        status = _short_status(rec)
        style = _STATUS_STYLE.get(status, "red")
        values = {
            "tokens": str(rec["tokens"]), "mode": _short_mode(rec, narrow), "method": _label(rec),
            "path": rec.get("path") or "—", "density": _fmt(rec.get("density"), ".3f"),
            "computed": _fmt(rec.get("computed_fraction"), ".3f"), "median s": _fmt(rec.get("median_s"), ".4f"),
            "spread": _fmt(rec.get("spread_s"), ".4f"),
            "vs SDPA": _fmt(ratio, ".2f") + ("×" if ratio is not None else ""),
            "peak MB": _mb(rec.get("peak_mem_bytes")), "TFLOP/s": _fmt(rec.get("tflops"), ".3f"),
            "gate err": _fmt(gate.get("max_abs_err"), ".1e"), "status": f"[{style}]{status}[/{style}]",
        }
        t.add_row(*(values[name] for name, _, _ in cols))
        console.print(t)
        self.header_done = True


def _summary_tokens(results: dict[str, Any]) -> int | None:
    lens = results["config"]["lengths"]
    if not lens:
        return None
    return SUMMARY_TOKENS if SUMMARY_TOKENS in lens else max(lens)


def summary_table(results: dict[str, Any]) -> Table:
    """Rich table of the speed-ups at 16k (or the largest length run)."""
    n = _summary_tokens(results)
    t = Table(title=f"speed-up over torch SDPA at {n} tokens (>1 = faster)")
    for col in ("method", "mode", "vs SDPA", "median s", "SDPA s", "density", "path", "status"):
        t.add_column(col, justify="right" if col in ("vs SDPA", "median s", "SDPA s", "density") else "left")
    for rec in results["records"]:
        if rec["tokens"] != n:
            continue
        r = rec.get("ratio_to_sdpa")
        t.add_row(_label(rec), rec_mode(rec),
                  _fmt(r, ".2f") + ("×" if r is not None else ""), _fmt(rec.get("median_s"), ".3f"),
                  _fmt(rec.get("sdpa_median_s"), ".3f"), _fmt(rec.get("density"), ".3f"),
                  rec.get("path") or "—", _short_status(rec))
    return t


def _cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "—"
    s = _short_status(rec)
    if not s.startswith("ok"):
        return s
    r = rec.get("ratio_to_sdpa")
    if rec["label"] == BASELINE:
        return f"{rec['median_s']:.3g} s"
    mark = " †" if s != "ok" else ""
    return ("—" if r is None else f"{r:.2f}×") + mark


def render_report(results: dict[str, Any]) -> str:
    """The markdown report: ratio tables per causal mode, the 16k summary, details, failures and
    where the time went."""
    recs = results["records"]
    cfg = results["config"]
    mach = results["machine"]
    lens = cfg["lengths"]
    lines = ["# longattn kernels benchmark", ""]
    lines += [
        f"- date (UTC): {mach.get('date_utc')}; wall time {results.get('wall_s', 0):.0f} s",
        f"- machine: {mach.get('cpu_model')}, {mach.get('cpu_count')} CPUs ({mach.get('cpu_affinity')} usable), "
        f"torch threads {mach.get('torch_threads')}; {mach.get('platform')}",
        f"- versions: python {mach.get('python')}, torch {mach.get('torch')}, longattn {mach.get('longattn')}; "
        f"FlexAttention: {mach.get('flex_unavailable_reason') or 'available'}",
        f"- load average at start {mach.get('load_average_at_start')}, at end {mach.get('load_average_at_end')} "
        "(other processes on the machine distort timings)",
        f"- inputs: float32, batch {cfg['batch']}, {cfg['heads']} heads, head_dim {cfg['head_dim']}, "
        f"seeded random q/k/v (seed {cfg['seed']})",
        f"- timing: median of timed repeats ({', '.join(f'{k}: {v}' for k, v in cfg['repeats'].items())}; "
        f"fewer once a case has spent {cfg['case_max_seconds']:.0f} s); the first call (with stats) is the "
        "warm-up and is not timed — it absorbs FlexAttention's compilation "
        f"(methods with backend='auto' use it from {cfg['flex_min_tokens']} keys)",
        f"- gate: {cfg['gate_rows']} seeded query rows against the float64 reference on each method's own "
        f"visible mask; pass = max abs error ≤ {cfg['gate_atol']:g} and relative error ≤ {cfg['gate_rtol']:g} "
        "(and LSE error ≤ 1e-3 where the kernel returns it); a failed gate gives no speed figure",
        "- ratio = SDPA median / method median in the same run (> 1 = faster than SDPA); density = visible "
        "pairs / dense pairs (causal triangle when causal); TFLOP/s from 4 · visible pairs · head_dim · heads",
        "- peak memory: growth of the process RSS during the first timed call (after malloc_trim), sampled every "
        "~1 ms: approximate, it misses allocations reused from the allocator's cache",
        f"- CPU use = process CPU seconds / (timed wall seconds × {mach.get('torch_threads')} threads); well below "
        "100% for SDPA, or a high 1-minute load average, means other work shared the CPUs",
        "",
    ]
    for shape, causal in KERNEL_PATTERNS:
        mode_recs = kernel_pattern_records(recs, shape, causal)
        if not mode_recs:
            continue
        lines += [f"## {kernel_pattern_title(shape, causal, mode_recs)}: ratio to SDPA", ""]
        lines.append("| method | " + " | ".join(str(n) for n in lens) + " |")
        lines.append("|---|" + "---:|" * len(lens))
        labels: list[str] = []
        for r in mode_recs:
            if _label(r) not in labels:
                labels.append(_label(r))
        for lab in labels:
            cells = []
            for n in lens:
                hit = [r for r in mode_recs if _label(r) == lab and r["tokens"] == n]
                cells.append(_cell(hit[-1] if hit else None))
            name = "sdpa (median s)" if lab == BASELINE else lab
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if any((r.get("extra") or {}).get("flex_error") for r in recs):
        lines += ["† the FlexAttention kernel of this mask did not compile; the library ran its exact tiled "
                  "kernel instead (see Failures).", ""]
    n = _summary_tokens(results)
    if n is not None:
        lines += [f"## {n // 1024}k speed-ups" if n % 1024 == 0 else f"## speed-ups at {n} tokens", ""]
        lines.append("| method | mode | ratio to SDPA | median s | SDPA s | density | computed | path | peak MB "
                     "| status |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---|---:|---|")
        for r in recs:
            if r["tokens"] != n or r["label"] == BASELINE:
                continue
            ratio = r.get("ratio_to_sdpa")
            lines.append(
                f"| {_label(r)} | {rec_mode(r)} | "
                f"{_fmt(ratio, '.2f') + ('×' if ratio is not None else '')} | {_fmt(r.get('median_s'), '.3f')} | "
                f"{_fmt(r.get('sdpa_median_s'), '.3f')} | {_fmt(r.get('density'), '.3f')} | "
                f"{_fmt(r.get('computed_fraction'), '.3f')} | {r.get('path') or '—'} | "
                f"{_mb(r.get('peak_mem_bytes'))} | "
                f"{_short_status(r)} |"
            )
        lines.append("")
    eff = results.get("efficiency_length") or efficiency_lengths(recs)
    if eff:
        lines += ["## Efficiency length", "",
                  "The smallest length run from which the method is at least as fast as SDPA at every larger "
                  "length run (— : still slower at the largest).", "",
                  "| method · mode | efficiency length |", "|---|---:|"]
        lines += [f"| {k} | {v if v is not None else '—'} |" for k, v in eff.items()]
        lines.append("")
    lines += ["## All cases", ""]
    threads = mach.get("torch_threads") or 1
    lines.append("| tokens | mode | method | path | density | computed | median s | min s | max s | first call s "
                 "| peak MB | TFLOP/s | ratio | max abs err | rel err | CPU use | load 1m | status |")
    lines.append("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in recs:
        g = r.get("gate") or {}
        ratio = r.get("ratio_to_sdpa")
        busy = sum(r.get("samples") or [])
        cpu_use = r["cpu_s"] / (busy * threads) if r.get("cpu_s") is not None and busy > 0 else None
        lines.append(
            f"| {r['tokens']} | {rec_mode(r)} | {_label(r)} | {r.get('path') or '—'} | "
            f"{_fmt(r.get('density'), '.4f')} | {_fmt(r.get('computed_fraction'), '.4f')} | "
            f"{_fmt(r.get('median_s'), '.4f')} | {_fmt(r.get('min_s'), '.4f')} | {_fmt(r.get('max_s'), '.4f')} | "
            f"{_fmt(r.get('first_call_s'), '.2f')} | {_mb(r.get('peak_mem_bytes'))} | {_fmt(r.get('tflops'), '.3f')} | "
            f"{_fmt(ratio, '.2f')} | {_fmt(g.get('max_abs_err'), '.1e')} | {_fmt(g.get('rel_err'), '.1e')} | "
            f"{_fmt(cpu_use, '.0%')} | {_fmt(r.get('load_1m'), '.2f')} | {_short_status(r)} |"
        )
    lines.append("")
    lines += harness.failure_lines(recs, lambda r: f"{_label(r)}, {r['tokens']} tokens, "
                                                  f"{rec_mode(r)}")
    fell_back = [r for r in recs if (r.get("extra") or {}).get("flex_error")]
    if fell_back:
        lines += ["", "FlexAttention fallbacks (results are exact, timings are of the tiled kernel):", ""]
        for r in fell_back:
            lines.append(f"- {_label(r)}, {r['tokens']} tokens, {rec_mode(r)}: "
                         f"{r['extra']['flex_error']}")
    lines.append("")
    spent = results.get("time_spent") or time_spent(recs)
    lines += ["## Where the time went", "",
              f"Cases took {spent['cases_s']:.0f} s in all, of which first calls (warm-up, compilation) "
              f"{spent['first_calls_s']:.0f} s. By mode: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in spent["by_mode"].items()) + ".", "",
              "| by method | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in spent["by_label"].items()]
    lines += ["", "| by length | s |", "|---:|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in spent["by_tokens"].items()]
    lines.append("")
    return "\n".join(lines)
