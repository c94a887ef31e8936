"""The ``kernels`` suite: exact kernels and exact masked methods against torch SDPA.

It covers CAB's four attention patterns, {causal, non-causal} × {self, cross}: for each length
(float32, batch 1, 8 heads, head_dim 64, seeded random q/k/v) self attention has ``tokens``
queries over ``tokens`` keys, cross attention ``tokens // CROSS_QUERY_DIVISOR`` queries over
``tokens`` keys (the shape of a chunked prefill or of a decoder reading an encoder's output);
causal cross aligns the last query with the last key, as in decoding, so its SDPA baseline is
``attn_mask=causal_lower_right(tokens_q, tokens_k)`` (``is_causal=True`` would align the first
query with the first key). Each pattern times torch's ``scaled_dot_product_attention`` as the
baseline in the same run, then every method case: correctness gate first, then timing. Records
carry ``shape`` ("self" / "cross"), ``tokens_q`` and ``tokens_k``; ``tokens`` is the key count.

Methods with ``backend="auto"`` switch to compiled FlexAttention from ``FLEX_MIN_TOKENS`` keys; their
first call compiles (tens of seconds on a small CPU) and is reported as ``first_call_s``, outside
the timed samples. When the library cannot compile a mask structure it runs the exact tiled kernel
instead (``stats.extra["flex_error"]``); the record then says path "tiled" and carries that note.
When the FlexAttention path fails in any other way (an error, a failed gate) the case is recorded
as it failed and run again with ``backend="tiled"`` as a separate, labelled record.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import longattn
from longattn.bench import harness
from longattn.bench.suite import Column, Context, Panel, Part, Pivot, Suite, Table, label, num, status_column
from longattn.core import masks
from longattn.kernels import flex
from longattn.methods.base import Method
from longattn.methods.masked import FLEX_MIN_TOKENS

#: quick: the main job's sizes (about 2 minutes here); full: 1k to 64k
QUICK_LENGTHS: tuple[int, ...] = (1024, 4096, 8192)
FULL_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
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


def make_inputs(tokens: int, seed: int, *, batch: int = 1, heads: int = 8, head_dim: int = 64,
                dtype: torch.dtype = torch.float32):
    """Seeded ``q, k, v`` of shape ``[batch, heads, tokens, head_dim]``, drawn in float32 on the CPU
    (the same values on every device), then rounded to ``dtype`` on the benchmark's device."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    return tuple(harness.on_device(torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype))
                 for _ in range(3))


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


def case_names(cases: Sequence[KernelCase]) -> list[str]:
    """Every name ``--methods`` accepts for these cases: labels, method names, pattern names."""
    names: list[str] = []
    for c in cases:
        base, _, sub = c.label.partition(":")
        for n in (c.label, base, sub):
            if n and n not in names:
                names.append(n)
    return names


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


def _run_baseline(q, k, v, causal, n, seed, n_rows, **tol) -> dict[str, Any]:
    t0 = time.perf_counter()

    def sdpa():
        return sdpa_baseline(q, k, v, causal)

    rec = harness.run_callable_case(sdpa, q, k, v, causal=causal, path="sdpa", repeats=repeats_for(n),
                                    max_seconds=CASE_MAX_SECONDS, n_rows=n_rows, seed=seed, **tol)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _timed_case(method, q, k, v, causal, n, seed, n_rows, **tol) -> dict[str, Any]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the library warns when it runs the tiled kernel instead of a FlexAttention kernel that
        # does not compile; the record keeps that as a note instead of a warning per call.
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = harness.run_attention_case(method, q, k, v, causal=causal, repeats=repeats_for(n),
                                         max_seconds=CASE_MAX_SECONDS, n_rows=n_rows, seed=seed, **tol)
    rec["wall_s"] = time.perf_counter() - t0
    flex_error = (rec.get("extra") or {}).get("flex_error")
    if flex_error:
        rec["note"] = f"library fell back to the tiled kernel: {flex_error}"
    return rec


# -- the part ----------------------------------------------------------------------------------


def _options_cases(options: Mapping[str, Any]) -> list[KernelCase]:
    return list(options.get("cases") or default_cases())


def run_cases(ctx: Context) -> Iterator[dict[str, Any]]:
    """Every (length, shape, causal) pattern: SDPA first, then each selected case (and its tiled
    rerun when its FlexAttention path failed)."""
    o = ctx.options
    lens = sorted({int(n) for n in o["lengths"]})
    shapes = tuple(dict.fromkeys(o["shapes"]))
    batch, heads, head_dim, n_rows, seed = o["batch"], o["heads"], o["head_dim"], o["n_rows"], ctx.seed
    chosen = select_cases(_options_cases(o), ctx.methods)
    half_lens = o.get("half_lengths")
    plan = [(dt, n, shape, causal, c) for dt in dict.fromkeys(o.get("dtypes") or ("float32",))
            for n in lens if dt == "float32" or half_lens is None or n in half_lens
            for shape in shapes for causal in (True, False)
            for c in [None, *chosen] if c is None or (causal in c.modes and shape in c.shapes)]
    ctx.plan(len(plan))
    inputs_for: tuple[int, str] | None = None
    q = k = v = None
    sdpa_time: dict[tuple[int, bool, str], float | None] = {}
    sdpa_gate: dict[tuple[int, bool, str, str], dict[str, Any] | None] = {}
    for i, (dtype, n, shape, causal, case) in enumerate(plan):
        if inputs_for != (dtype, n, shape):
            q = k = v = None
            q, k, v = make_inputs(n, seed, batch=batch, heads=heads, head_dim=head_dim, dtype=harness.DTYPES[dtype])
            if shape == "cross":
                q = cross_queries(q, query_tokens(n, shape))
            inputs_for = (dtype, n, shape)
        # half dtypes: flash attention's rule, at most twice SDPA's error in the same dtype + 1e-5
        # (the SDPA baseline itself, with no figure to compare with, gets bf16's resolution)
        tol = {} if dtype == "float32" else dict(zip(("atol", "rtol"), harness.half_gate_tolerance(
            sdpa_gate.get((n, causal, shape, dtype)) if case is not None else None)))
        lab = BASELINE if case is None else case.label
        ctx.step(f"{lab} · {n} · {_mode(causal, shape)}", advance=0 if i == 0 else 1)
        common = dict(tokens=n, tokens_q=q.shape[2], tokens_k=n, shape=shape, causal=causal, batch=batch,
                      heads=heads, head_dim=head_dim, dtype=dtype, repeats=repeats_for(n))

        def finish(rec):
            base = sdpa_time.get((n, causal, shape, dtype))
            med = rec.get("median_s")
            rec["sdpa_median_s"] = base
            rec["ratio_to_sdpa"] = base / med if (base and med) else None
            return rec

        if case is None:
            rec = _run_baseline(q, k, v, causal, n, seed, n_rows, **tol)
            params = "attn_mask=causal_lower_right" if causal and shape == "cross" else "is_causal" if causal else ""
            rec.update(label=BASELINE, method=BASELINE, backend="sdpa", params=params, compute_dtype=dtype, **common)
            sdpa_time[(n, causal, shape, dtype)] = rec.get("median_s")
            sdpa_gate[(n, causal, shape, dtype)] = rec.get("gate")
            yield finish(rec)
            continue
        method, status = harness.guarded(lambda: case.make(n, seed))
        auto_flex = method is not None and _uses_auto_flex(method, n)
        rec = {"status": status, "wall_s": 0.0} if status is not None else _timed_case(method, q, k, v, causal, n,
                                                                                        seed, n_rows, **tol)
        rec.update(label=case.label, method=getattr(method, "name", case.label.split(":")[0]),
                   backend=getattr(method, "backend", None), params=case.params, **common)
        yield finish(rec)
        failed_flex = auto_flex and rec["status"] != "ok" and not rec["status"].startswith("unsupported")
        tiled = _with_backend(method, "tiled") if failed_flex and o["fallback_tiled"] else None
        if tiled is not None:
            ctx.step(f"{case.label} [tiled fallback] · {n} · {_mode(causal, shape)}", advance=0)
            rec2 = _timed_case(tiled, q, k, v, causal, n, seed, n_rows, **tol)
            rec2.update(label=case.label, method=tiled.name, backend="tiled", params=case.params,
                        fallback_for="auto", note="FlexAttention path failed; eager tiled kernel", **common)
            yield finish(rec2)


def check(options: Mapping[str, Any]) -> None:
    lens = sorted({int(n) for n in options["lengths"]})
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"--lengths must be positive, got {lens}")
    shapes = tuple(dict.fromkeys(options["shapes"]))
    if not shapes or any(sh not in SHAPES for sh in shapes):
        raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {list(shapes)}")
    harness.check_dtypes(options.get("dtypes") or ("float32",))


# -- derived figures ---------------------------------------------------------------------------


def time_spent(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall seconds per case label, per length and per causal mode (gate and warm-up included)."""
    by_label: dict[str, float] = {}
    by_tokens: dict[str, float] = {}
    by_mode: dict[str, float] = {}
    first_calls = 0.0
    for r in records:
        w = float(r.get("wall_s") or 0.0)
        lab = series(r)
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
        key = f"{series(r)} · {rec_mode(r)}"
        if key in out:
            continue
        pts = [(x["tokens"], x.get("ratio_to_sdpa")) for x in records
               if series(x) == series(r) and rec_mode(x) == rec_mode(r)]
        out[key] = harness.efficiency_length(pts)
    return out


def summary_tokens(lengths: Sequence[int]) -> int | None:
    """The length the speed-up summary is about: ``SUMMARY_TOKENS`` when run, else the largest."""
    lens = sorted(int(n) for n in lengths)
    if not lens:
        return None
    return SUMMARY_TOKENS if SUMMARY_TOKENS in lens else lens[-1]


def finish(results: dict[str, Any]) -> None:
    """Efficiency lengths, where the time went, and which records the summary table shows."""
    recs = results["records"]
    results["efficiency_length"] = efficiency_lengths(recs)
    results["time_spent"] = time_spent(recs)
    n = summary_tokens([r["tokens"] for r in recs])
    results["summary_tokens"] = n
    for r in recs:
        r["in_summary"] = r["tokens"] == n and r["label"] != BASELINE


# -- the declaration ---------------------------------------------------------------------------


def series(rec: dict[str, Any]) -> str:
    """A case's name in tables and plots: its label, ``[tiled]`` for a fallback rerun, and the
    input dtype when it is not float32 (`` · bf16``)."""
    short = {"bfloat16": " · bf16", "float16": " · fp16"}.get(str(rec.get("dtype", "float32")), "")
    return str(rec.get("label") or rec.get("method")) + (" [tiled]" if rec.get("fallback_for") else "") + short


def pattern_title(rec: dict[str, Any], *, brief: bool = False) -> str:
    """The heading of a record's CAB pattern: "Causal", "Non-causal", "Causal cross (keys / 4
    queries, the last query aligned with the last key)", "Non-causal cross (keys / 4 queries)";
    ``brief`` (plot titles) leaves out the alignment clause."""
    causal = bool(rec.get("causal"))
    title = "Causal" if causal else "Non-causal"
    if rec.get("shape", "self") != "cross":
        return title
    tq = num(rec.get("tokens_q"))
    ratio = f"keys / {float(rec['tokens']) / tq:.0f} queries" if tq else "fewer queries than keys"
    aligned = ", the last query aligned with the last key" if causal and not brief else ""
    return f"{title} cross ({ratio}{aligned})"


#: CAB's four patterns in report order, as ``(shape, causal)``
PATTERNS: tuple[tuple[str, bool], ...] = (("self", True), ("self", False), ("cross", True), ("cross", False))


def _pattern_order(rec: dict[str, Any]) -> int:
    return PATTERNS.index((rec.get("shape", "self"), bool(rec.get("causal"))))


def _short(rec: dict[str, Any]) -> str:
    s = str(rec.get("status", ""))
    if s == "ok":
        return "ok, no flex" if (rec.get("extra") or {}).get("flex_error") else "ok"
    return s.split(":", 1)[0]


def _cell(rec: dict[str, Any]) -> str:
    """A pivot cell: SDPA's median seconds, a method's ratio (``†``: the tiled kernel ran instead
    of a FlexAttention kernel that did not compile), or the short status."""
    s = _short(rec)
    if not s.startswith("ok"):
        return s
    if rec["label"] == BASELINE:
        return f"{rec['median_s']:.3g} s"
    r = rec.get("ratio_to_sdpa")
    return ("—" if r is None else f"{r:.2f}×") + (" †" if s != "ok" else "")


def _cpu_use(rec: dict[str, Any]) -> float | None:
    busy = sum(rec.get("samples") or [])
    threads = rec.get("threads") or torch.get_num_threads()
    return rec["cpu_s"] / (busy * threads) if rec.get("cpu_s") is not None and busy > 0 else None


def _sorted_by_pattern(results: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(results["records"], key=_pattern_order)


def _efficiency_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"case": k, "length": v} for k, v in (results.get("efficiency_length") or {}).items()]


def _time_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    spent = results.get("time_spent") or {}
    return [{"what": k, "s": v} for k, v in (spent.get("by_label") or {}).items()] + \
        [{"what": f"{k} tokens", "s": v} for k, v in (spent.get("by_tokens") or {}).items()]


def _dtypes_text(cfg: Mapping[str, Any]) -> str:
    dts = list(cfg.get("dtypes") or ("float32",))
    half = cfg.get("half_lengths")
    return " and ".join(d if d == "float32" or not half else f"{d} (at {', '.join(map(str, half))} tokens)"
                        for d in dts) + " (each against SDPA in the same dtype)"


def _about(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return "\n".join([
        f"- inputs: {_dtypes_text(cfg)}, batch {cfg['batch']}, {cfg['heads']} heads, head_dim {cfg['head_dim']}, seeded random "
        f"q/k/v; lengths {', '.join(map(str, cfg['lengths']))}; CAB's four patterns (self and cross = tokens / "
        f"{CROSS_QUERY_DIVISOR} queries, causal and not)",
        f"- baseline: torch SDPA in the same run (causal cross: `attn_mask=causal_lower_right`); timing: median of "
        f"the timed repeats after a first call with stats that absorbs compilation (methods with backend='auto' "
        f"compile FlexAttention from {FLEX_MIN_TOKENS} keys); a case stops repeating after {CASE_MAX_SECONDS:.0f} s",
        f"- gate: {cfg['n_rows']} seeded query rows against the float64 reference on each method's own visible "
        f"mask; pass = max abs error ≤ {harness.ATOL:g}, relative ≤ {harness.RTOL:g}, LSE ≤ {harness.LSE_ATOL:g}; "
        "a failed gate gives no speed figure",
        "- ratio = SDPA median / method median (> 1: faster); density = visible pairs / dense pairs (causal "
        "triangle when causal); TFLOP/s from 4 · visible pairs · head_dim · heads; peak MB = RSS growth during the "
        "first timed call (approximate); CPU use = process CPU s / (timed s × threads)",
        "- † in a ratio table: the FlexAttention kernel of that mask did not compile, the library ran its exact "
        "tiled kernel instead",
    ])


_TOKENS = Column("tokens", "tokens", "")
_MODE = label("mode", rec_mode)
_METHOD = label("method", series)

SUITE = Suite(
    name="kernels",
    title="longattn kernels benchmark",
    about=_about,
    parts=(Part("cases", run_cases, methods=lambda o: case_names(_options_cases(o))),),
    quick={"lengths": QUICK_LENGTHS, "shapes": SHAPES, "batch": 1, "heads": 8, "head_dim": 64, "n_rows": 64,
           "fallback_tiled": True, "cases": None, "dtypes": ("float32", "bfloat16"), "half_lengths": (8192,)},
    full={"lengths": FULL_LENGTHS, "shapes": SHAPES, "batch": 1, "heads": 8, "head_dim": 64, "n_rows": 64,
          "fallback_tiled": True, "cases": None, "dtypes": ("float32", "bfloat16"), "half_lengths": None},
    describe=lambda r: f"{series(r)}, {r.get('tokens')} tokens, {rec_mode(r)}",
    live=(Column("median", "median_s", lambda x: None if x is None else f"{x:.4f} s"),
          Column("", "ratio_to_sdpa", lambda x: None if x is None else f"{x:.2f}× SDPA"),
          Column("density", "density", ".3f"), Column("path", "path"),
          Column("gate err", lambda r: (r.get("gate") or {}).get("max_abs_err"), ".1e")),
    tables=(
        Table("{group}: ratio to SDPA", source=_sorted_by_pattern, group=pattern_title, console=False,
              pivot=Pivot(label("method", lambda r: f"{series(r)} (median s)" if r["label"] == BASELINE else series(r)),
                          "tokens", Column("", lambda r: r, _cell))),
        Table(lambda res: f"speed-ups at {res.get('summary_tokens')} tokens", where=lambda r: r.get("in_summary"),
              columns=(_METHOD, _MODE, Column("vs SDPA", "ratio_to_sdpa", "ratio"),
                       Column("median s", "median_s", ".3f", keep=2), Column("SDPA s", "sdpa_median_s", ".3f", keep=3),
                       Column("density", "density", ".3f", keep=1), Column("computed", "computed_fraction", ".3f", 5),
                       label("path", "path", keep=4), Column("peak MB", "peak_mem_bytes", "mib", keep=6),
                       status_column())),
        Table("Efficiency length", source=_efficiency_rows, console=False,
              note="The smallest length run from which the method is at least as fast as SDPA at every larger "
                   "length run (— : still slower at the largest).",
              columns=(label("method · mode", "case"), Column("efficiency length", "length"))),
        Table("All cases", console=False,
              columns=(_TOKENS, _MODE, _METHOD, label("path", "path"), Column("density", "density", ".4f"),
                       Column("computed", "computed_fraction", ".4f"), Column("median s", "median_s", ".4f"),
                       Column("min s", "min_s", ".4f"), Column("max s", "max_s", ".4f"),
                       Column("first call s", "first_call_s", ".2f"), Column("peak MB", "peak_mem_bytes", "mib"),
                       Column("TFLOP/s", "tflops", ".3f"), Column("ratio", "ratio_to_sdpa", ".2f"),
                       Column("max abs err", lambda r: (r.get("gate") or {}).get("max_abs_err"), ".1e"),
                       Column("rel err", lambda r: (r.get("gate") or {}).get("rel_err"), ".1e"),
                       Column("CPU use", _cpu_use, ".0%"), Column("load 1m", "load_1m", ".2f"),
                       Column("status", _short, "", align="left"))),
        Table("FlexAttention fallbacks (results exact, timings of the tiled kernel)", console=False,
              where=lambda r: bool((r.get("extra") or {}).get("flex_error")),
              columns=(_METHOD, _TOKENS, _MODE, label("FlexAttention error", lambda r: r["extra"]["flex_error"]))),
        Table("Where the time went", source=_time_rows, console=False,
              note="Wall seconds per case (gate, warm-up and compilation included), by method and by length.",
              columns=(label("method / length", "what"), Column("s", "s", ".1f"))),
    ),
    panels=tuple(
        Panel("speedup_vs_length", (lambda recs: "exact kernels, " + pattern_title(recs[0], brief=True).lower()),
              "tokens", "ratio_to_sdpa", series,
              where=(lambda r, sh=shape, c=causal: r.get("shape", "self") == sh and bool(r.get("causal")) == c
                     and r.get("label") != BASELINE),
              xlabel="keys (tokens)" if shape == "cross" else "sequence length (tokens)")
        for shape, causal in PATTERNS
    ) + (
        Panel("memory_vs_length", "prefill, causal: peak memory (RSS growth, kernels suite)", "tokens",
              "peak_mem_bytes", series, where=lambda r: bool(r.get("causal")) and r.get("shape", "self") == "self"),
    ),
    finish=finish,
    check=check,
)
