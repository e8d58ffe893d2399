"""Quarantine and incidents files written by hand, by other tools, or corrupted: nothing is dropped, the
CLI and training agree on what is quarantined, what nobody can use is reported."""

from __future__ import annotations

import json
import warnings

import pytest
from reliability_common import Model, bisection_of, loader, trainer

from lightning_nan import BatchBisection, NaNGuard
from lightning_nan.cli import main
from lightning_nan.core.files import FileWarning
from lightning_nan.core.jsonl import append_jsonl, read_jsonl
from lightning_nan.core.quarantine import Quarantine

BY_HAND = (
    '{"index": "9", "reason": "by hand"}\n'
    '{"index": 17.0, "reason": "from another tool"}\n'
    '{"index": "abc", "reason": "a typo"}\n'
    '{"note": "names no sample"}\n'
    '{"index": 4, "reason": "no final newline"}'
)


def test_cli_and_training_agree_on_a_hand_written_quarantine(tmp_path, capsys):
    path = tmp_path / "quarantine.jsonl"
    path.write_text(BY_HAND)
    assert main(["quarantine", "list", str(path)]) == 0
    out, err = capsys.readouterr()
    table = out.splitlines()
    assert [row.split()[0] for row in table[1:-1]] == ["9", "17", "'abc'", "-", "4"]
    assert table[-1] == f"5 quarantined sample(s) in {path} (3 with a dataset index; 2 problem(s) on stderr)"
    assert err.splitlines() == [
        f"lightning-nan: warning: {path}, line 3: index 'abc' is not a data set index (an integer >= 0)",
        f"lightning-nan: warning: {path}, line 4: no index and no fingerprint: it names no sample",
    ]

    model = Model()
    t = trainer(tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                callbacks=[NaNGuard(), BatchBisection(quarantine_path=path)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FileWarning)
        t.fit(model, loader(poison=(30,)))
    assert not set().union(*map(set, model.seen)) & {4, 9, 17}  # what the CLI counted is what training left out
    assert 30 in model.seen[3] and not set().union(*map(set, model.seen[6:])) & {30}  # found in epoch 0, then out
    assert bisection_of(t).quarantined == {4, 9, 17, 30}
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, FileWarning)]
    assert str(path) in warning and "line 3: index 'abc'" in warning and "line 4: no index" in warning
    # nothing was dropped: the hand-written lines, the last one now ended, then the new record
    text = path.read_text()
    assert text.startswith(BY_HAND + "\n")
    assert [r.get("index") for r in read_jsonl(path)] == ["9", 17.0, "abc", None, 4, 30]
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0  # the run's report reads the indices the same way
    assert "6 samples quarantined: indices [4, 9, 17, 30] (1 without a data set index)" in capsys.readouterr().out


def test_a_found_sample_written_as_a_string_by_hand_is_not_recorded_twice(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    path.write_text('{"index": "30", "reason": "by hand"}\n')
    t = trainer(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                callbacks=[NaNGuard(), BatchBisection(quarantine_path=path)])
    t.fit(Model(), loader(poison=(5, 30)))
    assert [r["index"] for r in read_jsonl(path)] == ["30", 5]  # 30 never reached a batch; 5 was found


@pytest.mark.parametrize("name", ["quarantine.jsonl", "nan_incidents.jsonl"])
def test_a_torn_last_line_is_moved_aside_not_deleted(tmp_path, name):
    path = tmp_path / name
    whole = json.dumps({"index": 1, "step": 1}) + "\n"
    torn = '{"index": 2, "step": 2, "reas'  # what a kill -9 or a full disk can leave
    path.write_text(whole + torn)
    if name == "quarantine.jsonl":
        assert Quarantine(path).problems() == [
            "line 2: not a whole JSON record (an append cut short, or a line without its end): skipped"
        ]
    with pytest.warns(FileWarning, match="moved to .*torn-"):
        append_jsonl(path, [{"index": 3, "step": 3}])
    (aside,) = tmp_path.glob(f"{name}.torn-*")
    assert aside.read_text() == torn
    assert path.read_text() == whole + json.dumps({"index": 3, "step": 3}, sort_keys=True) + "\n"


def test_a_corrupt_middle_line_stops_setup_with_the_file_and_line(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    content = '{"index": 1}\nnot json\n{"index": 2}\n'
    path.write_text(content)
    t = trainer(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                callbacks=[NaNGuard(), BatchBisection(quarantine_path=path)])
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a JSON record"):
        t.fit(Model(), loader())
    assert path.read_text() == content
