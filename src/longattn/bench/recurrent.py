"""The ``recurrent`` suite: linear and recurrent attention against torch SDPA, and what their state
buys on associative recall.

``longattn bench --suite recurrent`` runs it alone (also part of the main job). Three parts:

* **prefill** — every op's chunked form (``longattn.recurrent``) over ``lengths`` tokens, batch 1,
  8 heads, head_dim 64 (Based: feature dim 16, window 64), float32 and bfloat16, against torch
  SDPA causal in the same dtype, measured in the same run: time, speed-up, peak RSS growth (flat
  in length is the point of a fixed state). Before any op is timed its chunked form is checked
  against its float64 naive recurrence at 256 tokens (relative RMSE ≤ 1e-5 in float32, ≤ 0.005 in
  bfloat16); an op that fails gets no speed figure.
* **decode** — one ``<op>_step`` after a prefill of ``history`` tokens (128 and 131,072 in both
  modes; the histories' steps timed in turn): a fixed state makes the step's time independent of
  the history; RAT keeps one summary per chunk and Based a window, so theirs may grow.
* **mqar** — multi-query associative recall learned from scratch (Zoology, Arora et al. 2023):
  2-layer models of each mixer at ``widths``, trained by the harness (``longattn.train``) on
  ``synthetic.mqar`` at one length with ``pairs`` key–value pairs, then scored per pair count by
  Zoology's measure (the share of queried values recalled; the share of samples with every value
  right is in the record too). The attention model first trains ``copy_steps`` steps on the copy
  task: without them it stays on the loss plateau for 800 steps (measured: 4% accuracy at 64
  tokens and 2–8 pairs; with 250 it reaches 99.5%). The recurrent mixers train on MQAR from the
  first step: the copy phase taught them nothing (their loss stayed at the uniform guess through
  it) and cost them a third of their budget. Each model's state size in bytes per sequence
  (attention: its KV cache at that length) is the x axis of the figure Zoology and Based report.

Quick (the main job's sizes) runs prefill to 32k, the decode pair, and MQAR for six mixers at
one small width with short training; ``--full`` prefill to 128k and MQAR for every mixer at three
widths (32, 64, 128) with 2,000 steps each, trained ``mqar_jobs`` at a time (default: one per CPU
core) in one-thread worker processes — about 3 hours of one core in all on a 2-core VM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from longattn.bench import harness
from longattn.bench.suite import Column, Context, Panel, Part, Suite, Table, guarded_record, label, status_column

HEADS, HEAD_DIM = 8, 64
BASED_FEATURES, BASED_WINDOW = 16, 64
OPS = ("linear", "lightning", "gla", "deltanet", "gated_deltanet", "aaren", "based", "rat", "titans")
MQAR_MIXERS = ("attention", "linear", "based", "based_f16", "lightning", "gla", "gated_deltanet", "titans", "rat",
               "aaren")
#: Based's softmax window in the MQAR models: a quarter of the 64-token task. With the layer's
#: default 64 the window covers the whole sample and Based is full softmax attention there (measured
#: at width 64: feature dim 16 then reached 0.99 accuracy, like attention)
MQAR_BASED_WINDOW = 16
#: MQAR mixers that are a recurrent layer with options other than the defaults. GLA, Gated
#: DeltaNet and Titans keep their per-head output norm but not their SiLU output gate: at this
#: training budget the gate slowed learning (measured, Gated DeltaNet width 64, 64 tokens, 2–12
#: pairs: 0.155 accuracy after 800 steps with the gate, 0.360 after 400 without)
MIXER_SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "based": ("based", {"feature_dim": 8, "window": MQAR_BASED_WINDOW}),
    "based_f16": ("based", {"feature_dim": 16, "window": MQAR_BASED_WINDOW}),
    "rat": ("rat", {"chunk_size": 16}),
    "gla": ("gla", {"output_gate": False}),
    "gated_deltanet": ("gated_deltanet", {"output_gate": False}),
    "titans": ("titans", {"output_gate": False}),
}
#: the short causal convolution before every recurrent mixer in the MQAR models (Based, Gated
#: DeltaNet and Titans have one; without it none of them learned MQAR here: 800 steps at 128
#: tokens, width 64, accuracy 0–7% against attention's 100%)
SHORT_CONV = 4
GATE_TOKENS = 256
GATE_TOL = {"float32": 1e-5, "bfloat16": 5e-3}


# -- op inputs --------------------------------------------------------------------------------


def op_call(name: str, tokens: int, dtype: torch.dtype, seed: int = 0, *, batch: int = 1):
    """``(chunked(state, tokens) -> (out, state), step(i, state) -> (out, state), naive() -> out)``
    for op ``name`` over ``tokens`` random tokens (gates in their papers' ranges): ``chunked`` runs
    the chunked form over the first ``tokens`` of them (all by default), ``step`` the step form on
    token ``i``."""
    from longattn.recurrent import aaren, based, delta, gated, lightning, linear, rat, titans
    g = torch.Generator().manual_seed(seed)
    b, h, d = batch, HEADS, HEAD_DIM

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def unit(*shape, low=0.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=g)).to(dtype)

    dk = BASED_FEATURES if name == "based" else d
    q, k, v = rnd(b, h, tokens, dk), rnd(b, h, tokens, dk), rnd(b, h, tokens, d)
    kw: dict[str, Any] = {}
    pos: tuple = ()
    if name == "linear":
        fn, step, naive = linear.linear_attention, linear.linear_attention_step, linear.linear_attention_naive
    elif name == "lightning":
        fn, step, naive = (lightning.lightning_attention, lightning.lightning_attention_step,
                           lightning.lightning_attention_naive)
    elif name == "gla":
        pos = (torch.nn.functional.logsigmoid(rnd(b, h, tokens, d) + 4).to(dtype) / 16,)
        fn, step, naive = gated.gla_attention, gated.gla_attention_step, gated.gla_attention_naive
    elif name == "deltanet":
        pos = (unit(b, h, tokens, low=0.1, high=0.9),)
        fn, step, naive = delta.deltanet_attention, delta.deltanet_attention_step, delta.deltanet_attention_naive
    elif name == "gated_deltanet":
        pos = (unit(b, h, tokens, low=0.1, high=0.9), -unit(b, h, tokens, low=0.0, high=0.1))
        fn, step, naive = (delta.gated_deltanet_attention, delta.gated_deltanet_attention_step,
                           delta.gated_deltanet_attention_naive)
    elif name == "aaren":
        q = rnd(h, d)
        fn, step, naive = aaren.aaren_attention, aaren.aaren_attention_step, aaren.aaren_attention_naive
    elif name == "based":
        kw = dict(window=BASED_WINDOW, q_window=rnd(b, h, tokens, d), k_window=rnd(b, h, tokens, d))
        fn, step, naive = based.based_attention, based.based_attention_step, based.based_attention_naive
    elif name == "rat":
        pos = (-unit(b, h, tokens, d, low=0.0, high=0.5), -unit(b, h, tokens, d, low=0.0, high=0.5))
        fn, step, naive = rat.rat_attention, rat.rat_attention_step, rat.rat_attention_naive
    elif name == "titans":
        pos = (unit(b, h, tokens, low=0.5, high=0.9), unit(b, h, tokens, low=0.0, high=0.1),
               unit(b, h, tokens, low=0.0, high=0.05))
        fn, step, naive = titans.titans_memory, titans.titans_memory_step, titans.titans_memory_naive
    else:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")

    def sl(x, i):  # token i of a per-token tensor (q of aaren is per head, not per token)
        return x if x.dim() == 2 else x[:, :, i:i + 1]

    def upto(x, n):  # the first n tokens of a per-token tensor
        return x if x.dim() == 2 or n is None else x[:, :, :n]

    def chunked(state=None, tokens=None):
        """The chunked form over the first ``tokens`` tokens (all: None)."""
        extra = {key: upto(val, tokens) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
        return fn(upto(q, tokens), upto(k, tokens), upto(v, tokens), *(upto(p, tokens) for p in pos),
                  initial_state=state, **extra)

    def one_step(i, state):
        extra = {key: sl(val, i) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
        return step(sl(q, i), sl(k, i), sl(v, i), *(sl(p, i) for p in pos), state, **extra)

    def reference():
        return naive(q, k, v, *pos, **kw)

    return chunked, one_step, reference


def _rel_rmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300))


def gate(name: str, dtype_name: str, seed: int) -> tuple[bool, float]:
    """The op's chunked form against its naive float64 recurrence at ``GATE_TOKENS`` tokens."""
    chunked, _, reference = op_call(name, GATE_TOKENS, harness.DTYPES[dtype_name], seed)
    out, _ = chunked()
    ref = reference()
    ref = ref[0] if isinstance(ref, tuple) else ref
    err = _rel_rmse(out, ref)
    return err <= GATE_TOL[dtype_name], err


# -- parts ------------------------------------------------------------------------------------


def _sdpa(tokens: int, dtype: torch.dtype, seed: int) -> Callable[[], Any]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _timed(fn: Callable[[], Any], o: dict[str, Any]) -> tuple[float, int]:
    """Median wall time of ``fn`` over clean samples, and its peak RSS growth from one more call
    made apart (sampling RSS makes that call slower, so it is not one of the timed ones)."""
    t = harness.time_call(fn, repeats=o["repeats"], max_seconds=o["max_seconds"])
    _, peak = harness.peak_memory(fn)
    return t.median_s, int(peak or 0)


def _prefill_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    lengths = sorted(int(n) for n in o["lengths"])
    ops = [n for n in OPS if ctx.wants(n)]
    ctx.plan(len(o["dtypes"]) * len(lengths) * (len(ops) + 1))
    for dtype_name in o["dtypes"]:
        dtype = harness.DTYPES[dtype_name]
        gates = {}
        for name in ops:
            gates[name] = harness.guarded(lambda name=name: gate(name, dtype_name, ctx.seed))
        for n in lengths:
            ctx.step(f"prefill {dtype_name} {n}: sdpa")
            base = {"test": "prefill", "dtype": dtype_name, "tokens": n}
            sdpa_s, peak = _timed(_sdpa(n, dtype, ctx.seed), o)
            yield {**base, "method": "sdpa", "time_s": sdpa_s, "peak_mem_bytes": peak, "speedup": 1.0,
                   "peak_bytes_per_token": peak / n, "status": "ok"}
            for name in ops:
                ctx.step(f"prefill {dtype_name} {n}: {name}")
                (ok_err, problem) = gates[name]
                rec = {**base, "method": name}
                if problem is not None:
                    yield {**rec, "status": problem}
                    continue
                ok, err = ok_err
                rec["gate_rel_rmse"] = err
                if not ok:
                    yield {**rec, "status": f"FAILED: chunked vs naive relative RMSE {err:.2e} > "
                                            f"{GATE_TOL[dtype_name]:g}"}
                    continue

                def measure(name=name, rec=rec):
                    chunked, _, _ = op_call(name, n, dtype, ctx.seed)
                    time_s, peak = _timed(chunked, o)
                    return {**rec, "time_s": time_s, "peak_mem_bytes": peak, "peak_bytes_per_token": peak / n,
                            "speedup": sdpa_s / time_s, "status": "ok"}

                yield guarded_record(rec, measure)


def _decode_part(ctx: Context) -> Iterator[dict[str, Any]]:
    """Per op, one state per history, then ``steps`` rounds that time one step on each history in
    turn: the histories are compared under the same machine conditions (measured one after the
    other, a sub-millisecond step drifted by up to 1.4× between them on the 2-core VM, in either
    direction)."""
    o = ctx.options
    histories = sorted(int(n) for n in o["histories"])
    ops = [n for n in OPS if ctx.wants(n)]
    ctx.plan(len(ops))
    for name in ops:
        ctx.step(f"decode {name} after {', '.join(str(h) for h in histories)}")
        recs = [{"test": "decode", "method": name, "history": hist, "dtype": "float32"} for hist in histories]

        def measure(name=name) -> list[dict[str, Any]]:
            runs = []
            for hist in histories:
                chunked, one_step, _ = op_call(name, hist + o["steps"], torch.float32, ctx.seed)
                runs.append([one_step, chunked(tokens=hist)[1]])  # the state after `hist` tokens
            times: list[list[float]] = [[] for _ in histories]
            for i in range(o["steps"]):
                for j, hist in enumerate(histories):
                    one_step, state = runs[j]
                    t0 = time.perf_counter()
                    _, runs[j][1] = one_step(hist + i, state)
                    times[j].append(time.perf_counter() - t0)
            out = []
            for rec, ts in zip(recs, times):
                ts = ts[4:] or ts  # the first steps warm up
                out.append({**rec, "step_ms": 1e3 * sorted(ts)[len(ts) // 2], "steps": len(ts), "status": "ok"})
            return out

        measured, problem = harness.guarded(measure)
        if problem is not None:
            for rec in recs:
                yield {**rec, "status": problem}
        else:
            yield from measured


def mqar_config(mixer: str, width: int, length: int):
    """The 2-layer model of ``mixer`` at ``width`` for MQAR at ``length`` tokens."""
    from longattn.tasks import VOCAB
    from longattn.train import ModelConfig

    layer, options = MIXER_SETUPS.get(mixer, (mixer, {}))
    heads = max(1, width // 32)
    return ModelConfig(vocab_size=VOCAB.size, dim=width, n_layers=2, n_heads=heads, n_kv_heads=heads,
                       hidden_dim=2 * width, max_train_length=length, mixer=layer, mixer_options=options,
                       short_conv=0 if layer == "attention" else SHORT_CONV)


def run_mqar(mixer: str, width: int, *, length: int, pairs: tuple[int, ...], steps: int, tokens_per_step: int,
             lr: float, seed: int, copy_steps: int = 0, say=print) -> dict[str, Any]:
    """Train one MQAR model and score it: a record with the state size, accuracy per pair count,
    their mean, tokens per second and the final loss."""
    from longattn.train import LanguageModel, MQARTask, TrainSettings, train
    from longattn.train.data import mqar_scores

    cfg = mqar_config(mixer, width, length)
    task = MQARTask(length=length, pairs=pairs, copy_steps=copy_steps if cfg.mixer == "attention" else 0,
                    pairs_ramp=steps // 2)
    settings = TrainSettings(seed=seed, steps=steps, lr=lr, warmup=max(1, steps // 10), tokens_per_step=tokens_per_step,
                             log_every=max(1, steps // 4))
    model, record = train(cfg, task, settings, log=lambda line: say(f"  {mixer} d={width}: {line}"), model_cls=LanguageModel)
    scores = mqar_scores(model, task, n=64, seed=seed + 77_777)
    per_pairs = {p: acc.token_accuracy for p, acc in scores.items()}
    per_sample = {p: acc.accuracy for p, acc in scores.items()}
    return {"test": "mqar", "method": mixer, "width": width, "length": length, "steps": steps,
            "state_bytes": model.state_size(length), "params": model.n_params(),
            "accuracy": sum(per_pairs.values()) / len(per_pairs), "accuracy_by_pairs": per_pairs,
            "sample_accuracy": sum(per_sample.values()) / len(per_sample),
            "copy_steps": task.copy_steps,
            "final_loss": record["history"][-1]["loss"], "tokens_per_s": record["tokens_per_s"],
            "train_s": record["wall_s"], "status": "ok"}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _mqar_in_worker(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``run_mqar`` in a worker process (one thread: the run is bit-identical to a one-thread run
    in the main process)."""
    return run_mqar(**kwargs, say=lambda line: None)


def _mqar_part(ctx: Context) -> Iterator[dict[str, Any]]:
    """One model per (width, mixer). ``mqar_jobs`` > 1 trains that many at once in worker
    processes of one thread each (the ``--full`` sweep is hours of one core); records come back in
    the same order either way."""
    import concurrent.futures
    import multiprocessing

    o = ctx.options
    mixers = [m for m in o["mqar_mixers"] if ctx.wants(m)]
    runs = [(mixer, width) for width in o["widths"] for mixer in mixers]
    ctx.plan(len(runs))

    def kwargs(mixer, width):
        return dict(mixer=mixer, width=width, length=o["mqar_length"], pairs=tuple(o["pairs"]),
                    steps=o["mqar_steps"], tokens_per_step=o["tokens_per_step"], lr=o["lr"], seed=ctx.seed,
                    copy_steps=o["copy_steps"])

    jobs = int(o.get("mqar_jobs", 1))
    if jobs <= 1 or len(runs) <= 1:
        for mixer, width in runs:
            ctx.step(f"mqar {mixer} d={width}")
            yield guarded_record({"test": "mqar", "method": mixer, "width": width},
                                 lambda mixer=mixer, width=width: run_mqar(**kwargs(mixer, width), say=ctx.say))
        return
    ctx.say(f"mqar: {len(runs)} models, {jobs} at a time in worker processes of one thread each")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_one_thread) as pool:
        futures = [pool.submit(_mqar_in_worker, kwargs(mixer, width)) for mixer, width in runs]
        for (mixer, width), fut in zip(runs, futures):
            ctx.step(f"mqar {mixer} d={width}")
            yield guarded_record({"test": "mqar", "method": mixer, "width": width}, fut.result)


# -- derived figures ----------------------------------------------------------------------------


def _crossovers(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per op and dtype: the speed-up at the longest length and the crossover length (the length
    from which the op is faster than SDPA, by log-linear interpolation)."""
    recs = [r for r in results["records"] if r.get("test") == "prefill" and r.get("status") == "ok"
            and r.get("method") != "sdpa"]
    rows = []
    for key in sorted({(r["method"], r["dtype"]) for r in recs}):
        pts = sorted((r["tokens"], r["speedup"]) for r in recs if (r["method"], r["dtype"]) == key)
        if pts[0][1] >= 1.0:  # faster already at the shortest length measured
            cross = f"< {pts[0][0]:,}"
        else:
            est = harness.crossover_estimate(pts)
            cross = f"{est:,.0f}" if est is not None else f"> {pts[-1][0]:,}"
        mem = [r.get("peak_bytes_per_token") for r in sorted(recs, key=lambda r: r["tokens"])
               if (r["method"], r["dtype"]) == key]
        rows.append({"method": key[0], "dtype": key[1], "longest": pts[-1][0], "speedup": pts[-1][1],
                     "crossover": cross, "per_token_first": mem[0], "per_token_last": mem[-1]})
    return rows


def _decode_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    recs = [r for r in results["records"] if r.get("test") == "decode" and r.get("status") == "ok"]
    rows = []
    for name in dict.fromkeys(r["method"] for r in recs):
        pts = sorted((r["history"], r["step_ms"]) for r in recs if r["method"] == name)
        if len(pts) >= 2:
            rows.append({"method": name, "short": pts[0][0], "long": pts[-1][0], "short_ms": pts[0][1],
                         "long_ms": pts[-1][1], "ratio": pts[-1][1] / pts[0][1]})
    return rows


def _about(results: dict[str, Any]) -> str:
    cfg = results["config"]
    return "\n".join([
        f"- prefill: batch 1, {HEADS} heads, head_dim {HEAD_DIM} (Based: feature dim {BASED_FEATURES} + a "
        f"{BASED_WINDOW}-token softmax window), causal; SDPA causal in the same dtype is the baseline, measured in the "
        "same run. Each op's chunked form passed the gate against its float64 naive recurrence at "
        f"{GATE_TOKENS} tokens before it was timed. Peak memory: RSS growth during one call (approximate).",
        f"- decode: one float32 step after {', '.join(str(h) for h in cfg.get('histories', []))} tokens of history.",
        f"- mqar: 2-layer models trained from scratch by `longattn.train` on MQAR at {cfg.get('mqar_length')} tokens, "
        f"{cfg.get('mqar_steps')} steps of {cfg.get('tokens_per_step')} tokens (attention's first {cfg.get('copy_steps')} "
        f"on the copy task, where its induction circuit forms), lr {cfg.get('lr')}, pair counts "
        f"{cfg.get('pairs')} drawn per step; accuracy = Zoology's share of queried values recalled, on 64 fresh "
        "samples per pair count (mean over the pair counts). State: bytes per sequence a model carries to continue (attention: its KV cache at "
        "that length; Zoology's convention).",
    ])


def _check(options) -> None:
    for n in options["lengths"]:
        if int(n) < GATE_TOKENS:
            raise ValueError(f"--lengths: prefill lengths must be >= {GATE_TOKENS}, got {n}")
    harness.check_dtypes(options["dtypes"])


def _pairs_text(r: dict[str, Any]) -> str | None:
    acc = r.get("accuracy_by_pairs")
    return None if not acc else " ".join(f"{p}:{a:.2f}" for p, a in sorted(acc.items(), key=lambda kv: int(kv[0])))


_METHOD = label("method", "method")

SUITE = Suite(
    name="recurrent",
    title="longattn recurrent suite",
    about=_about,
    parts=(Part("prefill", _prefill_part, methods=lambda o: list(OPS)),
           Part("decode", _decode_part, methods=lambda o: list(OPS)),
           Part("mqar", _mqar_part, methods=lambda o: list(MQAR_MIXERS))),
    quick={"lengths": (2048, 8192, 32768), "dtypes": ("float32", "bfloat16"), "repeats": 3, "max_seconds": 20.0,
           "histories": (128, 131072), "steps": 64, "widths": (64,), "mqar_length": 64, "pairs": (2, 4, 8),
           "mqar_steps": 500, "copy_steps": 150, "tokens_per_step": 4096, "lr": 3e-3,
           "mqar_mixers": ("attention", "linear", "based", "gla", "gated_deltanet", "rat")},
    full={"lengths": (1024, 4096, 16384, 32768, 65536, 131072), "dtypes": ("float32", "bfloat16"), "repeats": 3,
          "max_seconds": 60.0, "histories": (128, 131072), "steps": 128, "widths": (32, 64, 128), "mqar_length": 64,
          "pairs": (2, 4, 8, 12), "mqar_steps": 2000, "copy_steps": 250, "tokens_per_step": 4096, "lr": 3e-3,
          "mqar_mixers": MQAR_MIXERS, "mqar_jobs": max(1, os.cpu_count() or 1)},
    check=_check,
    describe=lambda r: (f"{r.get('test')}: {r.get('method')}" + (f" {r['dtype']} {r['tokens']}" if r.get("tokens") else "")
                        + (f" after {r['history']}" if r.get("history") else "")
                        + (f" d={r['width']}" if r.get("width") else "")),
    live=(Column("time", "time_s", lambda x: None if x is None else f"{x:.3f} s"),
          Column("vs SDPA", "speedup", "ratio"),
          Column("step", "step_ms", lambda x: None if x is None else f"{x:.3f} ms"),
          Column("MQAR acc", "accuracy", ".3f")),
    tables=(
        Table("Prefill against SDPA causal (same dtype, same run)", part="prefill",
              pivot=None, group=lambda r: r.get("dtype"),
              columns=(_METHOD, Column("tokens", "tokens", "int"), Column("time s", "time_s", ".3f"),
                       Column("vs SDPA", "speedup", "ratio"), Column("peak MiB", "peak_mem_bytes", "mib", keep=2),
                       Column("gate rel RMSE", "gate_rel_rmse", ".1e", keep=3), status_column(keep=4))),
        Table("Crossover length and speed-up at the longest length", source=_crossovers,
              columns=(_METHOD, label("dtype", "dtype"), Column("crossover", "crossover"),
                       Column("at", "longest", "int"), Column("vs SDPA", "speedup", "ratio"),
                       Column("peak KiB/token first", "per_token_first", "kib", keep=2),
                       Column("last", "per_token_last", "kib", keep=2)),
              note="Peak memory per token at the shortest and the longest length: the same figure at both is "
                   "memory linear in the length (inputs, outputs and per-chunk work), no quadratic term."),
        Table("Decode step: constant in the history", source=_decode_rows,
              columns=(_METHOD, Column("short", "short", "int"), Column("ms", "short_ms", ".3f"),
                       Column("long", "long", "int"), Column("ms ", "long_ms", ".3f"),
                       Column("long / short", "ratio", ".2f"))),
        Table("MQAR learned from scratch: accuracy against state size", part="mqar",
              columns=(_METHOD, Column("width", "width", "int"), Column("state KiB", "state_bytes", "kib"),
                       Column("params", "params", "int", keep=3), Column("accuracy", "accuracy", ".3f"),
                       label("by pairs", _pairs_text, keep=1), Column("final loss", "final_loss", ".3f", keep=4),
                       Column("train tok/s", "tokens_per_s", ",.0f", keep=2), status_column(keep=5))),
    ),
    panels=(
        Panel("speedup_vs_length", lambda recs: "recurrent prefill vs SDPA causal (float32)", "tokens", "speedup",
              lambda r: r["method"], where=lambda r: r.get("test") == "prefill" and r.get("dtype") == "float32"
              and r.get("method") != "sdpa"),
        Panel("memory_vs_length", lambda recs: "recurrent prefill: peak RSS growth (float32)", "tokens",
              "peak_mem_bytes", lambda r: r["method"],
              where=lambda r: r.get("test") == "prefill" and r.get("dtype") == "float32"),
        Panel("accuracy_vs_state", lambda recs: "MQAR accuracy vs state size", "state_bytes", "accuracy",
              lambda r: r["method"], where=lambda r: r.get("test") == "mqar", xlabel="state (bytes per sequence, log)"),
    ),
)
