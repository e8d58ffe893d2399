"""``lightning-nan report RUN_DIR``: the incident summary of a run, from its real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan import NaNGuard
from lightning_nan.cli import main
from lightning_nan.core.incident import Incident
from lightning_nan.core.jsonl import append_jsonl, read_jsonl
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record
from lightning_nan.core.records import BisectionRecord, LocalizationRecord

INCIDENTS = "nan_incidents.jsonl"


def _incidents() -> list[Incident]:
    return [
        Incident(
            step=7, kind="loss", cause="dirty_data", samples=[21, 5, 9, 30], epoch=0, batch_idx=[7],
            advice="Drop or fix the quarantined samples.",
            bisection=BisectionRecord(step=7, forward_passes=7, whole_batch=False, reproduced=True, indices_known=True),
        ),
        Incident(
            step=19, kind="grad", cause="unsafe_op", module="decoder.proj", epoch=1, action="recovered by CheckpointRollback",
            advice="Clamp the input of log.",
            bisection=BisectionRecord(step=19, forward_passes=4, whole_batch=True, note="a model problem"),
            localization=LocalizationRecord(module="decoder.proj", module_type="Linear", op="log",
                                            op_location="models/net.py:120 in forward", summary="first non-finite value from log"),
        ),
        Incident(step=20, kind="param", cause="divergence", epoch=1, action="raised", advice="Lower the learning rate."),
    ]


def _write_run(folder, incidents=None, quarantine=True):
    incidents = _incidents() if incidents is None else incidents
    append_jsonl(folder / INCIDENTS, [i.to_dict() for i in incidents])
    if quarantine:
        Quarantine(folder / QUARANTINE_FILE).add(
            [make_record(index=i, position=n, epoch=0, step=7, batch_idx=7, reason="non-finite loss", fingerprint=f"f{i}")
             for n, i in enumerate((21, 5, 9, 30))]
        )
    return incidents


def _table_rows(out: str) -> list[list[str]]:
    return [re.split(r" {2,}", line.rstrip()) for line in out.splitlines() if re.match(r"^\d+ {2,}", line)]


def test_report_prints_the_table_of_the_run(tmp_path, capsys):
    _write_run(tmp_path)
    assert main(["report", str(tmp_path), "--width", "140"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"incidents from {tmp_path / INCIDENTS}"
    assert lines[1] == "3 non-finite incidents, steps 7 to 20"
    assert lines[2].split() == ["step", "epoch", "kind", "cause", "module", "samples", "action"]
    assert _table_rows(out) == [
        ["7", "0", "loss", "dirty_data", "-", "[21, 5, +2 more]", "skipped"],
        ["19", "1", "grad", "unsafe_op", "decoder.proj (log at net.py:120)", "-", "recovered by CheckpointRollback"],
        ["20", "1", "param", "divergence", "-", "-", "raised"],
    ]
    assert "by cause: dirty_data 1, unsafe_op 1, divergence 1" in lines
    assert "  unsafe_op: Clamp the input of log." in lines
    assert lines[-1] == f"4 samples quarantined in {tmp_path / QUARANTINE_FILE}: indices [5, 9, 21, 30]"
    # the default width (stdout is not a terminal here) is 100: cells are cut, the op's line number is kept
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 100 for line in lines if str(tmp_path) not in line)
    row = _table_rows("\n".join(lines))[1]
    assert row[4].startswith("…") and row[4].endswith(".proj (log at net.py:120)")
    assert row[6].startswith("recovered by Check") and row[6].endswith("…")
    assert main(["report", str(tmp_path), "--width", "30"]) == 2
    assert "--width must be at least 60" in capsys.readouterr().err


def test_report_json_round_trips_incidents_and_quarantine(tmp_path, capsys):
    incidents = _write_run(tmp_path)
    assert main(["report", str(tmp_path / INCIDENTS), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["incidents_file"] == str(tmp_path / INCIDENTS)
    assert out["quarantine_file"] == str(tmp_path / QUARANTINE_FILE)
    assert [Incident.from_dict(d) for d in out["incidents"]] == incidents
    assert [d["time"] for d in out["incidents"]] == [i.time for i in incidents]
    assert out["by_cause"] == {"dirty_data": 1, "unsafe_op": 1, "divergence": 1}
    assert out["quarantine"] == Quarantine(tmp_path / QUARANTINE_FILE).records()


def test_nested_log_dirs_read_the_newest_file(tmp_path, capsys):
    old, new = tmp_path / "lightning_logs" / "version_0", tmp_path / "lightning_logs" / "version_3"
    for folder in (old, new):
        folder.mkdir(parents=True)
    _write_run(old, [Incident(step=1, kind="loss")], quarantine=False)
    _write_run(new)
    os.utime(old / INCIDENTS, (1_000, 1_000))
    os.utime(new / INCIDENTS, (2_000, 2_000))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"incidents from {new / INCIDENTS} (the newest of 2 found)"
    assert [row[0] for row in _table_rows(out)] == ["7", "19", "20"]
    assert f"in {new / QUARANTINE_FILE}" in out
    # the older run, newer now: read instead, without a quarantine section (it has no quarantine file)
    os.utime(old / INCIDENTS, (3_000, 3_000))
    assert main(["report", str(tmp_path / "lightning_logs")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"incidents from {old / INCIDENTS} (the newest of 2 found)"
    assert [row[0] for row in _table_rows(out)] == ["1"] and "quarantined" not in out


def test_quarantine_option_and_empty_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / INCIDENTS).write_text("")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"incidents from {run / INCIDENTS}", "no incidents"]
    elsewhere = tmp_path / "kept" / "q.jsonl"
    Quarantine(elsewhere).add([make_record(index=8, position=0, epoch=0, step=1, batch_idx=1, reason="r", fingerprint="x")])
    assert main(["report", str(run), "--quarantine", str(elsewhere), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["incidents"] == [] and out["quarantine_file"] == str(elsewhere) and [r["index"] for r in out["quarantine"]] == [8]
    assert main(["report", str(run), "--quarantine", str(tmp_path / "missing.jsonl")]) == 2
    assert "no quarantine file at" in capsys.readouterr().err


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty_run" / "lightning_logs").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "empty_run") in err
    assert "NaNGuard writes nan_incidents.jsonl in the run's log dir" in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "bad" / INCIDENTS
    append_jsonl(bad, [Incident(step=1, kind="loss").to_dict(), {"step": 2, "kind": "nonsense"}])
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "record 2: not an incident" in err and "'nonsense'" in err
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "garbage.jsonl")]) == 2
    assert "line 1: not a JSON record" in capsys.readouterr().err


def test_python_dash_m_report(tmp_path):
    _write_run(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "lightning_nan.cli", "report", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [d["step"] for d in out["incidents"]] == [7, 19, 20]
    assert [r["index"] for r in out["quarantine"]] == [21, 5, 9, 30]


class _NaNAtBatch(pl.LightningModule):
    def __init__(self, bad_batches):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)
        self.bad_batches = bad_batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return loss * float("nan") if batch_idx in self.bad_batches else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_report_on_a_real_run_finds_the_log_dir_file(tmp_path, capsys):
    guard = NaNGuard()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[guard], logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(24, 3, generator=g), torch.randn(24, 1, generator=g)), batch_size=4)
    with pytest.warns(Warning):
        trainer.fit(_NaNAtBatch({1, 4}), data)
    written = os.path.join(trainer.log_dir, INCIDENTS)
    assert os.path.dirname(written) == str(tmp_path / "lightning_logs" / "version_0")
    capsys.readouterr()  # the end-of-fit summary NaNGuard printed
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"incidents from {written}"
    expected = [Incident.from_dict(r) for r in read_jsonl(written)]
    assert len(expected) == len(guard.incidents) == 2
    assert [row[0] for row in _table_rows(out)] == [str(i.step) for i in guard.incidents]
    assert [row[2] for row in _table_rows(out)] == ["loss", "loss"]
    assert [row[6] for row in _table_rows(out)] == [i.action for i in guard.incidents]
