"""Side by side: longattn's KV-cache eviction (``longattn.hf.LongattnCache``) against NVIDIA's
``kvpress`` presses, on the same model, text and KV budget.

Both sides read stories260K's own sampled stories (``longattn.bench.tasks.stories_text``, one
seed per prompt, so both processes see the same tokens; each record carries a hash of its text).
For every prompt of ``prompt_len`` tokens (BOS first) and the ``cont_len + 1`` tokens after it:

1. **prefill + compression**: the prompt goes through the model in one call; the cache keeps
   ``budget`` tokens per layer and key head.
2. **continuation**: tokens ``prompt_len … prompt_len+cont_len-1`` go through the model in *one*
   teacher-forced forward call on the compressed cache, and the score is the mean negative
   log-likelihood (nats/token, float64 log-softmax) of tokens ``prompt_len+1 … prompt_len+cont_len``.
   Every scored token is thus predicted by a query that sees the compressed prompt (the
   prediction of token ``prompt_len`` itself comes from the prefill, where nothing has been
   dropped yet, so it is left out). ``nll_full`` is the same with the uncompressed cache.

All positions stay below ``prompt_len + cont_len`` ≤ 512, stories260K's trained length.

The two sides need different transformers releases (kvpress 0.5.5 pins ``transformers<5.3``
and fails on 5.23), so each side runs in its own process and writes its own JSON file:

* ``PYTHONPATH=/tmp/kvp52 python -m longattn.bench.kvpress_side run --side kvpress --out a.json``
  (``/tmp/kvp52`` holds transformers 5.2.0, kvpress 0.5.5 and their pure-python dependencies,
  installed ``--target`` and ``--no-deps`` by ``scripts/kvpress_side_by_side.sh``);
* ``python -m longattn.bench.kvpress_side run --side longattn --out b.json``;
* ``python -m longattn.bench.kvpress_side table a.json b.json`` prints the markdown table.

Differences that remain between the sides (both are in the records):

* kvpress compresses only at prefill: during the continuation its cache grows to
  ``budget + cont_len`` tokens. longattn's cache stays bounded at ``budget`` throughout, so its
  last continuation queries see fewer keys than kvpress's.
* kvpress keeps the kept keys at their original RoPE positions and the continuation is fed with
  explicit ``position_ids`` (as kvpress's own pipeline does); longattn by default re-rotates kept
  keys to positions within the kept layout (``positions="cache"``).
* kvpress compresses each layer after its attention over the whole prompt; longattn evicts as
  the prompt's tokens arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from longattn.files import atomic_write_text

#: stories260K's trained context: prompt_len + cont_len must stay within it
TRAINED_LENGTH = 512
#: kvpress presses run by default (class names in ``kvpress``); ObservedAttentionPress is the
#: H2O-like one (mean attention received, from the eager attention weights)
DEFAULT_PRESSES = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "ObservedAttentionPress", "KnormPress")
#: presses that score from the attention weights of the layer's own forward (eager attention)
EAGER_PRESSES = frozenset({"ObservedAttentionPress"})
#: longattn ``LongattnCache`` policies run by default (``full`` is the reference)
DEFAULT_POLICIES = ("full", "streaming", "h2o", "snapkv", "tova")


# --------------------------------------------------------------------------- shared pieces
def _model_dir(path: str | Path | None) -> Path:
    """``path``, else the bundled stories260K (``longattn.models.stories260k()``)."""
    if path is not None:
        return Path(path)
    from longattn.models import stories260k

    return stories260k()


def _load(model_dir: Path, attn_implementation: str = "sdpa"):
    """stories260K as a float32 ``LlamaForCausalLM`` through the repo's loader."""
    from longattn.hf import load_llama2c

    model, _tok = load_llama2c(model_dir, dtype=torch.float32, attn_implementation=attn_implementation)
    return model


def _texts(prompt_len: int, cont_len: int, n_prompts: int, seed: int) -> list[torch.Tensor]:
    """``n_prompts`` token rows ``[1, prompt_len + cont_len + 1]`` of stories260K's own stories,
    row ``i`` sampled with seed ``seed + i`` (BOS first)."""
    if prompt_len < 1 or cont_len < 1 or n_prompts < 1:
        raise ValueError(f"prompt_len, cont_len and n_prompts must be >= 1, got {prompt_len}, {cont_len}, {n_prompts}")
    if prompt_len + cont_len > TRAINED_LENGTH:
        raise ValueError(f"prompt_len + cont_len = {prompt_len + cont_len} exceeds stories260K's trained "
                         f"length {TRAINED_LENGTH}")
    from longattn.bench.tasks import stories_text

    return [stories_text(prompt_len + cont_len + 1, seed + i)[1] for i in range(n_prompts)]


def _text_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(json.dumps(tokens[0].tolist()).encode()).hexdigest()[:16]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of ``targets [1, T]`` under ``logits [1, T, V]``."""
    logp = torch.log_softmax(logits[0].double(), -1)
    return float(-logp.gather(-1, targets[0, :, None]).mean())


def _dynamic_cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a transformers ``DynamicCache`` holds (all layers)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _tokens_per_head(cache) -> float:
    """Mean tokens held per layer and key head of a ``DynamicCache``."""
    lens = [layer.keys.shape[-2] for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    return sum(lens) / len(lens) if lens else 0.0


@contextlib.contextmanager
def _kv_peak(model, nbytes: Callable[[Any], int]) -> Iterator[list[int]]:
    """Track the most KV bytes the cache holds at the exit of any attention layer.

    Registers a forward hook on every decoder layer's ``self_attn`` that reads the cache passed
    as ``past_key_values`` and records ``nbytes(cache)``. Entered *before* a kvpress press, its
    hooks run before the press's, so they see each layer's full prompt keys just before that
    layer is compressed (the transient peak of prefill compression). Yields a one-item list
    holding the maximum."""
    peak = [0]

    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is not None:
            peak[0] = max(peak[0], int(nbytes(cache)))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        yield peak
    finally:
        for h in handles:
            h.remove()


def _versions() -> dict[str, Any]:
    import transformers

    import longattn

    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "longattn": longattn.__version__, "torch_threads": torch.get_num_threads(),
                           "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version

        out["kvpress"] = version("kvpress")
    except Exception:  # noqa: BLE001 - kvpress is absent on the longattn side
        pass
    return out


def _repeat(run: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    """``run()`` ``repeats`` times (each on a fresh cache): the first result, with ``prefill_s`` and
    ``continuation_s`` the minimum over the runs (the machine is shared; the figures are
    deterministic otherwise) and ``repeats`` recorded."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = [run() for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("prefill_s", "continuation_s"):
        out[key] = min(r[key] for r in runs)
    out["repeats"] = repeats
    return out


def _record(side: str, method: str, *, budget: int | None, prompt_len: int, cont_len: int, prompt: int, seed: int,
            text: torch.Tensor, **fields: Any) -> dict[str, Any]:
    return {"side": side, "method": method, "budget": budget, "prompt_len": prompt_len, "cont_len": cont_len,
            "prompt": prompt, "seed": seed + prompt, "text_sha": _text_hash(text), **fields}


# --------------------------------------------------------------------------- kvpress side
def compression_ratio_for(budget: int, prompt_len: int) -> float:
    """The ``compression_ratio`` that makes a kvpress ``ScorerPress`` keep exactly ``budget`` of
    ``prompt_len`` tokens. kvpress keeps ``int(prompt_len * (1 - ratio))``; the plain
    ``1 - budget / prompt_len`` can truncate to ``budget - 1`` (384 tokens, budget 128 → 127),
    so the ratio aims half a token above ``budget``."""
    if not 0 < budget < prompt_len:
        raise ValueError(f"budget must be in (0, prompt_len={prompt_len}), got {budget}")
    ratio = 1.0 - (budget + 0.5) / prompt_len
    assert int(prompt_len * (1.0 - ratio)) == budget
    return ratio


def make_press(name: str, budget: int, prompt_len: int):
    """The kvpress press called ``name`` (a class of the ``kvpress`` package taking
    ``compression_ratio``), set to keep ``budget`` of ``prompt_len`` tokens, with kvpress's
    default parameters otherwise (StreamingLLM: 4 sinks; SnapKV: window 64, kernel 5)."""
    import kvpress

    cls = getattr(kvpress, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, kvpress.BasePress):
        raise ValueError(f"kvpress has no press {name!r}")
    return cls(compression_ratio=compression_ratio_for(budget, prompt_len))


def _kvpress_pass(model, press, text: torch.Tensor, prompt_len: int, cont_len: int) -> dict[str, Any]:
    """One prompt through ``model`` with ``press`` (None: uncompressed ``DynamicCache``)."""
    from transformers import DynamicCache

    prompt, cont = text[:, :prompt_len], text[:, prompt_len:prompt_len + cont_len]
    targets = text[:, prompt_len + 1:prompt_len + cont_len + 1]
    cache = DynamicCache()
    with torch.no_grad(), _kv_peak(model, _dynamic_cache_bytes) as peak:
        # the press's hooks go on after the peak tracker's, so the tracker sees uncompressed layers
        t0 = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            model(input_ids=prompt, past_key_values=cache, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        kv_bytes, kept = _dynamic_cache_bytes(cache), _tokens_per_head(cache)
        # kept keys keep their original positions: feed the continuation at prompt_len… (as
        # kvpress's pipeline feeds a question after the compressed context)
        position_ids = torch.arange(prompt_len, prompt_len + cont_len)[None]
        t0 = time.perf_counter()
        out = model(input_ids=cont, past_key_values=cache, position_ids=position_ids)
        cont_s = time.perf_counter() - t0
    return {"nll": _nll(out.logits, targets), "kv_bytes": kv_bytes, "tokens_kept": kept,
            "kv_bytes_end": _dynamic_cache_bytes(cache), "tokens_end": _tokens_per_head(cache),
            "kv_peak_bytes": max(peak[0], _dynamic_cache_bytes(cache)), "prefill_s": prefill_s,
            "continuation_s": cont_s}


def run_kvpress(presses: Sequence[str] = DEFAULT_PRESSES, prompt_len: int = 384, cont_len: int = 64,
                budget: int = 128, n_prompts: int = 4, seed: int = 0, *, model_dir: str | Path | None = None,
                repeats: int = 3,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Records of each kvpress press (and ``full``, the uncompressed ``DynamicCache``) on
    ``n_prompts`` prompts: ``nll`` (continuation, compressed), ``nll_full`` (same prompt,
    uncompressed), ``kv_bytes`` / ``tokens_kept`` after prefill + compression, ``kv_bytes_end`` /
    ``tokens_end`` after the continuation, ``kv_peak_bytes`` (largest seen at any attention-layer
    exit, including the one full layer a press holds before compressing it), ``prefill_s`` and
    ``continuation_s``.

    Each press is applied the documented kvpress way, ``with press(model): model(prompt,
    past_key_values=cache)``; the continuation is one teacher-forced forward call after the
    context manager has exited. ``ObservedAttentionPress`` (H2O-like) needs the attention
    weights, so it runs on an eager-attention copy of the model; the rest run on SDPA.
    Each pass runs ``repeats`` times; times are the minimum (see ``_repeat``).
    Needs transformers < 5.3 (kvpress 0.5.5's pin): run with ``PYTHONPATH=/tmp/kvp52``."""
    import importlib

    try:  # fail early; kvpress patches transformers' attention functions on import
        importlib.import_module("kvpress")
    except ImportError as e:
        raise ImportError("the kvpress side needs kvpress 0.5.5 with transformers 5.2.0 on PYTHONPATH "
                          "(scripts/kvpress_side_by_side.sh installs them into /tmp/kvp52)") from e

    say = progress or (lambda msg: None)
    mdir = _model_dir(model_dir)
    texts = _texts(prompt_len, cont_len, n_prompts, seed)
    models: dict[str, Any] = {}

    def model_for(impl: str):
        if impl not in models:
            models[impl] = _load(mdir, impl)
            _kvpress_pass(models[impl], None, texts[0], prompt_len, cont_len)  # warm-up, untimed
        return models[impl]

    base = dict(budget=budget, prompt_len=prompt_len, cont_len=cont_len, seed=seed)
    records: list[dict[str, Any]] = []
    full = []
    for i, text in enumerate(texts):
        say(f"kvpress: full cache, prompt {i}")
        r = _repeat(lambda: _kvpress_pass(model_for("sdpa"), None, text, prompt_len, cont_len), repeats)
        full.append(r["nll"])
        records.append(_record("kvpress", "full", **{**base, "budget": None}, prompt=i, text=text, **r,
                               nll_full=r["nll"], attn_implementation="sdpa", press=None))
    for name in presses:
        impl = "eager" if name in EAGER_PRESSES else "sdpa"
        press = make_press(name, budget, prompt_len)
        for i, text in enumerate(texts):
            say(f"kvpress: {name}, prompt {i}")
            r = _repeat(lambda: _kvpress_pass(model_for(impl), press, text, prompt_len, cont_len), repeats)
            records.append(_record("kvpress", name, **base, prompt=i, text=text, **r, nll_full=full[i],
                                   attn_implementation=impl, press=repr(press)))
    return records


# --------------------------------------------------------------------------- longattn side
def _longattn_pass(model, policy: str, budget: int | None, text: torch.Tensor, prompt_len: int,
                   cont_len: int) -> dict[str, Any]:
    """One prompt through ``model`` (already under ``longattn.hf.apply``) with a fresh
    ``LongattnCache(policy, budget)``."""
    from longattn.hf import LongattnCache

    def held(cache) -> int:
        return int(cache.stats()["kv_bytes"])

    def per_head(stats) -> float:
        rows = [t for layer in stats["tokens"] for t in layer]
        return sum(rows) / len(rows) if rows else 0.0

    prompt, cont = text[:, :prompt_len], text[:, prompt_len:prompt_len + cont_len]
    targets = text[:, prompt_len + 1:prompt_len + cont_len + 1]
    cache = LongattnCache(model, policy=policy, budget=budget)
    with torch.no_grad(), _kv_peak(model, held) as peak:
        t0 = time.perf_counter()
        model(input_ids=prompt, past_key_values=cache, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        after = cache.stats()
        t0 = time.perf_counter()
        out = model(input_ids=cont, past_key_values=cache)
        cont_s = time.perf_counter() - t0
    end = cache.stats()
    return {"nll": _nll(out.logits, targets), "kv_bytes": int(after["kv_bytes"]), "tokens_kept": per_head(after),
            "kv_bytes_end": int(end["kv_bytes"]), "tokens_end": per_head(end),
            "kv_peak_bytes": max(peak[0], int(after["kv_bytes"]), int(end["kv_bytes"])),
            "prefill_s": prefill_s, "continuation_s": cont_s, "cache_spec": dict(cache.spec)}


def run_longattn(policies: Sequence[str] = DEFAULT_POLICIES, prompt_len: int = 384, cont_len: int = 64,
                 budget: int = 128, n_prompts: int = 4, seed: int = 0, *, model_dir: str | Path | None = None,
                 repeats: int = 3,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of ``run_kvpress`` for longattn's ``LongattnCache`` policies (``full``,
    ``streaming``, ``h2o``, ``snapkv``, ``tova``, …) on the same prompts, under
    ``longattn.hf.apply(model, "dense")``. The cache evicts during prefill whenever it holds more
    than ``budget`` tokens per key head and stays bounded during the continuation (one
    teacher-forced forward call, positions chosen by the cache). ``nll_full`` comes from the
    ``full`` policy on the same prompt; ``kv_peak_bytes`` is the largest ``stats()["kv_bytes"]``
    seen at any attention-layer exit. Each pass runs ``repeats`` times; times are the minimum."""
    from longattn.hf import apply

    say = progress or (lambda msg: None)
    model = _load(_model_dir(model_dir))
    texts = _texts(prompt_len, cont_len, n_prompts, seed)
    base = dict(prompt_len=prompt_len, cont_len=cont_len, seed=seed)
    records: list[dict[str, Any]] = []
    with apply(model, "dense"):
        _longattn_pass(model, "full", None, texts[0], prompt_len, cont_len)  # warm-up, untimed
        full = []
        for i, text in enumerate(texts):
            say(f"longattn: full, prompt {i}")
            r = _repeat(lambda: _longattn_pass(model, "full", None, text, prompt_len, cont_len), repeats)
            full.append(r["nll"])
            if "full" in policies:
                records.append(_record("longattn", "full", budget=None, **base, prompt=i, text=text, **r,
                                       nll_full=r["nll"]))
        for name in policies:
            if name == "full":
                continue
            for i, text in enumerate(texts):
                say(f"longattn: {name}, prompt {i}")
                r = _repeat(lambda: _longattn_pass(model, name, budget, text, prompt_len, cont_len), repeats)
                records.append(_record("longattn", name, budget=budget, **base, prompt=i, text=text, **r,
                                       nll_full=full[i]))
    return records


# --------------------------------------------------------------------------- table
def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The records of one or more JSON files written by ``main`` (``{"records": [...]}``)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        out.extend(data["records"] if isinstance(data, dict) else data)
    return out


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``records``: one row per (side, method, budget), each figure the mean
    over prompts. A note follows when the two sides did not read the same texts."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["side"], r["method"], r["budget"])].append(r)

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else math.nan

    lines = ["| method | budget | tokens kept (prefill → end) | continuation NLL | NLL full cache | Δ NLL "
             "| KV bytes (kept) | KV bytes end | KV peak bytes | prefill s | continuation s | n |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (side, method, budget), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] is not None,
                                                                                kv[0][1])):
        nll, ref = mean(rows, "nll"), mean(rows, "nll_full")
        lines.append(
            f"| {side}/{method} | {'—' if budget is None else budget} "
            f"| {mean(rows, 'tokens_kept'):.0f} → {mean(rows, 'tokens_end'):.0f} | {nll:.4f} | {ref:.4f} "
            f"| {nll - ref:+.4f} | {mean(rows, 'kv_bytes'):,.0f} | {mean(rows, 'kv_bytes_end'):,.0f} "
            f"| {mean(rows, 'kv_peak_bytes'):,.0f} | {mean(rows, 'prefill_s'):.4f} "
            f"| {mean(rows, 'continuation_s'):.4f} | {len(rows)} |")
    texts: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        texts[(r["prompt_len"], r["cont_len"], r["seed"])].add(r["text_sha"])
    if any(len(v) > 1 for v in texts.values()):
        lines.append("\n**Note:** the records do not all share the same texts (text_sha differs for one seed).")
    return "\n".join(lines)


def merge_markdown(path_a: str | Path, path_b: str | Path) -> str:
    """The markdown table of two JSON files (typically the kvpress side and the longattn side)."""
    return markdown_table(load_records([path_a, path_b]))


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``run --side kvpress|longattn --out FILE`` (one side per process: the sides need
    different transformers releases) or ``table FILE [FILE …] [--out table.md]``."""
    ap = argparse.ArgumentParser(prog="python -m longattn.bench.kvpress_side", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one side and write its JSON records")
    run.add_argument("--side", choices=("kvpress", "longattn"), required=True)
    run.add_argument("--out", required=True, help="JSON file to write")
    run.add_argument("--methods", nargs="*", default=None,
                     help=f"kvpress press class names (default {' '.join(DEFAULT_PRESSES)}) or longattn "
                          f"policies (default {' '.join(DEFAULT_POLICIES)})")
    run.add_argument("--prompt-len", type=int, default=384)
    run.add_argument("--cont-len", type=int, default=64)
    run.add_argument("--budget", type=int, default=128)
    run.add_argument("--n-prompts", type=int, default=4)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--repeats", type=int, default=3, help="timed runs per prompt; the minimum time is kept")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    run.add_argument("--model-dir", default=None, help="stories260K folder (default: longattn's lookup)")
    tab = sub.add_parser("table", help="merge JSON files into a markdown table")
    tab.add_argument("files", nargs="+")
    tab.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    if args.cmd == "table":
        md = markdown_table(load_records(args.files))
        print(md)
        if args.out:
            atomic_write_text(args.out, md + "\n")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    kw = dict(prompt_len=args.prompt_len, cont_len=args.cont_len, budget=args.budget, n_prompts=args.n_prompts,
              seed=args.seed, model_dir=args.model_dir, repeats=args.repeats, progress=say)
    if args.side == "kvpress":
        records = run_kvpress(args.methods or DEFAULT_PRESSES, **kw)
    else:
        records = run_longattn(args.methods or DEFAULT_POLICIES, **kw)
    config = {k: v for k, v in kw.items() if k != "progress"}
    payload = {"side": args.side, "config": config, "versions": _versions(), "records": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=1, default=str))
    say(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
