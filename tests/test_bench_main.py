"""The main job (``longattn bench``): every suite runs, a failing suite or part does not lose the
others and is said plainly (one line, no absolute path, exit status 1), results are never
clobbered, and the combined results, report, plots and HTML page are written."""

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from longattn.bench import MAIN_SUITES, main, tasks
from longattn.bench.suite import claim_folder
from longattn.cli import app

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")

TINY = {
    "kernels": {"lengths": [256]},
    "sparse": {"parts": ("frontier",), "frontier_tokens": (1024,)},
    "decode": {"lengths": [512, 1024]},
    "tasks": {"parts": ("perplexity",), "perplexity_tokens": 600},
    "peers": {"lengths": [256]},
    "memory": {"parts": ("long_decode",), "lengths": [4096], "decode": 2},
    "recurrent": {"lengths": [256], "dtypes": ["float32"], "histories": [128, 256], "steps": 2, "widths": [32],
                  "mqar_length": 64, "pairs": [2], "mqar_steps": 1, "copy_steps": 0, "tokens_per_step": 128, "repeats": 1},
}


def _quiet(tmp_path):
    return Console(file=open(tmp_path / "console.txt", "w"), width=80)


def test_main_job_writes_everything_and_survives_a_failing_suite_and_part(tmp_path, monkeypatch):
    def missing_file(*a, **k):
        raise FileNotFoundError("/very/private/place/stories260K.bin is missing")

    monkeypatch.setattr(tasks, "run_perplexity", missing_file)
    options = {**TINY, "peers": {"lengths": [256], "no_such_option": 1}}  # peers cannot start
    out = tmp_path / "out"
    res = main.run_all(out, options=options, console=_quiet(tmp_path))
    assert list(res["suites"]) == list(MAIN_SUITES) and res["status"] == "failed"
    assert res["suites"]["peers"]["status"] == "failed"
    assert "unknown option(s) no_such_option" in res["suites"]["peers"]["error"]
    t = res["suites"]["tasks"]
    assert t["status"] == "failed" and t["parts"]["perplexity"]["status"] == "error"
    assert t["parts"]["perplexity"]["reason"] == "FileNotFoundError: …/stories260K.bin is missing"
    for name in ("kernels", "sparse", "decode", "memory", "recurrent"):
        assert res["suites"][name]["status"] == "ok", (name, res["suites"][name].get("parts"))
        assert res["suites"][name]["records"], name
        assert (out / name / "results.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["kind"] == "main" and saved["config"]["mode"] == "quick" and set(saved["suites"]) == set(MAIN_SUITES)
    report = (out / "report.md").read_text()
    head = report.split("## longattn kernels benchmark")[0]  # the status comes first
    assert "- tasks: FAILED (0 records" in head and "part perplexity error: FileNotFoundError" in head
    assert "- peers: FAILED" in head and "2 of 7 suites FAILED: tasks, peers" in head
    assert "/very/private" not in report and "Traceback" not in report
    log = (out / "errors.log").read_text()
    assert "Traceback" in log and "/very/private/place/stories260K.bin" in log and "== tasks · perplexity ==" in log
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert 'id="suite-memory"' in html and "Long prompt through the tiered memory" in html
    assert html.index('id="status"') < html.index('id="plots"') and "2 of 7 suites FAILED" in html
    assert "/very/private" not in html and "Traceback" not in html
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "speedup_vs_length.png" in pngs and "error_vs_density.png" in pngs and "memory_vs_length.png" in pngs
    _assert_tables_fit_80_columns(res)
    console = (tmp_path / "console.txt").read_text()
    before, _, tail = console.rpartition("longattn bench")  # the rule above the last lines
    assert "tracebacks in" in before[-400:]
    assert "tasks: FAILED" in tail and "peers: FAILED" in tail and "FileNotFoundError" in tail
    assert console.rstrip().splitlines()[-1].startswith("2 of 7 suites FAILED: tasks, peers (")


def _assert_tables_fit_80_columns(combined):
    """Every suite's console tables at 80 columns: no line wider, nothing cut to an ellipsis, and
    every row's name shown whole (a long name wraps onto a second line instead)."""
    import io

    from longattn.bench import get_suite
    from longattn.bench.suite import console_table, render_tables

    for name, res in combined["suites"].items():
        if not res["records"]:  # the suite that could not start, the one whose only part failed
            continue
        rendered = render_tables(get_suite(name), res, target="console")
        assert rendered, name
        for r in rendered:
            buf = io.StringIO()
            Console(file=buf, width=80, force_terminal=False).print(console_table(r, 80))
            text = buf.getvalue()
            assert max(map(len, text.splitlines())) <= 80, (name, text)
            assert "…" not in text, (name, text)
            words = set(text.split())
            for row in r.rows:
                for part in row[0].split():
                    assert part in words, (name, row[0], text)


def test_the_command_exits_non_zero_when_a_suite_failed_unless_allowed(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(tasks, "run_perplexity", broken)
    runner = CliRunner()
    out = tmp_path / "one"
    argv = ["bench", "--suite", "tasks", "--methods", "dense", "--out", str(out)]
    res = runner.invoke(app, argv + ["--lengths", "256"])
    assert res.exit_code == 1, res.output
    assert "tasks: FAILED" in res.output and "RuntimeError: kernel exploded" in res.output
    assert (out / "errors.log").exists() and "kernel exploded" in (out / "report.md").read_text()
    # the retrieval part did its work: one failed part does not drop the others
    data = json.loads((out / "results.json").read_text())
    assert data["parts"]["retrieval"]["status"] == "ok" and data["records"]
    res = runner.invoke(app, argv + ["--lengths", "256", "--allow-partial"])
    assert res.exit_code == 0, res.output


def test_results_are_never_clobbered(tmp_path):
    main_dir = tmp_path / "bench-out"
    claim_folder(main_dir, "main", "all")
    (main_dir / "results.json").write_text(json.dumps({"kind": "main", "suites": {}}))
    (main_dir / "kernels").mkdir()
    (main_dir / "kernels" / "results.json").write_text(json.dumps({"kind": "suite", "suite": "kernels",
                                                                    "part_of_main": True}))
    with pytest.raises(ValueError, match="holds the main job's results"):
        claim_folder(main_dir, "suite", "kernels")
    with pytest.raises(ValueError, match="holds the kernels suite's results of a main job"):
        claim_folder(main_dir / "kernels", "suite", "kernels")
    assert claim_folder(main_dir, "main", "all") == main_dir  # the main job may rerun into its folder
    alone = tmp_path / "bench-out-kernels"
    alone.mkdir()
    (alone / "results.json").write_text(json.dumps({"kind": "suite", "suite": "kernels", "part_of_main": False}))
    assert claim_folder(alone, "suite", "kernels") == alone  # the same suite may rerun
    with pytest.raises(ValueError, match="holds the kernels suite's results"):
        claim_folder(alone, "suite", "decode")
    with pytest.raises(ValueError, match="holds the kernels suite's results"):
        claim_folder(alone, "main", "all")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a longattn run's"):
        claim_folder(foreign, "main", "all")
    res = CliRunner().invoke(app, ["bench", "--suite", "kernels", "--out", str(main_dir), "--lengths", "128"])
    assert res.exit_code == 2 and "main job" in " ".join(res.output.replace("│", " ").split())


def test_the_main_job_refuses_per_suite_options_and_bad_values_before_any_work(tmp_path):
    runner = CliRunner()
    for argv, text in ((["bench", "--methods", "dense"], "--suite"), (["bench", "--lengths", "1024"], "--suite"),
                       (["bench", "--lengths", "12x"], "12x"),
                       (["bench", "--suite", "decode", "--methods", "warp_drive"], "warp_drive"),
                       (["bench", "--suite", "tasks", "--methods", "nope"], "nope"),
                       (["bench", "--suite", "memory", "--methods", "sdpa"], "sdpa"),
                       (["bench", "--suite", "nope"], "kernels")):
        res = runner.invoke(app, argv + ["--out", str(tmp_path / "x")])
        assert res.exit_code == 2, (argv, res.output)
        assert text in res.output, (argv, res.output)
    assert not (tmp_path / "x").exists()
    a_file = tmp_path / "f"
    a_file.write_text("")
    res = runner.invoke(app, ["bench", "--suite", "kernels", "--lengths", "128", "--out", str(a_file)])
    assert res.exit_code == 2 and "is a file" in " ".join(res.output.replace("│", " ").split())
    with pytest.raises(ValueError, match="unknown suite"):
        main.run_all(tmp_path / "never", suites=["nope"])
