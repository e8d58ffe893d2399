import json
import os

import pytest

from lightning_nan.core.jsonl import append_jsonl, read_jsonl


def test_appends_keep_earlier_records(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    append_jsonl(path, [])
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3


def test_torn_tail_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "b": [1, 2')  # a crash in the middle of an append
    assert read_jsonl(path) == [{"a": 1}]
    append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_file_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"half')
    assert read_jsonl(path) == []
    append_jsonl(path, [{"a": 1}])
    assert read_jsonl(path) == [{"a": 1}]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl, line 2"):
        read_jsonl(path)


def test_non_finite_numbers_are_refused_not_written(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    with pytest.raises(ValueError):
        append_jsonl(path, [{"a": float("nan")}])
    assert read_jsonl(path) == [{"a": 1}]
    assert os.path.getsize(path) == len('{"a": 1}\n')
