"""The recurrent benchmark suite: every op is gated against its naive recurrence before it is timed,
the derived tables (crossover, decode constancy, MQAR vs state) are built, and the MQAR figure is
drawn."""

import json

import pytest
import torch
from rich.console import Console

from longattn.bench import get_suite, recurrent
from longattn.bench.suite import run_suite

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")

TINY = {"lengths": [256, 512], "dtypes": ["float32", "bfloat16"], "histories": [128, 512], "steps": 3,
        "widths": [32], "mqar_length": 64, "pairs": [2, 4], "mqar_steps": 2, "copy_steps": 1, "tokens_per_step": 256, "repeats": 1}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "out"
    con = Console(file=open(out.parent / "console.txt", "w"), width=80)
    return run_suite(get_suite("recurrent"), out, console=con,
                     methods=["linear", "gla", "rat", "attention", "based"], **TINY), out


def test_every_selected_case_runs_and_passes_its_gate(results):
    res, out = results
    assert res["status"] == "ok", [r for r in res["records"] if r["status"] != "ok"][:3]
    prefill = [r for r in res["records"] if r["test"] == "prefill" and r["method"] != "sdpa"]
    assert {r["method"] for r in prefill} == {"linear", "gla", "rat", "based"}
    for r in prefill:
        assert r["gate_rel_rmse"] <= recurrent.GATE_TOL[r["dtype"]] and r["speedup"] > 0, r
    assert {r["dtype"] for r in prefill} == {"float32", "bfloat16"}
    report = (out / "report.md").read_text()
    assert "Crossover length" in report and "Decode step" in report and "MQAR learned from scratch" in report


def test_mqar_records_carry_state_size_accuracy_and_speed(results):
    res, _ = results
    mqar = {r["method"]: r for r in res["records"] if r["test"] == "mqar"}
    assert set(mqar) == {"linear", "gla", "rat", "attention", "based"}
    for r in mqar.values():
        assert r["state_bytes"] > 0 and 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_s"] > 0
        assert set(r["accuracy_by_pairs"]) == {2, 4}
        # per-query accuracy (Zoology) is never below the all-values-right share of samples
        assert 0.0 <= r["sample_accuracy"] <= r["accuracy"] + 1e-12
    # only the attention model gets the copy warm-up
    assert mqar["attention"]["copy_steps"] == 1 and all(r["copy_steps"] == 0 for m, r in mqar.items() if m != "attention")
    # attention's state is its KV cache at the task length; the fixed states do not grow with it
    assert mqar["attention"].get("state_bytes") == 2 * 2 * 1 * 32 * 64 * 4


def test_a_wrong_op_fails_its_gate_and_gets_no_speed(tmp_path, monkeypatch):
    real = recurrent.op_call

    def broken(name, tokens, dtype, seed=0, **kw):
        chunked, step, ref = real(name, tokens, dtype, seed, **kw)
        return (lambda state=None: (lambda o: (o[0] * 1.01, o[1]))(chunked(state))), step, ref

    monkeypatch.setattr(recurrent, "op_call", broken)
    res = run_suite(get_suite("recurrent"), tmp_path / "o", console=Console(file=open(tmp_path / "c.txt", "w")),
                    methods=["linear"], parts=("prefill",), **{**TINY, "dtypes": ["float32"], "lengths": [256]})
    rec = [r for r in res["records"] if r["method"] == "linear"][0]
    assert rec["status"].startswith("FAILED: chunked vs naive") and "time_s" not in rec and "speedup" not in rec


def test_op_call_forms_agree_for_every_op():
    for name in recurrent.OPS:
        chunked, one_step, _ = recurrent.op_call(name, 40, torch.float32, 1)
        full, _ = chunked()
        _, state = chunked(tokens=37)
        outs = []
        for i in range(37, 40):
            o, state = one_step(i, state)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, -2), full[..., 37:40, :], atol=1e-5, rtol=1e-5, msg=name)


def test_the_mqar_figure_is_drawn(results, tmp_path):
    pytest.importorskip("matplotlib")
    from longattn.bench import plots

    res, _ = results
    combined = {"kind": "main", "machine": res["machine"], "config": {}, "suites": {"recurrent": res}}
    written = plots.write_all(json.loads(json.dumps(combined)), tmp_path)
    assert "accuracy_vs_state" in written and written["accuracy_vs_state"].stat().st_size > 10_000


def test_mqar_in_worker_processes_repeats_the_one_thread_runs(tmp_path):
    """``mqar_jobs=2`` trains in one-thread worker processes and gives the records a one-thread run
    in this process gives, in the same order."""
    opts = {**TINY, "dtypes": ["float32"], "mqar_steps": 3}
    res = run_suite(get_suite("recurrent"), tmp_path / "o", console=Console(file=open(tmp_path / "c.txt", "w")),
                    methods=["linear", "gla"], parts=("mqar",), mqar_jobs=2, **opts)
    got = [(r["method"], r["final_loss"], r["accuracy"]) for r in res["records"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [(m, r["final_loss"], r["accuracy"]) for m in ("linear", "gla")
                for r in [recurrent.run_mqar(m, 32, length=64, pairs=(2, 4), steps=3, tokens_per_step=256, lr=3e-3,
                                             seed=0, copy_steps=1, say=lambda line: None)]]
    finally:
        torch.set_num_threads(threads)
    assert got == want
