import json
import os

import pytest

from lightning_nan.core.files import FileWarning
from lightning_nan.core.jsonl import append_jsonl, read_jsonl, read_jsonl_lines


def test_appends_keep_earlier_records(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    append_jsonl(path, [{"a": 2}, {"a": 3}])
    append_jsonl(path, [])
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3


def test_torn_tail_is_ignored_then_moved_aside(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}])
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "b": [1, 2')  # a crash in the middle of an append
    assert read_jsonl(path) == [{"a": 1}]
    with pytest.warns(FileWarning, match=r"r\.jsonl: its last line \(19 bytes\) was not a whole JSON record"):
        append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    (aside,) = tmp_path.glob("r.jsonl.torn-*")
    assert aside.read_bytes() == b'{"a": 2, "b": [1, 2'


def test_a_last_record_without_its_newline_is_read_and_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')  # written by hand or by another tool
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert read_jsonl_lines(path) == ([(1, {"a": 1}), (2, {"a": 2})], None)
    append_jsonl(path, [{"a": 3}])
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    assert list(tmp_path.iterdir()) == [path]


def test_file_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"half')
    assert read_jsonl(path) == []
    with pytest.warns(FileWarning):
        append_jsonl(path, [{"a": 1}])
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.read_bytes() for p in tmp_path.glob("r.jsonl.torn-*")] == [b'{"half']


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
