import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lightning_nan.core.files import FileWarning
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record, sample_fingerprint


def _rec(index, fingerprint="fp", **kw):
    args = dict(index=index, position=0, epoch=1, step=10, batch_idx=3, reason="non-finite loss", fingerprint=fingerprint)
    args.update(kw)
    return make_record(**args)


def test_make_record_fields():
    before = time.time()
    r = make_record(
        index=5, position=2, epoch=1, step=40, batch_idx=9, reason="nan in ['x']", fingerprint="0f3a", rank=1,
        source="bisection",
    )
    assert {k: r[k] for k in ("index", "position", "epoch", "step", "batch_idx", "reason", "fingerprint", "rank", "source")} == {
        "index": 5, "position": 2, "epoch": 1, "step": 40, "batch_idx": 9, "reason": "nan in ['x']",
        "fingerprint": "0f3a", "rank": 1, "source": "bisection",
    }
    assert before <= r["time"] <= time.time()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(index=1.5), "`index`"),
        (dict(index=True), "`index`"),
        (dict(step="3"), "`step`"),
        (dict(reason=""), "`reason`"),
        (dict(fingerprint=None), "`fingerprint`"),
    ],
)
def test_make_record_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _rec(**{"index": 0, **kwargs})


def test_missing_file_is_empty(tmp_path):
    q = Quarantine(tmp_path / "none" / QUARANTINE_FILE)
    assert q.records() == [] and q.indices() == set()
    assert q.clear() is None
    assert not (tmp_path / "none").exists()


def test_add_read_dedupe_indices(tmp_path):
    q = Quarantine(tmp_path / "runs" / QUARANTINE_FILE)
    a, b = _rec(3), _rec(8, reason="extreme magnitude")
    assert q.add([a, b, _rec(3, reason="again")]) == [a, b]  # the second index 3 is a duplicate
    assert [r["index"] for r in q.add([_rec(8), _rec(11)])] == [11]
    assert [r["index"] for r in q.records()] == [3, 8, 11]
    assert q.records()[1]["reason"] == "extreme magnitude"
    assert q.indices() == {3, 8, 11}
    # a fresh object on the same file sees the same records (resumed runs)
    assert Quarantine(q.path).indices() == {3, 8, 11}
    lines = (tmp_path / "runs" / QUARANTINE_FILE).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [3, 8, 11]


def test_unknown_index_dedupes_by_fingerprint(tmp_path):
    q = Quarantine(tmp_path / QUARANTINE_FILE)
    new = q.add([_rec(None, "aaaa", position=1), _rec(None, "bbbb", position=0), _rec(None, "aaaa", position=3)])
    assert [(r["position"], r["fingerprint"]) for r in new] == [(1, "aaaa"), (0, "bbbb")]
    assert q.add([_rec(None, "bbbb"), _rec(None, "cccc")])[0]["fingerprint"] == "cccc"
    # a fingerprint equal to that of an indexed record is not a duplicate of it
    assert len(q.add([_rec(None, "fp"), _rec(4, "aaaa")])) == 2
    assert q.indices() == {4}
    assert len(q.records()) == 5


def test_add_rejects_bad_records_and_writes_nothing(tmp_path):
    q = Quarantine(tmp_path / QUARANTINE_FILE)
    with pytest.raises(ValueError, match="`index`"):
        q.add([_rec(1), {"index": "7", "reason": "x"}])
    with pytest.raises(ValueError, match="dict"):
        q.add([_rec(1), [1, 2]])
    assert not os.path.exists(q.path)


def test_torn_tail_from_a_crash(tmp_path):
    q = Quarantine(tmp_path / QUARANTINE_FILE)
    q.add([_rec(1), _rec(2)])
    whole = open(q.path, "rb").read()
    line = json.dumps(_rec(3), sort_keys=True).encode()
    with open(q.path, "ab") as f:
        f.write(line[: len(line) // 2])  # the process died in the middle of an append
    assert q.indices() == {1, 2}
    with pytest.warns(FileWarning, match="moved to"):  # the torn bytes go aside, not away
        assert [r["index"] for r in q.add([_rec(3)])] == [3]  # the index is not seen as present
    assert q.indices() == {1, 2, 3}
    assert open(q.path, "rb").read().startswith(whole)
    assert all(json.loads(x) for x in open(q.path).read().splitlines())


def test_clear_keeps_a_backup_with_the_exact_content(tmp_path):
    q = Quarantine(tmp_path / QUARANTINE_FILE)
    q.add([_rec(1), _rec(None, "abcd")])
    before = open(q.path, "rb").read()
    backup = q.clear()
    assert backup is not None and os.path.dirname(backup) == str(tmp_path)
    assert os.path.basename(backup).startswith(QUARANTINE_FILE + ".") and backup.endswith(".bak")
    assert open(backup, "rb").read() == before
    assert not os.path.exists(q.path) and q.records() == []
    q.add([_rec(2)])
    second = q.clear()
    assert second != backup and os.path.exists(backup)
    assert [r["index"] for r in Quarantine(second).records()] == [2]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (backup, second))


@pytest.mark.parametrize(
    "content, line, what",
    [
        (b'{"index": 1}\n\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary\n', 2, "not UTF-8"),
        (b'[{"index": 1}, {"index": 2}]\n', 1, "expected a JSON object"),
        (b'{"index": 1}\n\n7\n', 3, "expected a JSON object"),
        (b'[\n  {"index": 1}\n]\n', 1, "not a JSON record"),
    ],
)
def test_unreadable_file_raises_naming_path_and_line(tmp_path, content, line, what):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    q = Quarantine(path)
    for call in (q.records, q.indices, lambda: q.add([_rec(5)])):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"{path}, line {line}:") and what in msg and "one JSON object per line" in msg
    assert path.read_bytes() == content  # nothing appended to a file we cannot read


def test_constructor_validates():
    with pytest.raises(ValueError, match="`path`"):
        Quarantine("")
    with pytest.raises(ValueError, match="`path`"):
        Quarantine(None)


_WRITER = """
import sys
from lightning_nan.core.quarantine import Quarantine, make_record
q = Quarantine(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 200, 2):
    q.add([make_record(index=i, position=0, epoch=0, step=i, batch_idx=0, reason="x" * 2000, fingerprint=str(i))])
"""


def test_concurrent_appends_from_two_processes_do_not_interleave(tmp_path):
    path = tmp_path / QUARANTINE_FILE
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(start)]) for start in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    assert sorted(json.loads(x)["index"] for x in lines) == list(range(200))


def test_sample_fingerprint_covers_structure_dtype_and_bytes():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = sample_fingerprint({"x": x, "y": 1})
    assert base == sample_fingerprint({"x": x.clone(), "y": 1})
    assert base == sample_fingerprint({"x": x.t().contiguous().t(), "y": 1})  # layout does not matter
    others = [
        {"x": x.double(), "y": 1},
        {"x": x.reshape(3, 2), "y": 1},
        {"x": x, "y": 2},
        {"z": x, "y": 1},
        {"x": x + torch.tensor([[0, 0, 1e-6], [0, 0, 0]]), "y": 1},
        (x, 1),
    ]
    prints = {sample_fingerprint(o) for o in others} | {base}
    assert len(prints) == len(others) + 1
    assert len(base) == 16 and int(base, 16) >= 0
    for t in (torch.tensor([True, False]), torch.ones(2, dtype=torch.bfloat16), torch.tensor(3), torch.zeros(0)):
        assert len(sample_fingerprint(t)) == 16
    # stable across processes (no id()/hash() salt)
    code = (
        "import torch; from lightning_nan.core.quarantine import sample_fingerprint as f;"
        " print(f({'x': torch.arange(6, dtype=torch.float32).reshape(2, 3), 'y': 1}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == base


def test_indices_written_as_strings_or_integral_floats_count_and_deduplicate(tmp_path):
    path = tmp_path / QUARANTINE_FILE
    path.write_text('{"index": "9"}\n{"index": 17.0}\n{"index": " 12 "}\n{"index": 3}\n')
    q = Quarantine(path)
    assert q.indices() == {3, 9, 12, 17} and q.problems() == []
    assert [r["index"] for r in q.add([_rec(9), _rec(17), _rec(12), _rec(4)])] == [4]  # the others are there
    assert [r["index"] for r in q.records()] == ["9", 17.0, " 12 ", 3, 4]


@pytest.mark.parametrize("value", ["abc", -1, 2.5, True, [1], "", "1e3", float("inf")])
def test_an_unusable_index_is_reported_and_kept(tmp_path, value):
    path = tmp_path / QUARANTINE_FILE
    line = json.dumps({"index": value, "reason": "x"}) + "\n"
    path.write_text('{"index": 1}\n' + line)
    q = Quarantine(path)
    assert q.indices() == {1}
    assert q.problems() == [f"line 2: index {value!r} is not a data set index (an integer >= 0)"]
    q.add([_rec(5)])
    assert path.read_text().startswith('{"index": 1}\n' + line)  # never dropped
    assert q.indices() == {1, 5}
