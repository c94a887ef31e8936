"""The ``decode`` and ``peers`` benchmark suites at tiny sizes: schema, gate marks, failures that
are recorded instead of crashing the sweep, valid JSON and a report naming every method."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

import longattn
from longattn.bench import decode, get_suite, harness, peers
from longattn.bench.suite import run_suite
from longattn.methods.block_topk import Landmark
from longattn.methods.dense import DenseChunked
from longattn.methods.local import SlidingWindow

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")

DECODE_FIELDS = ("method", "cache", "budget", "step_s", "ratio_to_sdpa", "rel_err", "recall", "kv_bytes",
                 "kv_kept_bytes", "peak_mem_bytes", "status", "efficiency_length")
PEER_FIELDS = ("peer", "case", "tokens", "causal", "median_s", "ratio_to_sdpa", "status")


@dataclass(frozen=True)
class Scaled(DenseChunked):
    """Test-only: claims to be exact (dense_chunked) but scales its output."""

    def run(self, q, k, v, call):
        res = super().run(q, k, v, call)
        res.out = res.out * 1.5
        return res


@dataclass(frozen=True)
class ScaledWindow(SlidingWindow):
    def run(self, q, k, v, call):
        res = super().run(q, k, v, call)
        res.out = res.out * 1.5
        return res


@dataclass(frozen=True)
class Boom(DenseChunked):
    def run(self, q, k, v, call):
        raise RuntimeError("kernel exploded")


@dataclass(frozen=True)
class NaNLandmark(Landmark):
    """Test-only: an approximate method whose output is not finite."""

    def run(self, q, k, v, call):
        res = super().run(q, k, v, call)
        res.out = torch.full_like(res.out, math.nan)
        return res


def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _small_cases():
    m = longattn.method
    blocks = dict(budget=256, block=64, q_block=1, sinks=64, window=64)
    return [
        decode.DecodeCase("dense", lambda: m("dense"), "dense"),
        decode.DecodeCase("streaming", lambda: m("streaming", sinks=64, window=192, backend="tiled"), "window"),
        decode.DecodeCase("landmark", lambda: m("landmark", **blocks), "blocks", summary_reads=1),
        decode.DecodeCase("quest", lambda: m("quest", **blocks), "blocks", summary_reads=2),
        decode.DecodeCase("tokenselect", lambda: m("tokenselect", budget=256), "tokens"),
        decode.DecodeCase("recycled", lambda: m("recycled", stride=decode.STRIDE, budget=256), "recycled"),
        decode.DecodeCase("wrong", lambda: Scaled(), "dense"),
        decode.DecodeCase("boom", lambda: Boom(), "dense"),
        decode.DecodeCase("nan", lambda: NaNLandmark(**blocks), "blocks", summary_reads=1),
    ]


def test_decode_suite_records_gates_and_failures(tmp_path):
    res = run_suite(decode.SUITE, tmp_path, lengths=[512, 1024], heads=4, kv_heads=(4, 2), head_dim=32,
                    timed_steps=2, cases=_small_cases(), console=Console(width=100, quiet=True))
    recs = res["records"]
    assert res["suite"] == "decode" and res["machine"]["seed"] == 0 and res["wall_s"] > 0
    assert res["status"] == "failed"  # the wrong, crashing and non-finite cases
    # every case at every cache and layout, SDPA first, nothing lost to the failing ones
    assert len(recs) == 2 * 2 * (1 + len(_small_cases()))
    for r in recs:
        for f in DECODE_FIELDS:
            assert f in r, f
    by = {(r["method"], r["cache"], r["kv_heads"]): r for r in recs}
    for cache in (512, 1024):
        for hkv in (4, 2):
            for name in ("sdpa", "dense", "streaming", "landmark", "quest", "tokenselect", "recycled"):
                r = by[(name, cache, hkv)]
                assert r["status"] == "ok", (name, r["status"])
                assert r["step_s"] > 0 and r["ratio_to_sdpa"] > 0 and r["kv_bytes"] > 0
                assert r["gate"]["passed"]
            assert by[("sdpa", cache, hkv)]["ratio_to_sdpa"] == pytest.approx(1.0)
            assert by[("dense", cache, hkv)]["rel_err"] < 1e-5
            assert by[("streaming", cache, hkv)]["gate"]["max_abs_err"] < 1e-4  # exact on its own mask
            # a selection at 256 of 1024 keys misses some of the mass; recall is a share
            lm = by[("landmark", 1024, hkv)]
            assert 0 < lm["recall"] <= 1 and lm["rel_err"] > 0 and lm["density"] < 0.5
            # streaming keeps sinks + window, retrieval keeps the whole cache
            assert by[("streaming", 1024, hkv)]["kv_kept_bytes"] < by[("landmark", 1024, hkv)]["kv_kept_bytes"]
            wrong, boom, nan = by[("wrong", cache, hkv)], by[("boom", cache, hkv)], by[("nan", cache, hkv)]
            assert wrong["status"] == "FAILED accuracy" and not wrong["gate"]["passed"]
            assert boom["status"].startswith("error: RuntimeError: kernel exploded")
            assert nan["status"] == "FAILED: non-finite output"
            for r in (wrong, boom, nan):
                assert r["step_s"] is None and r["ratio_to_sdpa"] is None
    assert {(row["method"], row["key"]) for row in res["efficiency_length"]} >= {("landmark", 4), ("quest", 2)}
    data = _strict_json(tmp_path / "results.json")
    assert data["suite"] == "decode" and len(data["records"]) == len(recs)
    report = (tmp_path / "report.md").read_text()
    for name in ("sdpa", "dense", "streaming", "landmark", "quest", "tokenselect", "recycled", "wrong", "boom", "nan"):
        assert f"| {name} |" in report, name
    assert "## Efficiency length" in report and "FAILED accuracy" in report


def test_decode_suite_names_and_memory_guard(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown method"):
        run_suite(decode.SUITE, tmp_path, lengths=[256], methods=["nope"], console=Console(quiet=True))
    assert not (tmp_path / "results.json").exists()  # refused before any work
    assert get_suite("decode") is decode.SUITE
    assert [c.label for c in decode.select_cases(decode.default_cases(), None)] == [
        "dense", "dense_chunked", "streaming", "landmark", "quest", "tokenselect", "recycled"]
    # too little memory: every case is recorded as skipped, nothing runs or crashes
    monkeypatch.setattr(harness, "available_memory", lambda: 1)
    res = run_suite(decode.SUITE, tmp_path, lengths=[256], methods=["quest"], kv_heads=(8,),
                    console=Console(quiet=True))
    assert [r["method"] for r in res["records"]] == ["sdpa", "quest"]
    assert all(r["status"].startswith("oom:") and r["step_s"] is None for r in res["records"])


def test_exact_reference_matches_the_oracle():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 5, 16, generator=g)
    k, v = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    keys = torch.rand(300, generator=g) < 0.3
    for kw, ref_kw in (({}, {}), ({"q_pos": torch.arange(295, 300)}, {"causal": True}),
                       ({"key_mask": keys}, {"mask": keys})):
        out, lse = harness.exact_reference(q, k, v, chunk=64, **kw)
        ref, ref_lse = longattn.reference_attention(q, k, v, **ref_kw)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)


def test_crossover_helpers():
    pts = [(1024, 0.5), (4096, 0.8), (16384, 2.0), (65536, 4.0)]
    est = harness.crossover_estimate(pts)
    assert 4096 < est < 16384
    assert harness.crossover_estimate([(1024, 2.0), (4096, 3.0)]) is None  # ahead from the smallest
    assert harness.crossover_estimate([(1024, 0.5), (4096, None)]) is None
    rows = harness.crossovers([
        {"method": "sdpa", "cache": 1, "ratio_to_sdpa": 1.0},
        {"method": "x", "cache": 1024, "kv_heads": 8, "ratio_to_sdpa": 2.0},
        {"method": "x", "cache": 4096, "kv_heads": 8, "ratio_to_sdpa": 3.0},
    ])
    assert rows == [{"method": "x", "key": 8, "efficiency_length": 1024, "ahead_from_smallest": True,
                     "crossover_estimate": None, "lengths_timed": [1024, 4096]}]


def test_document_ids_and_visible_pairs_match_the_masks():
    for n in (200, 1000):
        ids = peers.document_ids(n, seed=3)
        assert ids.shape == (n,) and int(ids.max()) == peers.DOCUMENTS - 1
        assert bool((ids[1:] >= ids[:-1]).all())
        for case in peers.CASES:
            dense = peers.longattn_mask(case, n, ids).dense(1, 1, n, n)
            assert peers.visible_pairs(case, n, ids) == int(dense.sum()), case


def _make_with_failures(peer, case, tokens, ids):
    if peer == "window":
        return ScaledWindow(window=peers.WINDOW)
    if peer == "dense_chunked":
        return Boom()
    return peers.default_method(peer, case, tokens, ids)


def test_peers_suite_records_gates_and_failures(tmp_path):
    res = run_suite(peers.SUITE, tmp_path, lengths=[256, 512],
                    methods=["dense", "dense_chunked", "window", "pattern", "kvpress"],
                    heads=2, head_dim=16, make_method=_make_with_failures, console=Console(width=100, quiet=True))
    recs = res["records"]
    assert res["suite"] == "peers" and res["machine"]["torch"] == torch.__version__
    for r in recs:
        for f in PEER_FIELDS:
            assert f in r, f
    kv = [r for r in recs if r["peer"] == "kvpress"]
    assert len(kv) == 1 and kv[0]["status"].startswith("unsupported: kvpress")
    assert "kvpress_side" in kv[0]["status"] and "issue" not in kv[0]["status"]
    by = {(r["peer"], r["case"], r["tokens"]): r for r in recs if r["peer"] != "kvpress"}
    # sdpa on every mask, dense_chunked and dense on causal only, window and pattern on theirs
    assert len(by) == 2 * (3 + 2 + 1 + 1)
    for n in (256, 512):
        for key in (("sdpa", "causal"), ("sdpa", "window"), ("sdpa", "document"), ("dense", "causal"),
                    ("pattern", "document")):
            r = by[(*key, n)]
            assert r["status"] == "ok", (key, r["status"])
            assert r["gate"]["passed"] and r["median_s"] > 0 and r["ratio_to_sdpa"] > 0 and r["flops"] > 0
        assert by[("sdpa", "causal", n)]["ratio_to_sdpa"] == pytest.approx(1.0)
        assert by[("pattern", "document", n)]["density"] < by[("dense", "causal", n)]["density"] == 1.0
        win, boom = by[("window", "window", n)], by[("dense_chunked", "causal", n)]
        assert win["status"] == "FAILED accuracy" and win["median_s"] is None and win["ratio_to_sdpa"] is None
        assert boom["status"].startswith("error: RuntimeError") and boom["ratio_to_sdpa"] is None
    assert ("flex", "causal", 256) not in by  # not asked for
    data = _strict_json(tmp_path / "results.json")
    assert len(data["records"]) == len(recs)
    report = (tmp_path / "report.md").read_text()
    for name in ("sdpa", "dense", "dense_chunked", "window", "pattern", "kvpress"):
        assert f"| {name} |" in report or f"## {name}" in report, name
    assert "FAILED accuracy" in report


def test_peers_flex_unavailable_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "flex_unavailable", lambda: "no C++ compiler here")
    res = run_suite(peers.SUITE, tmp_path, lengths=[128], methods=["flex"], cases=("causal",), heads=2, head_dim=16,
                    console=Console(quiet=True))
    flex = [r for r in res["records"] if r["peer"] == "flex"]
    assert [r["status"] for r in flex] == ["unsupported: no C++ compiler here"]
    assert flex[0]["ratio_to_sdpa"] is None
    with pytest.raises(ValueError, match="unknown method"):
        run_suite(peers.SUITE, tmp_path / "b", lengths=[128], methods=["flash"], console=Console(quiet=True))


def test_kvpress_record_when_importable(monkeypatch):
    import importlib.metadata
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "kvpress" else real(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")
    rec = peers.kvpress_record()
    assert rec["version"] == "9.9" and rec["status"].startswith("unsupported: kvpress 9.9 is importable")


@pytest.mark.skipif(peers.flex_unavailable() is not None, reason="compiled FlexAttention cannot run here")
def test_peers_flex_compiles_outside_the_timed_samples(tmp_path):
    res = run_suite(peers.SUITE, tmp_path, lengths=[128], methods=["flex"], cases=("causal",), heads=2, head_dim=16,
                    console=Console(quiet=True))
    (flex,) = [r for r in res["records"] if r["peer"] == "flex"]
    assert flex["status"] == "ok", flex["status"]
    assert flex["gate"]["passed"] and flex["compile_s"] > 0 and flex["block_mask_s"] >= 0
    assert flex["median_s"] > 0 and flex["ratio_to_sdpa"] > 0 and "first_call_s" not in flex
