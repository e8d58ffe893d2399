import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nan import cli
from lightning_nan.cli import main
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record, sample_fingerprint

CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-nan"

# A dataset module as a user would write it: 40 samples (a dict with a float tensor, an int label and
# a tuple), with NaN, Inf and 1e38 planted in different fields, and ints that are huge but harmless.
DATA_MODULE = """
import torch

BAD = {"nan": 3, "inf": 17, "big": 29, "neg_inf_nested": 35}

class Data:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = torch.linspace(-1, 1, 5) * (i + 1)
        extra = torch.full((2,), float(i))
        if i == BAD["nan"]:
            x[2] = float("nan")
        if i == BAD["inf"]:
            x[0] = float("inf")
        if i == BAD["big"]:
            extra[1] = -1e38
        if i == BAD["neg_inf_nested"]:
            extra[0] = float("-inf")
        return {"x": x, "label": torch.tensor(10**18), "meta": ("id", extra)}

def make():
    return Data()

def not_a_dataset():
    return 42

VALUE = 3
"""


@pytest.fixture
def data_module(tmp_path, monkeypatch, request):
    """Write the dataset module in tmp_path and cd there; returns its (test-unique) name."""
    name = "userdata_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    (tmp_path / f"{name}.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def _records(n=3):
    return [
        make_record(index=i * 5, position=i, epoch=0, step=10 + i, batch_idx=i, reason=f"non-finite loss {i}", fingerprint=f"fp{i}")
        for i in range(n)
    ] + [make_record(index=None, position=2, epoch=1, step=30, batch_idx=4, reason="iterable", fingerprint="ffff")]


def test_quarantine_list_table_and_json(tmp_path, capsys):
    path = tmp_path / QUARANTINE_FILE
    records = Quarantine(path).add(_records())
    assert main(["quarantine", "list", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["index", "epoch", "step", "batch_idx", "reason", "fingerprint"]
    assert out[1].split() == ["0", "0", "10", "0", "non-finite", "loss", "0", "fp0"]
    assert out[3].split() == ["10", "0", "12", "2", "non-finite", "loss", "2", "fp2"]
    assert out[4].split() == ["?", "(pos", "2)", "1", "30", "4", "iterable", "ffff"]
    assert out[-1] == f"4 quarantined sample(s) in {path} (3 with a dataset index)"
    # a run's folder works too, and --json gives the records themselves
    assert main(["quarantine", "list", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == records


def test_quarantine_clear_keeps_a_backup(tmp_path, capsys):
    path = tmp_path / QUARANTINE_FILE
    Quarantine(path).add(_records())
    content = path.read_bytes()
    assert main(["quarantine", "clear", str(path)]) == 0
    out = capsys.readouterr().out
    backups = [p for p in tmp_path.iterdir() if p.name.endswith(".bak")]
    assert len(backups) == 1 and str(backups[0]) in out
    assert backups[0].read_bytes() == content and not path.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quarantine", "list", "{tmp}/missing.jsonl"], "no quarantine file at '{tmp}/missing.jsonl'"),
        (["quarantine", "clear", "{tmp}/missing.jsonl"], "no quarantine file at '{tmp}/missing.jsonl'"),
        (["quarantine", "list", "{tmp}/binary.jsonl"], "{tmp}/binary.jsonl, line 1: not UTF-8"),
        (["quarantine", "list", "{tmp}/array.jsonl"], "{tmp}/array.jsonl, line 1: expected a JSON object"),
    ],
)
def test_quarantine_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xd8\xff\xe0 jpeg\n")
    (tmp_path / "array.jsonl").write_text('[{"index": 1}]\n')
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-nan: error: ") and message.format(tmp=tmp_path) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "binary.jsonl").read_bytes() == b"\xff\xd8\xff\xe0 jpeg\n"


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["quarantine"]) == 2
    assert main(["quarantine", "list"]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("quarantine", "scan", "replay", "report"):
        assert f"\n  {command} " in out
    assert main(["scan", "--help"]) == 0
    assert "--max-abs" in capsys.readouterr().out


def test_a_command_whose_module_is_missing_is_listed_but_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "future", "lightning_nan.cli._not_written_yet")
    assert main(["--help"]) == 0
    assert "future" in capsys.readouterr().out.split("commands:")[1]
    assert main(["future", "--anything"]) == 2
    assert capsys.readouterr().err.strip() == "lightning-nan future: not available in this version"


def test_scan_flags_exactly_the_planted_samples(data_module, tmp_path, capsys):
    assert main(["scan", f"{data_module}:make"]) == 0
    out = capsys.readouterr().out
    assert "scanned 40 samples, flagged 4: indices [3, 17, 29, 35]" in out
    q = Quarantine(tmp_path / QUARANTINE_FILE)  # the default --out, in the current folder
    records = q.records()
    assert q.indices() == {3, 17, 29, 35}
    by_index = {r["index"]: r for r in records}
    assert by_index[3]["reason"] == "non-finite: ['x']"
    assert by_index[17]["reason"] == "non-finite: ['x']"
    assert by_index[29]["reason"] == "extreme magnitude |x|=1e+38 at ['meta'][1]"
    assert by_index[35]["reason"] == "non-finite: ['meta'][1]"
    data = sys.modules[data_module].make()
    for r in records:
        assert r["fingerprint"] == sample_fingerprint(data[r["index"]])
        assert (r["epoch"], r["step"], r["batch_idx"], r["position"]) == (None, None, None, None)
    # scanning again appends nothing twice
    assert main(["scan", f"{data_module}:make"]) == 0
    assert q.records() == records


def test_scan_options(data_module, tmp_path, capsys):
    out = tmp_path / "sub" / "pre.jsonl"
    assert main(["scan", f"{data_module}:make", "--out", str(out), "--limit", "20"]) == 0
    assert "scanned 20 samples, flagged 2: indices [3, 17]" in capsys.readouterr().out
    assert Quarantine(out).indices() == {3, 17}
    # sample i holds |x| = i + 1 in 'x' and i in 'meta': a low --max-abs flags 37..39 too
    assert main(["scan", f"{data_module}:make", "--out", str(out), "--max-abs", "37.5"]) == 0
    assert "scanned 40 samples, flagged 7: indices [3, 17, 29, 35, 37, 38, 39]" in capsys.readouterr().out
    assert Quarantine(out).indices() == {3, 17, 29, 35, 37, 38, 39}
    reason = next(r for r in Quarantine(out).records() if r["index"] == 38)["reason"]
    assert reason == "extreme magnitude |x|=39 at ['x']; extreme magnitude |x|=38 at ['meta'][1]"
    # samples above --max-abs are still finite, so 36 (|x| = 37) is not flagged
    assert 36 not in Quarantine(out).indices()


@pytest.mark.parametrize(
    "target, message",
    [
        ("{mod}", "expected MODULE:FUNCTION (e.g. mydata:make_dataset), got '{mod}'"),
        ("{mod}:", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("{mod}:missing", "module '{mod}' has no attribute 'missing'"),
        ("{mod}:VALUE", "{mod}:VALUE is a int, not a function"),
        ("{mod}:not_a_dataset", "returned a int, expected a map-style dataset"),
        ("data/{mod}.py:make", "expected a module name, not a file path"),
    ],
)
def test_scan_bad_target_exit_2(data_module, tmp_path, capsys, target, message):
    assert main(["scan", target.format(mod=data_module)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-nan: error: ") and message.format(mod=data_module) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / QUARANTINE_FILE).exists()


def test_scan_refuses_an_unreadable_out_before_scanning(data_module, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["scan", f"{data_module}:make", "--out", "bad.jsonl"]) == 2
    assert "bad.jsonl, line 1" in capsys.readouterr().err
    assert (tmp_path / "bad.jsonl").read_text() == "not json\n"


def test_python_dash_m_runs_the_cli(tmp_path):
    path = tmp_path / QUARANTINE_FILE
    records = Quarantine(path).add(_records(2))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_nan.cli", "quarantine", "list", str(path), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == records
    missing = subprocess.run(
        [sys.executable, "-m", "lightning_nan.cli", "quarantine", "list", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "no quarantine file" in missing.stderr


def test_console_script_scans_with_a_progress_bar(tmp_path):
    assert CONSOLE_SCRIPT.exists(), "run `pip install -e .` so that the lightning-nan script exists"
    (tmp_path / "clidata.py").write_text(DATA_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "scan", "clidata:make", "--out", "q.jsonl"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "scanned 40 samples, flagged 4: indices [3, 17, 29, 35]" in result.stdout
    assert "40/40" in result.stderr  # tqdm's progress bar, on stderr
    assert Quarantine(tmp_path / "q.jsonl").indices() == {3, 17, 29, 35}

