"""Atomic writes and the output checks every command runs before its work."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn import files


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "results.json"
    files.atomic_write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text('{"half": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=12))
def test_json_safe_is_always_standard_json(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("j") / "x.json"
    files.atomic_write_json(path, value)
    back = json.loads(path.read_text())  # strict parse: no NaN / Infinity tokens

    def same(a, b):
        if isinstance(a, float) and not math.isfinite(a):
            return b == str(a)
        if isinstance(a, dict):
            return set(map(str, a)) == set(b) and all(same(v, b[str(k)]) for k, v in a.items())
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    assert same(value, back)


def test_output_checks_name_the_option_and_the_problem(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"^--out '.*f\.txt' is a file; expected a folder"):
        files.output_dir(a_file)
    with pytest.raises(ValueError, match=r"^--out '.*f\.txt/sub': cannot create the folder"):
        files.output_dir(a_file / "sub")
    with pytest.raises(ValueError, match=r"^--out '.*' is a folder; expected a file name"):
        files.output_file(tmp_path)
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        files.output_file(a_file / "x.json")
    with pytest.raises(ValueError, match="cannot"):
        files.output_dir("/proc/longattn-out")  # not writable even by root
    assert files.output_dir(tmp_path / "new" / "deep").is_dir()
    assert files.output_file(tmp_path / "other" / "x.json").parent.is_dir()
    assert not (tmp_path / "other" / "x.json").exists()
