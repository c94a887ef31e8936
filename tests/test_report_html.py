"""The benchmark's PNG plots and its self-contained report.html, rendered in headless Chromium.

The results are a fake but realistic combined run (every suite, the schema the suites write), so
these tests need no benchmark run. The Chromium test skips when Debian's ``chromium`` is missing,
except under CI (``CI`` set), where ``make test`` installs it and its absence is a failure.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from longattn.bench import plots  # noqa: E402
from longattn.bench.report_html import render_html, write_html  # noqa: E402

pytestmark = pytest.mark.cpu_only(reason="renders the benchmark's report (a CPU program) in headless Chromium")

MACHINE = {
    "date_utc": "2026-11-22T07:36:26+00:00", "platform": "Linux-6.1-x86_64-with-glibc2.36", "machine": "x86_64",
    "cpu_model": "AMD EPYC", "cpu_count": 2, "cpu_affinity": 2, "torch_threads": 2, "torch_interop_threads": 2,
    "python": "3.11.7", "torch": "2.13.0+cpu", "longattn": "0.1.0", "flex_unavailable_reason": None,
    "load_average_at_start": [1.0, 1.2, 1.3], "seed": 0,
}
LENGTHS = (1024, 2048, 4096, 8192, 16384)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: a name that must come out escaped wherever it appears
NASTY = "window<script>&"


def _suite(name, records, wall_s, **config):
    from longattn.bench import get_suite

    defaults = dict(get_suite(name).quick)
    return {"kind": "suite", "suite": name, "machine": MACHINE, "config": {"seed": 0, **defaults, **config},
            "records": records, "wall_s": wall_s, "parts": {}, "status": "ok"}


def fake_results() -> dict:
    """A combined run: every suite, each record with the fields the schema names (plus a few)."""
    rng = np.random.default_rng(0)
    kernels = []
    sdpa_s = {n: 2e-9 * n * n for n in LENGTHS}
    # speed-up trends: window/streaming grow with length, dense stays near 1, lsg in between
    trend = {"dense": lambda n: 0.9, "dense_chunked": lambda n: 0.7, "window": lambda n: n / 4096,
             "streaming": lambda n: n / 3500, "pattern:lsg": lambda n: 0.4 * math.sqrt(n / 1024)}
    for n in LENGTHS:
        for causal in (True, False):
            base = sdpa_s[n] * (0.5 if causal else 1.0)
            kernels.append({"label": "sdpa", "method": "sdpa", "tokens": n, "causal": causal, "status": "ok",
                            "median_s": base, "ratio_to_sdpa": 1.0, "density": 1.0, "peak_mem_bytes": 4 * n * n})
            for label, f in trend.items():
                if label == "streaming" and not causal:
                    continue
                r = f(n) * float(rng.uniform(0.9, 1.1))
                kernels.append({"label": label, "method": label.split(":")[0], "tokens": n, "causal": causal,
                                "status": "ok", "median_s": base / r, "ratio_to_sdpa": r,
                                "density": min(1.0, 2048 / n), "peak_mem_bytes": 256 * n * (2 if label == "dense"
                                                                                            else 1)})
    kernels.append({"label": "pattern:power", "method": "pattern", "tokens": 16384, "causal": True,
                    "status": "FAILED accuracy: max abs err 3e-2 > 1e-4", "median_s": None, "ratio_to_sdpa": None,
                    "density": 0.1, "peak_mem_bytes": None})
    kernels.append({"label": NASTY, "method": "window", "tokens": 8192, "causal": False,
                    "status": "unsupported: <b>no kernel</b> & no fallback", "median_s": None,
                    "ratio_to_sdpa": None, "density": None, "peak_mem_bytes": None})

    frontier = []
    for method, quality, speed in (("landmark", 1.0, 3.0), ("quest", 1.4, 2.6), ("hip", 0.8, 1.6),
                                   ("streaming", 4.0, 5.0)):
        for n in (16384, 32768):
            for d in (0.02, 0.05, 0.1, 0.2, 0.4):
                rel = 0.02 * quality * (0.1 / d) ** 0.8 * (n / 32768) ** 0.3
                ratio = speed * (n / 32768) * 0.1 / d
                frontier.append({"part": "frontier", "method": method, "tokens": n, "density": d, "rel_err": rel,
                                 "target_density": d, "recall": max(0.0, 1 - 0.5 * rel),
                                 "median_s": 0.5 * d * 10 / speed, "ratio_to_sdpa": ratio if d <= 0.2 else None,
                                 "speed_panel": d == 0.1, "status": "ok"})
    decode = []
    for layout, kv_heads in (("MHA", 8), ("GQA 8:2", 2)):  # the suite runs both; plots draw the first
        for cache in (4096, 16384, 65536, 131072):
            for method, kept in (("sdpa", cache), ("landmark", 2048), ("quest", 2048), ("streaming", 1024)):
                kv = 2 * kv_heads * 64 * 4 * kept
                decode.append({"layout": layout, "heads": 8, "kv_heads": kv_heads, "method": method, "cache": cache,
                               "budget": None if method == "sdpa" else kept, "step_s": 1e-7 * kept + 1e-4,
                               "ratio_to_sdpa": cache / kept if method != "sdpa" else 1.0,
                               "rel_err": 0.0 if method == "sdpa" else 0.03,
                               "recall": 1.0 if method == "sdpa" else 0.95, "kv_bytes": kv,
                               "peak_mem_bytes": kv + 2**20, "status": "ok"})
    decode.append({"layout": "MHA", "heads": 8, "kv_heads": 8, "method": "quest", "cache": 262144, "budget": 2048,
                   "step_s": None,
                   "ratio_to_sdpa": None, "rel_err": None, "recall": None, "kv_bytes": None, "peak_mem_bytes": None,
                   "status": "skipped: out of the time budget"})

    tasks = []
    for method in ("dense", "streaming", "landmark", "quest"):
        for n in (1024, 2048, 4096, 8192):
            for d in DEPTHS:
                if method == "dense":
                    acc = 1.0
                elif method == "streaming":
                    acc = 1.0 if (d >= 0.75 and n <= 2048) or d == 1.0 else 0.0
                else:
                    acc = float(np.clip(1.0 - 0.08 * math.log2(n / 1024) * (1.5 if method == "quest" else 1.0)
                                        - 0.1 * d, 0, 1))
                tasks.append({"part": "retrieval", "task": "passkey", "method": method, "length": n, "depth": d,
                              "accuracy": round(acc * 20) / 20, "n": 20, "status": "ok"})
            tasks.append({"part": "retrieval", "task": "mqar", "method": method, "length": n, "depth": None,
                          "accuracy": 0.9 if method == "dense" else 0.6, "n": 64, "status": "ok"})
        tasks.append({"part": "perplexity", "task": "perplexity", "method": method, "length": 8192, "depth": None,
                      "perplexity": 5.0 + (0.0 if method == "dense" else 0.3), "in_length_perplexity": 4.0,
                      "ratio_to_in_length": 1.25, "n": 1, "status": "ok"})
    tasks.append({"part": "retrieval", "task": "passkey", "method": "quest", "length": 16384, "depth": 0.5,
                  "accuracy": None, "n": 0, "status": "oom: out of memory"})
    peers = []
    for n in (4096, 16384):
        for peer, ratio in (("sdpa", 1.0), ("flex", 1.8), ("landmark", 2.5)):
            peers.append({"part": "prefill", "peer": peer, "case": "causal prefill", "tokens": n, "causal": True,
                          "median_s": sdpa_s[n] / ratio, "ratio_to_sdpa": ratio, "status": "ok"})
    peers.append({"part": "kvpress", "peer": "kvpress", "case": "kv-cache compression", "tokens": None,
                  "causal": True, "median_s": None, "ratio_to_sdpa": None,
                  "status": "unsupported: kvpress is not installed"})
    recurrent = []
    for method, state, acc in (("attention", 131072, 1.0), ("gla", 16384, 0.4), ("based", 103056, 0.6),
                               ("linear", 16896, 0.0)):
        for width, scale in ((64, 1), (128, 4)):
            recurrent.append({"test": "mqar", "method": method, "width": width, "state_bytes": state * scale,
                              "accuracy": min(1.0, acc * (1 + 0.5 * (width == 128))), "status": "ok"})
    suites = {
        "kernels": _suite("kernels", kernels, 210.0, lengths=list(LENGTHS)),
        "sparse": _suite("sparse", frontier, 95.5),
        "decode": _suite("decode", decode, 60.0, lengths=[4096, 16384, 65536, 131072]),
        "tasks": _suite("tasks", tasks, 140.0),
        "peers": _suite("peers", peers, 30.0),
        "recurrent": _suite("recurrent", recurrent, 300.0),
    }
    suites["kernels"]["status"] = suites["decode"]["status"] = "failed"
    return {"kind": "main", "machine": MACHINE, "config": {"mode": "quick", "seed": 0, "suites": list(suites)},
            "suites": suites, "wall_s": 535.2, "status": "failed"}


@pytest.fixture(scope="module")
def results():
    return fake_results()


@pytest.fixture(scope="module")
def report(tmp_path_factory, results):
    """Plots and report.html written once for the tests of this module."""
    out = tmp_path_factory.mktemp("bench-out")
    written = plots.write_all(results, out / "plots")
    md = "# longattn benchmark\n\n| a | b |\n|---|---|\n| <x> | & |\n"
    html_path = write_html(out / "report.html", results, written, markdown=md)
    return out, written, html_path


def _png_ok(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img[..., :3]


def test_every_plot_is_a_real_image(report):
    _, written, _ = report
    assert set(written) == set(plots.PLOT_NAMES)
    for name, path in written.items():
        img = _png_ok(path)
        h, w, _ = img.shape
        assert h >= 250 and w >= 500, f"{name}: {w}x{h} is too small to read"
        assert img.std() > 0.05, f"{name} is nearly blank"
        non_white = (img.min(axis=2) < 0.9).mean()
        assert 0.02 < non_white < 0.9, f"{name}: {non_white:.1%} of pixels drawn"


def test_heatmap_uses_the_accuracy_colours(report):
    _, written, _ = report
    img = _png_ok(written["passkey_heatmap"])
    # the fake run has cells at accuracy 0 and 1: both ends of the colour map must be there
    for acc in (0.0, 1.0):
        assert _near(img, colormaps[plots.HEATMAP_CMAP](acc)[:3]) > 500, f"no cell coloured for accuracy {acc}"


def test_plots_skip_suites_not_run(tmp_path, results):
    only_kernels = {**results, "suites": {"kernels": results["suites"]["kernels"]}}
    written = plots.write_all(only_kernels, tmp_path / "k")
    # kernels' prefill peak memory still gives a memory plot without the decode suite
    assert set(written) == {"speedup_vs_length", "memory_vs_length"}
    data = plots.panel_data(only_kernels)
    assert [p.title for p, _ in data["memory_vs_length"]] == ["prefill, causal: peak memory (RSS growth, kernels suite)"]
    assert len(data["speedup_vs_length"]) == 2  # the fake run has causal and non-causal self attention
    assert plots.write_all({"machine": MACHINE, "config": {}, "suites": {}}, tmp_path / "none") == {}
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_colours_are_fixed_per_method(results):
    styles = plots.series_styles(results)
    assert styles["sdpa"]["color"] == plots.BASELINE_COLOR
    # landmark is in the sparse, decode and tasks suites: one entry, one colour
    assert styles["landmark"]["color"] != styles["quest"]["color"]
    colours = [s["color"] for n, s in styles.items() if n != "sdpa"]
    assert len(set(colours)) == len(colours)
    assert styles == plots.series_styles(fake_results())
    assert plots.base_name("landmark (pooled)") == plots.base_name("landmark [tiled]") == "landmark"


def test_html_is_self_contained_and_escaped(report, results):
    _, written, html_path = report
    html = html_path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", html), "the report refers to the network"
    assert "<script" not in html.lower() and "<link" not in html.lower()
    srcs = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", html, flags=re.I)
    assert len(srcs) == len(written) == 5
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    hrefs = re.findall(r"""\bhref\s*=\s*["']?([^"'\s>]*)""", html, flags=re.I)
    assert hrefs and all(h.startswith("#") for h in hrefs), "links must stay inside the page"
    assert "url(" not in html
    # every string from the results is escaped
    assert NASTY not in html and "window&lt;script&gt;&amp;" in html
    assert "&lt;b&gt;no kernel&lt;/b&gt; &amp; no fallback" in html
    # the headline numbers and the failures are there
    for text in ("Speed-up", "AMD EPYC", "2.13.0+cpu", "FAILED accuracy", "kvpress is not installed",
                 "oom: out of memory", "skipped: out of the time budget", "Seed</dt><dd>0<", "535 s",
                 "64.00×", "passkey · landmark", "Status:", "kernels: FAILED"):
        assert text in html, text
    # one plot description each, and one table per suite
    for name in plots.PLOT_NAMES:
        assert f'id="plot-{name}"' in html
    for suite in ("kernels", "sparse", "decode", "tasks", "peers"):
        assert f'id="suite-{suite}"' in html


def test_html_with_suites_missing(results):
    part = {"machine": MACHINE, "config": {}, "suites": {"tasks": results["suites"]["tasks"]}}
    html = render_html(part, {}, None)
    assert 'id="suite-tasks"' in html and 'id="suite-kernels"' not in html
    assert "not run" in html
    assert render_html({"suites": {}}, {})  # nothing at all still renders a page
    # a suite that could not start: its one-line reason shown, escaped, and listed as a failure
    crashed = {**part, "suites": {**part["suites"], "peers": {"suite": "peers", "records": [], "parts": {},
                                                              "status": "failed", "error": "RuntimeError: <boom>"}},
               "status": "failed"}
    html = render_html(crashed, {})
    assert 'id="suite-peers"' in html and "RuntimeError: &lt;boom&gt;" in html and "<boom>" not in html
    assert "the whole suite" in html and "1 of 2 suites FAILED: peers" in html


def _near(img: np.ndarray, rgb, tol: float = 0.06) -> int:
    """Number of pixels within ``tol`` (per channel, 0..1) of colour ``rgb``."""
    return int((np.abs(img - np.asarray(rgb, dtype=img.dtype)) <= tol).all(axis=2).sum())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(report, tmp_path, results):
    exe = _chromium()
    if exe is None:
        msg = ("Debian's chromium is not installed (apt-get install chromium; `make test` installs it), so "
               "report.html cannot be rendered")
        if os.environ.get("CI"):
            pytest.fail(msg + " — CI must have it")
        pytest.skip(msg)
    _, _, html_path = report
    shot = tmp_path / "screenshot.png"
    width, height = 1200, 2400
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", f"--window-size={width},{height}", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and shot.exists(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    img = _png_ok(shot)
    assert img.shape[:2] == (height, width)
    assert img.std() > 0.1, "the page rendered blank"
    non_white = (img.min(axis=2) < 0.9).mean()
    assert non_white > 0.1, f"only {non_white:.1%} of the page is drawn"
    # the plots rendered: the heat map's two ends of the colour map, and the method colours of the
    # line plots, appear on the page (an <img> that failed to decode would show neither)
    cmap = colormaps[plots.HEATMAP_CMAP]
    assert _near(img, cmap(1.0)[:3]) > 2000, "the passkey heat map (accuracy 1) is not on the page"
    assert _near(img, cmap(0.0)[:3]) > 500, "the passkey heat map (accuracy 0) is not on the page"
    styles = plots.series_styles(results)
    for method in ("window", "landmark", "quest"):
        rgb = [int(styles[method]["color"][i:i + 2], 16) / 255 for i in (1, 3, 5)]
        assert _near(img, rgb, tol=0.1) > 100, f"{method}'s colour is missing from the plots"
