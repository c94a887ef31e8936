"""The README's and the docs' Python examples run as written and print what the page says they print.

A page shows an example as a ```` ```python ```` block, optionally followed by a ```` ```text ````
block with its output (``...`` in a line matches anything: a backend name, a path). Every python
block of every page is one of the scripts in ``examples/`` (the script minus its docstring), so the
README, the docs, the scripts and this test cannot drift apart; each script runs once, as a user
would run it, from a folder outside the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only(reason="the pages' examples are CPU programs printing CPU output")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
BLOCK = re.compile(r"```python\n(.*?)```(?:\s*\n```text\n(.*?)```)?", re.S)


def example_body(path: Path) -> str:
    """A script without its module docstring: what a page shows of it."""
    text = path.read_text()
    if text.startswith('"""'):
        text = text.split('"""', 2)[2]
    return text.strip()


def page_blocks() -> list[tuple[Path, str, str | None]]:
    """``(page, code, expected output or None)`` of every python block of every page."""
    out = []
    for page in PAGES:
        for code, expected in BLOCK.findall(page.read_text()):
            out.append((page, code.strip(), expected or None))
    return out


def output_matches(expected: str, actual: str) -> bool:
    """Line by line, trailing spaces ignored; ``...`` stands for any text within a line."""
    exp = expected.rstrip("\n").splitlines()
    got = actual.rstrip("\n").splitlines()
    if len(exp) != len(got):
        return False
    for e, g in zip(exp, got):
        pattern = ".*".join(re.escape(part) for part in e.rstrip().split("..."))
        if not re.fullmatch(pattern, g.rstrip()):
            return False
    return True


def test_output_matching_is_strict_where_it_must_be():
    assert output_matches("density=0.288\n", "density=0.288")
    assert not output_matches("density=0.148", "density=0.288")  # the figure the README once got wrong
    assert output_matches("backend: ... | bytes: 8", "backend: faiss | bytes: 8")
    assert not output_matches("a\nb", "a")


def test_every_page_example_is_a_script_in_examples():
    bodies = {example_body(p) for p in EXAMPLES}
    blocks = page_blocks()
    assert any(page.name == "README.md" for page, _, _ in blocks), "the README has no python example"
    for page, code, _ in blocks:
        assert code in bodies, f"an example of {page.name} is not in examples/:\n{code[:200]}"


def _expected_for(script: Path) -> list[tuple[Path, str]]:
    body = example_body(script)
    return [(page, exp) for page, code, exp in page_blocks() if code == body and exp is not None]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs_and_prints_what_the_pages_say(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    for page, expected in _expected_for(script):
        assert output_matches(expected, proc.stdout), (
            f"{page.name} says {script.name} prints\n{expected}\nbut it printed\n{proc.stdout}")
