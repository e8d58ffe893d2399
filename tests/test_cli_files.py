"""The CLI recognises lightning_nan's files and refuses the wrong one; a closed pipe ends it quietly (issue 16)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from lightning_nan.cli import main
from lightning_nan.core.incident import Incident
from lightning_nan.core.jsonl import append_jsonl
from lightning_nan.core.quarantine import Quarantine, make_record


@pytest.fixture
def run(tmp_path):
    """A run's two files, as NaNGuard and BatchBisection write them, and a JSON Lines file of neither kind."""
    append_jsonl(tmp_path / "nan_incidents.jsonl", [Incident(step=s, kind="loss", samples=[4]).to_dict() for s in (3, 9)])
    Quarantine(tmp_path / "quarantine.jsonl").add(
        [make_record(index=4, position=0, epoch=0, step=3, batch_idx=3, reason="non-finite loss", fingerprint="ab", kind="loss")]
    )
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    return tmp_path


CASES = [
    (["report", "{run}/quarantine.jsonl"], r"quarantine.jsonl holds quarantined samples .*, not NaN incidents: run `lightning-nan quarantine list "),
    (["quarantine", "list", "{run}/nan_incidents.jsonl"], r"nan_incidents.jsonl holds NaN incidents .*: run `lightning-nan report "),
    (["quarantine", "list", "{run}/other.jsonl", "--json"], r"other.jsonl is not a quarantine file: none of its 1 record\(s\) names a sample .* keys \['a'\]"),
    (["quarantine", "clear", "{run}/nan_incidents.jsonl"], r"nan_incidents.jsonl holds NaN incidents"),
    (["report", "{run}", "--quarantine", "{run}/nan_incidents.jsonl"], r"--quarantine: .*nan_incidents.jsonl holds NaN incidents"),
    (["report", "{run}/other.jsonl"], r"other.jsonl, record 1: not an incident"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(x.rsplit("/", 1)[-1] for x in a).replace("{run}", "RUN") for a, _ in CASES])
def test_the_wrong_file_is_refused_with_a_message(run, capsys, argv, message):
    assert main([a.format(run=run) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("lightning-nan: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert (run / "nan_incidents.jsonl").exists()  # `clear` moved nothing aside


def test_the_right_files_are_read(run, capsys):
    assert main(["quarantine", "list", str(run / "quarantine.jsonl")]) == 0
    assert main(["report", str(run), "--quarantine", str(run / "quarantine.jsonl")]) == 0
    assert "2 non-finite incidents" in capsys.readouterr().out


def test_a_reader_that_stops_early_gets_no_traceback(run, monkeypatch, capsys):
    """``lightning-nan report --json RUN | head -1``: head exits after one line, the next write meets a closed pipe."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    monkeypatch.setattr(sys, "stdout", os.fdopen(write, "w", buffering=1))
    try:
        assert main(["report", "--json", str(run)]) == 1
        print("more output after the pipe closed is swallowed too")
        sys.stdout.flush()
    finally:
        sys.stdout.close()
    assert capsys.readouterr().err == ""
