"""The models that ship inside the package: found without any folder outside it, checked by SHA-256."""

import shutil

import pytest

import longattn.models as models
from longattn.models import bundled


def test_stories260k_is_inside_the_package_and_matches_its_published_digests(monkeypatch):
    monkeypatch.delenv(bundled.STORIES260K_ENV, raising=False)
    folder = models.stories260k()
    assert folder == bundled.WEIGHTS / "stories260K"
    assert (folder / "LICENSE").read_text().startswith("The files stories260K.bin and tok512.bin")
    for name, (size, digest) in bundled.STORIES260K_FILES.items():
        assert (folder / name).stat().st_size == size
        assert bundled.sha256_of(folder / name) == digest


def test_environment_variable_points_at_another_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(bundled.STORIES260K_ENV, raising=False)
    for name in bundled.STORIES260K_FILES:
        shutil.copy(models.stories260k() / name, tmp_path / name)
    monkeypatch.setenv(bundled.STORIES260K_ENV, str(tmp_path))
    assert models.stories260k() == tmp_path
    monkeypatch.setenv(bundled.STORIES260K_ENV, str(tmp_path / "stories260K.bin"))  # the file itself
    assert models.stories260k() == tmp_path


def test_a_corrupted_or_truncated_copy_is_refused_with_the_file_named(tmp_path, monkeypatch):
    monkeypatch.delenv(bundled.STORIES260K_ENV, raising=False)
    src = models.stories260k()
    for name in bundled.STORIES260K_FILES:
        shutil.copy(src / name, tmp_path / name)
    monkeypatch.setenv(bundled.STORIES260K_ENV, str(tmp_path))
    data = bytearray((tmp_path / "stories260K.bin").read_bytes())
    data[5000] ^= 0xFF  # same size, one flipped byte
    (tmp_path / "stories260K.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"stories260K\.bin has SHA-256 .* expected b0a507e7"):
        models.stories260k()
    assert models.stories260k(verify=False) == tmp_path
    (tmp_path / "tok512.bin").write_bytes(b"\0" * 10)
    shutil.copy(src / "stories260K.bin", tmp_path / "stories260K.bin")
    with pytest.raises(ValueError, match=r"tok512\.bin has 10 bytes, expected 6227"):
        models.stories260k()
    (tmp_path / "tok512.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"tok512\.bin is missing"):
        models.stories260k()
    monkeypatch.setenv(bundled.STORIES260K_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        models.stories260k()


def test_retrieval_model_ships_too():
    assert (models.retrieval_tiny() / "model.safetensors").is_file()
    assert (models.retrieval_tiny() / "config.json").is_file()
