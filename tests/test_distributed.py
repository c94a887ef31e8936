"""longattn.distributed: Ring Attention over gloo (CPU) at world 2 and 4 equals one process —
output and LSE, causal and not, GQA, lengths that do not divide evenly, window / streaming /
document masks, zigzag and contiguous — and ranks that disagree or fail make every rank raise
instead of hanging."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import longattn
from longattn import masks
from longattn.distributed import pieces, positions, shard, unshard

pytestmark = pytest.mark.cpu_only(reason="gloo process groups on the CPU")


# -- layouts (no processes) ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("total,world", [(37, 2), (64, 4), (5, 4), (3, 2)])
def test_shard_and_unshard_are_inverse_and_cover_every_token_once(layout, total, world):
    x = torch.arange(total).view(1, 1, total, 1).float()
    parts = [shard(x, r, world, layout) for r in range(world)]
    assert torch.equal(unshard(parts, layout), x)
    seen = torch.cat([positions(total, world, r, layout) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(total))
    for r in range(world):
        assert torch.equal(parts[r].flatten(), positions(total, world, r, layout).float())


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    def causal_pairs(own):  # query-key pairs a rank computes under a causal mask
        return sum(sum(p.start + i + 1 for i in range(p.length)) for p in own)

    for layout, worst in (("zigzag", 1.1), ("contiguous", None)):
        work = [causal_pairs(own) for own in pieces(4096, 4, layout)]
        ratio = max(work) / min(work)
        if worst:
            assert ratio <= worst
        else:
            assert ratio > 3


# -- ring attention across processes ------------------------------------------------------------


def _start(rank, world, store):
    """A gloo process group over a file store, one torch thread per rank."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _failed(exc):
    import traceback

    return {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}


def _finish(out_dir, rank, result):
    """Write this rank's result for the parent, which asserts, and leave the group."""
    import torch.distributed as dist

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()

def _cases():
    out = []
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            out += [(layout, causal, 37, "dense", {}), (layout, causal, 64, "dense", {})]
        out += [(layout, True, 50, "window", {"window": 7}), (layout, True, 50, "streaming", {"sinks": 3, "window": 5}),
                (layout, False, 45, "document", {})]
    return out


def _method(name, kw, total):
    if name == "document":
        return longattn.method("pattern", mask=masks.document(torch.arange(total) // 13))
    return longattn.method(name, **kw)


def _equivalence_worker(rank, world, store, out_dir):
    from longattn.distributed import ring_attention

    _start(rank, world, store)
    worst = {"out": 0.0, "lse": 0.0}
    try:
        for layout, causal, total, name, kw in _cases():
            g = torch.Generator().manual_seed(total)
            q = torch.randn(2, 4, total, 8, generator=g)
            k = torch.randn(2, 2, total, 8, generator=g)
            v = torch.randn(2, 2, total, 8, generator=g)
            m = _method(name, kw, total)
            mask = m.visible_mask(total, total, causal)
            ref, ref_lse = longattn.reference_attention(q, k, v, mask=None if mask is None else mask.dense(2, 4, total, total))
            out, lse = ring_attention(shard(q, rank, world, layout), shard(k, rank, world, layout),
                                      shard(v, rank, world, layout), causal=causal, method=m, layout=layout,
                                      return_lse=True, timeout_s=60)
            worst["out"] = max(worst["out"], float((out.double() - shard(ref, rank, world, layout)).abs().max()))
            diff = (lse.double() - shard(ref_lse, rank, world, layout))
            worst["lse"] = max(worst["lse"], float(diff.nan_to_num(0.0, 0.0, 0.0).abs().max()))
            same_inf = torch.isneginf(lse) == torch.isneginf(shard(ref_lse, rank, world, layout))
            assert bool(same_inf.all()), (layout, causal, total, name)
        result = {"ok": True, **worst}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


def _spawn(fn, world, tmp_path, *extra):
    store = tmp_path / "store"
    torch.multiprocessing.spawn(fn, args=(world, str(store), str(tmp_path), *extra), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_one_process(world, tmp_path):
    results = _spawn(_equivalence_worker, world, tmp_path)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["out"] <= 1e-5 and res["lse"] <= 1e-5, (r, res)


def _mismatch_worker(rank, world, store, out_dir):
    from longattn.distributed import ring_attention

    _start(rank, world, store)
    d = 8 if rank == 0 else 16                                   # rank 1 calls with another head_dim
    q = torch.randn(1, 2, 8, d)
    try:
        ring_attention(q, q, q, causal=True, timeout_s=30)
        result = {"raised": None}
    except Exception as exc:
        result = {"raised": type(exc).__name__, "message": str(exc)}
    _finish(out_dir, rank, result)


def test_ranks_that_disagree_on_shapes_all_get_a_clear_error(tmp_path):
    results = _spawn(_mismatch_worker, 2, tmp_path)
    for res in results:
        assert res["raised"] == "ValueError" and "head_dim" in res["message"], res


def _failing_peer_worker(rank, world, store, out_dir, timeout_s, when):
    """Rank 1 dies — before the call (``when="before"``) or inside the ring at its first pair kernel,
    after the shape check (``"inside"``); every other rank records how its call ended."""
    import longattn.distributed.ring as ring_mod

    _start(rank, world, store)
    if rank == 1 and when == "before":
        os._exit(0)
    if rank == 1:
        ring_mod._pair_attention = lambda *a, **kw: os._exit(0)
    t0 = time.perf_counter()
    try:
        q = torch.randn(1, 2, 64, 8)
        ring_mod.ring_attention(q, q, q, causal=True, timeout_s=timeout_s)
        result = {"raised": None}
    except Exception as exc:
        result = {"raised": type(exc).__name__, "message": str(exc)}
    result["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # no destroy_process_group: a peer is gone


@pytest.mark.parametrize("when,world", [("before", 2), ("inside", 3)])
def test_a_failing_rank_ends_the_others_within_the_timeout(when, world, tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_failing_peer_worker, args=(r, world, str(tmp_path / "store"), str(tmp_path), 5.0, when))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert not p.is_alive(), "a rank hung"
    for r in [r for r in range(world) if r != 1]:
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["raised"] == "RuntimeError" and "ring attention" in res["message"], res
        assert res["seconds"] < 5.0 + 10.0, res


def test_ring_attention_needs_a_process_group_and_an_exact_method():
    from longattn.distributed import ring_attention

    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="process group"):
        ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="spiral")


def _ulysses_worker(rank, world, store, out_dir):
    from longattn.distributed import ulysses_attention

    _start(rank, world, store)
    worst = {"out": 0.0, "lse": 0.0}
    try:
        cases = [(layout, causal, total, name, kw) for layout, causal, total, name, kw in _cases()]
        cases.append(("contiguous", True, 61, "landmark", {"budget": 48, "block": 8, "q_block": 8, "sinks": 8,
                                                           "window": 8}))   # sparse: every key is local
        for layout, causal, total, name, kw in cases:
            g = torch.Generator().manual_seed(total)
            q = torch.randn(2, 4, total, 8, generator=g)
            k = torch.randn(2, 4 if world == 4 else 2, total, 8, generator=g)
            v = torch.randn(*k.shape, generator=g)
            m = _method(name, kw, total)
            ref, st = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
            out, lse = ulysses_attention(shard(q, rank, world, layout), shard(k, rank, world, layout),
                                         shard(v, rank, world, layout), causal=causal, method=m, layout=layout,
                                         return_lse=True, timeout_s=60)
            worst["out"] = max(worst["out"], float((out - shard(ref, rank, world, layout)).abs().max()))
            diff = lse - shard(st.lse.float(), rank, world, layout)
            worst["lse"] = max(worst["lse"], float(diff.nan_to_num(0.0, 0.0, 0.0).abs().max()))
        result = {"ok": True, **worst}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_one_process(world, tmp_path):
    results = _spawn(_ulysses_worker, world, tmp_path)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["out"] <= 1e-5 and res["lse"] <= 1e-5, (r, res)


def _heads_worker(rank, world, store, out_dir):
    from longattn.distributed import ulysses_attention

    _start(rank, world, store)
    q = torch.randn(1, 4, 8, 8)
    kv = torch.randn(1, 1, 8, 8)                                 # one key/value head, two ranks
    try:
        ulysses_attention(q, kv, kv, causal=True, timeout_s=30)
        result = {"raised": None}
    except Exception as exc:
        result = {"raised": type(exc).__name__, "message": str(exc)}
    _finish(out_dir, rank, result)


def test_ulysses_names_heads_that_do_not_divide(tmp_path):
    for res in _spawn(_heads_worker, 2, tmp_path):
        assert res["raised"] == "ValueError" and "multiples of 2" in res["message"], res


def _hybrid_worker(rank, world, store, out_dir):
    from longattn.distributed import hybrid_attention, hybrid_shard, make_grid

    _start(rank, world, store)
    worst = {"out": 0.0, "lse": 0.0}
    try:
        ug, rg = make_grid(2, 2)
        for layout, causal, total, name, kw in _cases():
            g = torch.Generator().manual_seed(total)
            q = torch.randn(2, 4, total, 8, generator=g)
            k = torch.randn(2, 2, total, 8, generator=g)
            v = torch.randn(2, 2, total, 8, generator=g)
            m = _method(name, kw, total)
            mask = m.visible_mask(total, total, causal)
            ref, ref_lse = longattn.reference_attention(q, k, v, mask=None if mask is None else mask.dense(2, 4, total, total))
            cut = lambda x: hybrid_shard(x, rank, 2, 2, layout)  # noqa: E731
            out, lse = hybrid_attention(cut(q), cut(k), cut(v), ulysses_group=ug, ring_group=rg, causal=causal,
                                        method=m, layout=layout, return_lse=True, timeout_s=60)
            worst["out"] = max(worst["out"], float((out.double() - cut(ref)).abs().max()))
            worst["lse"] = max(worst["lse"], float((lse.double() - cut(ref_lse)).nan_to_num(0.0, 0.0, 0.0).abs().max()))
        result = {"ok": True, **worst}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


def test_hybrid_ulysses_by_ring_equals_one_process(tmp_path):
    results = _spawn(_hybrid_worker, 4, tmp_path)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["out"] <= 1e-5 and res["lse"] <= 1e-5, (r, res)


def _decode_worker(rank, world, store, out_dir):
    from longattn.distributed import ShardedKVCache

    _start(rank, world, store)
    try:
        g = torch.Generator().manual_seed(7)
        k = torch.randn(2, 2, 300, 16, generator=g)
        v = torch.randn(2, 2, 300, 16, generator=g)
        cache = ShardedKVCache(page=16)
        worst, held = 0.0, []
        at = 0
        for n in (100, 1, 1, 57, 1, 140):              # a prefill, decode steps, another chunk …
            cache.append(k[:, :, at:at + n], v[:, :, at:at + n])
            at += n
            q = torch.randn(2, 4, 1, 16, generator=g)
            got = cache.attend(q)
            want = longattn.attention(q, k[:, :, :at], v[:, :, :at], causal=False)
            worst = max(worst, float((got - want).abs().max()))
            # block retrieval over each rank's own pages: at a budget covering a slice, exact too
            got_quest = cache.attend(q, method="quest", budget=512, block=16, q_block=16, sinks=0, window=16)
            worst = max(worst, float((got_quest - want).abs().max()))
            held.append(cache.local_tokens)
        result = {"ok": True, "worst": worst, "held": held, "seen": cache.seen}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_decode_equals_one_process_over_the_whole_cache(world, tmp_path):
    results = _spawn(_decode_worker, world, tmp_path)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["worst"] <= 1e-5, (r, res)
    assert sum(res["held"][-1] for res in results) == 300          # every token on exactly one rank
    assert max(res["held"][-1] for res in results) <= 300 // world + 16


def _gradient_worker(rank, world, store, out_dir, kind):
    from longattn.distributed import hybrid_attention, hybrid_shard, make_grid, ring_attention, ulysses_attention

    _start(rank, world, store)
    worst = 0.0
    try:
        grid = make_grid(2, world // 2) if kind == "hybrid" else None
        cases = [c for c in _cases() if c[3] != "dense" or c[2] == 37]
        for layout, causal, total, name, kw in cases:
            if kind == "ulysses" and layout == "zigzag" and name != "dense":
                continue
            g = torch.Generator().manual_seed(total + 1)
            q = torch.randn(2, 4, total, 8, generator=g)
            k = torch.randn(2, 2 if kind != "ulysses" or world == 2 else 4, total, 8, generator=g)
            v = torch.randn(*k.shape, generator=g)
            w = torch.randn(2, 4, total, 8, generator=g)                # the loss: <out, w>
            m = _method(name, kw, total)
            ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
            (longattn.attention(*ref_in, causal=causal, method=m) * w).sum().backward()
            if kind == "hybrid":
                cut = lambda x: hybrid_shard(x, rank, 2, world // 2, layout)  # noqa: E731
            else:
                cut = lambda x: shard(x, rank, world, layout)  # noqa: E731
            mine = [cut(t).clone().requires_grad_(True) for t in (q, k, v)]
            if kind == "ring":
                out = ring_attention(*mine, causal=causal, method=m, layout=layout)
            elif kind == "ulysses":
                out = ulysses_attention(*mine, causal=causal, method=m, layout=layout)
            else:
                out = hybrid_attention(*mine, ulysses_group=grid[0], ring_group=grid[1], causal=causal, method=m,
                                       layout=layout)
            (out * cut(w)).sum().backward()
            for a, b in zip(mine, ref_in):
                worst = max(worst, float((a.grad - cut(b.grad)).abs().max()))
        result = {"ok": True, "worst": worst}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


@pytest.mark.parametrize("kind,world", [("ring", 2), ("ring", 4), ("ulysses", 2), ("ulysses", 4), ("hybrid", 4)])
def test_gradients_through_context_parallelism_equal_one_process(kind, world, tmp_path):
    results = _spawn(_gradient_worker, world, tmp_path, kind)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["worst"] <= 1e-5, (r, res)


def _hf_worker(rank, world, store, out_dir, scheme, layout):
    import longattn.hf as hf
    from longattn.distributed import positions
    from longattn.distributed.hf import context_parallel

    _start(rank, world, store)
    try:
        model, _ = hf.load_llama2c()
        ids = torch.randint(3, 512, (1, 4096), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = model(input_ids=ids).logits
            with context_parallel(model, layout=layout, scheme=scheme):
                mine = model(input_ids=shard(ids, rank, world, layout, dim=1),
                             position_ids=positions(4096, world, rank, layout)[None]).logits
        err = float((mine - shard(full, rank, world, layout, dim=1)).abs().max())
        result = {"ok": True, "err": err}
    except Exception as exc:  # reported to the parent, which asserts
        result = _failed(exc)
    _finish(out_dir, rank, result)


@pytest.mark.parametrize("scheme,layout,world", [("ring", "zigzag", 2), ("ring", "zigzag", 4),
                                                 ("ring", "contiguous", 4), ("ulysses", "contiguous", 4)])
def test_stories260k_prefill_across_ranks_equals_one_process(scheme, layout, world, tmp_path):
    pytest.importorskip("transformers")
    results = _spawn(_hf_worker, world, tmp_path, scheme, layout)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res.get('error')}"
        assert res["err"] <= 1e-4, (r, res)


def _count_worker(rank, world, store, out_dir):
    import torch.distributed as dist

    from longattn.distributed import ShardedKVCache, ring_attention, ulysses_attention

    _start(rank, world, store)
    calls = {}
    originals = {}
    for name in ("all_gather", "all_to_all", "batch_isend_irecv", "broadcast", "all_reduce", "send", "recv"):
        originals[name] = getattr(dist, name)

        def counted(*a, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return originals[_name](*a, **kw)

        setattr(dist, name, counted)
    q = torch.randn(1, 4, 16, 8)
    counts = {}
    ring_attention(q, q, q, causal=True)
    counts["ring"], calls = dict(calls), calls.clear() or calls
    ulysses_attention(q, q, q, causal=True)
    counts["ulysses"] = dict(calls)
    calls.clear()
    cache = ShardedKVCache(page=4)
    cache.append(q, q)
    cache.attend(q[:, :, :1])
    counts["decode"] = dict(calls)
    bf = {}
    g = torch.Generator().manual_seed(3)
    qb, kb, vb = (torch.randn(1, 4, 64, 16, generator=g) for _ in range(3))
    qb, kb, vb = qb.bfloat16(), kb.bfloat16(), vb.bfloat16()
    ref = shard(longattn.attention(qb, kb, vb, causal=True), rank, world, "zigzag").double()   # one process, bf16
    for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        out = fn(*(shard(t, rank, world, "zigzag") for t in (qb, kb, vb)), causal=True, layout="zigzag").double()
        # torch.testing's closeness: |out - ref| <= atol + rtol·|ref|; the excess over rtol·|ref| is what atol must cover
        bf[name] = float(((out - ref).abs() - 1.6e-2 * ref.abs()).max())
    # gradients in bf16 against one process in bf16 (torch's CP tests: atol 8e-3 · world)
    grads = {}
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (qb, kb, vb))
    (longattn.attention(qg, kg, vg, causal=True).float() * 0.1).sum().backward()
    for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        mine = [shard(t, rank, world, "zigzag").detach().clone().requires_grad_(True) for t in (qb, kb, vb)]
        (fn(*mine, causal=True, layout="zigzag").float() * 0.1).sum().backward()
        grads[name] = max(float(((a.grad.double() - shard(b.grad, rank, world, "zigzag").double()).abs()
                                 - 1.6e-2 * shard(b.grad, rank, world, "zigzag").double().abs()).max())
                          for a, b in zip(mine, (qg, kg, vg)))
    for name, fn in originals.items():
        setattr(dist, name, fn)
    _finish(out_dir, rank, {"counts": counts, "bf16": bf, "bf16_grads": grads})


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_per_call_are_the_designs_and_bf16_meets_torchs_tolerance(world, tmp_path):
    for res in _spawn(_count_worker, world, tmp_path):
        assert res["counts"]["ring"] == {"all_gather": 1, "batch_isend_irecv": world - 1}, res
        assert res["counts"]["ulysses"] == {"all_gather": 1, "all_to_all": 2}, res
        assert res["counts"]["decode"] == {"all_gather": 1}, res
        # torch's context-parallel tests: atol 1e-3 · world for bf16 outputs (bf16's rtol 1.6e-2), against
        # the same inputs attended in one process
        for name, excess in res["bf16"].items():
            assert excess <= 1e-3 * world, (name, excess)
        for name, excess in res["bf16_grads"].items():
            assert excess <= 8e-3 * world, (name, excess)


def test_the_distributed_bench_suite_runs_and_checks_itself(tmp_path):
    from longattn.bench import get_suite
    from longattn.bench.suite import run_suite

    res = run_suite(get_suite("distributed"), tmp_path, full=False, lengths=(256,), worlds=(1, 2), repeats=1)
    recs = {(r["method"], r["world"]): r for r in res["records"]}
    assert all(r["status"] == "ok" for r in recs.values()), recs
    assert recs[("ring zigzag", 2)]["bytes_ratio"] == pytest.approx(1.0)
    assert recs[("ring zigzag", 2)]["balance"] < recs[("ring contiguous", 2)]["balance"]
