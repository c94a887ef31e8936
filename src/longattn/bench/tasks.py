"""The ``tasks`` suite: does a method let a model use context past its trained length?

Two parts, each run inside a real model with the method in place of its attention:

* ``perplexity`` — stories260K (trained on 512-token stories) reads its own sampled stories,
  concatenated (seeded), far past 512 tokens. Reported against the *in-length* figure (the
  same text cut into 512-token chunks, each read on its own): a method that keeps the model in
  distribution stays near it; dense attention over the whole text does not.
* ``retrieval`` — the project's tiny retrieval model (``longattn.models.retrieval``, trained at
  ≤ 512 tokens) answers passkey, needle and MQAR questions at lengths up to 32× that, at several
  needle depths (``longattn.tasks.synthetic``).

Every record follows the shared schema: ``task``, ``method``, ``length``, ``depth``,
``accuracy`` or ``perplexity``, ``n``, ``status``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import longattn
from longattn.bench import harness

#: the context stories260K was trained on
STORIES_TRAINED_LENGTH = 512


def perplexity_methods(trained: int = STORIES_TRAINED_LENGTH) -> dict[str, Any]:
    """Methods that give each query at most ``trained − 64`` keys (an in-distribution count),
    plus dense over everything. Those that keep *original* positions (window, streaming, the
    block selectors) see relative distances the model never trained on, unless, like the
    window, they only keep nearby keys; LongHeads re-maps the positions of what it keeps."""
    keys = trained - 64
    block = 64
    return {
        "dense": longattn.method("dense"),
        "window": longattn.method("window", window=keys),
        "streaming": longattn.method("streaming", sinks=block, window=keys - block),
        "longheads": longattn.method("longheads", window=keys, chunk=block),
        "landmark": longattn.method("landmark", budget=keys, block=block, q_block=block, sinks=block, window=2 * block),
        "quest": longattn.method("quest", budget=keys, block=block, q_block=block, sinks=block, window=2 * block),
        "tokenselect": longattn.method("tokenselect", budget=keys),
    }


def _nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of ``tokens [1, T]`` under ``logits [1, T, V]`` (next-token)."""
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    return -logp.gather(-1, tokens[0, 1:, None])[:, 0]


def stories_text(n_tokens: int, seed: int):
    """``(model, tokens [1, n_tokens])``: stories260K and its own sampled stories, BOS-separated."""
    from longattn.models import stories260k
    from longattn.models.llama2c import generate, load_checkpoint

    model = load_checkpoint(stories260k() / "stories260K.bin")
    return model, torch.tensor([[1] + generate(model, n_tokens - 1, seed=seed, temperature=1.0)])


def run_perplexity(n_tokens: int = 4096, *, methods: dict[str, Any] | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Perplexity of stories260K over ``n_tokens`` of its own stories with each method, and the
    in-length reference (``STORIES_TRAINED_LENGTH``-token chunks read separately). Records have
    ``task="perplexity"``, ``perplexity``, ``in_length_perplexity`` and their ratio."""
    from longattn.models.llama2c import forward

    say = progress or (lambda msg: None)
    methods = methods if methods is not None else perplexity_methods()
    say(f"perplexity: sampling {n_tokens} tokens of stories260K text (seed {seed})")
    model, tokens = stories_text(n_tokens, seed)
    trained = STORIES_TRAINED_LENGTH
    with torch.no_grad():
        chunk_nll = [_nll(forward(model, tokens[:, i:i + trained], dtype=torch.float32), tokens[:, i:i + trained])
                     for i in range(0, n_tokens, trained)]
    in_length = math.exp(float(torch.cat(chunk_nll).mean()))
    records: list[dict[str, Any]] = []
    for name, m in methods.items():
        say(f"perplexity: {name} over {n_tokens} tokens")
        t0 = time.perf_counter()

        def run(m=m):
            with torch.no_grad():
                return forward(model, tokens, dtype=torch.float32, method=m)

        logits, status = harness.guarded(run)
        rec: dict[str, Any] = {"task": "perplexity", "method": name, "length": n_tokens, "depth": None, "n": 1,
                               "trained_length": trained, "in_length_perplexity": in_length, "status": status or "ok",
                               "wall_s": time.perf_counter() - t0}
        if logits is not None:
            if not bool(torch.isfinite(logits).all()):
                rec["status"] = "FAILED: logits not finite"
            else:
                ppl = math.exp(float(_nll(logits, tokens).mean()))
                rec.update(perplexity=ppl, ratio_to_in_length=ppl / in_length)
        records.append(rec)
    return records


#: the retrieval model's trained length and the settings of the retrieval part
RETRIEVAL_TRAINED_LENGTH = 512
#: quick stops at 8k (16× the trained length): a LongHeads forward over 16k tokens takes ~4 s a
#: sample here; ``--full`` (and ``--lengths``) reach 16k–32k
QUICK_RETRIEVAL = {"lengths": (512, 2048, 8192), "depths": (0.1, 0.5, 0.9), "n": 3,
                   "needle_lengths": (512, 2048), "mqar_lengths": (512, 2048), "mqar_pairs": 8}
FULL_RETRIEVAL = {"lengths": (256, 512, 1024, 2048, 4096, 8192, 16384, 32768), "depths": (0.0, 0.25, 0.5, 0.75, 1.0),
                  "n": 8, "needle_lengths": (512, 2048, 8192), "mqar_lengths": (512, 2048, 8192), "mqar_pairs": 8}


def retrieval_methods(trained: int = RETRIEVAL_TRAINED_LENGTH) -> dict[str, Any]:
    """Methods run inside the retrieval model, each giving a query at most ``trained`` keys (an
    in-distribution count), plus dense over everything. LongHeads re-maps the positions of the
    chunks it keeps into the trained window; the others keep original positions. LongHeads runs
    twice: chunks scored by their mean key (the paper's) and by Quest's bound (``score="bound"``),
    which still finds a passkey that a chunk boundary cuts in two."""
    block = 32
    return {
        "dense": longattn.method("dense"),
        "longheads": longattn.method("longheads", window=trained, chunk=block, local=block),
        "longheads_bound": longattn.method("longheads", window=trained, chunk=block, local=block, score="bound"),
        "landmark": longattn.method("landmark", budget=trained, block=block, q_block=block, sinks=block, window=2 * block),
        "quest": longattn.method("quest", budget=trained, block=block, q_block=block, sinks=block, window=2 * block),
        "streaming": longattn.method("streaming", sinks=block, window=trained - block),
    }


def run_retrieval(settings: dict[str, Any], *, methods: dict[str, Any] | None = None, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Passkey at every (length, depth) of ``settings`` and needle / MQAR at their lengths, with
    each method inside the shipped retrieval model (``longattn.models.retrieval``). Accuracy is
    exact match of the whole answer (teacher-forced argmax on every answer token = greedy)."""
    from longattn.models import retrieval
    from longattn.tasks import synthetic

    say = progress or (lambda msg: None)
    methods = methods if methods is not None else retrieval_methods()
    model = retrieval.load()
    trained = int(retrieval.read_config(retrieval.SHIPPED)["model"]["max_train_length"])
    n = settings["n"]
    jobs: list[tuple[str, int, float | None, Callable[[], Any]]] = []
    for length in settings["lengths"]:
        for depth in settings["depths"]:
            jobs.append(("passkey", length, depth, lambda L=length, d=depth: synthetic.passkey(L, d, n, seed)))
    for length in settings["needle_lengths"]:
        jobs.append(("needle", length, 0.5, lambda L=length: synthetic.needle(L, 0.5, n, seed)))
    for length in settings["mqar_lengths"]:
        jobs.append(("mqar", length, None, lambda L=length: synthetic.mqar(L, settings["mqar_pairs"], n, seed)))
    records: list[dict[str, Any]] = []
    for task, length, depth, make in jobs:
        batch = make()
        for name, m in methods.items():
            say(f"retrieval: {task} {length} tokens" + (f", depth {depth}" if depth is not None else "") + f": {name}")
            t0 = time.perf_counter()
            acc, status = harness.guarded(lambda m=m: retrieval.evaluate(model, batch, m, batch_size=n))
            rec = {"task": task, "method": name, "length": length, "depth": depth, "n": n, "trained_length": trained,
                   "status": status or "ok", "wall_s": time.perf_counter() - t0}
            if acc is not None:
                rec.update(accuracy=acc.accuracy, token_accuracy=acc.token_accuracy)
            records.append(rec)
    return records


PARTS = ("retrieval", "perplexity")


def run_tasks_suite(out_dir: str | Path, *, full: bool = False, lengths=None, methods=None, seed: int = 0,
                    console: Console | None = None, parts=PARTS, perplexity_tokens: int | None = None) -> dict[str, Any]:
    """``longattn bench --suite tasks``: writes ``out_dir/results.json`` and ``report.md``.

    ``lengths`` sets the passkey lengths of the retrieval part (default ``QUICK_RETRIEVAL`` /
    ``FULL_RETRIEVAL``); perplexity reads ``perplexity_tokens`` (default 4096, 8192 with
    ``full``). ``methods`` keeps only those method names."""
    unknown_parts = sorted(set(parts) - set(PARTS))
    if unknown_parts:
        raise ValueError(f"unknown tasks suite part(s) {', '.join(unknown_parts)}; known: {', '.join(PARTS)}")
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
    ppl_tokens = perplexity_tokens or (8192 if full else 4096)
    results: dict[str, Any] = {"suite": "tasks", "machine": harness.machine_info(seed),
                               "config": {"seed": seed, "perplexity_tokens": ppl_tokens, "parts": list(parts)},
                               "records": []}
    if "retrieval" in parts:
        settings = dict(FULL_RETRIEVAL if full else QUICK_RETRIEVAL)
        if lengths:
            settings["lengths"] = tuple(sorted(int(n) for n in lengths))
        results["config"]["retrieval"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
        r_methods = retrieval_methods()
        if methods:
            r_methods = {k: v for k, v in r_methods.items() if k in methods}
        results["records"] += run_retrieval(settings, methods=r_methods, seed=seed, progress=say)
        console.print(retrieval_table(results["records"]))
    if "perplexity" in parts:
        ppl_methods = perplexity_methods()
        if methods:
            ppl_methods = {k: v for k, v in ppl_methods.items() if k in methods}
        results["records"] += run_perplexity(ppl_tokens, methods=ppl_methods, seed=seed, progress=say)
        console.print(perplexity_table(results["records"]))
    results["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_report(results))
    console.print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def retrieval_summary(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], tuple[float | None, int]]:
    """``(task, method, length) -> (accuracy averaged over depths, samples)``."""
    out: dict[tuple[str, str, int], tuple[float | None, int]] = {}
    keys = dict.fromkeys((r["task"], r["method"], r["length"]) for r in records if r["task"] != "perplexity")
    for key in keys:
        rs = [r for r in records if (r["task"], r["method"], r["length"]) == key]
        accs = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        out[key] = (sum(accs) / len(accs) if accs else None, sum(r["n"] for r in rs))
    return out


def retrieval_table(records: list[dict[str, Any]]) -> Table:
    summary = retrieval_summary(records)
    lengths = sorted({k[2] for k in summary})
    t = Table(title="retrieval accuracy inside the tiny retrieval model (trained ≤ 512 tokens), mean over depths")
    t.add_column("task · method")
    for n in lengths:
        t.add_column(str(n), justify="right")
    for task, method in dict.fromkeys((k[0], k[1]) for k in summary):
        cells = []
        for n in lengths:
            acc = summary.get((task, method, n))
            cells.append("" if acc is None else _f(acc[0]))
        t.add_row(f"{task} · {method}", *cells)
    return t


def perplexity_table(records: list[dict[str, Any]]) -> Table:
    recs = [r for r in records if r["task"] == "perplexity"]
    first = recs[0] if recs else {}
    t = Table(title=f"stories260K perplexity over {first.get('length')} tokens (trained on {first.get('trained_length')}; "
                    f"in-length {first.get('in_length_perplexity', float('nan')):.2f})")
    for col in ("method", "perplexity", "× in-length", "status"):
        t.add_column(col, justify="left" if col in ("method", "status") else "right")
    for r in recs:
        t.add_row(r["method"], _f(r.get("perplexity")), _f(r.get("ratio_to_in_length")), r["status"])
    return t


def _f(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def render_report(results: dict[str, Any]) -> str:
    lines = ["# longattn tasks suite", ""]
    summary = retrieval_summary(results["records"])
    if summary:
        lengths = sorted({k[2] for k in summary})
        ret = [r for r in results["records"] if r["task"] != "perplexity"]
        lines += [
            "## Retrieval past the trained length",
            "",
            f"- the project's tiny retrieval model (`longattn.models.retrieval`, 2 layers, trained at ≤ "
            f"{ret[0]['trained_length']} tokens), every attention replaced by the method",
            "- accuracy = share of samples whose whole answer is right (teacher-forced argmax on every answer "
            "token = greedy decoding); passkey averaged over the needle depths run, needle at depth 0.5, MQAR "
            f"{results['config'].get('retrieval', {}).get('mqar_pairs', '')} pairs",
            "",
            "| task · method | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for task, method in dict.fromkeys((k[0], k[1]) for k in summary):
            cells = [("" if (task, method, n) not in summary else _f(summary[(task, method, n)][0])) for n in lengths]
            lines.append(f"| {task} · {method} | " + " | ".join(cells) + " |")
        lines += ["", "Passkey accuracy by depth:", "",
                  "| method | length | " + " | ".join(f"depth {d}" for d in sorted({r['depth'] for r in ret if r['task'] == 'passkey'})) + " |"]
        depths = sorted({r["depth"] for r in ret if r["task"] == "passkey"})
        lines.append("|---|---:|" + "---:|" * len(depths))
        for method in dict.fromkeys(r["method"] for r in ret if r["task"] == "passkey"):
            for n in lengths:
                row = {r["depth"]: r for r in ret if r["task"] == "passkey" and r["method"] == method and r["length"] == n}
                if row:
                    lines.append(f"| {method} | {n} | " + " | ".join(
                        _f(row[d].get("accuracy")) if d in row else "" for d in depths) + " |")
        bad = [r for r in ret if r["status"] != "ok"]
        for r in bad:
            lines.append(f"- {r['task']} · {r['method']} · {r['length']}: {r['status']}")
        lines.append("")
    ppl = [r for r in results["records"] if r["task"] == "perplexity"]
    if ppl:
        r0 = ppl[0]
        lines += [
            "## Perplexity past the trained length",
            "",
            f"- stories260K (trained on {r0['trained_length']}-token stories) over {r0['length']} tokens of its own "
            f"sampled stories, concatenated (seed {results['config']['seed']})",
            f"- in-length reference: the same text in {r0['trained_length']}-token chunks read separately: "
            f"**{r0['in_length_perplexity']:.2f}**",
            "",
            "| method | perplexity | × in-length | status |",
            "|---|---:|---:|---|",
        ]
        for r in ppl:
            lines.append(f"| {r['method']} | {_f(r.get('perplexity'))} | {_f(r.get('ratio_to_in_length'))} | {r['status']} |")
    return "\n".join(lines) + "\n"
