"""The benchmark harness and the kernels suite (tiny lengths: the tiled kernel, never Flex)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch
from rich.console import Console

import longattn
from longattn.bench import get_suite, harness, kernels
from longattn.bench.suite import run_suite
from longattn.methods.dense import DenseChunked
from longattn.methods.local import SlidingWindow

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")


def _qkv(tokens=256, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, tokens, dim, generator=g) for _ in range(3))


@dataclass(frozen=True)
class ScaledOutput(DenseChunked):
    """Test-only: a registered exact method whose output is deliberately wrong."""

    factor: float = 1.5

    def run(self, q, k, v, call):
        res = super().run(q, k, v, call)
        res.out = res.out * self.factor
        return res


@dataclass(frozen=True)
class Exploding(SlidingWindow):
    """Test-only: a method that raises inside its kernel."""

    def run(self, q, k, v, call):
        raise RuntimeError("kernel exploded")


@dataclass(frozen=True)
class Hungry(SlidingWindow):
    def run(self, q, k, v, call):
        raise MemoryError()


def test_time_call_statistics():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = harness.time_call(fn, warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.warmup_s) == 2 and len(t.samples) == 5
    assert t.min_s <= t.median_s <= t.max_s
    assert t.min_s >= 0.0015 and t.spread_s >= 0
    assert t.peak_mem_bytes is None


def test_time_call_budget_and_memory():
    t = harness.time_call(lambda: time.sleep(0.02), warmup=0, repeats=10, max_seconds=0.01)
    assert len(t.samples) == 1  # the budget is spent after the first sample
    with pytest.raises(ValueError):
        harness.time_call(lambda: None, repeats=0)

    def alloc():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.02)
        return float(x[-1])

    t = harness.time_call(alloc, warmup=0, repeats=1, track_memory=True)
    if harness.current_rss() is not None:
        assert t.peak_mem_bytes is not None and t.peak_mem_bytes > 32 * 2**20


def test_peak_memory_helper():
    res, peak = harness.peak_memory(lambda: 7)
    assert res == 7 and (peak is None or peak >= 0)


def test_gate_passes_for_exact_methods():
    q, k, v = _qkv(300)
    for m in (longattn.method("dense"), longattn.method("window", window=40),
              longattn.method("pattern", mask=longattn.masks.lsg(window=32, stride=3, global_tokens=5, block_size=16))):
        for causal in (True, False):
            gate = harness.check_exact(m, q, k, v, causal, n_rows=32, seed=1)
            assert gate.passed, (m.name, causal, gate)
            assert gate.rows == 32 and gate.max_abs_err < 1e-5


def test_gate_cross_attention_rows_use_aligned_positions():
    q, _, _ = _qkv(64, seed=1)
    _, k, v = _qkv(200, seed=2)
    gate = harness.check_exact(longattn.method("window", window=30), q, k, v, True, n_rows=16, seed=0)
    assert gate.passed, gate


def test_gate_fails_for_wrong_method():
    q, k, v = _qkv(256)
    gate = harness.check_exact(ScaledOutput(), q, k, v, True, n_rows=16, seed=0)
    assert not gate.passed and gate.max_abs_err > 1e-3 and "max abs error" in gate.reason


def test_wrong_method_case_gets_no_speed_figure():
    q, k, v = _qkv(256)
    rec = harness.run_attention_case(ScaledOutput(), q, k, v, causal=True, repeats=1)
    assert rec["status"] == "FAILED accuracy"
    assert not rec["gate"]["passed"]
    for key in ("median_s", "min_s", "tflops", "samples"):
        assert key not in rec


def test_good_case_record():
    q, k, v = _qkv(256)
    rec = harness.run_attention_case("dense_chunked", q, k, v, causal=True, repeats=2)
    assert rec["status"] == "ok" and rec["gate"]["passed"]
    assert rec["path"] == "tiled" and rec["density"] == pytest.approx(1.0)
    assert len(rec["samples"]) == 2 and rec["median_s"] > 0 and rec["tflops"] > 0
    assert rec["flops"] == pytest.approx(4 * (256 * 257 // 2) * 16 * 2)


def test_exceptions_are_recorded_not_raised():
    q, k, v = _qkv(128)
    rec = harness.run_attention_case(Exploding(window=16), q, k, v, causal=True, repeats=1)
    assert rec["status"].startswith("error: RuntimeError: kernel exploded")
    assert harness.run_attention_case(Hungry(window=16), q, k, v, causal=True)["status"] == "oom"
    rec = harness.run_attention_case("streaming", q, k, v, causal=False)
    assert rec["status"].startswith("unsupported")
    assert harness.run_attention_case("no-such-method", q, k, v, causal=False)["status"].startswith("error")


def test_flops_from_masked_area():
    assert harness.attention_flops(4, 4, False, head_dim=2, heads=3, batch=1) == 4 * 16 * 2 * 3
    assert harness.attention_flops(4, 4, True, head_dim=2, heads=3, batch=2, density=0.5) == 4 * 0.5 * 10 * 2 * 3 * 2


def test_machine_info_keys():
    info = harness.machine_info(seed=3)
    for key in ("platform", "cpu_count", "torch", "longattn", "torch_threads", "seed", "date_utc"):
        assert key in info
    assert info["seed"] == 3


def test_machine_info_says_which_native_kernels_cannot_run(monkeypatch):
    """A run records the C kernels that could not be built (their ops then take the slower torch
    path), and its report says so."""
    from longattn.bench.suite import machine_lines
    from longattn.kernels import native_linear

    from conftest import reload_kernel

    reload_kernel(monkeypatch, native_linear.KERNEL)
    monkeypatch.setenv("LONGATTN_NATIVE", "0")
    info = harness.machine_info(seed=0)
    assert info["native_unavailable"]["linear_chunked"] == "disabled by LONGATTN_NATIVE=0"
    assert "linear_chunked unavailable (disabled by LONGATTN_NATIVE=0)" in "\n".join(
        machine_lines({"machine": info, "config": {}}))


def test_select_cases_filters():
    cases = kernels.default_cases()
    assert [c.label for c in kernels.select_cases(cases, ["window", "lsg"])] == ["window", "pattern:lsg"]
    assert all(c.label.startswith("pattern") for c in kernels.select_cases(cases, ["pattern"]))
    with pytest.raises(ValueError, match="known"):
        kernels.select_cases(cases, ["nope"])


def test_random_block_map_is_seeded_with_diagonal():
    a, b = kernels.random_block_map(2048, 0), kernels.random_block_map(2048, 0)
    assert torch.equal(a, b) and bool(a.diagonal().all())
    assert 0.05 < a.float().mean() < 0.2


def test_suite_writes_results_and_report(tmp_path):
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)
    res = run_suite(kernels.SUITE, tmp_path / "out", lengths=[256, 512],
                    methods=["dense", "window", "streaming", "pattern:prefix_lm"], console=console, n_rows=16)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["suite"] == "kernels" and data["kind"] == "suite" and data["config"]["lengths"] == [256, 512]
    assert data["status"] == "ok" and data["parts"]["cases"]["status"] == "ok"
    for key in ("platform", "cpu_count", "torch", "longattn", "seed", "date_utc", "load_average_at_end"):
        assert key in data["machine"]
    recs = data["records"]
    labels = {(r["label"], r["tokens"], r["causal"]) for r in recs}
    assert ("sdpa", 256, True) in labels and ("streaming", 512, True) in labels
    assert ("streaming", 256, False) not in labels and ("pattern:prefix_lm", 256, True) not in labels
    # per length and shape: sdpa, dense, window + streaming (causal) / prefix_lm (non-causal)
    assert len(recs) == 2 * 2 * (4 + 4)
    cross = [r for r in recs if r["shape"] == "cross"]
    assert len(cross) == 16 and all(r["tokens_q"] == r["tokens"] // 4 and r["tokens_k"] == r["tokens"] for r in cross)
    assert all(r["tokens_q"] == r["tokens_k"] == r["tokens"] for r in recs if r["shape"] == "self")
    cross_sdpa = [r for r in cross if r["label"] == "sdpa" and r["causal"]]
    assert cross_sdpa and all(r["params"] == "attn_mask=causal_lower_right" for r in cross_sdpa)
    assert "dense · causal cross" in data["efficiency_length"]
    for r in recs:
        assert r["status"] == "ok", r
        assert r["path"] in ("sdpa", "tiled")  # tiny lengths never compile Flex
        for key in ("median_s", "min_s", "max_s", "ratio_to_sdpa", "density", "computed_fraction",
                    "peak_mem_bytes", "tflops", "gate", "wall_s"):
            assert key in r
    assert all(r["ratio_to_sdpa"] == pytest.approx(1.0) for r in recs if r["label"] == "sdpa")
    assert "by_label" in data["time_spent"]
    report = (tmp_path / "out" / "report.md").read_text()
    for heading in ("## Causal: ratio to SDPA", "## Non-causal: ratio to SDPA", "## Causal cross (keys / 4",
                    "## Non-causal cross (keys / 4", "speed-ups at 512 tokens",
                    "## All cases", "## Failures", "## Where the time went"):
        assert heading in report
    assert "| window |" in report
    assert len(res["records"]) == len(recs)


def test_cross_sdpa_baseline_aligns_the_last_query_with_the_last_key():
    """The causal cross baseline must be the mask longattn computes (bottom-right), not SDPA's
    is_causal (top-left), or the ratio would compare different attention."""
    from longattn.core.reference import reference_attention

    q, k, v = kernels.make_inputs(256, 0)
    q = kernels.cross_queries(q, kernels.query_tokens(256, "cross"))
    assert q.shape[2] == 64 and q.is_contiguous()
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    out = kernels.sdpa_baseline(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (top_left.double() - ref).abs().max() > 0.1
    with pytest.raises(ValueError, match="shape"):
        kernels.query_tokens(256, "diagonal")


def test_suite_records_failures_and_keeps_going(tmp_path):
    cases = [
        kernels.KernelCase("wrong", lambda n, s: ScaledOutput()),
        kernels.KernelCase("boom", lambda n, s: Exploding(window=16)),
        kernels.KernelCase("bad-factory", lambda n, s: 1 / 0),
        kernels.KernelCase("window", lambda n, s: longattn.method("window", window=64)),
    ]
    console = Console(file=open(tmp_path / "console.txt", "w"), width=100)
    res = run_suite(kernels.SUITE, tmp_path, lengths=[256], cases=cases, console=console, n_rows=8)
    assert res["status"] == "failed"  # a failed gate and crashed cases fail the suite
    recs = {(r["label"], r["causal"]): r for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    wrong = recs[("wrong", True)]
    assert wrong["status"] == "FAILED accuracy" and "median_s" not in wrong and wrong["ratio_to_sdpa"] is None
    assert recs[("boom", False)]["status"].startswith("error: RuntimeError")
    assert recs[("bad-factory", True)]["status"].startswith("error: ZeroDivisionError")
    assert recs[("window", False)]["status"] == "ok"
    report = (tmp_path / "report.md").read_text()
    assert "FAILED accuracy" in report and "kernel exploded" in report


def test_get_suite():
    assert get_suite("kernels") is kernels.SUITE
    with pytest.raises(ValueError, match="kernels"):
        get_suite("nope")


@dataclass(frozen=True)
class FlexOnlyBroken(SlidingWindow):
    """Test-only: fails whenever its backend is 'auto' (stands in for a FlexAttention failure)."""

    def run(self, q, k, v, call):
        if self.backend == "auto":
            raise RuntimeError("pretend the compiled kernel failed")
        return super().run(q, k, v, call)


def test_failed_auto_case_gets_a_tiled_fallback_record(tmp_path, monkeypatch):
    from longattn.kernels import flex

    if flex.flex_unavailable_reason() is not None:
        pytest.skip("the fallback only applies where FlexAttention could run")
    monkeypatch.setattr(kernels, "FLEX_MIN_TOKENS", 1)  # treat tiny lengths as the Flex range (nothing compiles)
    cases = [kernels.KernelCase("flaky", lambda n, s: FlexOnlyBroken(window=32), (True,))]
    console = Console(file=open(tmp_path / "console.txt", "w"), width=100)
    res = run_suite(kernels.SUITE, tmp_path, lengths=[256], cases=cases, console=console, n_rows=8, shapes=["self"])
    flaky = [r for r in res["records"] if r["label"] == "flaky"]
    assert [r["status"].split(":")[0] for r in flaky] == ["error", "ok"]
    assert flaky[1]["fallback_for"] == "auto" and flaky[1]["backend"] == "tiled" and flaky[1]["path"] == "tiled"
    assert "flaky [tiled]" in (tmp_path / "report.md").read_text()


def test_efficiency_length_is_the_crossover_that_holds():
    from longattn.bench.harness import efficiency_length

    assert efficiency_length([(1024, 0.5), (4096, 1.2), (16384, 3.0)]) == 4096
    assert efficiency_length([(1024, 1.5), (4096, 0.9), (16384, 3.0)]) == 16384  # a dip resets it
    assert efficiency_length([(1024, 1.1), (4096, 1.2)]) == 1024
    assert efficiency_length([(1024, 2.0), (4096, 0.8)]) is None
    assert efficiency_length([(1024, None), (4096, 1.3)]) == 4096
    assert efficiency_length([]) is None
