"""The ``memory`` suite: what the KV memory (``longattn.hf.LongattnCache``) keeps, costs and loses.

``longattn bench --suite memory`` runs it alone (also part of the main job). Two parts:

* **policies** — the real stories260K model (512-token context) reads ``policy_tokens`` of its own
  TinyStories-like text in 64-token chunks, then ``continuation`` more tokens teacher-forced; per
  policy at ``budget`` keys per key head: the continuation's NLL (the full cache is the
  reference; on text 4–8× the trained length the bounded policies, whose keys take positions
  inside the kept cache, do *better* than the full cache), tokens kept per layer and key head,
  KV bytes now and at the peak, and time. ``retrieval`` (RetrievalAttention) runs twice: with the
  ANN library installed here (faiss-cpu, else hnswlib) and with the exact index, and reports the
  index's recall against exact ranking.
* **long_decode** — a tiny random Llama (2 layers, 2 key heads, head_dim 16) reads a
  ``prompt``-token prompt (``lengths``) in 2048-token chunks into a tiered cache (fast tier
  bounded, host, disk spill) and decodes greedily: the fast tier's peak tokens against its
  budget, bytes per tier, the process's RSS growth (``harness.PeakRSS``, approximate), prefill
  and per-token decode time, and whether a saved and reloaded memory gives bit-identical
  next-token logits. ``blocks`` (Quest block retrieval) and ``retrieval`` (per-token ANN
  retrieval, recall measured on the decode steps) run at every length.

Quick (the main job's sizes): 2048 + 256 policy tokens and a 32k-token prompt; ``full`` reads a
131072-token prompt (128k).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from longattn.bench import harness
from longattn.bench.suite import Column, Context, Part, Suite, Table, guarded_record, label, status_column

QUICK_PROMPTS = (32768,)
FULL_PROMPTS = (131072,)
LONG_POLICIES = ("blocks", "retrieval")


def tiny_llama(max_positions: int, seed: int = 0):
    """A random-initialised 2-layer Llama (GQA 4:2, head_dim 16) that accepts ``max_positions``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions)
    return transformers.LlamaForCausalLM(cfg).eval()


def policy_configs(budget: int, n_layers: int, n_kv: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """``label -> (LongattnCache policy, its parameters)`` at ``budget`` keys per key head.

    The paged policies spend the budget as 32 sink tokens + a window + 64 retrieved tokens (two
    32-token pages for ``blocks``/``longheads``, 64 single tokens for ``retrieval``); ``heads``
    gives half of each layer's key heads the full context."""
    if budget < 128:
        raise ValueError(f"budget must be >= 128 keys per head (32 sinks + 64 retrieved + a window), got {budget}")
    paged = dict(page=32, sinks=32, window=budget - 96)
    return {
        "full": ("full", {}),
        "streaming": ("streaming", dict(budget=budget, sinks=4)),
        "h2o": ("h2o", dict(budget=budget)),
        "tova": ("tova", dict(budget=budget)),
        "snapkv": ("snapkv", dict(budget=budget)),
        "heads": ("heads", dict(head_map=[[h < n_kv // 2 for h in range(n_kv)]] * n_layers, sinks=4,
                                window=budget - 4)),
        "blocks": ("blocks", dict(paged, topk=2)),
        "longheads": ("longheads", dict(paged, topk=2)),
        "retrieval": ("retrieval", dict(paged, retrieve=64, exact_chunks=False, measure_recall=True)),
        "retrieval-exact": ("retrieval", dict(paged, retrieve=64, backend="exact")),
    }


def run_policies(tokens: int = 2048, cont: int = 256, budget: int = 256, seed: int = 0, methods=None,
                 say=print) -> Iterator[dict[str, Any]]:
    """stories260K: read ``tokens`` of its own text, then teacher-force ``cont`` more, per policy
    (one record each, ``nll_vs_full`` against the ``full`` policy when it ran first)."""
    import longattn.hf as hf
    from longattn.bench.tasks import stories_text

    _, text = stories_text(tokens + cont, seed)
    model, _ = hf.load_llama2c()
    model = model.float().eval()
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    configs = policy_configs(budget, n_layers, n_kv)
    if methods:
        configs = {k: v for k, v in configs.items() if k in methods}
    full_nll = None
    with torch.no_grad(), hf.apply(model, "dense"):
        for label, (policy, kw) in configs.items():
            cache = hf.LongattnCache(model, policy, **kw)
            t0 = time.perf_counter()
            peak = 0  # the most KV bytes the cache held after any step
            for i in range(0, tokens, 64):
                model(text[:, i:i + 64], past_key_values=cache)
                peak = max(peak, cache.stats()["kv_bytes"])
            prefill_s = time.perf_counter() - t0
            parts = []
            for i in range(tokens, tokens + cont, 64):
                parts.append(model(text[:, i:i + 64], past_key_values=cache).logits)
                peak = max(peak, cache.stats()["kv_bytes"])
            logits = torch.cat(parts, 1)
            lp = torch.log_softmax(logits[0, :-1].double(), -1)
            nll = float(-lp.gather(-1, text[0, tokens + 1:tokens + cont, None]).mean())
            s = cache.stats()
            if label == "full":
                full_nll = nll
            yield {
                "suite": "memory", "test": "policies", "policy": label, "budget": None if label == "full" else budget,
                "backend": cache.spec.get("backend"), "tokens": tokens, "continuation": cont, "nll": nll,
                "perplexity": math.exp(nll), "recall": s.get("recall"), "tokens_kept": s["tokens"],
                "kv_bytes": s["kv_bytes"], "peak_kv_bytes": peak, "fast_bytes": s["fast_bytes"],
                "index_bytes": s["index_bytes"], "prefill_s": prefill_s, "wall_s": time.perf_counter() - t0,
                "nll_vs_full": None if full_nll is None else nll - full_nll, "status": "ok"}


def run_long_decode(prompt: int = 131072, policy: str = "blocks", chunk: int = 2048, decode: int = 32,
                    page: int = 64, sinks: int = 64, window: int = 256, topk: int = 8, host_tokens: int = 8192,
                    seed: int = 0, say=print) -> dict[str, Any]:
    """A ``prompt``-token prefill and ``decode`` greedy tokens through a tiered ``policy`` cache
    (``blocks``: ``topk`` pages; ``retrieval``: ``topk·page`` tokens, recall measured while decoding)."""
    import longattn.hf as hf
    from longattn.memory.retrieval import RetrievalMemory

    if policy not in LONG_POLICIES:
        raise ValueError(f"policy must be one of {LONG_POLICIES}, got {policy!r}")
    model = tiny_llama(prompt + decode + 1, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (1, prompt), generator=g)
    with tempfile.TemporaryDirectory(prefix="longattn-bench-") as tmp, torch.no_grad(), hf.apply(model, "dense"), \
            harness.PeakRSS(interval=0.005, trim=True) as rss:
        kw = dict(page=page, sinks=sinks, window=window, host_tokens=host_tokens, disk_dir=Path(tmp) / "tiers")
        if policy == "blocks":
            kw["topk"] = topk
        else:  # the same number of keys per step, as single tokens
            kw["retrieve"] = topk * page
        cache = hf.LongattnCache(model, policy, **kw)
        t0 = time.perf_counter()
        for i in range(0, prompt, chunk):
            out = model(ids[:, i:i + chunk], past_key_values=cache)
            if (i // chunk) % 16 == 15:
                say(f"  {policy}: prefill {i + chunk}/{prompt} tokens, fast tier peak "
                    f"{cache.stats()['peak_fast_tokens']} tokens ({time.perf_counter() - t0:.0f} s)")
        prefill_s = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        saved = Path(tmp) / "memory.safetensors"
        cache.save(saved)  # right after the prompt
        first = nxt
        for mem in cache.memories:  # recall of the decode steps only (prefill chunks are ranked exactly)
            if isinstance(mem, RetrievalMemory):
                mem.measure_recall = True
        t0 = time.perf_counter()
        for step in range(decode):
            logits = model(nxt, past_key_values=cache).logits
            if step == 0:
                first_logits = logits
            nxt = logits[:, -1:].argmax(-1)
        decode_ms = (time.perf_counter() - t0) / decode * 1e3
        stats = cache.stats()
        # a fresh cache loaded from the file gives the first decode step bit for bit
        again = hf.LongattnCache(model, policy, **{**kw, "disk_dir": Path(tmp) / "tiers2"}).load(saved)
        identical = torch.equal(model(first, past_key_values=again).logits, first_logits)
        file_mib = saved.stat().st_size / 2**20
    per_token = 2 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head_dim × fp32
    rec = {"suite": "memory", "test": "long_decode", "policy": policy, "prompt": prompt, "decode": decode,
           "chunk": chunk, "page": page, "sinks": sinks, "window": window,
           "retrieved_per_step": topk * page, "host_tokens": host_tokens,
           "backend": cache.spec.get("backend"), "recall": stats.get("recall"),
           "fast_budget_tokens": stats["fast_budget_tokens"], "peak_fast_tokens": stats["peak_fast_tokens"],
           "fast_bytes": stats["fast_bytes"], "host_bytes": stats["host_bytes"], "disk_bytes": stats["disk_bytes"],
           "metadata_bytes": stats["metadata_bytes"], "index_bytes": stats["index_bytes"],
           "full_kv_bytes": per_token * (prompt + decode), "prefill_s": prefill_s,
           "decode_ms_per_token": decode_ms, "rss_growth_bytes": rss.peak_bytes, "saved_file_mib": file_mib,
           "reload_bit_identical": bool(identical)}
    # the fast tier's bound is the point of the tiers: a run that broke it is a failure, not a figure
    ok = rec["peak_fast_tokens"] <= rec["fast_budget_tokens"] and rec["reload_bit_identical"]
    rec["status"] = "ok" if ok else "FAILED: fast tier over budget or reload not bit-identical"
    return rec


def _policies_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    ctx.say(f"policies on stories260K: {o['policy_tokens']} + {o['continuation']} tokens, {o['budget']} keys per head")
    yield from run_policies(int(o["policy_tokens"]), int(o["continuation"]), int(o["budget"]), ctx.seed,
                            ctx.methods, ctx.say)


def _long_decode_part(ctx: Context) -> Iterator[dict[str, Any]]:
    o = ctx.options
    prompts = sorted({int(n) for n in o["lengths"]})
    for policy in LONG_POLICIES:
        if not ctx.wants(policy):
            continue
        for n in prompts:
            ctx.say(f"long decode: {policy}, {n}-token prompt")
            base = {"test": "long_decode", "policy": policy, "prompt": n}
            yield guarded_record(base, lambda: run_long_decode(n, policy, decode=int(o["decode"]), seed=ctx.seed,
                                                               say=ctx.say))


def _kept(r) -> str:
    """Tokens kept per key head: one number when every layer and head keeps the same."""
    flat = {t for row in r.get("tokens_kept") or [] for t in row}
    return str(flat.pop()) if len(flat) == 1 else (f"{min(flat)}–{max(flat)}" if flat else "")


def _about(results: dict[str, Any]) -> str:
    from longattn.memory.ann import available_backends

    cfg = results["config"]
    return "\n".join([
        f"- ANN libraries found: {', '.join(available_backends())}",
        f"- policies: stories260K (trained at 512 tokens) reads {cfg['policy_tokens']} tokens of its own text in "
        f"64-token chunks, then {cfg['continuation']} more teacher-forced; NLL of the continuation. Bounded policies "
        f"keep {cfg['budget']} keys per key head with keys at positions inside the kept cache (the full cache keeps "
        "every key at its original position, far past the trained length, hence its higher NLL). `recall`: share "
        "of the exactly-ranked top tokens the ANN index retrieved.",
        "- long decode: a tiny random Llama (2 layers, 2 key heads, head_dim 16) reads the prompt in 2048-token "
        "chunks through a cache with 64-token pages, 64 sink tokens, a 256-token window and 512 retrieved tokens "
        "per step (8 pages for `blocks`, 512 single tokens for `retrieval`); the host tier holds 8192 tokens, older "
        "pages spill to disk. `recall` is measured on the decode steps.",
    ])


def _check(options) -> None:
    prompts = sorted(int(n) for n in options["lengths"])
    if any(n < 4096 for n in prompts):
        raise ValueError(f"--lengths: long-decode prompt lengths must be >= 4096 tokens (the tiers need pages to "
                         f"move), got {prompts}")
    policy_configs(int(options["budget"]), 1, 2)  # the budget's own check


_POLICY = label("policy", "policy")

SUITE = Suite(
    name="memory",
    title="longattn memory suite",
    about=_about,
    parts=(Part("policies", _policies_part, requires=("transformers",),
                methods=lambda o: list(policy_configs(256, 1, 2))),
           Part("long_decode", _long_decode_part, requires=("transformers",), methods=lambda o: list(LONG_POLICIES))),
    quick={"lengths": QUICK_PROMPTS, "policy_tokens": 2048, "continuation": 256, "budget": 256, "decode": 32},
    full={"lengths": FULL_PROMPTS, "policy_tokens": 2048, "continuation": 256, "budget": 256, "decode": 32},
    always=(),
    check=_check,
    describe=lambda r: f"{r.get('test')}: {r.get('policy')}" + (f", prompt {r['prompt']}" if r.get("prompt") else ""),
    live=(Column("NLL", "nll", ".3f"), Column("recall", "recall", ".3f"),
          Column("KV", "kv_bytes", lambda x: None if x is None else f"{x / 1024:,.0f} KiB"),
          Column("prefill", "prefill_s", lambda x: None if x is None else f"{x:.1f} s"),
          Column("decode", "decode_ms_per_token", lambda x: None if x is None else f"{x:.1f} ms/token")),
    tables=(
        Table("KV policies on stories260K (continuation NLL; lower is better)", part="policies",
              columns=(_POLICY, label("index", "backend", keep=4), Column("NLL", "nll", ".3f"),
                       Column("vs full", "nll_vs_full", "+.3f"), Column("recall", "recall", ".3f", keep=3),
                       Column("kept/head", _kept), Column("KV KiB", "kv_bytes", "kib", keep=1),
                       Column("peak KV KiB", "peak_kv_bytes", "kib", keep=2),
                       Column("index KiB", "index_bytes", "kib", keep=5), Column("wall s", "wall_s", ".1f", keep=6))),
        Table("Long prompt through the tiered memory, then decode (tiny random Llama)", part="long_decode",
              columns=(_POLICY, Column("prompt", "prompt", "int"), label("index", "backend", keep=9),
                       Column("fast peak / budget", lambda r: None if r.get("peak_fast_tokens") is None else
                              f"{r['peak_fast_tokens']} / {r['fast_budget_tokens']}", keep=1),
                       Column("host MiB", "host_bytes", "mib", keep=5), Column("disk MiB", "disk_bytes", "mib", keep=4),
                       Column("index MiB", "index_bytes", "mib", keep=8),
                       Column("RSS growth MiB", "rss_growth_bytes", "mib", keep=6),
                       Column("full KV MiB", "full_kv_bytes", "mib", keep=7), Column("prefill s", "prefill_s", ".1f"),
                       Column("decode ms/token", "decode_ms_per_token", ".1f"), Column("recall", "recall", ".3f", 3),
                       label("reload identical", lambda r: None if "reload_bit_identical" not in r else
                             ("yes" if r["reload_bit_identical"] else "NO"), keep=2),
                       status_column(keep=10))),
    ),
)
