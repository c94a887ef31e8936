"""The main job (``longattn bench``, suite ``all``): every suite runs, one failing suite does not
lose the others, and the combined results, report, plots and HTML page are written."""

import json

import pytest

from longattn.bench import main

TINY = {
    "kernels": {"lengths": [256]},
    "sparse": {"parts": ("frontier",), "frontier_tokens": 1024},
    "decode": {"lengths": [512, 1024]},
    "tasks": {"parts": ("perplexity",), "perplexity_tokens": 600},
    "peers": {"lengths": [256]},
    "memory": {"parts": ("long_decode",), "lengths": [4096], "decode": 2, "methods": ["blocks"]},
}


def test_main_job_writes_everything_and_survives_a_failing_suite(tmp_path, monkeypatch):
    options = {**TINY, "peers": {"lengths": [256], "no_such_option": 1}}  # peers will raise TypeError
    monkeypatch.setattr(main, "QUICK_OPTIONS", options)
    res = main.run_all(tmp_path)
    assert list(res["suites"]) == list(main.MAIN_SUITES)
    assert res["suite_status"]["peers"].startswith("error: TypeError")
    for name in ("kernels", "sparse", "decode", "tasks", "memory"):
        assert res["suite_status"][name] == "ok", (name, res["suite_status"][name])
        assert res["suites"][name]["records"], name
        assert (tmp_path / name / "results.json").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["mode"] == "quick" and set(saved["suites"]) == set(main.MAIN_SUITES)
    report = (tmp_path / "report.md").read_text()
    assert "## longattn kernels benchmark" in report and "| peers | error: TypeError" in report
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert 'id="suite-memory"' in html and "Long prompt through the tiered memory" in html
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "speedup_vs_length.png" in pngs and "error_vs_density.png" in pngs and "memory_vs_length.png" in pngs


def test_main_job_refuses_per_suite_options():
    with pytest.raises(ValueError, match="--lengths applies to one suite"):
        main.run_all("/tmp/never", lengths=[1024])
    with pytest.raises(ValueError, match="--methods applies to one suite"):
        main.run_all("/tmp/never", methods=["dense"])
    with pytest.raises(ValueError, match="unknown suite"):
        main.run_all("/tmp/never", suites=["nope"])
