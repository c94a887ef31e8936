"""KV-memory measurements: a long decode past the device budget, and the eviction policies side by side.

``python -m longattn.bench.memory --out bench-out/memory`` writes ``memory.json`` and prints
two tables:

* **long decode** — a tiny random Llama reads a ``--prompt``-token prompt (default 131072) in
  chunks into a ``blocks`` LongattnCache with a disk tier, then decodes; reports the fast tier's
  peak tokens against its budget, bytes per tier, the process's peak RSS, prefill and per-token
  decode time, and checks that a saved and reloaded memory gives bit-identical next-token logits.
* **policies** — stories260K reads its own text (``--policy-tokens``) then continues; per policy
  at ``--budget`` tokens per head: continuation NLL against the full cache, tokens kept per layer
  and head, KV bytes, time.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def tiny_llama(max_positions: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions)
    return transformers.LlamaForCausalLM(cfg).eval()


def run_long_decode(prompt: int = 131072, chunk: int = 2048, decode: int = 32, page: int = 64, sinks: int = 64,
                    window: int = 256, topk: int = 8, host_tokens: int = 8192, seed: int = 0,
                    say=print) -> dict:
    """A ``prompt``-token prefill and ``decode`` greedy tokens through a tiered ``blocks`` cache."""
    import longattn.hf as hf

    model = tiny_llama(prompt + decode + 1, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (1, prompt), generator=g)
    rss0 = _rss_mib()
    with tempfile.TemporaryDirectory(prefix="longattn-bench-") as tmp, torch.no_grad(), hf.apply(model, "dense"):
        kw = dict(page=page, sinks=sinks, window=window, topk=topk, host_tokens=host_tokens,
                  disk_dir=Path(tmp) / "tiers")
        cache = hf.LongattnCache(model, "blocks", **kw)
        t0 = time.perf_counter()
        for i in range(0, prompt, chunk):
            out = model(ids[:, i:i + chunk], past_key_values=cache)
            if (i // chunk) % 16 == 0:
                say(f"  prefill {i + chunk}/{prompt} tokens, fast tier {cache.stats()['peak_fast_tokens']} tokens")
        prefill_s = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        saved = Path(tmp) / "memory.safetensors"
        cache.save(saved)  # right after the prompt
        first = nxt
        t0 = time.perf_counter()
        for step in range(decode):
            logits = model(nxt, past_key_values=cache).logits
            if step == 0:
                first_logits = logits
            nxt = logits[:, -1:].argmax(-1)
        decode_ms = (time.perf_counter() - t0) / decode * 1e3
        stats = cache.stats()
        # a fresh cache loaded from the file gives the first decode step bit for bit
        again = hf.LongattnCache(model, "blocks", **{**kw, "disk_dir": Path(tmp) / "tiers2"}).load(saved)
        identical = torch.equal(model(first, past_key_values=again).logits, first_logits)
        file_mib = saved.stat().st_size / 2**20
    per_token = 2 * 2 * 2 * 16 * 4  # layers × (k, v) × kv heads × head_dim × fp32
    return {"suite": "memory", "test": "long_decode", "prompt": prompt, "decode": decode, "chunk": chunk,
            "policy": "blocks", "page": page, "sinks": sinks, "window": window, "topk": topk,
            "host_tokens": host_tokens, "fast_budget_tokens": stats["fast_budget_tokens"],
            "peak_fast_tokens": stats["peak_fast_tokens"], "fast_bytes": stats["fast_bytes"],
            "host_bytes": stats["host_bytes"], "disk_bytes": stats["disk_bytes"],
            "metadata_bytes": stats["metadata_bytes"], "full_kv_bytes": per_token * (prompt + decode),
            "prefill_s": prefill_s, "decode_ms_per_token": decode_ms, "peak_rss_mib": _rss_mib(),
            "rss_before_mib": rss0, "saved_file_mib": file_mib, "reload_bit_identical": bool(identical)}


def run_policies(tokens: int = 2048, cont: int = 256, budget: int = 256, seed: int = 0, say=print) -> list[dict]:
    """stories260K: read ``tokens`` of its own text, then teacher-force ``cont`` more, per policy."""
    import longattn.hf as hf
    from longattn.bench.tasks import stories_text

    _, text = stories_text(tokens + cont, seed)
    model, _ = hf.load_llama2c(_stories_dir())
    model = model.float().eval()
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    policies = {
        "full": {},
        "streaming": dict(budget=budget, sinks=4),
        "h2o": dict(budget=budget),
        "tova": dict(budget=budget),
        "snapkv": dict(budget=budget),
        "heads": dict(head_map=[[h < n_kv // 2 for h in range(n_kv)]] * n_layers, sinks=4, window=budget - 4),
        "blocks": dict(page=32, sinks=32, window=budget - 96, topk=2),
        "longheads": dict(page=32, sinks=32, window=budget - 96, topk=2),
    }
    records = []
    with torch.no_grad(), hf.apply(model, "dense"):
        for name, kw in policies.items():
            cache = hf.LongattnCache(model, name, **kw)
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
            records.append({"suite": "memory", "test": "policies", "policy": name, "budget": None if name == "full" else budget,
                            "tokens": tokens, "continuation": cont, "nll": nll, "perplexity": math.exp(nll),
                            "tokens_kept": s["tokens"], "kv_bytes": s["kv_bytes"], "peak_kv_bytes": peak, "fast_bytes": s["fast_bytes"],
                            "prefill_s": prefill_s, "wall_s": time.perf_counter() - t0})
            say(f"  {name:10s} nll {nll:.3f}  kept/head {s['tokens'][0]}  kv {s['kv_bytes'] / 1024:.0f} KiB (peak {peak / 1024:.0f})")
    return records


def _stories_dir():
    from longattn.models.llama2c import stories260k_dir

    d = stories260k_dir()
    if d is None:
        raise FileNotFoundError("stories260K not found: set LONGATTN_STORIES260K")
    return d


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    ap.add_argument("--prompt", type=int, default=131072)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--policy-tokens", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=256)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("policies on stories260K")
    recs = run_policies(args.policy_tokens, budget=args.budget)
    print(f"long decode: {args.prompt}-token prompt")
    long = run_long_decode(args.prompt, decode=args.decode)
    (args.out / "memory.json").write_text(json.dumps({"policies": recs, "long_decode": long}, indent=2))
    print(json.dumps(long, indent=2))


if __name__ == "__main__":
    main()
