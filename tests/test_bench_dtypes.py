"""The benchmark in half precision: bf16 records beside float32 ones, each against SDPA in the same
dtype, gated by flash attention's rule; the machine's matmul unit and the compute dtype recorded."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from longattn.bench import decode, harness, kernels
from longattn.bench.suite import run_suite
from longattn.cli import app

runner = CliRunner()


def test_kernels_suite_runs_bf16_against_sdpa_in_bf16(tmp_path):
    res = run_suite(kernels.SUITE, tmp_path, lengths=[256], methods=["dense", "window"], n_rows=16,
                    dtypes=("float32", "bfloat16"), half_lengths=None, shapes=["self"],
                    console=Console(quiet=True))
    assert res["status"] == "ok"
    assert res["machine"]["isa"] in ("AMX", "AVX-512+BF16", "AVX-512", "AVX2", "baseline")
    assert set(res["machine"]["compute_dtype_rule"]) == {"bfloat16", "float16"}
    half = [r for r in res["records"] if r["dtype"] == "bfloat16"]
    assert {r["label"] for r in half} == {"sdpa", "dense", "window"}
    for r in half:
        base = next(b for b in half if b["label"] == "sdpa" and b["causal"] == r["causal"])
        assert r["sdpa_median_s"] == base["median_s"]  # the same dtype's baseline
        if r["label"] != "sdpa":
            assert r["gate"]["passed"] and r["compute_dtype"] in ("float32", "bfloat16")
            assert r["gate"]["atol"] >= 2 * base["gate"]["max_abs_err"]  # flash attention's rule
            assert r["gate"]["atol"] < 0.05
    text = (tmp_path / "report.md").read_text()
    assert "dense · bf16" in text and "matmul unit:" in text


def test_a_half_gate_still_fails_a_wrong_answer():
    q, k, v = (torch.randn(1, 2, 64, 16).to(torch.bfloat16) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    atol, rtol = harness.half_gate_tolerance({"max_abs_err": 4e-3, "rel_err": 4e-3})
    rows = torch.arange(64)
    from longattn.core.masks import Causal

    assert harness.check_rows(out, q, k, v, mask=Causal(), rows=rows, atol=atol, rtol=rtol).passed
    wrong = out.clone()
    wrong[:, :, 5] += 0.05
    assert not harness.check_rows(wrong, q, k, v, mask=Causal(), rows=rows, atol=atol, rtol=rtol).passed


def test_decode_suite_reads_half_the_bytes_in_bf16(tmp_path):
    res = run_suite(decode.SUITE, tmp_path, lengths=[512], heads=4, kv_heads=(4,), head_dim=32, timed_steps=2,
                    methods=["dense", "streaming", "landmark"], dtypes=("float32", "bfloat16"), half_lengths=None,
                    console=Console(quiet=True))
    assert res["status"] == "ok", [r.get("gate") for r in res["records"] if r.get("status") != "ok"]
    by = {(r["method"], r["dtype"]): r for r in res["records"]}
    assert by[("dense", "bfloat16")]["kv_read_bytes"] * 2 == by[("dense", "float32")]["kv_read_bytes"]
    assert by[("streaming", "bfloat16")]["gate"]["passed"]
    assert by[("sdpa", "bfloat16")]["layout"].endswith("bf16")


def test_cli_refuses_bad_dtypes_and_devices(tmp_path):
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--dtypes", "float8", "--out", str(tmp_path / "a")])
    assert res.exit_code != 0 and "--dtypes" in res.output and "float8" in res.output
    res = runner.invoke(app, ["bench", "--suite", "tasks", "--dtypes", "bfloat16", "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "float32 only" in res.output
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--device", "tpu", "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and "--device" in res.output
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["bench", "--suite", "kernels", "--device", "cuda", "--out", str(tmp_path / "d")])
        assert res.exit_code != 0 and "CUDA is not available" in res.output
    harness.use_device("cpu")


def test_cli_dtypes_reach_the_suite(tmp_path):
    out = tmp_path / "k"
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--out", str(out), "--lengths", "256",
                              "--methods", "dense", "--dtypes", "bfloat16"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert {r["dtype"] for r in data["records"]} == {"bfloat16"}
