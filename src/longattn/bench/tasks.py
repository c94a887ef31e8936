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
    from longattn.models.llama2c import generate, load_checkpoint, stories260k_dir

    model_dir = stories260k_dir()
    if model_dir is None:
        raise FileNotFoundError("stories260K not found: set LONGATTN_STORIES260K to the folder holding stories260K.bin")
    model = load_checkpoint(model_dir / "stories260K.bin")
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


PARTS = ("retrieval", "perplexity")


def run_tasks_suite(out_dir: str | Path, *, full: bool = False, lengths=None, methods=None, seed: int = 0,
                    console: Console | None = None, parts=PARTS, perplexity_tokens: int | None = None) -> dict[str, Any]:
    """``longattn bench --suite tasks``: writes ``out_dir/results.json`` and ``report.md``.

    ``lengths`` sets the retrieval lengths (default: quick 512…16k, full up to 32k) and, its
    largest value capped at 8192, nothing else; perplexity reads 4096 tokens (8192 with
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
