"""``longattn methods`` and ``longattn bench`` through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import longattn
from longattn.cli import app

pytestmark = pytest.mark.cpu_only(reason="the command line (methods, bench) is a CPU program")

runner = CliRunner()


def test_methods_lists_every_registered_name():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    for spec in longattn.methods():
        assert spec.name in res.output
    assert "exact" in res.output


def test_bench_unknown_suite_lists_known():
    res = runner.invoke(app, ["bench", "--suite", "nope"])
    assert res.exit_code != 0
    assert "nope" in res.output and "kernels" in res.output


def test_bench_unknown_method_and_bad_lengths():
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--methods", "warp_drive", "--lengths", "256"])
    assert res.exit_code != 0 and "warp_drive" in res.output
    # the main job has no per-suite options: it says so and names --suite
    res = runner.invoke(app, ["bench", "--methods", "dense"])
    assert res.exit_code != 0 and "--suite" in res.output
    res = runner.invoke(app, ["bench", "--lengths", "12x"])
    assert res.exit_code != 0 and "12x" in res.output


def test_bench_kernels_small(tmp_path):
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--out", str(out), "--lengths", "256",
                              "--methods", "dense,window"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert {r["label"] for r in data["records"]} == {"sdpa", "dense", "window"}
    assert (out / "report.md").exists()
    assert "window" in res.output


def test_train_retrieval_command_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    from longattn.models import retrieval, train_retrieval

    calls = []
    real_main = train_retrieval.main

    def small_main(argv):
        calls.append(argv)
        # the real entry point, shrunk so the test stays fast: few steps, short sequences
        return real_main(argv + ["--tokens-per-step", "256", "--max-length", "128", "--dim", "32", "--hidden", "64"])

    monkeypatch.setattr(train_retrieval, "main", small_main)
    monkeypatch.setattr(train_retrieval, "final_evaluation", lambda model, **kw: {"passkey@128": 0.0})
    res = runner.invoke(app, ["train-retrieval", "--out", str(tmp_path / "ck"), "--steps", "3", "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert calls == [["--out", str(tmp_path / "ck"), "--seed", "5", "--steps", "3"]]
    model = retrieval.load(tmp_path / "ck")
    cfg = retrieval.read_config(tmp_path / "ck")
    assert cfg["training"]["seed"] == 5 and cfg["training"]["steps"] == 3 and model.config.dim == 32


def test_train_command_trains_a_recurrent_mqar_model_with_conv_ramp_and_mixer_options(tmp_path):
    from longattn.train import load_model, read_config

    out = tmp_path / "gdn"
    res = runner.invoke(app, ["train", "--out", str(out), "--mixer", "gated_deltanet", "--mixer-option",
                              "output_gate=false", "--short-conv", "4", "--dim", "32", "--length", "64",
                              "--pairs", "2,4", "--pairs-ramp", "2", "--steps", "3", "--tokens-per-step", "256",
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    cfg = read_config(out)
    assert cfg["model"]["short_conv"] == 4 and cfg["model"]["mixer_options"] == {"output_gate": False}
    assert cfg["training"]["task"]["pairs_ramp"] == 2
    model = load_model(out)
    assert model.layers[0].mixer.output_norm and not model.layers[0].mixer.output_gate
    bad = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--mixer", "gla", "--mixer-option",
                              "output_norm=3", "--steps", "1"])
    assert bad.exit_code != 0 and "output_norm must be a bool" in bad.output
    # a malformed KEY=VALUE is blamed on the option it came from
    bad = runner.invoke(app, ["train", "--out", str(tmp_path / "y"), "--method", "moba", "--method-option", "top_k"])
    assert bad.exit_code != 0 and "--method-option" in bad.output and "--mixer-option" not in bad.output


def test_version_flag_prints_the_package_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"longattn {longattn.__version__}"


def test_a_bad_out_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    from longattn.memory import calibrate
    from longattn.models import train_retrieval

    def must_not_run(*a, **k):
        raise AssertionError("the work started before --out was checked")

    monkeypatch.setattr(calibrate, "calibrate_heads", must_not_run)
    monkeypatch.setattr(train_retrieval, "main", must_not_run)
    monkeypatch.setattr("longattn.bench.sparse.capture_real_qkv", must_not_run)
    for argv in (["calibrate-heads", "--out", str(tmp_path)],
                 ["calibrate-heads", "--out", str(a_file / "map.json")],
                 ["calibrate-minference", "--out", str(tmp_path)],
                 ["train-retrieval", "--out", str(a_file)]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (argv, res.output)
        flat = " ".join(res.output.replace("│", " ").split())  # rich wraps the message in a box
        assert "--out" in flat and ("is a folder" in flat or "is a file" in flat), res.output
