"""The ``sparse`` suite's speed parts: long causal prefill at a set density, and decoding over a
long cache at a set budget, each against torch SDPA timed in the same run.

Both run on synthetic *clustered* q/k/v (``clustered_qkv``): every query and key belongs to one
of a few hundred clusters scattered over the whole context, and a query's attention mass sits on
the keys of its own cluster. That is retrieval-shaped attention, where which keys are chosen
matters (on i.i.d. Gaussian q/k attention is flat and every sparse method's error is large and
meaningless). Error is always measured against the exact output of the same run:

* ``rel_err`` ``‖out − exact‖ / ‖exact‖``;
* ``recall`` mean over queries of ``exp(lse − lse_exact)``, the share of the true softmax mass
  inside the attended keys (methods that give an LSE).

Speed ratios are SDPA's median time over the method's, so > 1 means faster than SDPA; a method
whose output is not finite gets no speed figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

import longattn
from longattn.bench import harness
from longattn.bench.harness import guarded, time_call
from longattn.sparse.summaries import BlockSummaries

#: the speed parts' configuration: fp32, batch 1, 8 heads, head_dim 64, causal
HEADS, HEAD_DIM = 8, 64
PREFILL_BLOCK, PREFILL_Q_BLOCK = 64, 256
#: decode reads every block summary each step: 128-key blocks halve that traffic against 64
DECODE_BLOCK = 128


def clustered_qkv(tokens: int, *, tokens_q: int | None = None, heads: int = HEADS, head_dim: int = HEAD_DIM,
                  clusters: int | None = None, segment: int = 128, sharpness: float = 6.0, seed: int = 0):
    """``q [1, H, Tq, D]``, ``k, v [1, H, T, D]`` float32 with retrieval-shaped attention.

    The context is cut into segments of about ``segment`` tokens (random lengths), each about one
    of ``clusters`` topics (a random unit direction per head; default: one topic per four
    segments, so each recurs a few times across the context); a key is its segment's topic plus
    noise. Queries likewise come in topical segments, scaled by ``sharpness``, so a query's mass
    sits on the segments sharing its topic, wherever they are in the context — contiguous spans,
    as text gives, so block selection can find them. Queries are the last ``tokens_q`` positions
    (default all: prefill)."""
    g = torch.Generator().manual_seed(seed)
    tq = tokens if tokens_q is None else tokens_q
    clusters = clusters or max(1, tokens // (4 * segment))
    topics = torch.randn(heads, clusters, head_dim, generator=g)
    topics = topics / topics.norm(dim=-1, keepdim=True)

    def topic_per_token(n: int, segment: int) -> torch.Tensor:
        lengths = torch.randint(segment // 2, segment * 3 // 2 + 1, (n // (segment // 2) + 1,), generator=g)
        seg_topic = torch.randint(0, clusters, (heads, lengths.numel()), generator=g)
        return seg_topic.repeat_interleave(lengths, dim=1)[:, :n]  # [H, n]

    def embed(topic: torch.Tensor) -> torch.Tensor:
        return torch.gather(topics, 1, topic[..., None].expand(-1, -1, head_dim))

    k_topic = topic_per_token(tokens, segment)
    # a query keeps its focus longer than a key segment lasts (a sentence reads several spans)
    q_topic = topic_per_token(tokens, 4 * segment)[:, tokens - tq:]
    noise = 1.0 / math.sqrt(head_dim)
    k = math.sqrt(head_dim) * (embed(k_topic) + noise * torch.randn(heads, tokens, head_dim, generator=g))
    q = sharpness * (embed(q_topic) + noise * torch.randn(heads, tq, head_dim, generator=g))
    v = torch.randn(heads, tokens, head_dim, generator=g)
    return q[None].contiguous(), k[None].contiguous(), v[None].contiguous()


def causal_block_density(tokens: int, n_sel: int, block: int, q_block: int) -> float:
    """Density (share of the causal triangle) of a block selection keeping ``n_sel`` key blocks per
    query block: the query block's own causal square plus ``n_sel − q_block/block`` earlier blocks
    (fewer where fewer exist)."""
    total = 0.0
    past_keys = (n_sel - q_block // block) * block
    for i in range(math.ceil(tokens / q_block)):
        rows = min(q_block, tokens - i * q_block)
        total += rows * (rows + 1) / 2 + rows * min(past_keys, i * q_block)
    return total / (tokens * (tokens + 1) / 2)


def budget_for_density(tokens: int, density: float, block: int = PREFILL_BLOCK, q_block: int = PREFILL_Q_BLOCK) -> int:
    """The smallest budget (keys per query, whole blocks) whose causal density reaches ``density``."""
    n_sel = q_block // block + 3  # room for a sink block and a misaligned local window
    while causal_block_density(tokens, n_sel, block, q_block) < density and n_sel * block < tokens:
        n_sel += 1
    return n_sel * block


def prefill_methods(budget: int, block: int = PREFILL_BLOCK, q_block: int = PREFILL_Q_BLOCK) -> dict[str, Any]:
    """The methods timed in long prefill, all at the same budget and blocks (FlexPrefill's γ,
    XAttention's τ and AnchorAttention's θ may stop below it). Token-level methods (TokenSelect, Loki, MInference's eager kernel, Routing)
    score every key for every query — dense cost — so they are not timed here."""
    common = dict(budget=budget, block=block, q_block=q_block, sinks=block, window=0)
    return {
        "landmark (pooled)": longattn.method("landmark", pooled=True, **common),
        "quest (pooled)": longattn.method("quest", pooled=True, **common),
        "infllm (pooled)": longattn.method("infllm", pooled=True, **common),
        "hip": longattn.method("hip", **common),
        "flexprefill": longattn.method("flexprefill", **common),
        "longheads": longattn.method("longheads", window=budget, chunk=block, local=0),
        "landmark": longattn.method("landmark", **common),
        "quest": longattn.method("quest", **common),
        "xattention": longattn.method("xattention", **common),
        "anchor": longattn.method("anchor", **common),
        "pbs": longattn.method("pbs", segment=4 * q_block, **common),
        # (pbs with estimate="rows" is in the accuracy table: its exact row estimate costs a third of
        # SDPA's time at 32k here, 0.68x SDPA in all)
        "streaming": longattn.method("streaming", sinks=block, window=budget - block, backend="tiled"),
        # trainable selectors at the same budget: MoBA's router, NSA's selected branch (its
        # compressed branch's scores choose the blocks)
        "moba": longattn.method("moba", block=block, top_k=budget // block, q_block=q_block),
        "nsa (selected branch)": longattn.method("nsa", block=block, top_n=budget // block, local=max(1, q_block // block),
                                                 compress_block=block, compress_stride=block // 2, q_block=q_block,
                                                 gates=(0.0, 1.0, 0.0)),
    }


def _errors(out: torch.Tensor, lse: torch.Tensor | None, ref: torch.Tensor, ref_lse: torch.Tensor) -> dict[str, Any]:
    rec: dict[str, Any] = {"finite": bool(torch.isfinite(out).all())}
    rec["rel_err"] = float((out - ref).norm() / ref.norm())
    rec["recall"] = float(torch.exp(lse - ref_lse).clamp(max=1.0).mean()) if lse is not None else None
    return rec


def run_prefill(tokens: int = 32768, density: float = 0.10, *, methods: dict[str, Any] | None = None, repeats: int = 3,
                seed: int = 0, progress=None, dtype: str = "float32") -> Iterator[dict[str, Any]]:
    """Causal prefill of ``tokens`` tokens in ``dtype`` ("float32", "bfloat16", "float16"): SDPA
    (``is_causal``, same dtype) first, then every method at the budget giving ``density`` (records
    carry ``sdpa_median_s`` and ``ratio_to_sdpa`` from the same run, ``dtype`` and the
    ``compute_dtype`` that ran). Errors are against dense attention computed in float32 from the
    same (rounded) inputs. A method whose output is not finite gets no speed figure."""
    budget = budget_for_density(tokens, density)
    methods = methods if methods is not None else prefill_methods(budget)
    q, k, v = harness.on_device(*(t.to(harness.DTYPES[dtype]) for t in clustered_qkv(tokens, seed=seed)))
    say = progress or (lambda msg: None)
    say(f"prefill {tokens} tokens, {dtype}: SDPA")
    ref_out, ref_stats = longattn.attention(q, k, v, causal=True, method="dense", return_stats=True,
                                            compute_dtype="float32")
    sdpa = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, repeats=repeats)
    common = {"tokens": tokens, "target_density": density, "budget": budget, "block": PREFILL_BLOCK,
              "q_block": PREFILL_Q_BLOCK, "sdpa_median_s": sdpa.median_s, "dtype": dtype}
    yield {**common, "method": "sdpa", "density": 1.0, "median_s": sdpa.median_s, "min_s": sdpa.min_s,
           "max_s": sdpa.max_s, "ratio_to_sdpa": 1.0, "status": "ok"}
    for name, m in methods.items():
        say(f"prefill {tokens} tokens, {dtype}: {name}")
        out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
        rec = {**common, "method": name, "registry_name": m.name, "density": st.density,
               "compute_dtype": st.compute_dtype, "path_detail": st.extra.get("kernel"),
               **_errors(out, st.lse, ref_out, ref_stats.lse), "status": "ok"}
        if not rec["finite"]:
            rec["status"] = "FAILED: output not finite"
        else:
            parts: list[tuple[float, float]] = []

            def call():
                _, s = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
                parts.append((s.extra.get("selection_s", 0.0), s.extra.get("kernel_s", s.time_s)))

            t = time_call(call, warmup=0, repeats=repeats)
            rec.update(median_s=t.median_s, min_s=t.min_s, max_s=t.max_s, ratio_to_sdpa=sdpa.median_s / t.median_s,
                       selection_s=sorted(p[0] for p in parts)[len(parts) // 2],
                       kernel_s=sorted(p[1] for p in parts)[len(parts) // 2])
        yield rec


def run_decode(cache: int = 131072, budget: int = 2048, *, steps: int = 20, repeats: int = 3, seed: int = 0,
               progress=None, dtype: str = "float32") -> Iterator[dict[str, Any]]:
    """One decode step (a single new query) over a ``cache``-token KV cache in ``dtype``: dense
    SDPA (same dtype) first, then the block-retrieval methods at ``budget`` keys, whose block
    summaries are kept by the decode loop (``attention(..., summaries=)``), as a real cache would.
    Each method record also carries the time to build the summaries once and to fold one new key
    into them."""
    say = progress or (lambda msg: None)
    q_all, k, v = harness.on_device(*(t.to(harness.DTYPES[dtype])
                                      for t in clustered_qkv(cache, tokens_q=steps, seed=seed)))
    say(f"decode over {cache} keys: building block summaries")
    t0 = time.perf_counter()
    summaries = BlockSummaries.build(k, DECODE_BLOCK)
    build_s = time.perf_counter() - t0
    qs = [q_all[:, :, i:i + 1] for i in range(steps)]
    it = iter(range(10 ** 9))

    def step_dense():
        q = qs[next(it) % steps]
        return F.scaled_dot_product_attention(q, k, v)

    say(f"decode over {cache} keys: SDPA")
    sdpa = time_call(lambda: [step_dense() for _ in range(steps)], warmup=1, repeats=repeats)
    # the cost of keeping summaries current: one new key per step
    extra = BlockSummaries.build(k[:, :, : cache - 1], DECODE_BLOCK)
    t_app = time_call(lambda: _append_copy(extra, k[:, :, cache - 1: cache]), warmup=1, repeats=repeats)
    common = {"cache": cache, "budget": budget, "steps": steps, "sdpa_step_s": sdpa.median_s / steps, "dtype": dtype}
    yield {**common, "method": "sdpa", "budget": None, "density": 1.0, "step_s": sdpa.median_s / steps,
           "ratio_to_sdpa": 1.0, "status": "ok"}
    kw = dict(budget=budget, block=DECODE_BLOCK, q_block=1, sinks=DECODE_BLOCK, window=256)
    methods = {"landmark": longattn.method("landmark", **kw), "quest": longattn.method("quest", **kw)}
    for name, m in methods.items():
        say(f"decode over {cache} keys: {name}")
        errs = []
        recalls = []
        for q in qs:
            out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True, summaries=summaries)
            ref, ref_st = longattn.attention(q, k, v, causal=True, method="dense", return_stats=True,
                                             compute_dtype="float32")
            e = _errors(out, st.lse, ref, ref_st.lse)
            errs.append(e["rel_err"])
            recalls.append(e["recall"])
        t = time_call(lambda: [longattn.attention(q, k, v, causal=True, method=m, summaries=summaries) for q in qs],
                      warmup=1, repeats=repeats)
        yield {**common, "method": name, "density": budget / cache, "rel_err": sum(errs) / len(errs),
               "recall": sum(recalls) / len(recalls), "step_s": t.median_s / steps,
               "ratio_to_sdpa": sdpa.median_s / t.median_s, "summaries_build_s": build_s,
               "summary_append_s": t_app.median_s, "compute_dtype": st.compute_dtype,
               "path_detail": st.extra.get("path_detail"), "status": "ok"}


def _append_copy(s: BlockSummaries, k_new: torch.Tensor) -> None:
    """Append to a throw-away copy (the timing must not grow the summaries it reuses)."""
    c = BlockSummaries(s.block, s.sums, s.kmin, s.kmax, s.count, s.tokens)
    c.append(k_new)


#: densities of the frontier sweep (share of the causal triangle)
FRONTIER_DENSITIES = (0.05, 0.10, 0.20, 0.40)


def frontier_methods() -> dict[str, Callable[[int], Any]]:
    """Method families of the density ↔ error ↔ speed-up frontier: ``name -> budget -> method``
    (block selectors with pooled query blocks, HiP, and the sinks + window baseline)."""
    def block(name: str, **kw) -> Callable[[int], Any]:
        return lambda budget: longattn.method(name, budget=budget, block=PREFILL_BLOCK, q_block=PREFILL_Q_BLOCK,
                                              sinks=PREFILL_BLOCK, window=0, **kw)

    return {
        "landmark (pooled)": block("landmark", pooled=True),
        "quest (pooled)": block("quest", pooled=True),
        "infllm (pooled)": block("infllm", pooled=True),
        "hip": block("hip"),
        # budget-driven forms (exact at full budget, as the gate needs): τ = 1, θ = ∞
        "xattention (τ=1)": block("xattention", threshold=1.0),
        "anchor (θ=∞)": block("anchor", theta=math.inf),
        "pbs": block("pbs", segment=4 * PREFILL_Q_BLOCK),
        "streaming": lambda budget: longattn.method("streaming", sinks=PREFILL_BLOCK, window=budget - PREFILL_BLOCK,
                                                    backend="tiled"),
    }


def full_budget_gate(make: Callable[[int], Any], tokens: int = 1024, seed: int = 0) -> dict[str, Any]:
    """The frontier's correctness gate: at a budget covering every key the method must equal the
    float64 reference (max abs error ≤ 1e-4 on seeded random q/k/v, causal)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, tokens, 32, generator=g) for _ in range(3))
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    out = longattn.attention(q, k, v, causal=True, method=make(tokens))
    err = float((out.double() - ref).abs().max())
    return {"tokens": tokens, "max_abs_err": err, "passed": bool(err <= 1e-4)}


def run_frontier(tokens: int = 8192, densities=FRONTIER_DENSITIES, *, methods: dict[str, Callable[[int], Any]] | None = None,
                 repeats: int = 2, seed: int = 0, progress=None) -> Iterator[dict[str, Any]]:
    """Each method family at each target density over ``tokens`` causal tokens of
    ``clustered_qkv``: measured density, error against exact attention, and speed-up over SDPA
    timed in the same run (SDPA's record comes first). A family that fails ``full_budget_gate``
    gets errors but no speed."""
    say = progress or (lambda msg: None)
    methods = methods if methods is not None else frontier_methods()
    q, k, v = clustered_qkv(tokens, seed=seed)
    say(f"frontier {tokens} tokens: exact reference and SDPA")
    ref_out, ref_stats = longattn.attention(q, k, v, causal=True, method="dense", return_stats=True)
    sdpa = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, repeats=repeats)
    yield {"method": "sdpa", "tokens": tokens, "target_density": 1.0, "density": 1.0, "median_s": sdpa.median_s,
           "min_s": sdpa.min_s, "max_s": sdpa.max_s, "sdpa_median_s": sdpa.median_s, "ratio_to_sdpa": 1.0,
           "status": "ok"}
    for name, make in methods.items():
        gate, status = guarded(lambda: full_budget_gate(make, seed=seed))
        for d in densities:
            budget = budget_for_density(tokens, d)
            say(f"frontier {tokens} tokens: {name} at density {d:.2f}")
            rec: dict[str, Any] = {"method": name, "tokens": tokens, "target_density": d, "budget": budget,
                                   "gate": gate, "status": "ok", "median_s": None, "ratio_to_sdpa": None,
                                   "sdpa_median_s": sdpa.median_s}
            m = make(budget)
            res, err = guarded(lambda: longattn.attention(q, k, v, causal=True, method=m, return_stats=True))
            if err is not None:
                rec["status"] = err
                yield rec
                continue
            out, st = res
            rec.update(density=st.density, **_errors(out, st.lse, ref_out, ref_stats.lse))
            if status is not None:
                rec["status"] = f"gate {status}"
            elif not gate["passed"]:
                rec["status"] = f"FAILED full-budget gate ({gate['max_abs_err']:.2e})"
            elif not rec["finite"]:
                rec["status"] = "FAILED: output not finite"
            else:
                t = time_call(lambda: longattn.attention(q, k, v, causal=True, method=m), warmup=0, repeats=repeats)
                rec.update(median_s=t.median_s, min_s=t.min_s, max_s=t.max_s,
                           ratio_to_sdpa=sdpa.median_s / t.median_s)
            yield rec
