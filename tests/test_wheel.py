"""The package as a user gets it: the wheel built from this checkout, installed into a fresh virtual
environment, used from a folder with nothing of the checkout on the path and no ``shared`` folder
above it. Everything the package needs (the bundled models included) must come from the wheel.

The fresh environment reuses this environment's installed dependencies (torch, transformers, …)
through a ``.pth`` line, so nothing is downloaded; ``--no-deps`` keeps pip from touching them. A
``.pth`` line adds a folder to ``sys.path`` without processing the ``.pth`` files inside it, so the
checkout's editable install of longattn does not leak into the fresh environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only(reason="builds and installs the wheel in subprocesses")

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python, bin folder, work folder, env)`` of a fresh venv with the wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    for parent in (base, *base.parents):
        assert not (parent / "shared").exists(), f"{parent} has a shared folder: the test would not prove anything"
    dist = base / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LONGATTN_STORIES260K")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT],
         cwd=base, env=env)
    (wheel,) = dist.glob("longattn-*.whl")
    target = base / "venv"
    venv.create(target, with_pip=True, symlinks=True)
    py = target / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env).strip())
    (site / "longattn-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=base, env=env)
    work = base / "work"
    work.mkdir()
    return py, target / "bin", work, {**env, "PATH": f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_the_wheel_carries_the_models_and_runs_without_the_checkout(installed):
    py, bindir, work, env = installed
    where = _run([py, "-c", "import longattn, longattn.models as m; print(longattn.__file__); "
                            "print(m.stories260k()); print(m.retrieval_tiny())"], work, env).split()
    venv_root = bindir.parent
    for path in where:
        assert Path(path).is_relative_to(venv_root), f"{path} is not inside the installed package"
        assert not Path(path).is_relative_to(ROOT), f"{path} comes from the checkout"
    assert (Path(where[1]) / "LICENSE").exists() and (Path(where[1]) / "stories260K.bin").exists()
    version = _run([bindir / "longattn", "--version"], work, env).strip()
    import longattn

    assert version == f"longattn {longattn.__version__}"
    listing = _run([bindir / "longattn", "methods"], work, env)
    for spec in longattn.methods():
        assert spec.name in listing


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_every_example_runs_from_the_installed_wheel(installed, script):
    py, _, work, env = installed
    out = _run([py, script], work, env)
    assert out.strip()


def test_the_tasks_suite_runs_on_the_bundled_models(installed):
    py, bindir, work, env = installed
    out = work / "bench-tasks"
    _run([bindir / "longattn", "bench", "--suite", "tasks", "--lengths", "512", "--methods", "dense",
          "--out", out], work, env)
    import json

    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "ok" and {p["status"] for p in data["parts"].values()} == {"ok"}
    tasks = {r["task"] for r in data["records"]}
    assert tasks == {"passkey", "needle", "mqar", "perplexity"}  # both bundled models were read


def test_the_native_kernels_build_from_the_installed_wheel(installed, tmp_path):
    """The C sources and their shared header (csrc/vec8.h) travel in the wheel: every native kernel
    builds there (into a fresh cache folder, so nothing built from the checkout is reused)."""
    py, _, work, env = installed
    code = ("from longattn.kernels import native, native_prefill as p, native_linear as n; "
            "print(native.unavailable_reason(), p.unavailable_reason(), n.unavailable_reason())")
    out = _run([py, "-c", code], work, {**env, "LONGATTN_CACHE_DIR": str(tmp_path)}).strip()
    if native_compiler_missing():
        pytest.skip("no C compiler on this machine")
    assert out == "None None None", out


def native_compiler_missing() -> bool:
    from longattn.kernels import native

    return native._compiler() is None
