"""The ``decode`` suite: the time and memory of one decoding step against the length of the cache.

A decoding step is one new query (batch 1, 8 query heads, head_dim 64; a float32 cache, and a bf16
one against SDPA in bf16 — quick: at the largest cache) attending over a KV cache of ``cache`` tokens, run for MHA (8 key-value heads) and GQA (2 key-value heads, 4 query
heads per group). For every cache length, torch SDPA over the whole cache is timed in the same
run as the baseline, then each method:

* ``dense`` / ``dense_chunked``: longattn's exact kernels (SDPA through the API, the online-softmax
  tiled kernel) — what the API costs over plain SDPA;
* ``streaming``: attention sinks + recent window (StreamingLLM, Xiao et al. 2024), exact on its
  mask; the only method here whose cache may be cut to ``sinks + window`` tokens;
* ``landmark`` / ``quest``: block retrieval (Mohtashami & Jaggi 2023; Tang et al. 2024) at a budget
  of keys, on block summaries the decode loop keeps (``attention(..., summaries=)``), as
  ``longattn.bench.sparse_speed.run_decode`` does;
* ``tokenselect``: per-head top-``budget`` keys by ``q·k`` (Wu et al. 2024);
* ``recycled``: Recycled Attention (Xu et al. 2024), a full step every ``stride`` queries; one of
  its steps is timed as a call with ``stride`` queries (one full step, ``stride − 1`` recycled)
  divided by ``stride``: the cost amortised over its schedule.

Inputs are retrieval-shaped (``sparse_speed.clustered_qkv``): on i.i.d. Gaussian q/k attention is
flat and every selection's error is large and meaningless. The decode queries are the last
``STEP_QUERIES`` query rows, each in turn the new query at the cache's end.

Per record:

* ``step_s`` — median over the timed steps (each sample one step, cycling through the queries),
  with ``min_step_s``/``max_step_s``; ``ratio_to_sdpa`` = SDPA's median step / the method's
  (> 1: faster than SDPA).
* the gate, before any timing: an output with a non-finite value gets no speed figure; methods
  that claim to be exact (``dense``, ``dense_chunked``, ``streaming`` on its own mask) must match
  the float64 reference within ``harness.ATOL``/``RTOL`` or they are marked ``FAILED accuracy``.
  Approximate methods report ``rel_err`` (‖out − exact‖ / ‖exact‖) and ``recall`` (mean of
  ``exp(lse − lse_exact)``, the share of the true softmax mass inside what was attended), always
  against exact attention over the whole cache.
* ``kv_bytes`` (= ``kv_read_bytes``): bytes of K/V one step reads, by the method's algorithm (see
  ``kv_accounting``); ``kv_kept_bytes``: bytes the method must keep in memory for later steps
  (``kv_kept_what`` says what: the whole cache for retrieval methods, ``sinks + window`` for
  streaming).
* ``peak_mem_bytes``: RSS growth during the first timed step (``harness.time_call``), approximate.
* ``efficiency_length``: the smallest cache length run from which the method beats SDPA at that
  length and every larger one (``harness.efficiency_length``), and ``crossover_estimate``, the
  length where the ratio crosses 1 by log-log interpolation between the lengths run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import longattn
from longattn.bench import harness
from longattn.bench.suite import (Column, Context, Panel, Part, Pivot, Suite, Table, efficiency_columns, format_value,
                                  label, num, short_status, status_column)
from longattn.bench.sparse_speed import clustered_qkv
from longattn.methods.base import Method
from longattn.sparse.summaries import BlockSummaries

QUICK_CACHES: tuple[int, ...] = (4096, 16384, 65536)
FULL_CACHES: tuple[int, ...] = (4096, 16384, 65536, 131072, 262144)
HEADS, HEAD_DIM = 8, 64
#: key-value heads per layout: MHA, and GQA with 4 query heads per key-value head
KV_HEADS: tuple[int, ...] = (8, 2)
#: the sparse methods' common setting (as in sparse_speed.run_decode): 2048 keys per step, in
#: 128-key blocks (decode reads every block summary per step; 128 halves that traffic against 64)
BUDGET, BLOCK, SINKS, WINDOW = 2048, 128, 128, 256
STRIDE = 16
#: distinct decode queries (each in turn the new query at the cache's end): the gate checks all
#: of them and the timed steps cycle through them
STEP_QUERIES = 8
BASELINE = "sdpa"


@dataclass(frozen=True)
class DecodeCase:
    """One method configuration of the suite.

    ``make()`` builds the method; ``kind`` decides how a step is run and its K/V counted:
    ``"dense"`` (every key), ``"window"`` (sinks + window), ``"blocks"`` (block retrieval on the
    loop's ``BlockSummaries``; ``summary_reads`` = summary tensors scored per step: 1 for mean keys,
    2 for min/max), ``"tokens"`` (scores every key, reads the selected values) or ``"recycled"``.
    ``default``: run when no ``methods`` are named.
    """

    label: str
    make: Callable[[], Method]
    kind: str
    params: str = ""
    summary_reads: int = 0
    default: bool = True
    note: str = ""


def default_cases() -> list[DecodeCase]:
    """The methods the suite times against SDPA (``loki`` only when asked for by name)."""
    m = longattn.method
    blocks = dict(budget=BUDGET, block=BLOCK, q_block=1, sinks=SINKS, window=WINDOW)
    block_params = f"budget={BUDGET}, block={BLOCK}, sinks={SINKS}, window={WINDOW}"
    return [
        DecodeCase("dense", lambda: m("dense"), "dense", "torch SDPA through longattn.attention"),
        DecodeCase("dense_chunked", lambda: m("dense_chunked"), "dense", "chunk=2048 (tiled online softmax)"),
        DecodeCase("streaming", lambda: m("streaming", sinks=SINKS, window=BUDGET - SINKS, backend="tiled"), "window",
                   f"sinks={SINKS}, window={BUDGET - SINKS}, backend=tiled",
                   note="backend='tiled': 'auto' would compile a FlexAttention kernel per cache length for one query"),
        DecodeCase("landmark", lambda: m("landmark", **blocks), "blocks", block_params, summary_reads=1),
        DecodeCase("quest", lambda: m("quest", **blocks), "blocks", block_params, summary_reads=2),
        DecodeCase("tokenselect", lambda: m("tokenselect", budget=BUDGET), "tokens", f"budget={BUDGET}"),
        DecodeCase("recycled", lambda: m("recycled", stride=STRIDE, budget=BUDGET), "recycled",
                   f"stride={STRIDE}, budget={BUDGET}",
                   note=f"step = a call with {STRIDE} queries (1 full + {STRIDE - 1} recycled) / {STRIDE}"),
        DecodeCase("loki", lambda: m("loki", budget=BUDGET), "tokens", f"budget={BUDGET}, rank_dims=16", default=False,
                   note="refits the key PCA every call (a real cache would fit it once)"),
    ]


def select_cases(cases: Sequence[DecodeCase], names: Iterable[str] | None) -> list[DecodeCase]:
    """The default cases, or those named (``"sdpa"`` is accepted: the baseline always runs).
    Unknown names raise ``ValueError`` listing the known ones."""
    if names is None:
        return [c for c in cases if c.default]
    wanted = [n.strip() for n in names if n.strip()]
    known = [BASELINE] + [c.label for c in cases]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) for the decode suite: {', '.join(unknown)}; known: {', '.join(known)}")
    return [c for c in cases if c.label in wanted]


# -- inputs ------------------------------------------------------------------------------------


def decode_inputs(cache: int, kv_heads: int, *, heads: int = HEADS, head_dim: int = HEAD_DIM,
                  queries: int = STEP_QUERIES, seed: int = 0):
    """``q [1, heads, queries, D]``, ``k, v [1, kv_heads, cache, D]`` float32, retrieval-shaped.

    For GQA the ``heads / kv_heads`` query heads of a group are drawn from the topics of their
    key-value head (``clustered_qkv`` over ``kv_heads`` heads with ``group × queries`` query rows,
    split among the group), so every query head has keys worth retrieving."""
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    group = heads // kv_heads
    q, k, v = clustered_qkv(cache, tokens_q=group * queries, heads=kv_heads, head_dim=head_dim, seed=seed)
    # query head h reads key-value head h // group (the GQA convention of SDPA's enable_gqa)
    q = q.view(1, kv_heads, group, queries, head_dim).reshape(1, heads, queries, head_dim).contiguous()
    return q, k, v


def memory_needed(cache: int, kv_heads: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> int:
    """Rough peak bytes of one cache length: the float32 cache with the generator's temporaries
    (about 3×) and the float64 scores of the reference (``exact_reference``)."""
    kv32 = 2 * kv_heads * cache * head_dim * 4
    scores64 = 2 * heads * max(STEP_QUERIES, STRIDE) * cache * 8
    return 3 * kv32 + scores64


# -- K/V accounting ----------------------------------------------------------------------------


def kv_accounting(case: DecodeCase | None, method: Method | None, cache: int, heads: int, kv_heads: int,
                  head_dim: int, attended: float, element_bytes: int = 4) -> dict[str, Any]:
    """Bytes of K/V (``element_bytes`` per element: 4 float32, 2 bf16) one step reads, and bytes
    the method must keep, by its algorithm.

    ``attended``: keys attended per query head (measured). A row is one head's key or value
    (``head_dim × 4`` bytes). Selective methods gather their rows per *query* head; with GQA the
    heads of a group may choose the same row, so the count is capped at the whole cache (no step
    reads more distinct rows than exist). Dense methods read per key-value head. Reads of the eager
    implementations can be larger (TokenSelect's eager kernel masks every key instead of
    gathering); the figures are what the algorithm needs.
    """
    row = head_dim * element_bytes
    full = 2 * kv_heads * cache * row
    kind = "dense" if case is None else case.kind
    if kind == "dense":
        return {"kv_read_bytes": full, "kv_kept_bytes": full, "kv_kept_what": "whole cache"}
    if kind == "window":
        keep = min(cache, int(getattr(method, "sinks", 0)) + int(getattr(method, "window", cache)))
        b = 2 * kv_heads * keep * row
        return {"kv_read_bytes": b, "kv_kept_bytes": b, "kv_kept_what": f"sinks + window ({keep} tokens)"}
    if kind == "blocks":
        n_blocks = math.ceil(cache / int(getattr(method, "block", BLOCK)))
        summary = kv_heads * n_blocks * row
        read = min(2 * heads * attended * row, full) + case.summary_reads * summary
        # the loop keeps sums, min and max per block for every method of the family
        return {"kv_read_bytes": int(read), "kv_kept_bytes": full + 3 * summary,
                "kv_kept_what": "whole cache + block summaries (sum, min, max)"}
    if kind == "tokens":
        read = full / 2 + min(heads * attended * row, full / 2)  # every key scored, chosen values read
        return {"kv_read_bytes": int(read), "kv_kept_bytes": full, "kv_kept_what": "whole cache"}
    if kind == "recycled":
        stride = int(getattr(method, "stride", STRIDE))
        budget = int(getattr(method, "budget", BUDGET))
        recycled = min(2 * heads * min(cache, budget + stride / 2) * row, full)
        read = (full + (stride - 1) * recycled) / stride
        return {"kv_read_bytes": int(read), "kv_kept_bytes": full,
                "kv_kept_what": "whole cache (every full step reads it)"}
    raise ValueError(f"unknown decode case kind {kind!r}")


# -- the gate ----------------------------------------------------------------------------------


def _own_mask_reference(method: Method, q, k, v, ref, ref_lse):
    """Reference on the method's own visible mask for queries at the cache's last position (the
    full-cache reference when that mask shows every key)."""
    tk = k.shape[2]
    allowed = harness.rows_mask(method.visible_mask(1, tk, True), 1, 1, torch.zeros(1, dtype=torch.long), 1, tk)
    if allowed is None or bool(allowed.all()):
        return ref, ref_lse
    if allowed.shape[:3] != (1, 1, 1):  # a mask that depends on batch or head
        return longattn.reference_attention(q, k, v, mask=allowed)
    return harness.exact_reference(q, k, v, key_mask=allowed.reshape(tk))


# -- the part ---------------------------------------------------------------------------------


def run_steps(ctx: Context) -> Iterator[dict[str, Any]]:
    """Every cache length × KV layout: SDPA's step first, then each selected case."""
    o = ctx.options
    caches = sorted({int(n) for n in o["lengths"]})
    heads, head_dim = int(o["heads"]), int(o["head_dim"])
    layouts = [int(h) for h in o["kv_heads"]]
    chosen = select_cases(_options_cases(o), ctx.methods)
    n_timed = int(o["timed_steps"])
    max_case_s = float(o["case_max_seconds"])
    half_lens = o.get("half_lengths")
    plan = [(dt, cache) for dt in dict.fromkeys(o.get("dtypes") or ("float32",)) for cache in caches
            if dt == "float32" or half_lens is None or cache in half_lens]
    ctx.plan(len(plan) * len(layouts) * (1 + len(chosen)))
    for dtype, cache in plan:
        for hkv in layouts:
            yield from _run_layout(ctx, cache, hkv, heads, head_dim, chosen, n_timed, max_case_s, dtype)


def _common(cache, hkv, heads, head_dim, dtype: str = "float32") -> dict[str, Any]:
    layout = "MHA" if hkv == heads else f"GQA {heads}:{hkv}"
    short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
    return dict(cache=cache, tokens=cache, kv_heads=hkv, heads=heads, head_dim=head_dim,
                layout=f"{layout} · {short}" if short else layout, causal=True, dtype=dtype)


def _run_layout(ctx: Context, cache, hkv, heads, head_dim, chosen, n_timed, max_case_s,
                dtype: str = "float32") -> Iterator[dict[str, Any]]:
    """Every case at one cache length, key-value head count and dtype (a cache in bf16 against
    SDPA in bf16; exact methods then gate at twice SDPA's error, ``harness.half_gate_tolerance``)."""
    common = _common(cache, hkv, heads, head_dim, dtype)
    labels = [BASELINE] + [c.label for c in chosen]

    def skip_all(status: str) -> Iterator[dict[str, Any]]:
        for lab in labels:
            ctx.step(f"{lab} · cache {cache} · {common['layout']}")
            yield _finish_record({**common, "method": lab, "budget": None, "status": status, "step_s": None}, None)

    need, avail = memory_needed(cache, hkv, heads, head_dim), harness.available_memory()
    if avail is not None and need > 0.8 * avail:
        yield from skip_all(f"oom: needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available (not run)")
        return
    ctx.step(f"inputs · cache {cache} · {common['layout']}", advance=0)
    t0 = time.perf_counter()
    res, status = harness.guarded(lambda: _prepare(cache, hkv, heads, head_dim, ctx.seed, dtype))
    if status is not None:
        yield from skip_all(f"inputs {status}")
        return
    q_all, k, v, ref_all, ref_lse_all = res
    # single-step cases use the last STEP_QUERIES queries; recycled takes a block of its stride
    q, ref, ref_lse = q_all[:, :, -STEP_QUERIES:], ref_all[:, :, -STEP_QUERIES:], ref_lse_all[:, :, -STEP_QUERIES:]
    prepare_s = time.perf_counter() - t0
    build_s: dict[str, float] = {}
    summaries = _SummaryCache(k, build_s)
    qs = [q[:, :, i:i + 1] for i in range(q.shape[2])]
    gqa = hkv != heads

    # the baseline: SDPA over the whole cache
    ctx.step(f"{BASELINE} · cache {cache} · {common['layout']}", advance=0)
    t0 = time.perf_counter()
    rec = {**common, "method": BASELINE, "registry_name": None, "budget": None, "params": "whole cache",
           "status": "ok", "exact": True, "prepare_s": prepare_s}
    if dtype != "float32":
        rec["gate_tol"] = harness.half_gate_tolerance(None)
    _step_case(rec, lambda i: F.scaled_dot_product_attention(qs[i % len(qs)], k, v, enable_gqa=gqa),
               lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), None, ref, ref_lse, None, None,
               n_timed, max_case_s, per_call=1)
    rec.update(kv_accounting(None, None, cache, heads, hkv, head_dim, cache, k.element_size()))
    rec["attended_keys"] = float(cache)
    rec["flops"] = harness.attention_flops(1, cache, False, head_dim=head_dim, heads=heads, batch=1)
    rec["wall_s"] = time.perf_counter() - t0
    sdpa_step = rec.get("step_s")
    half_tol = harness.half_gate_tolerance(rec.get("gate")) if dtype != "float32" else None
    ctx.step(f"{BASELINE} · cache {cache} · {common['layout']}")
    yield _finish_record(rec, sdpa_step)

    for case in chosen:
        ctx.step(f"{case.label} · cache {cache} · {common['layout']}", advance=0)
        t0 = time.perf_counter()
        rec = _run_case(case, {**common, **({"gate_tol": half_tol} if half_tol else {})}, q, q_all, k, v, qs, ref,
                        ref_lse, summaries, n_timed, max_case_s, heads, hkv, head_dim)
        rec["wall_s"] = time.perf_counter() - t0
        if case.kind == "blocks":
            rec["summaries_build_s"] = build_s.get(str(rec.get("block") or BLOCK))
        ctx.step(f"{case.label} · cache {cache} · {common['layout']}")
        yield _finish_record(rec, sdpa_step)


def _prepare(cache, hkv, heads, head_dim, seed, dtype: str = "float32"):
    q, k, v = decode_inputs(cache, hkv, heads=heads, head_dim=head_dim, queries=max(STEP_QUERIES, STRIDE), seed=seed)
    # rounded to the dtype first: the reference is exact attention over the inputs the methods get
    q, k, v = harness.on_device(*(t.to(harness.DTYPES[dtype]) for t in (q, k, v)))
    # exact attention of every decode query over the whole cache (each sits at the cache's end)
    ref, ref_lse = harness.exact_reference(q, k, v)
    return q, k, v, ref, ref_lse


class _SummaryCache:
    """The block summaries a decode loop keeps for this cache, built once per block size (their
    build time goes to ``build_s``, outside every step)."""

    def __init__(self, k: torch.Tensor, build_s: dict[str, float]):
        self.k, self.build_s, self._by_block = k, build_s, {}

    def get(self, block: int) -> BlockSummaries:
        if block not in self._by_block:
            t0 = time.perf_counter()
            self._by_block[block] = BlockSummaries.build(self.k, block)
            self.build_s[str(block)] = time.perf_counter() - t0
        return self._by_block[block]


def _run_case(case: DecodeCase, common, q, q_all, k, v, qs, ref, ref_lse, summaries, n_timed, max_case_s,
              heads, hkv, head_dim) -> dict[str, Any]:
    rec: dict[str, Any] = {**common, "method": case.label, "params": case.params, "kind": case.kind,
                           "status": "ok", "note": case.note or None}
    method, status = harness.guarded(case.make)
    if status is not None:
        rec.update(status=status, registry_name=None, budget=None, step_s=None)
        return rec
    rec["registry_name"] = method.name
    rec["budget"] = getattr(method, "budget", None) if case.kind != "window" else \
        getattr(method, "sinks", 0) + getattr(method, "window", 0)
    rec["exact"] = bool(method.capabilities.exact)
    cache = k.shape[2]
    if case.kind == "recycled":
        stride = int(getattr(method, "stride", STRIDE))
        q_blk = q_all[:, :, -stride:] if q_all.shape[2] >= stride else None
        if q_blk is None:
            rec.update(status=f"unsupported: needs {stride} decode queries, the suite has {q_all.shape[2]}",
                       step_s=None)
            return rec
        # a group's queries sit at the last ``stride`` positions; exact reference causal over them
        g_ref, g_ref_lse = harness.exact_reference(q_blk, k, v, q_pos=torch.arange(cache - stride, cache))

        def call_all():
            return longattn.attention(q_blk, k, v, causal=True, method=method, return_stats=True)

        _step_case(rec, lambda i: longattn.attention(q_blk, k, v, causal=True, method=method), call_all,
                   "stats", g_ref, g_ref_lse, None, None, n_timed, max_case_s, per_call=stride)
    else:
        kw = {"summaries": summaries.get(int(getattr(method, "block", BLOCK)))} if case.kind == "blocks" else {}
        exact_ref = None
        if rec["exact"]:
            exact_ref, status = harness.guarded(lambda: _own_mask_reference(method, q, k, v, ref, ref_lse))
            if status is not None:
                rec.update(status=f"gate {status}", step_s=None)
                return rec

        def call_all():
            outs, lses, dens, t_first = [], [], [], None
            for qi in qs:
                t0 = time.perf_counter()
                o, st = longattn.attention(qi, k, v, causal=True, method=method, return_stats=True, **kw)
                t_first = time.perf_counter() - t0 if t_first is None else t_first
                outs.append(o)
                lses.append(st.lse)
                dens.append(st.density)
            lse = None if any(x is None for x in lses) else torch.cat(lses, 2)
            return torch.cat(outs, 2), lse, dens, t_first, st

        _step_case(rec, lambda i: longattn.attention(qs[i % len(qs)], k, v, causal=True, method=method, **kw),
                   call_all, "steps", ref, ref_lse, exact_ref, rec["exact"], n_timed, max_case_s, per_call=1)
        if case.kind == "blocks" and rec["status"] == "ok":
            rec["summary_append_s"] = _summary_append_s(kw["summaries"], k)
    density = rec.get("density")
    attended = (density if density is not None else 1.0) * cache
    if case.kind == "recycled" and density is not None:
        stride = int(getattr(method, "stride", STRIDE))
        # stats density of a causal block of ``stride`` queries is over its causal pairs
        attended = density * (stride * cache - stride * (stride - 1) / 2) / stride
    rec["attended_keys"] = attended
    rec.update(kv_accounting(case, method, cache, heads, hkv, head_dim, attended, k.element_size()))
    rec["flops"] = harness.attention_flops(1, max(1, round(attended)), False, head_dim=head_dim, heads=heads, batch=1)
    return rec


def _step_case(rec, step, first, kind, ref, ref_lse, exact_ref, exact, n_timed, max_case_s, *, per_call):
    """Fill ``rec``: first call(s) and the gate, then timed steps. ``step(i)`` runs step ``i``;
    ``first()`` gives every gated output at once: a tensor (``kind=None``), ``(out, stats)``
    (``"stats"``) or ``(out, lse, densities, first_call_s, stats)`` (``"steps"``)."""
    t0 = time.perf_counter()
    res, status = harness.guarded(first)
    if status is not None:
        rec.update(status=status, step_s=None)
        return
    lse, dens = None, None
    if kind is None:
        out = res
        rec["first_call_s"] = (time.perf_counter() - t0) / max(1, out.shape[2])
    elif kind == "stats":
        out, st = res
        lse, dens = st.lse, [st.density]
        rec["first_call_s"] = time.perf_counter() - t0
        rec["path"] = st.path
    else:
        out, lse, dens, rec["first_call_s"], st = res
        rec["path"] = st.path
        if st.extra.get("path_detail"):
            rec["path"] = f"{st.path} ({st.extra['path_detail']})"
    if dens and all(d is not None for d in dens):
        rec["density"] = sum(dens) / len(dens)
    err = harness.compare(out, lse, ref, ref_lse)
    rec.update(rel_err=err["rel_err"], max_abs_err=err["max_abs_err"], recall=err["recall"], finite=err["finite"])
    if exact_ref is not None or (rec.get("exact") and kind is None):
        own = harness.compare(out, lse, *(exact_ref or (ref, ref_lse)))
        tol = rec.get("gate_tol")
        if tol is not None:  # half inputs: twice SDPA's error, or twice the rounding of the exact answer
            tol = rec["gate_tol"] = (harness.half_atol(tol[0], (exact_ref or (ref, ref_lse))[0], rec["dtype"]), tol[1])
        gate = harness.gate_of(own, out.shape[2], True, tol)
    else:
        gate = harness.gate_of(err, out.shape[2], False)
    rec["gate"] = gate.as_dict()
    if not gate.passed:
        rec.update(status="FAILED accuracy" if err["finite"] else "FAILED: non-finite output", step_s=None)
        return
    counter = iter(range(10**9))
    timing, status = harness.guarded(lambda: harness.time_call(
        lambda: step(next(counter)), warmup=2, repeats=n_timed, max_seconds=max_case_s, track_memory=True))
    if status is not None:
        rec.update(status=status, step_s=None)
        return
    samples = [s / per_call for s in timing.samples]
    rec.update(
        step_s=timing.median_s / per_call, min_step_s=timing.min_s / per_call, max_step_s=timing.max_s / per_call,
        spread_s=timing.spread_s / per_call, samples=samples, steps_per_sample=per_call,
        n_samples=len(samples), peak_mem_bytes=timing.peak_mem_bytes, cpu_s=timing.cpu_s,
        load_1m=(harness.load_average() or [None])[0],
    )


def _summary_append_s(summaries: BlockSummaries, k: torch.Tensor, repeats: int = 5) -> float:
    """Median time to fold one new key into the block summaries (on copies: the timed call must
    not grow the summaries the steps reuse)."""
    k_new = k[:, :, -1:]
    times = []
    for _ in range(repeats):
        c = BlockSummaries(summaries.block, summaries.sums.clone(), summaries.kmin.clone(), summaries.kmax.clone(),
                           summaries.count.clone(), summaries.tokens)
        t0 = time.perf_counter()
        c.append(k_new)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _finish_record(rec: dict[str, Any], sdpa_step: float | None) -> dict[str, Any]:
    rec["sdpa_step_s"] = sdpa_step
    step = rec.get("step_s")
    rec["ratio_to_sdpa"] = sdpa_step / step if (sdpa_step and step) else None
    rec["kv_bytes"] = rec.get("kv_read_bytes")
    for key in ("budget", "step_s", "rel_err", "recall", "kv_read_bytes", "kv_kept_bytes", "peak_mem_bytes"):
        rec.setdefault(key, None)
    return rec


def check(options: Mapping[str, Any]) -> None:
    caches = sorted({int(n) for n in options["lengths"]})
    if not caches or any(n < 2 for n in caches):
        raise ValueError(f"--lengths (cache tokens) must be at least 2, got {caches}")
    heads = int(options["heads"])
    bad = [int(h) for h in options["kv_heads"] if int(h) < 1 or heads % int(h)]
    if bad:
        raise ValueError(f"kv_heads must divide heads={heads}, got {bad}")
    harness.check_dtypes(options.get("dtypes") or ("float32",))


def finish(results: dict[str, Any]) -> None:
    """The efficiency lengths, folded into the records too."""
    rows = harness.crossovers(results["records"])
    results["efficiency_length"] = rows
    by = {(r["method"], r["key"]): r for r in rows}
    for r in results["records"]:
        row = by.get((r["method"], r.get("kv_heads")))
        r["efficiency_length"] = row["efficiency_length"] if row else None


# -- the declaration ---------------------------------------------------------------------------


def _cell(r: dict[str, Any]) -> str:
    s = short_status(r.get("status"))
    if s != "ok":
        return s
    step = r.get("step_s")
    if r["method"] == BASELINE:
        return f"{step * 1e3:.2f} ms"
    ratio = r.get("ratio_to_sdpa")
    return f"{step * 1e3:.2f} ({format_value(ratio, '.2f')}×)"


def _gate_text(r: dict[str, Any]) -> str | None:
    g = r.get("gate") or {}
    if not g:
        return None
    return "pass" if g.get("passed") else f"FAIL: {g.get('reason')}"


def _about(results: dict[str, Any]) -> str:
    cfg = results["config"]
    notes = {c.label: c.note for c in _options_cases(cfg) if c.note}
    lines = [
        f"One decoding step (one new query over a cache of `cache` tokens), fp32, batch 1, {cfg['heads']} query "
        f"heads, head_dim {cfg['head_dim']}, key-value heads {', '.join(map(str, cfg['kv_heads']))}; "
        "retrieval-shaped inputs (`sparse_speed.clustered_qkv`).",
        "",
        "- baseline: torch SDPA, one query over the whole cache (`enable_gqa` for GQA), timed in the same run at "
        "every cache length",
        f"- timing: 2 warm-up steps, then up to {cfg['timed_steps']} timed steps cycling through {STEP_QUERIES} "
        f"decode queries (fewer once a case has spent {cfg['case_max_seconds']:.0f} s); step = median",
        f"- gate (before timing): every output finite; exact methods within max abs {harness.ATOL:g} and relative "
        f"{harness.RTOL:g} of the float64 reference on their own mask; a failed gate gives no speed figure",
        "- rel err = ‖out − exact‖/‖exact‖ against attention over the whole cache; recall = mean exp(lse − lse_exact)",
        "- KV read = bytes of K/V one step reads by the method's algorithm; kept = what it must keep; peak = RSS "
        "growth during the first timed step (approximate)",
    ]
    lines += [f"- `{k}`: {v}" for k, v in notes.items()]
    return "\n".join(lines)


def _options_cases(options: Mapping[str, Any]) -> list[DecodeCase]:
    return list(options.get("cases") or default_cases())


_LAYOUT = label("layout", "layout")
_METHOD = label("method", "method")

SUITE = Suite(
    name="decode",
    title="longattn decode suite",
    about=_about,
    parts=(Part("steps", run_steps, methods=lambda o: [c.label for c in _options_cases(o)]),),
    quick={"lengths": QUICK_CACHES, "kv_heads": KV_HEADS, "heads": HEADS, "head_dim": HEAD_DIM, "timed_steps": 16,
           "case_max_seconds": 4.0, "cases": None, "dtypes": ("float32", "bfloat16"), "half_lengths": (65536,)},
    full={"lengths": FULL_CACHES, "kv_heads": KV_HEADS, "heads": HEADS, "head_dim": HEAD_DIM, "timed_steps": 32,
          "case_max_seconds": 20.0, "cases": None, "dtypes": ("float32", "bfloat16"), "half_lengths": None},
    describe=lambda r: f"{r['method']}, cache {r['cache']}, {r.get('layout')}",
    live=(Column("", "step_s", lambda x: None if x is None else f"{x * 1e3:.3f} ms/step"),
          Column("", "ratio_to_sdpa", lambda x: None if x is None else f"{x:.2f}× SDPA"),
          Column("rel err", "rel_err", ".1e"), Column("recall", "recall", ".3f")),
    tables=(
        Table("{group}: step time (ms) and ratio to SDPA", group=lambda r: r.get("layout"), console=False,
              pivot=Pivot(_METHOD, "cache", Column("", lambda r: r, _cell))),
        Table("decode step vs cache length (×SDPA > 1: faster)", markdown=False, html=False,
              columns=(Column("cache", "cache"), label("kv", lambda r: f"{r.get('heads')}/{r.get('kv_heads')}"),
                       _METHOD, Column("ms/step", "step_s", "ms"), Column("×SDPA", "ratio_to_sdpa", ".2f"),
                       Column("rel err", "rel_err", ".1e", keep=2), Column("recall", "recall", ".3f", keep=1),
                       Column("MiB read", "kv_read_bytes", "mib", keep=3), status_column())),
        Table("Accuracy against exact attention", where=lambda r: r["method"] != BASELINE, console=False,
              columns=(_LAYOUT, _METHOD, Column("cache", "cache"), Column("density", "density", ".4f"),
                       Column("rel err", "rel_err", ".2e"), Column("recall", "recall", ".4f"),
                       label("gate", _gate_text))),
        Table("Memory", console=False, html=False,
              columns=(_LAYOUT, _METHOD, Column("cache", "cache"), Column("KV read MiB/step", "kv_read_bytes", "mib"),
                       Column("kept MiB", "kv_kept_bytes", "mib"), label("kept", "kv_kept_what"),
                       Column("peak MiB", "peak_mem_bytes", "mib"))),
        Table("Efficiency length (crossover with SDPA)", source=lambda res: res.get("efficiency_length") or [],
              console=False, columns=efficiency_columns("kv heads"),
              note="The smallest cache length run from which the method beats SDPA at that length and every larger "
                   "one; the estimate interpolates log ratio against log length between the lengths run."),
        Table("Keeping block summaries current", where=lambda r: r.get("summary_append_s") is not None,
              console=False, html=False,
              note="A retrieval decode loop folds each generated key into its block summaries: one append per "
                   "token, not in the step time above.",
              columns=(_LAYOUT, _METHOD, Column("cache", "cache"), Column("append µs", "summary_append_s", "us"),
                       Column("step µs", "step_s", "us"))),
    ),
    panels=(
        Panel("speedup_vs_length", "one decode step, MHA (decode suite)", "cache", "ratio_to_sdpa",
              lambda r: r["method"], where=lambda r: r.get("kv_heads") == r.get("heads") and r["method"] != BASELINE,
              xlabel="tokens in the KV cache"),
        Panel("memory_vs_length", "decode, MHA: K/V bytes read per step", "cache", "kv_bytes", lambda r: r["method"],
              where=lambda r: r.get("kv_heads") == r.get("heads"), xlabel="tokens in the KV cache"),
        Panel("memory_vs_length", "decode, MHA: peak memory per step (RSS growth)", "cache", "peak_mem_bytes",
              lambda r: r["method"], where=lambda r: r.get("kv_heads") == r.get("heads") and
              (num(r.get("peak_mem_bytes")) or 0) > 0, xlabel="tokens in the KV cache"),
    ),
    finish=finish,
    check=check,
)
