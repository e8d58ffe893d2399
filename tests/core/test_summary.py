"""The incident summary table and its JSON form (pure Python, no Lightning)."""

from __future__ import annotations

import json
import math
import re

import pytest

from lightning_nan.core.incident import Incident
from lightning_nan.core.quarantine import make_record
from lightning_nan.core.records import BisectionRecord, LocalizationRecord
from lightning_nan.core.summary import COLUMNS, summary_json, summary_table


def _incidents() -> list[Incident]:
    """Several causes, bisection and localization details as BatchBisection writes them."""
    return [
        Incident(
            step=12, kind="loss", cause="dirty_data", samples=[137, 911, 5, 6, 7], epoch=0, batch_idx=[12],
            advice="old advice for dirty data",
            bisection=BisectionRecord(step=12, forward_passes=9, whole_batch=False, reproduced=True, indices_known=True),
        ),
        Incident(
            step=40, kind="grad", cause="unsafe_op", module="encoder.attn", epoch=1, action="recovered by CheckpointRollback",
            advice="Replace torch.log(x) by torch.log(x.clamp_min(1e-12)).",
            bisection=BisectionRecord(step=40, forward_passes=3, whole_batch=True, note="every sample fails on its own"),
            localization=LocalizationRecord(module="encoder.attn", op="log", op_location="src/pkg/model.py:88 in forward",
                                            summary="first non-finite value from log"),
        ),
        Incident(step=41, kind="param", cause="divergence", epoch=1, action="raised", detail={"evidence": ["lr 10"]}),
        Incident(step=55, kind="input", cause="dirty_data", samples=[3], epoch=2, advice="Run `lightning-nan scan` on the data."),
        Incident(
            step=60, kind="loss", epoch=2, samples=None,  # iterable data set: positions instead of indices
            bisection=BisectionRecord(step=60, indices_known=False, positions=[[0, 59, 2], [0, 59, 7]], fingerprints=["a", "b"]),
        ),
    ]


def _rows(table: str) -> list[list[str]]:
    """The table's header and rows, split into cells (cells are separated by two or more spaces)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "epoch"])
    rows = []
    for line in lines[start:]:
        if not re.match(r"^(step|\d)", line):
            break
        rows.append(re.split(r" {2,}", line.rstrip()))
    return rows


def test_one_row_per_incident_with_every_column():
    table = summary_table(_incidents(), width=140)
    lines = table.splitlines()
    assert lines[0] == "5 non-finite incidents, steps 12 to 60"
    rows = _rows(table)
    assert rows[0] == list(COLUMNS)
    assert rows[1:] == [
        ["12", "0", "loss", "dirty_data", "-", "[137, 911, +3 more]", "skipped"],
        ["40", "1", "grad", "unsafe_op", "encoder.attn (log at model.py:88)", "-", "recovered by CheckpointRollback"],
        ["41", "1", "param", "divergence", "-", "-", "raised"],
        ["55", "2", "input", "dirty_data", "-", "[3]", "skipped"],
        ["60", "2", "loss", "unknown", "-", "pos [2, 7]", "skipped"],
    ]
    # columns are aligned: every cell of a column starts at the header's offset
    header = lines[1]
    for line in lines[2:7]:
        for name in ("kind", "cause", "samples", "action"):
            at = header.index(name)
            assert line[at - 2 : at] == "  " and line[at] != " "


def test_counts_advice_of_the_most_recent_incident_and_quarantine_line():
    quarantine = [
        make_record(index=i, position=0, epoch=0, step=12, batch_idx=12, reason="non-finite loss", fingerprint=f"f{i}")
        for i in (911, 137, 3)
    ] + [make_record(index=None, position=2, epoch=2, step=60, batch_idx=59, reason="non-finite loss", fingerprint="a")]
    lines = summary_table(_incidents(), quarantine, quarantine_path="runs/quarantine.jsonl").splitlines()
    after = lines[7:]
    assert after[0] == "by cause: dirty_data 2, unsafe_op 1, divergence 1, unknown 1"
    assert after[1] == "advice:"
    # dirty_data: the advice of step 55 (the most recent), not step 12's; causes without advice are left out
    assert after[2] == "  dirty_data: Run `lightning-nan scan` on the data."
    assert after[3] == "  unsafe_op: Replace torch.log(x) by torch.log(x.clamp_min(1e-12))."
    assert after[4] == "4 samples quarantined in runs/quarantine.jsonl: indices [3, 137, 911] (1 without a data set index)"
    assert len(after) == 5


@pytest.mark.parametrize("width", [60, 80, 100])
def test_lines_fit_the_width_and_cut_cells_end_with_an_ellipsis(width):
    long = Incident(
        step=123456, kind="grad", cause="overflow", module="backbone.stages.3.blocks.11.attention.out_proj",
        samples=list(range(1000, 1100)), epoch=7, action="recovered by CheckpointRollbackWithAVeryLongName",
        advice="A long piece of advice " * 12,
        localization=LocalizationRecord(op="div", op_location="a/b/c/some_long_module_file_name.py:1234 in forward"),
    )
    text = summary_table([long, *_incidents()], width=width)
    assert all(len(line) <= width for line in text.splitlines()), text
    row = _rows(text)[1]
    assert row[0] == "123456" and row[2] == "grad"
    cut = [cell for cell in row if cell.endswith("…") or cell.startswith("…")]
    assert cut  # something had to give
    # the advice is wrapped, not cut: its words are all there
    advice = " ".join(line.strip() for line in text.splitlines() if line.startswith("  overflow:") or line.startswith("    "))
    assert advice.count("A long piece of advice") == 12


def test_a_long_module_name_keeps_its_tail_and_the_operation():
    inc = Incident(
        step=1, kind="loss", module="very.long.prefix.of.modules.head",
        localization=LocalizationRecord(op="log", op_location="model.py:9 in forward"),
    )
    other = Incident(step=2, kind="loss", cause="unsafe_op", action="a" * 20, samples=list(range(50)))
    cell = _rows(summary_table([inc, other], width=110))[1][4]
    assert cell.startswith("…") and cell.endswith("head (log at model.py:9)")


def test_a_long_quarantine_path_is_kept_whole_on_its_own_line():
    path = "/" + "/".join(["deep"] * 30) + "/quarantine.jsonl"
    records = [{"index": i} for i in range(30)]
    lines = summary_table([Incident(step=1, kind="loss")], records, quarantine_path=path, width=80).splitlines()
    assert lines[-1] == f"  in {path}"
    assert lines[-2].startswith("30 samples quarantined: indices [0, 1, ") and len(lines[-2]) <= 80
    assert lines[-2].endswith("more]")


def test_no_incidents_and_bad_width():
    assert summary_table([]) == "no incidents"
    assert summary_table([], [{"index": 4}]) == "no incidents\n1 sample quarantined: indices [4]"
    with pytest.raises(ValueError, match="Expected `width` to be an int >= 60"):
        summary_table([], width=20)


def test_json_is_strict_json_and_round_trips_the_incidents():
    incidents = _incidents()
    incidents[2].detail["loss"] = math.nan
    incidents[2].detail["grad_norm"] = -math.inf
    incidents[4].bisection.positions = [(0, 59, 2), (0, 59, 7)]  # tuples, as a caller may set them
    quarantine = [make_record(index=3, position=1, epoch=2, step=55, batch_idx=54, reason="non-finite input", fingerprint="c")]
    out = json.loads(json.dumps(summary_json(incidents, quarantine), allow_nan=False))
    assert sorted(out) == ["advice", "by_cause", "incidents", "quarantine"]
    assert out["by_cause"] == {"dirty_data": 2, "unsafe_op": 1, "divergence": 1, "unknown": 1}
    assert out["advice"] == {"dirty_data": incidents[3].advice, "unsafe_op": incidents[1].advice}
    assert out["quarantine"] == quarantine
    back = [Incident.from_dict(d) for d in out["incidents"]]
    assert back[2].detail["loss"] == "nan" and back[2].detail["grad_norm"] == "-inf"
    assert back[4].bisection.positions == [[0, 59, 2], [0, 59, 7]]
    untouched = [0, 1, 3]  # nothing non-JSON in them: they come back equal
    assert [back[i] for i in untouched] == [incidents[i] for i in untouched]
    assert [b.time for b in back] == [i.time for i in incidents]


def test_max_rows_shows_the_first_and_last_incidents_and_counts_the_rest():
    from lightning_nan.core.incident import Incident
    from lightning_nan.core.summary import summary_table

    incidents = [Incident(step=s, kind="loss") for s in range(30)]
    lines = summary_table(incidents, max_rows=6).splitlines()
    assert lines[0] == "30 non-finite incidents, steps 0 to 29"
    rows = [line.split()[0] for line in lines[2:9]]
    assert rows == ["0", "1", "2", "…", "27", "28", "29"]
    assert "24 more incidents" in lines[5]
    assert "by cause: unknown 30" in summary_table(incidents, max_rows=6)


def test_records_are_top_level_json_keys_and_old_files_with_them_in_detail_still_load():
    old = {
        "step": 5, "kind": "loss", "module": "head", "detail": {
            "loss": 1.0,
            "bisection": {"step": 5, "forward_passes": 3, "indices_known": False, "batches": [{"batch_idx": 2, "size": 8}],
                          "positions": [[0, 2, 1]], "fingerprints": ["ab"], "from_a_newer_version": 1},
            "localization": {"module": "head", "op": "log", "op_location": "m.py:3 in forward", "summary": "log of 0"},
        },
    }
    inc = Incident.from_dict(json.loads(json.dumps(old)))
    assert inc.detail == {"loss": 1.0}  # moved out of detail
    assert inc.bisection.batches[0].size == 8 and inc.bisection.positions == [[0, 2, 1]] and inc.localization.op == "log"
    assert _rows(summary_table([inc]))[1][4:6] == ["head (log at m.py:3)", "pos [1]"]
    line = json.loads(json.dumps(inc.to_dict()))
    assert line["bisection"]["forward_passes"] == 3 and line["localization"]["summary"] == "log of 0"
    assert Incident.from_dict(line) == inc
