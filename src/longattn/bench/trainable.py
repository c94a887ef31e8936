"""The trainable sparse attention suite: ``longattn bench --suite trainable``.

* ``landmark`` — Landmark Attention's headline, small: the bundled landmark model (trained here at
  ≤ 512 tokens with a landmark token every 64 and the grouped softmax) retrieves a passkey at long
  lengths by landmark retrieval (``landmark_trained``, top-k blocks per head), against the retrieval
  model (same size and recipe, no landmarks) with dense attention, training-free ``landmark`` and
  ``longheads`` (Quest's bound), by length and depth;
* ``memory`` — the same retrieval with the context in a ``LandmarkMemory`` (one per layer): only
  landmark keys, the open block and the fetched blocks hot, closed blocks on the host and disk;
* ``retrofit`` — DSA's lightning indexer distilled onto frozen stories260K: attention-mass recall of
  its top-k before and after, against ``tokenselect`` (exact per-head top-k), ``quest`` and the
  parameter-free indexer at the same k;
* ``stories`` — stories260K fine-tuned on its own sampled stories with dense, ``moba`` and ``nsa``
  attention in the same budget: held-out NLL at and past its 512-token context, before and after;
* ``prefill`` — the methods' prefill time at ~10% density against SDPA in the same run;
* ``trained`` — small models trained from scratch in the same budget (steps, tokens, recipe) with
  dense, ``moba``, ``nsa`` and ``landmark_trained`` attention: training tokens/s, their accuracy at
  and past the trained length, their density.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

import longattn
from longattn.bench.suite import Column, Context, Part, Pivot, Suite, Table, guarded_record, label, status_column

QUICK = {"lengths": (512, 2048, 8192), "depths": (0.1, 0.5, 0.9), "n": 3,
         "retrofit_train": 4, "retrofit_eval": 2, "retrofit_steps": 100, "budget": 64,
         "train_steps": 60, "train_eval": (512, 2048), "train_n": 8,
         "stories_steps": 20, "stories_corpus": 16384, "stories_held_out": 2048, "stories_eval": (512,),
         "stories_lr": 3e-4, "prefill_tokens": 8192, "prefill_repeats": 2}
FULL = {"lengths": (512, 2048, 8192, 32768), "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "n": 8,
        "retrofit_train": 8, "retrofit_eval": 4, "retrofit_steps": 300, "budget": 64,
        "train_steps": 1000, "train_eval": (512, 2048, 8192), "train_n": 16,
        "stories_steps": 150, "stories_corpus": 262144, "stories_held_out": 16384, "stories_eval": (512, 2048),
        "stories_lr": 3e-4, "prefill_tokens": 32768, "prefill_repeats": 3}


# -- landmark: passkey by length and depth ----------------------------------------------------------


def landmark_entries() -> dict[str, tuple[str, Any]]:
    """name -> (model, method): ``"landmark"`` is the bundled landmark model (landmarks inserted
    into every input), ``"retrieval"`` the shipped retrieval model."""
    from longattn.bench.tasks import retrieval_methods

    base = retrieval_methods()
    return {
        "landmark_trained (top-4)": ("landmark", longattn.method("landmark_trained", block=64, top_k=4)),
        "landmark_trained (top-2)": ("landmark", longattn.method("landmark_trained", block=64, top_k=2)),
        "dense": ("retrieval", base["dense"]),
        "landmark (training-free)": ("retrieval", base["landmark"]),
        "longheads (bound)": ("retrieval", base["longheads_bound"]),
    }


def run_landmark(settings: dict[str, Any], *, entries: dict[str, tuple[str, Any]] | None = None, seed: int = 0,
                 say=print) -> Iterator[dict[str, Any]]:
    from longattn.models import landmark_tiny, retrieval
    from longattn.tasks import synthetic
    from longattn.train import load_model, read_config
    from longattn.train.data import evaluate
    from longattn.train.landmarks import with_landmarks

    entries = entries if entries is not None else landmark_entries()
    lm_dir = landmark_tiny()
    models = {"landmark": load_model(lm_dir), "retrieval": retrieval.load()}
    block = int(read_config(lm_dir)["training"]["method_options"]["block"])
    n = settings["n"]
    for length in settings["lengths"]:
        for depth in settings["depths"]:
            batch = synthetic.passkey(length, depth, n, seed)
            for name, (which, method) in entries.items():
                say(f"landmark: passkey {length} tokens, depth {depth}: {name}")
                rec = {"part": "landmark", "method": name, "model": which, "length": length, "depth": depth, "n": n}

                def run(which=which, method=method):
                    data = with_landmarks(batch, block=block) if which == "landmark" else batch
                    t0 = time.perf_counter()
                    acc = evaluate(models[which], data, method, batch_size=n)
                    return {**rec, "accuracy": acc.accuracy, "wall_s": time.perf_counter() - t0, "status": "ok"}

                yield guarded_record(rec, run)


def _landmark_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    entries = {k: v for k, v in landmark_entries().items() if ctx.wants(k)}
    settings = {"lengths": tuple(o["lengths"]), "depths": tuple(o["depths"]), "n": int(o["n"])}
    ctx.plan(len(settings["lengths"]) * len(settings["depths"]) * len(entries))
    for rec in run_landmark(settings, entries=entries, seed=ctx.seed, say=ctx.say):
        ctx.step(rec["method"])
        yield rec


# -- memory: the same retrieval with the context in a LandmarkMemory --------------------------------


def run_memory(settings: dict[str, Any], *, top_k: int = 4, host_tokens: int = 8192, seed: int = 0,
               say=print) -> Iterator[dict[str, Any]]:
    """The bundled landmark model reading each passkey sample through one ``LandmarkMemory`` per
    layer, a block per step: only the landmark keys, the open block and the fetched blocks are hot,
    closed blocks sit on the host and, past ``host_tokens`` per layer, on disk."""
    from longattn.models import landmark_tiny
    from longattn.tasks import synthetic
    from longattn.train import load_model, read_config
    from longattn.train.landmarks import memory_evaluation, with_landmarks

    lm_dir = landmark_tiny()
    model = load_model(lm_dir)
    block = int(read_config(lm_dir)["training"]["method_options"]["block"])
    name = f"landmark_trained (top-{top_k}) over LandmarkMemory"
    for length in settings["lengths"]:
        for depth in settings["depths"]:
            say(f"memory: passkey {length} tokens, depth {depth}")
            rec = {"part": "memory", "method": name, "length": length, "depth": depth, "n": settings["n"],
                   "top_k": top_k, "host_tokens": host_tokens}

            def run(length=length, depth=depth, rec=rec):
                batch = with_landmarks(synthetic.passkey(length, depth, settings["n"], seed), block=block)
                return {**rec, **memory_evaluation(model, batch, block=block, top_k=top_k, host_tokens=host_tokens),
                        "status": "ok"}

            yield guarded_record(rec, run)


def _memory_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    settings = {"lengths": tuple(o["lengths"]), "depths": tuple(o["depths"]), "n": int(o["n"])}
    ctx.plan(len(settings["lengths"]) * len(settings["depths"]))
    for rec in run_memory(settings, seed=ctx.seed, say=ctx.say):
        ctx.step(f"memory {rec['length']}")
        yield rec


def _memory_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    recs = [r for r in results["records"] if r.get("part") == "memory" and r.get("accuracy") is not None]
    rows = []
    for length in dict.fromkeys(r["length"] for r in recs):
        at = [r for r in recs if r["length"] == length]
        rows.append({"method": at[0]["method"], "length": length,
                     "accuracy": sum(r["accuracy"] for r in at) / len(at),
                     "context_tokens": max(r["context_tokens"] for r in at),
                     "peak_hot_tokens": max(r["peak_hot_tokens"] for r in at),
                     "host_mib": max(r["host_bytes"] for r in at) / 2**20,
                     "disk_mib": max(r["disk_bytes"] for r in at) / 2**20,
                     "ms_per_token": sum(r["ms_per_token"] for r in at) / len(at), "status": "ok"})
    return rows


# -- retrofit: DSA's indexer on stories260K -----------------------------------------------------------


def run_retrofit(*, n_train: int, n_eval: int, steps: int, budget: int, length: int = 512, seed: int = 0,
                 say=print) -> Iterator[dict[str, Any]]:
    """Capture stories260K's q/k on ``n_train`` + ``n_eval`` of its own stories, distill one indexer
    per layer on the first, and measure every selector's attention-mass recall on the others."""
    from longattn.analysis.capture import capture
    from longattn.analysis.subject import stories260k_subject
    from longattn.analysis.texts import stories
    from longattn.calibrate.indexer import LayerQK, distill_indexer, dsa_for, recall_of
    from longattn.methods.dsa import DSAIndexer

    subject = stories260k_subject()

    def layers(seeds) -> list[LayerQK]:
        recs = [capture(subject, stories(length, seed=s)) for s in seeds]
        return [LayerQK(torch.cat([r[i].q for r in recs]), torch.cat([r[i].k for r in recs]), recs[0][i].site.scale)
                for i in range(len(recs[0]))]

    say(f"retrofit: capturing stories260K q/k on {n_train} + {n_eval} stories of {length} tokens")
    train, held_out = layers(range(seed, seed + n_train)), layers(range(seed + 1000, seed + 1000 + n_eval))
    hq, hk, d = train[0].q.shape[1], train[0].k.shape[1], train[0].q.shape[-1]
    indexers = [DSAIndexer(d, hq, hk, seed=seed + i) for i in range(len(train))]
    common = {"part": "retrofit", "budget": budget, "length": length, "n_eval": n_eval}

    def indexer_recall() -> float:
        return sum(recall_of(dsa_for(ix, budget), [qk], budget) for ix, qk in zip(indexers, held_out)) / len(held_out)

    texts = torch.cat([stories(length, seed=s) for s in range(seed + 1000, seed + 1000 + n_eval)])
    model = subject.model

    def nll(method) -> float:
        """Next-token NLL (nats) of the held-out stories with ``method`` in every layer (a list:
        one method per layer)."""
        with torch.no_grad():
            logits = model(texts, method=method)
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), texts[:, 1:].flatten()))

    yield {**common, "method": "dense", "recall": 1.0, "nll": nll("dense"), "status": "ok"}
    for name, m in (("tokenselect (exact per-head top-k)", longattn.method("tokenselect", budget=budget)),
                    ("quest (blocks of 8)", longattn.method("quest", budget=budget, block=8, q_block=8, sinks=0,
                                                            window=0)),
                    ("dsa_indexer, identity indexer", dsa_for(None, budget))):
        yield {**common, "method": name, "recall": recall_of(m, held_out, budget), "nll": nll(m), "status": "ok"}
    per_layer = lambda: [dsa_for(ix, budget) for ix in indexers]  # noqa: E731
    yield {**common, "method": "dsa_indexer, before distillation", "recall": indexer_recall(), "nll": nll(per_layer()),
           "status": "ok"}
    t0 = time.perf_counter()
    fit = distill_indexer(train, indexers, steps=steps, seed=seed, progress=say)
    yield {**common, "method": "dsa_indexer, distilled", "recall": indexer_recall(), "nll": nll(per_layer()),
           "steps": steps, "kl_before": sum(f["kl_before"] for f in fit) / len(fit),
           "kl_after": sum(f["kl_after"] for f in fit) / len(fit), "distill_s": time.perf_counter() - t0,
           "status": "ok"}


def _retrofit_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    yield from run_retrofit(n_train=int(o["retrofit_train"]), n_eval=int(o["retrofit_eval"]),
                            steps=int(o["retrofit_steps"]), budget=int(o["budget"]), seed=ctx.seed, say=ctx.say)


# -- trained: models trained from scratch with each method -----------------------------------------


def trained_setups() -> dict[str, dict[str, Any]]:
    """name -> the training method, its options, learned parts and landmark block. MoBA and NSA
    keep about a quarter of a 512-token sequence's keys per query."""
    return {
        "dense": {"method": None},
        "moba": {"method": "moba", "options": {"block": 32, "top_k": 4, "q_block": 32}},
        "nsa": {"method": "nsa", "options": {"block": 32, "top_n": 4, "local": 1, "compress_block": 16,
                                             "compress_stride": 8, "window": 64, "q_block": 32},
                "learned": "nsa"},
        "landmark_trained": {"method": "landmark_trained", "options": {"block": 64}, "landmarks": 64},
    }


def _setup_model(setup: dict[str, Any], steps: int):
    """``(config, recipe, settings)`` of one setup on the retrieval curriculum."""
    import dataclasses

    from longattn.models.retrieval import RetrievalConfig
    from longattn.train import RetrievalCurriculum, TrainSettings
    from longattn.train.landmarks import LANDMARK_ID, WithLandmarks

    recipe: Any = RetrievalCurriculum(steps=steps)
    cfg = RetrievalConfig()
    block = setup.get("landmarks")
    if block:
        recipe = WithLandmarks(recipe.to_dict(), block=block)
        cfg = dataclasses.replace(cfg, vocab_size=LANDMARK_ID + 1, max_train_length=recipe.longest)
    if setup.get("learned"):
        cfg = dataclasses.replace(cfg, learned_attention=setup["learned"],
                                  learned_options={"compress_block": setup["options"]["compress_block"]})
    settings = TrainSettings(seed=0, steps=steps, warmup=min(100, max(1, steps // 10)), method=setup["method"],
                             method_options=setup.get("options", {}), log_every=max(1, steps // 6))
    return cfg, recipe, settings


def training_throughput(setup: dict[str, Any], *, length: int = 512, steps: int = 6, seed: int = 0) -> float:
    """Training tokens per second at ``length`` tokens (batches of 4,096 tokens), the median step of
    ``steps`` after one warm-up step."""
    import statistics

    from longattn.tasks import synthetic
    from longattn.train import LanguageModel, answer_loss
    from longattn.train.landmarks import with_landmarks

    cfg, _, settings = _setup_model(setup, 1)
    model = LanguageModel(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = synthetic.passkey(length, 0.5, max(1, 4096 // length), seed)
    if setup.get("landmarks"):
        batch = with_landmarks(batch, block=setup["landmarks"])
    method = settings.training_method()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = answer_loss(model, batch, method, lm_weight=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return batch.tokens.numel() / statistics.median(times)


def run_trained(name: str, setup: dict[str, Any], *, steps: int, eval_lengths, n: int, seed: int = 0,
                say=print) -> dict[str, Any]:
    """Train the retrieval model's architecture with one method on the retrieval curriculum and
    score it: passkey (depth
    0.5) and MQAR (8 pairs) at each length with the same method, and its density at 512 tokens."""
    from longattn.tasks import synthetic
    from longattn.train import train
    from longattn.train.data import evaluate
    from longattn.train.landmarks import with_landmarks

    cfg, recipe, settings = _setup_model(setup, steps)
    rec: dict[str, Any] = {"part": "trained", "method": name}
    model, record = train(cfg, recipe, settings, log=lambda line: say(f"  {name}: {line}"))
    rec.update(steps=steps, train_s=record["wall_s"], final_loss=record["history"][-1]["loss"])
    block = setup.get("landmarks")
    method = settings.training_method() or "dense"
    if block:
        method = longattn.method("landmark_trained", block=block, top_k=4)
    for length in eval_lengths:
        for task, batch in (("passkey", synthetic.passkey(length, 0.5, n, seed + 5)),
                            ("mqar", synthetic.mqar(length, 8, n, seed + 5))):
            data = with_landmarks(batch, block=block) if block else batch
            rec[f"{task}@{length}"] = evaluate(model, data, method, batch_size=n).accuracy
    # the share of (query, key) pairs the method attends at the trained length, on the model's own q/k
    probe = synthetic.passkey(512, 0.5, 1, seed + 9)
    tokens = with_landmarks(probe, block=block).tokens if block else probe.tokens
    cap: list = []
    with torch.no_grad():
        model(tokens, capture=cap)
    q, k, v = cap[-1]
    _, st = longattn.attention(q, k, v, causal=True, method=method, return_stats=True)
    rec["density@512"] = st.density
    rec["status"] = "ok"
    return rec


# -- stories: stories260K fine-tuned with each method, perplexity on held-out stories ----------------


def stories_model(learned: str = "", learned_options: dict[str, Any] | None = None):
    """stories260K as a float32 :class:`~longattn.train.LanguageModel`, trainable, with fresh learned
    attention parts (``learned``: ``"nsa"`` …) in every block when asked for."""
    import dataclasses

    from longattn.models import stories260k
    from longattn.models.llama2c import as_language_model, load_checkpoint
    from longattn.train import LanguageModel

    base = as_language_model(load_checkpoint(stories260k() / "stories260K.bin"), torch.float32)
    cfg = dataclasses.replace(base.config, learned_attention=learned, learned_options=dict(learned_options or {}))
    model = LanguageModel(cfg, seed=0)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(".learned." not in k for k in missing):
        raise RuntimeError(f"stories260K's weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def run_stories(name: str, setup: dict[str, Any], *, steps: int, corpus: torch.Tensor, held_out: torch.Tensor,
                eval_lengths, lr: float = 3e-4, seed: int = 0, say=print) -> dict[str, Any]:
    """Fine-tune stories260K ``steps`` steps on ``corpus`` (its own sampled stories) with the setup's
    method at 512 tokens (its trained length) and measure the held-out NLL at each length before and
    after, with that method."""
    from longattn.train.text import finetune_text, text_nll

    learned = setup.get("learned", "")
    model = stories_model(learned, {"compress_block": setup["options"]["compress_block"]} if learned else None)
    method = longattn.method(setup["method"], **setup.get("options", {})) if setup["method"] else "dense"
    rec: dict[str, Any] = {"part": "stories", "method": name, "steps": steps, "corpus_tokens": int(corpus.numel())}
    for length in eval_lengths:
        rec[f"nll_before@{length}"] = text_nll(model, held_out, method, length=length)
    fit = finetune_text(model, corpus, method, steps=steps, length=512, lr=lr, seed=seed,
                        log=lambda line: say(f"  stories {name}: {line}"))
    for length in eval_lengths:
        rec[f"nll@{length}"] = text_nll(model, held_out, method, length=length)
        rec[f"ppl@{length}"] = math.exp(rec[f"nll@{length}"])
    rec.update(train_s=fit["wall_s"], tokens_per_s=fit["tokens_per_s"], final_loss=fit["losses"][-1], status="ok")
    return rec


def stories_windows(n_tokens: int, seed: int, *, row: int = 512) -> torch.Tensor:
    """``[n_tokens // row, row]``: stories260K's own 512-token windows (sampled from BOS through the
    story boundaries, as it was trained), consecutive windows joined into rows of ``row`` tokens."""
    from longattn.models import stories260k
    from longattn.models.llama2c import load_checkpoint, sample_windows

    if row % 512 or n_tokens < row:
        raise ValueError(f"row must be a multiple of 512 and n_tokens >= row, got row={row}, n_tokens={n_tokens}")
    windows = sample_windows(load_checkpoint(stories260k() / "stories260K.bin"), n_tokens // 512, length=512,
                             seed=seed)
    per_row = row // 512
    return windows[: windows.shape[0] // per_row * per_row].reshape(-1, row)


def _stories_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    setups = {k: v for k, v in trained_setups().items() if ctx.wants(k) and not v.get("landmarks")}
    ctx.plan(len(setups) + 1)
    ctx.step("sampling stories")
    ctx.say(f"stories: sampling {o['stories_corpus']} + {o['stories_held_out']} tokens of stories260K text")
    corpus = stories_windows(int(o["stories_corpus"]), ctx.seed + 2000)
    held_out = stories_windows(int(o["stories_held_out"]), ctx.seed + 3000, row=-(-max(512, *o["stories_eval"]) // 512) * 512)
    for name, setup in setups.items():
        ctx.step(f"stories {name}")
        yield guarded_record({"part": "stories", "method": name},
                             lambda name=name, setup=setup: run_stories(
                                 name, setup, steps=int(o["stories_steps"]), corpus=corpus, held_out=held_out,
                                 eval_lengths=tuple(o["stories_eval"]), lr=float(o["stories_lr"]), seed=ctx.seed,
                                 say=ctx.say))


def _trained_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    setups = {k: v for k, v in trained_setups().items() if ctx.wants(k)}
    ctx.plan(len(setups))
    for name, setup in setups.items():
        ctx.step(f"train {name}")
        yield guarded_record({"part": "trained", "method": name},
                             lambda name=name, setup=setup: run_trained(
                                 name, setup, steps=int(o["train_steps"]), eval_lengths=tuple(o["train_eval"]),
                                 n=int(o["train_n"]), seed=ctx.seed, say=ctx.say))


def _throughput_part(ctx: Context) -> Iterator[dict[str, Any]]:
    """Training tokens/s of every setup at 512 tokens, one after the other in this run (its own part,
    so that it can run alone on a quiet machine)."""
    setups = {k: v for k, v in trained_setups().items() if ctx.wants(k)}
    ctx.plan(len(setups))
    for name, setup in setups.items():
        ctx.step(f"throughput {name}")
        yield guarded_record({"part": "throughput", "method": name},
                             lambda name=name, setup=setup: {"part": "throughput", "method": name, "length": 512,
                                                             "tokens_per_s": training_throughput(setup, seed=ctx.seed),
                                                             "status": "ok"})


# -- prefill: the trainable methods' speed against SDPA in one run -----------------------------------


#: entries that compute another function than softmax attention over kept keys (the grouped
#: softmax; NSA's gated mix of three branches): their error and mass recall against dense
#: attention say nothing about them (each is tested against its own float64 formula)
OWN_FUNCTION = ("landmark_trained", "nsa (three branches)")
#: token-level selectors (no block structure), run at no more than 8k tokens
TOKEN_LEVEL = ("dsa_indexer (identity)",)


def prefill_entries(budget: int, block: int = 64) -> dict[str, Any]:
    """The trainable methods at ``budget`` keys per query (``block``-token blocks; their learned
    parts absent: NSA with fixed gates, the DSA indexer parameter-free) — what their kernels cost."""
    n = max(1, budget // block)
    return {
        "moba": longattn.method("moba", block=block, top_k=n, q_block=block),
        "nsa (selected branch)": longattn.method("nsa", block=block, top_n=n, local=1, compress_block=block,
                                                 compress_stride=block // 2, q_block=block, gates=(0.0, 1.0, 0.0)),
        "nsa (three branches)": longattn.method("nsa", block=block, top_n=n, local=1, compress_block=block,
                                                compress_stride=block // 2, q_block=block, window=block,
                                                gates=(1 / 3, 1 / 3, 1 / 3)),
        "dsa_indexer (identity)": longattn.method("dsa_indexer", budget=budget),
        "landmark_trained": longattn.method("landmark_trained", block=block, top_k=max(1, n - 1)),
    }


def _prefill_part(ctx: Context) -> Iterator[dict[str, Any]]:
    """Causal prefill of random clustered q/k/v (the sparse suite's inputs) at ~10% density:
    SDPA first, every method after it in the same run (``sparse_speed.run_prefill``)."""
    from longattn.bench.sparse_speed import budget_for_density, run_prefill

    o = ctx.options
    block_tokens = int(o["prefill_tokens"])
    # the DSA indexer scores every (query, key) pair in eager code (23 s at 8k here, against SDPA's
    # 0.55 s; a 32k call did not finish in four minutes), so it runs at no more than 8k tokens
    # against its own SDPA
    token_tokens = min(block_tokens, 8192)
    length_of = {k: token_tokens if k in TOKEN_LEVEL else block_tokens
                 for k in prefill_entries(1024) if ctx.wants(k)}
    lengths = sorted(set(length_of.values()), reverse=True)
    ctx.plan(len(length_of) + len(lengths))
    for tokens in lengths:
        entries = prefill_entries(budget_for_density(tokens, 0.10))
        chosen = {k: entries[k] for k, t in length_of.items() if t == tokens}
        for rec in run_prefill(tokens, 0.10, methods=chosen, repeats=int(o["prefill_repeats"]), seed=ctx.seed,
                               progress=ctx.say):
            ctx.step(f"prefill {rec['method']}")
            if rec["method"] in OWN_FUNCTION:
                rec["recall"] = rec["rel_err"] = None
            yield {"part": "prefill", **rec}


# -- the declaration ------------------------------------------------------------------------------


def _about(results: dict[str, Any]) -> str:
    o = results["config"]
    return "\n".join([
        "Sparse attention a model learns, trained here at ≤ 512 tokens.",
        "",
        f"- landmark: passkey accuracy (exact match of the 7 digits, teacher-forced), {o.get('n')} samples per "
        "(length, depth); `landmark_trained` runs in the bundled landmark model (2 layers × 4 heads, landmark every "
        "64 tokens, trained with the grouped softmax), the other rows in the shipped retrieval model (same size and "
        "recipe, no landmarks)",
        f"- retrofit: stories260K frozen; its q/k captured on {o.get('retrofit_train')} stories to fit one lightning "
        f"indexer per layer ({o.get('retrofit_steps')} Adam steps), recall measured on {o.get('retrofit_eval')} other "
        f"stories: the share of each head's dense attention mass on the {o.get('budget')} keys kept, over queries "
        "with more earlier keys than that, and the next-token NLL of those stories with the selector in every layer",
        f"- trained: the retrieval model's architecture trained {o.get('train_steps')} steps on the retrieval "
        "curriculum with each method; passkey at depth 0.5 and MQAR (8 pairs) at and past the trained length, with the method "
        "it was trained with (landmark: top-4 retrieval)",
        "- memory: the landmark model reads each passkey sample a block (64 tokens) per step through one "
        "LandmarkMemory per layer (top-4 retrieval; closed blocks on the host, past 8,192 tokens per layer on "
        "disk); peak hot tokens = the most k/v tokens one step of one layer held (fetched blocks + open block + "
        "chunk), host/disk MiB per layer at the end of a sample",
        f"- stories: stories260K (float32) fine-tuned {o.get('stories_steps')} AdamW steps (4,096 tokens each, "
        f"512-token windows, lr {o.get('stories_lr')}) on {o.get('stories_corpus')} tokens of its own sampled 512-token windows with each method "
        "(MoBA and NSA as in `trained`; NSA's learned parts start fresh), next-token NLL of "
        f"{o.get('stories_held_out')} other sampled tokens (consecutive windows joined) read in windows of each length, "
        "before and after",
        f"- prefill: causal prefill of {o.get('prefill_tokens')} random clustered tokens (8 heads × 64) at ~10% "
        "density, each method against torch SDPA timed in the same run (learned parts absent: NSA with fixed gates, "
        "the DSA indexer parameter-free); `landmark_trained` and NSA's three branches compute their own functions, "
        "so no error or recall against dense attention is given for them",
        "- throughput: training steps at 512 tokens (4,096 per step, next-token loss on every token), the median of "
        "6 after a warm-up, every method in the same run",
    ])


def _passkey_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    recs = [r for r in results["records"] if r.get("part") == "landmark" and r.get("accuracy") is not None]
    rows = []
    for method, length in dict.fromkeys((r["method"], r["length"]) for r in recs):
        accs = [r["accuracy"] for r in recs if (r["method"], r["length"]) == (method, length)]
        rows.append({"method": method, "length": length, "accuracy": sum(accs) / len(accs)})
    return rows


SUITE = Suite(
    name="trainable",
    title="longattn trainable sparse attention suite",
    about=_about,
    parts=(Part("landmark", _landmark_part, methods=lambda o: list(landmark_entries())),
           Part("memory", _memory_part),
           Part("retrofit", _retrofit_part),
           Part("trained", _trained_part, methods=lambda o: list(trained_setups())),
           Part("stories", _stories_part,
                methods=lambda o: [k for k, v in trained_setups().items() if not v.get("landmarks")]),
           Part("throughput", _throughput_part, methods=lambda o: list(trained_setups())),
           Part("prefill", _prefill_part, methods=lambda o: list(prefill_entries(1024)))),
    quick=QUICK,
    full=FULL,
    describe=lambda r: f"{r.get('part')} / {r.get('method')}" + (f", {r['length']} tokens" if r.get("length") else ""),
    live=(Column("accuracy", "accuracy", ".2f"), Column("recall", "recall", ".3f")),
    tables=(
        Table("Passkey by landmark retrieval (accuracy, mean over depths)", source=_passkey_rows,
              pivot=Pivot(label("method", "method"), "length", Column("", "accuracy", ".2f"))),
        Table("Passkey accuracy by depth", part="landmark", console=False, html=False,
              pivot=Pivot(label("method · length", lambda r: f"{r['method']} · {r['length']}"), "depth",
                          Column("", "accuracy", ".2f"), col_header=lambda d: f"depth {d}")),
        Table("Landmark retrieval with the context in a LandmarkMemory (per layer)", source=_memory_rows,
              columns=(label("method", "method"), Column("length", "length", ".0f"),
                       Column("tokens with landmarks", "context_tokens", ",.0f"),
                       Column("accuracy", "accuracy", ".2f"), Column("peak hot tokens", "peak_hot_tokens", ",.0f"),
                       Column("host MiB", "host_mib", ".2f"), Column("disk MiB", "disk_mib", ".2f"),
                       Column("ms / token", "ms_per_token", ".3f"), status_column())),
        Table("DSA indexer retrofit on stories260K (attention-mass recall)", part="retrofit",
              columns=(label("selector", "method"), Column("keys kept", "budget", ".0f"), Column("recall", "recall", ".3f"),
                       Column("NLL (nats)", "nll", ".4f"),
                       Column("KL before", "kl_before", ".3f"), Column("KL after", "kl_after", ".3f"),
                       status_column())),
        Table("Trained from scratch in the same budget", part="trained",
              columns=(label("method", "method"), Column("steps", "steps", ".0f"),
                       Column("density@512", "density@512", ".2f"), Column("passkey@512", "passkey@512", ".2f"),
                       Column("passkey@2k", "passkey@2048", ".2f"), Column("passkey@8k", "passkey@8192", ".2f"),
                       Column("mqar@512", "mqar@512", ".2f"), Column("mqar@2k", "mqar@2048", ".2f"),
                       Column("mqar@8k", "mqar@8192", ".2f"), status_column())),
        Table("stories260K fine-tuned with each method (held-out NLL, nats)", part="stories",
              columns=(label("method", "method"), Column("steps", "steps", ".0f"),
                       Column("NLL@512 before", "nll_before@512", ".4f"), Column("NLL@512 after", "nll@512", ".4f"),
                       Column("NLL@2k before", "nll_before@2048", ".4f"), Column("NLL@2k after", "nll@2048", ".4f"),
                       Column("tokens/s", "tokens_per_s", ",.0f"), status_column())),
        Table("Prefill at ~10% causal density against SDPA (same run)", part="prefill",
              columns=(label("method", "method"), Column("tokens", "tokens", ".0f"), Column("density", "density", ".3f"),
                       Column("recall", "recall", ".3f"), Column("rel. error", "rel_err", ".3f"),
                       Column("median s", "median_s", ".3f"), Column("× SDPA", "ratio_to_sdpa", ".2f"),
                       status_column())),
        Table("Training throughput at 512 tokens (same run)", part="throughput",
              columns=(label("method", "method"), Column("tokens/s", "tokens_per_s", ",.0f"), status_column())),
    ),
)
