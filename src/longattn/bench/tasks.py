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

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import longattn
from longattn.bench import harness
from longattn.bench.suite import Column, Context, Panel, Part, Pivot, Suite, Table, label, num, status_column

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
                   progress: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Perplexity of stories260K over ``n_tokens`` of its own stories with each method, and the
    in-length reference (``STORIES_TRAINED_LENGTH``-token chunks read separately), one record per
    method as it finishes: ``task="perplexity"``, ``perplexity``, ``in_length_perplexity`` and
    their ratio."""
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
        yield rec


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


def run_retrieval(settings: Mapping[str, Any], *, methods: dict[str, Any] | None = None, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Passkey at every (length, depth) of ``settings`` and needle / MQAR at their lengths, with
    each method inside the shipped retrieval model (``longattn.models.retrieval``), one record per
    (task, length, depth, method). Accuracy is exact match of the whole answer (teacher-forced
    argmax on every answer token = greedy)."""
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
            yield rec


# -- the parts and the declaration -------------------------------------------------------------


def _retrieval_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    settings = {**o["retrieval"]}
    if o.get("lengths"):
        settings["lengths"] = tuple(sorted(int(n) for n in o["lengths"]))
    methods = {k: v for k, v in retrieval_methods().items() if ctx.wants(k)}
    yield from run_retrieval(settings, methods=methods, seed=ctx.seed, progress=ctx.say)


def _perplexity_part(ctx: Context) -> Iterator[dict[str, Any]]:
    methods = {k: v for k, v in perplexity_methods().items() if ctx.wants(k)}
    yield from run_perplexity(int(ctx.options["perplexity_tokens"]), methods=methods, seed=ctx.seed,
                              progress=ctx.say)


def retrieval_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, length): accuracy averaged over the depths run, samples."""
    recs = [r for r in records if r.get("task") not in (None, "perplexity")]
    keys = dict.fromkeys((r["task"], r["method"], r["length"]) for r in recs)
    rows = []
    for task, method, length in keys:
        rs = [r for r in recs if (r["task"], r["method"], r["length"]) == (task, method, length)]
        accs = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
        rows.append({"task": task, "method": method, "length": length,
                     "accuracy": sum(accs) / len(accs) if accs else None, "n": sum(r["n"] for r in rs),
                     "status": "ok" if all(str(r["status"]).startswith("ok") for r in rs) else rs[-1]["status"]})
    return rows


def _about(results: dict[str, Any]) -> str:
    cfg = results["config"]
    ret = cfg.get("retrieval") or {}
    return "\n".join([
        "Does a method let a model use context past its trained length?",
        "",
        f"- retrieval: the project's tiny retrieval model (`longattn.models.retrieval`, 2 layers, trained at ≤ "
        f"{RETRIEVAL_TRAINED_LENGTH} tokens), every attention replaced by the method; accuracy = share of samples "
        "whose whole answer is right (teacher-forced argmax on every answer token = greedy decoding); passkey "
        f"averaged over the needle depths run, needle at depth 0.5, MQAR {ret.get('mqar_pairs', '')} pairs, "
        f"{ret.get('n', '')} samples per cell",
        f"- perplexity: stories260K (trained on {STORIES_TRAINED_LENGTH}-token stories) over "
        f"{cfg.get('perplexity_tokens')} tokens of its own sampled stories, concatenated; the in-length reference "
        f"reads the same text in {STORIES_TRAINED_LENGTH}-token chunks separately",
    ])


def _perplexity_title(results: dict[str, Any]) -> str:
    ppl = [r for r in results["records"] if r.get("task") == "perplexity"]
    ref = ppl[0].get("in_length_perplexity") if ppl else None
    return (f"Perplexity past the trained length (in-length reference {ref:.2f})" if ref is not None
            else "Perplexity past the trained length")


_METHOD = label("method", "method")

SUITE = Suite(
    name="tasks",
    title="longattn tasks suite",
    about=_about,
    parts=(Part("retrieval", _retrieval_part, methods=lambda o: list(retrieval_methods())),
           Part("perplexity", _perplexity_part, methods=lambda o: list(perplexity_methods()))),
    quick={"lengths": None, "retrieval": QUICK_RETRIEVAL, "perplexity_tokens": 4096},
    full={"lengths": None, "retrieval": FULL_RETRIEVAL, "perplexity_tokens": 8192},
    describe=lambda r: (f"{r['task']} / {r['method']}, length {r['length']}"
                        + (f", depth {float(r['depth']):.0%}" if num(r.get("depth")) is not None else "")),
    live=(Column("accuracy", "accuracy", ".2f"), Column("perplexity", "perplexity", ".2f"),
          Column("", "ratio_to_in_length", lambda x: None if x is None else f"{x:.2f}× in-length")),
    tables=(
        Table("Retrieval past the trained length (accuracy, mean over depths)", source=lambda res:
              retrieval_summary(res["records"]),
              pivot=Pivot(label("task · method", lambda r: f"{r['task']} · {r['method']}"), "length",
                          Column("", "accuracy", ".2f"))),
        Table("Passkey accuracy by depth", part="retrieval", where=lambda r: r["task"] == "passkey", console=False,
              html=False, pivot=Pivot(label("method · length", lambda r: f"{r['method']} · {r['length']}"), "depth",
                                      Column("", "accuracy", ".2f"), col_header=lambda d: f"depth {d}")),
        Table(_perplexity_title, part="perplexity",
              columns=(_METHOD, Column("perplexity", "perplexity", ".2f"),
                       Column("× in-length", "ratio_to_in_length", ".2f"), status_column())),
    ),
    panels=(Panel("passkey_heatmap", "passkey", "length", "depth", lambda r: r["method"],
                  where=lambda r: r.get("task") == "passkey", value="accuracy"),),
)
