"""What a user installs: licence files, metadata, the typed marker, and no text that points at
places a user cannot see (the team's issues, design notes or a ``shared`` folder)."""

import re
import tomllib
from pathlib import Path

import longattn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "longattn"
#: references that mean nothing outside the team: "issue 4", "the issue's targets", the team's design
#: notes, a path into a "shared" folder beside the checkout
INTERNAL = re.compile(r"\bissues?\b|DESIGN\.md|/shared\b|\bshared[/\\]", re.I)


def test_no_package_text_refers_to_internal_places():
    hits = []
    for path in PACKAGE.rglob("*"):
        if path.suffix in (".py", ".c", ".json", ".md", ".txt") and path.is_file():
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if INTERNAL.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_user_facing_pages_refer_to_no_internal_places():
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*")]:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            assert not INTERNAL.search(line), f"{page.name}:{n}: {line}"


def test_metadata_licence_and_typed_marker():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "MIT"  # the SPDX form (setuptools >= 77): no deprecation warning on install
    for f in project["license-files"]:
        assert (ROOT / f).is_file(), f
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (PACKAGE / "py.typed").exists()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["longattn"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", longattn.__version__)
    assert f"## {longattn.__version__} " in (ROOT / "CHANGELOG.md").read_text()
