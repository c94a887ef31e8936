"""The ``peers`` suite: longattn's exact kernels beside the libraries a user would reach for.

Prefill (fp32, batch 1, 8 heads, head_dim 64, seeded random q/k/v) at a few lengths, for three
masks, all causal:

* ``causal`` — plain causal attention;
* ``window`` — causal sliding window of ``WINDOW`` keys (the query itself included);
* ``document`` — causal within each of a few packed documents of seeded random lengths.

For each mask the peers are

* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention``, the baseline timed in the same
  run (``is_causal`` for the causal mask, a materialised bool ``attn_mask`` otherwise);
* ``flex`` — ``torch.nn.attention.flex_attention`` compiled with ``torch.compile`` over a
  ``create_block_mask`` block mask, written here as a user would write it (mask functions of
  ``(b, h, q_idx, kv_idx)``), independently of longattn's own FlexAttention path. Building the
  block mask (``block_mask_s``) and the first call, which compiles (``compile_s``), are reported
  apart and never inside the timed samples;
* longattn's exact methods for the same mask: ``dense`` (causal; ``dense_chunked`` on request),
  ``window`` and ``pattern`` with ``longattn.masks.document``;
* ``kvpress`` — recorded as unsupported here: a press compresses the KV cache of a Hugging Face
  model, so the side-by-side with kvpress compares ``LongattnCache`` policies with its presses on
  stories260K in its own environment (``longattn.bench.kvpress_side``; kvpress pins transformers
  < 5.3).

Every output first passes the correctness gate: seeded query rows against the float64 reference
on the case's mask (``harness.check_rows``); a peer that fails gets no speed figure. Ratios are
SDPA's median over the peer's (> 1: faster than SDPA), ``ratio_to_sdpa_causal`` against SDPA's
plain causal call (what the sparsity of the mask buys over dense causal attention). FLOPs come
from the exact masked area: ``4 · visible pairs · head_dim · heads``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import longattn
from longattn import masks
from longattn.bench import harness
from longattn.bench.harness import available_memory, crossovers
from longattn.bench.suite import (Column, Context, Part, Pivot, Suite, Table, efficiency_columns, format_value, label,
                                  short_status, status_column)

QUICK_LENGTHS: tuple[int, ...] = (2048, 8192)
FULL_LENGTHS: tuple[int, ...] = (2048, 8192, 32768)
HEADS, HEAD_DIM = 8, 64
WINDOW = 1024
DOCUMENTS = 4
CASES: tuple[str, ...] = ("causal", "window", "document")
BASELINE = "sdpa"
#: longattn's exact method for each mask (``dense_chunked`` runs too when asked for by name)
LONGATTN_PEERS: dict[str, tuple[str, ...]] = {"causal": ("dense", "dense_chunked"), "window": ("window",),
                                              "document": ("pattern",)}
PEERS: tuple[str, ...] = ("sdpa", "flex", "dense", "dense_chunked", "window", "pattern", "kvpress")
DEFAULT_PEERS: tuple[str, ...] = ("sdpa", "flex", "dense", "window", "pattern", "kvpress")
KVPRESS_NOTE = ("a press compresses a Hugging Face model's KV cache; the KV-cache policies are compared with "
                "kvpress in longattn.bench.kvpress_side")


def repeats_for(tokens: int) -> int:
    """Timed repeats: 3 up to 4k tokens, 2 up to 16k, 1 beyond (the first call is the warm-up)."""
    return 3 if tokens <= 4096 else 2 if tokens <= 16384 else 1


CASE_MAX_SECONDS = 20.0


# -- inputs and masks --------------------------------------------------------------------------


def make_inputs(tokens: int, seed: int, heads: int = HEADS, head_dim: int = HEAD_DIM):
    """Seeded float32 ``q, k, v [1, heads, tokens, head_dim]``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    return tuple(torch.randn(1, heads, tokens, head_dim, generator=g) for _ in range(3))


def document_ids(tokens: int, seed: int, documents: int = DOCUMENTS) -> torch.Tensor:
    """``[tokens]`` int64 document id per token: ``documents`` packed documents whose lengths are
    seeded and uneven (each at least ``tokens / (4·documents)``)."""
    g = torch.Generator().manual_seed(seed * 7919 + tokens)
    floor = max(1, tokens // (4 * documents))
    spare = tokens - floor * documents
    w = torch.rand(documents, generator=g)
    lengths = (w / w.sum() * spare).floor().long() + floor
    lengths[-1] += tokens - int(lengths.sum())
    return torch.repeat_interleave(torch.arange(documents), lengths)


def longattn_mask(case: str, tokens: int, ids: torch.Tensor | None) -> masks.Mask:
    """The case's mask as a ``longattn.masks`` rule, causality included (used by the gate)."""
    if case == "causal":
        return masks.Causal()
    if case == "window":
        return masks.Causal() & masks.Window(WINDOW)
    if case == "document":
        return masks.Causal() & masks.document(ids)
    raise ValueError(f"unknown peers case {case!r}; known: {', '.join(CASES)}")


def visible_pairs(case: str, tokens: int, ids: torch.Tensor | None) -> int:
    """Exact count of the (query, key) pairs the case's mask allows, in closed form."""
    n = tokens
    if case == "causal":
        return n * (n + 1) // 2
    if case == "window":
        w = min(WINDOW, n)
        return w * (w + 1) // 2 + (n - w) * w
    if case == "document":
        lengths = torch.bincount(ids)
        return int((lengths * (lengths + 1) // 2).sum())
    raise ValueError(f"unknown peers case {case!r}")


# -- the FlexAttention peer (a user's code, independent of longattn.kernels.flex) --------------


def flex_unavailable() -> str | None:
    """None when compiled FlexAttention can run here, else why not."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - depends on the torch build
        return f"torch {torch.__version__} has no FlexAttention ({type(exc).__name__}: {exc})"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/clang++) and none is on PATH"
    return None


_COMPILED: list[Any] = []


def compiled_flex():
    """``torch.compile(flex_attention)`` with static shapes, made once per process.

    Each length and mask compiles its own kernel; dynamo's default of 8 recompilations per
    function would silently fall back to eager FlexAttention (which materialises every score),
    so the limit is raised to at least 64."""
    if not _COMPILED:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        if getattr(dynamo_config, "recompile_limit", 64) < 64:
            dynamo_config.recompile_limit = 64
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def flex_mask_mod(case: str, ids: torch.Tensor | None) -> Callable:
    """The case's mask as FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""
    if case == "causal":
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return causal
    if case == "window":
        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
        return sliding_window
    if case == "document":
        def document_causal(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
        return document_causal
    raise ValueError(f"unknown peers case {case!r}")


# -- kvpress ---------------------------------------------------------------------------------


def kvpress_record() -> dict[str, Any]:
    """One record saying whether kvpress is importable here; never installs anything."""
    rec: dict[str, Any] = {"suite": "peers", "peer": "kvpress", "method": "kvpress", "label": "kvpress",
                           "case": "kv-cache compression", "tokens": None, "causal": True, "median_s": None,
                           "ratio_to_sdpa": None, "version": None}
    if importlib.util.find_spec("kvpress") is None:
        rec["status"] = f"unsupported: kvpress is not installed here — {KVPRESS_NOTE}"
        return rec
    try:
        rec["version"] = importlib.metadata.version("kvpress")
    except importlib.metadata.PackageNotFoundError:
        rec["version"] = "unknown"
    rec["status"] = (f"unsupported: kvpress {rec['version']} is importable, but a press needs a Hugging Face "
                     f"model — {KVPRESS_NOTE}")
    return rec


def select_peers(names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(DEFAULT_PEERS)
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown method(s) for the peers suite: {', '.join(unknown)}; known: {', '.join(PEERS)}")
    return [p for p in PEERS if p in wanted or p == BASELINE]


# -- the parts --------------------------------------------------------------------------------


def run_prefill(ctx: Context) -> Iterator[dict[str, Any]]:
    """Every length × mask: SDPA first, then FlexAttention and longattn's method for the mask."""
    o = ctx.options
    lens = sorted({int(n) for n in o["lengths"]})
    cases = list(o["cases"])
    peers = select_peers(ctx.methods)
    make_method = o.get("make_method") or default_method
    heads, head_dim, n_rows, seed = o["heads"], o["head_dim"], o["n_rows"], ctx.seed
    flex_reason = flex_unavailable() if "flex" in peers else None
    per_case = [p for p in peers if p in (BASELINE, "flex")]
    plan = [(n, c, p) for n in lens for c in cases for p in per_case + [x for x in LONGATTN_PEERS[c] if x in peers]]
    ctx.plan(len(plan))
    inputs_for = None
    q = k = v = ids = None
    sdpa_time: dict[tuple[int, str], float | None] = {}
    for i, (n, case, peer) in enumerate(plan):
        if inputs_for != n:
            q = k = v = None
            q, k, v = make_inputs(n, seed, heads, head_dim)
            ids = document_ids(n, seed)
            inputs_for = n
        ctx.step(f"{peer} · {case} · {n}", advance=0 if i == 0 else 1)
        t0 = time.perf_counter()
        rec = run_peer(peer, case, q, k, v, ids, n_rows=n_rows, seed=seed, flex_reason=flex_reason,
                       make_method=make_method)
        rec["wall_s"] = time.perf_counter() - t0
        if peer == BASELINE:
            sdpa_time[(n, case)] = rec.get("median_s")
        base, causal_base = sdpa_time.get((n, case)), sdpa_time.get((n, "causal"))
        med = rec.get("median_s")
        rec["sdpa_median_s"] = base
        rec["ratio_to_sdpa"] = base / med if (base and med) else None
        rec["ratio_to_sdpa_causal"] = causal_base / med if (causal_base and med) else None
        yield rec


def check(options) -> None:
    lens = sorted({int(n) for n in options["lengths"]})
    if not lens or any(n < 1 for n in lens):
        raise ValueError(f"--lengths must be positive, got {lens}")
    bad = [c for c in options["cases"] if c not in CASES]
    if bad:
        raise ValueError(f"unknown peers case(s) {', '.join(bad)}; known: {', '.join(CASES)}")


def run_kvpress(ctx: Context) -> Iterator[dict[str, Any]]:
    yield kvpress_record()


def finish(results: dict[str, Any]) -> None:
    """Efficiency lengths per peer and mask, folded into the records too."""
    timed = [r for r in results["records"] if r.get("tokens") is not None]
    rows = crossovers(timed, key=lambda r: r["case"], length="tokens")
    results["efficiency_length"] = rows
    by = {(r["method"], r["key"]): r["efficiency_length"] for r in rows}
    for r in timed:
        r["efficiency_length"] = by.get((r["method"], r["case"]))


def default_method(peer: str, case: str, tokens: int, ids: torch.Tensor | None):
    """longattn's exact method for a case: ``dense``/``dense_chunked`` (causal), ``window`` with
    ``window=WINDOW``, ``pattern`` with ``masks.document(ids)``."""
    if peer in ("dense", "dense_chunked"):
        return longattn.method(peer)
    if peer == "window":
        return longattn.method("window", window=WINDOW)
    if peer == "pattern":
        return longattn.method("pattern", mask=masks.document(ids))
    raise ValueError(f"{peer!r} is not a longattn peer")


def run_peer(peer: str, case: str, q, k, v, ids, *, n_rows: int, seed: int, flex_reason: str | None,
             make_method) -> dict[str, Any]:
    """One peer on one case: a record (gate, timing, FLOPs), never an exception."""
    b, h, n, d = q.shape
    mask = longattn_mask(case, n, ids)
    pairs = visible_pairs(case, n, ids)
    dense = n * (n + 1) // 2
    rec: dict[str, Any] = {"suite": "peers", "peer": peer, "method": peer, "label": peer, "case": case, "tokens": n,
                           "causal": True, "heads": h, "head_dim": d, "pairs": pairs, "density": pairs / dense}
    common = dict(causal=True, repeats=repeats_for(n), max_seconds=CASE_MAX_SECONDS, n_rows=n_rows, seed=seed)
    if peer == BASELINE:
        if case == "causal":
            rec["params"] = "is_causal=True"
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        else:
            # a bool [n, n] mask, which SDPA's CPU kernel turns into an additive float one
            need, avail = 5 * n * n, available_memory()
            if avail is not None and need > 0.5 * avail:
                rec["status"] = (f"oom: SDPA's dense [{n}, {n}] mask needs about {need / 2**30:.1f} GiB, "
                                 f"{avail / 2**30:.1f} GiB available (not run)")
                return rec
            t0 = time.perf_counter()
            attn_mask, status = harness.guarded(lambda: mask.dense(1, 1, n, n)[0, 0].contiguous())
            if status is not None:
                rec["status"] = status
                return rec
            rec["mask_build_s"] = time.perf_counter() - t0
            rec["mask_bytes"] = attn_mask.numel() * attn_mask.element_size()
            rec["params"] = f"attn_mask: bool [{n}, {n}]"
            fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # noqa: E731
        rec.update(harness.run_callable_case(fn, q, k, v, mask=mask, path="sdpa", **common))
    elif peer == "flex":
        if flex_reason is not None:
            rec["status"] = f"unsupported: {flex_reason}"
            return rec
        rec["params"] = f"torch {torch.__version__}, torch.compile(dynamic=False), create_block_mask (block 128)"

        def block_mask():
            from torch.nn.attention.flex_attention import create_block_mask

            t0 = time.perf_counter()
            bm = create_block_mask(flex_mask_mod(case, ids), None, None, n, n, device=q.device.type)
            return bm, time.perf_counter() - t0

        res, status = harness.guarded(block_mask)
        if status is not None:
            rec["status"] = status
            return rec
        bm, rec["block_mask_s"] = res
        fn = lambda: compiled_flex()(q, k, v, block_mask=bm)  # noqa: E731
        rec.update(harness.run_callable_case(fn, q, k, v, mask=mask, path="flex", **common))
        # the first call compiled the kernel (plus one run): never part of the timed samples
        rec["compile_s"] = rec.pop("first_call_s", None)
    else:
        method, status = harness.guarded(lambda: make_method(peer, case, n, ids))
        if status is not None:
            rec["status"] = status
            return rec
        rec["params"] = repr(method) if len(repr(method)) < 120 else type(method).__name__
        rec.update(harness.run_attention_case(method, q, k, v, **common))
    # the mask's exact area (the harness counts SDPA and FlexAttention as dense)
    rec["density"] = pairs / dense
    flops = 4.0 * pairs * d * h * b
    rec["flops"] = flops
    med = rec.get("median_s")
    rec["tflops"] = flops / med / 1e12 if med else None
    rec.setdefault("peak_mem_bytes", None)
    rec.setdefault("median_s", None)
    return rec


# -- the declaration ---------------------------------------------------------------------------


def _cell(r: dict[str, Any]) -> str:
    s = short_status(r.get("status"))
    if s != "ok":
        return s
    if r["peer"] == BASELINE:
        return format_value(r.get("median_s"), ".3f")
    return f"{format_value(r.get('median_s'), '.3f')} ({format_value(r.get('ratio_to_sdpa'), '.2f')}×)"


def _about(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return "\n".join([
        f"Causal prefill, fp32, batch 1, {cfg['heads']} heads, head_dim {cfg['head_dim']}, seeded random q/k/v; "
        f"masks: causal, a sliding window of {WINDOW} keys, {DOCUMENTS} packed documents of seeded uneven lengths.",
        "",
        "- baseline: torch SDPA (`is_causal`, else a bool `attn_mask`), timed in the same run on the same mask",
        "- FlexAttention: `torch.compile(flex_attention, dynamic=False)` + `create_block_mask`, written as a user "
        "would (not longattn's own flex path); block-mask build and the first (compiling) call are reported apart, "
        "never in the timed samples",
        f"- gate: {cfg['n_rows']} seeded query rows against the float64 reference on the case's mask; pass = max "
        f"abs error ≤ {harness.ATOL:g}, relative ≤ {harness.RTOL:g}; a failed gate gives no speed figure",
        "- ×SDPA = SDPA median / peer median on the same mask, ×causal = SDPA's plain causal median / peer median; "
        "TFLOP/s from the exact masked area",
    ])


_PEER = label("peer", "peer")
_TIMED = lambda r: r.get("tokens") is not None  # noqa: E731 - the kvpress note has no length

SUITE = Suite(
    name="peers",
    title="longattn peers suite",
    about=_about,
    parts=(Part("prefill", run_prefill, methods=lambda o: [p for p in PEERS if p != "kvpress"]),
           Part("kvpress", run_kvpress, methods=lambda o: ["kvpress"])),
    quick={"lengths": QUICK_LENGTHS, "cases": CASES, "heads": HEADS, "head_dim": HEAD_DIM, "n_rows": 64,
           "make_method": None},
    full={"lengths": FULL_LENGTHS, "cases": CASES, "heads": HEADS, "head_dim": HEAD_DIM, "n_rows": 64,
          "make_method": None},
    describe=lambda r: (f"{r['peer']}, {r['case']}, {r['tokens']} tokens" if r.get("tokens") is not None
                        else f"{r['peer']} ({r['case']})"),
    live=(Column("median", "median_s", lambda x: None if x is None else f"{x:.4f} s"),
          Column("", "ratio_to_sdpa", lambda x: None if x is None else f"{x:.2f}× SDPA"),
          Column("compile", "compile_s", lambda x: None if x is None else f"{x:.1f} s")),
    tables=(
        Table("{group}: median s (×SDPA)", part="prefill", group=lambda r: r["case"], console=False,
              pivot=Pivot(_PEER, "tokens", Column("", lambda r: r, _cell))),
        Table("prefill peers (×SDPA > 1: faster than SDPA on the same mask)", part="prefill", markdown=False,
              html=False,
              columns=(Column("tokens", "tokens"), label("case", "case"), _PEER, Column("median s", "median_s", ".3f"),
                       Column("×SDPA", "ratio_to_sdpa", ".2f"), Column("×causal", "ratio_to_sdpa_causal", ".2f", 2),
                       Column("compile s", "compile_s", ".1f", 1), status_column())),
        Table("All cases", part="prefill", console=False, html=False,
              columns=(Column("tokens", "tokens"), label("case", "case"), _PEER, label("path", "path"),
                       Column("density", "density", ".3f"), Column("median s", "median_s", ".4f"),
                       Column("min s", "min_s", ".4f"), Column("max s", "max_s", ".4f"),
                       Column("×SDPA", "ratio_to_sdpa", ".2f"), Column("×causal", "ratio_to_sdpa_causal", ".2f"),
                       Column("TFLOP/s", "tflops", ".3f"), Column("peak MiB", "peak_mem_bytes", "mib"),
                       Column("gate max err", lambda r: (r.get("gate") or {}).get("max_abs_err"), ".1e"),
                       status_column())),
        Table("FlexAttention setup (not in the timed samples)", part="prefill", console=False,
              where=lambda r: r["peer"] == "flex" and str(r.get("status")).startswith("ok"),
              columns=(Column("tokens", "tokens"), label("case", "case"),
                       Column("create_block_mask s", "block_mask_s", ".2f"),
                       Column("first call (compile) s", "compile_s", ".2f"))),
        Table("Efficiency length (crossover with SDPA)", source=lambda res: res.get("efficiency_length") or [],
              console=False, columns=efficiency_columns("case"),
              note="The smallest length run from which the peer beats SDPA on the same mask at that length and "
                   "every larger one."),
        Table("kvpress", part="kvpress", console=False, columns=(label("status", "status"),)),
    ),
    finish=finish,
    check=check,
)
