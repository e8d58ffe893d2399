"""``kill -9``: while records are being appended, and in the middle of a run, which then resumes elsewhere."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from reliability_common import POISON, Model, assert_bit_equal, bisection_of, guard_of, loader, trainer, weights

from lightning_nan.core.files import FileWarning
from lightning_nan.core.jsonl import append_jsonl, read_jsonl, read_jsonl_lines
from lightning_nan.core.quarantine import Quarantine, make_record

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))


def _append_forever(q_path: str, i_path: str, start: int, ready) -> None:
    """In a forked process: append record after record to both files until killed."""
    pad = "x" * (1 << 18)  # 256 KiB records: a kill can land inside the write of one
    quarantine = Quarantine(q_path)
    for i in range(start, start + 1000):
        quarantine.add([make_record(index=i, position=0, epoch=0, step=i, batch_idx=i, reason="r", fingerprint="f", pad=pad)])
        append_jsonl(i_path, [{"step": i, "pad": pad}])
        if i == start + 1:
            ready.set()  # two whole records of this round are on disk; the kill comes during the next ones


def _whole_and_torn(path: Path) -> tuple[list[int], str | None]:
    lines, torn = read_jsonl_lines(path)
    return [r.get("index", r.get("step")) for _, r in lines], torn


def test_kill_9_during_appends_loses_no_whole_record_and_deletes_no_byte(tmp_path):
    q_path, i_path = tmp_path / "quarantine.jsonl", tmp_path / "nan_incidents.jsonl"
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    start, tears = 0, 0  # tears: kills that landed inside a write (it varies; test_files checks that path deterministically)
    for _ in range(12):
        ready = fork.Event()
        child = fork.Process(target=_append_forever, args=(str(q_path), str(i_path), start, ready))
        child.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0, 0.01))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        for path in (q_path, i_path):
            whole, torn = _whole_and_torn(path)
            assert whole == list(range(len(whole))) and len(whole) >= start + 2  # every whole record, in order
            size = path.stat().st_size
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FileWarning)
                append_jsonl(path, [{"index": len(whole), "step": len(whole)}])
            if torn is not None:  # what a kill tore is moved aside byte for byte, and said where
                tears += 1
                aside = sorted(tmp_path.glob(f"{path.name}.torn-*"))[-1]
                assert aside.read_bytes() == torn.encode()
                assert [str(aside) in str(w.message) for w in caught] == [True]
                assert path.read_bytes()[: size - len(torn.encode())].endswith(b"\n")
            else:
                assert caught == []
            again, torn = _whole_and_torn(path)
            assert torn is None and again == list(range(len(whole) + 1))
        start = max(len(_whole_and_torn(q_path)[0]), len(_whole_and_torn(i_path)[0]))
        for path in (q_path, i_path):  # both files continue at the same index
            have = len(_whole_and_torn(path)[0])
            append_jsonl(path, [{"index": n, "step": n} for n in range(have, start)])


TRAINER = """
import os, sys, time
import pytorch_lightning as pl
from reliability_common import Model, loader, trainer
import lightning_nan

class KillPoint(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # epoch 0 (2 incidents, 2 samples quarantined) and its checkpoint are done
            print("READY", flush=True)
            time.sleep(120)

t = trainer(sys.argv[1], max_epochs=3, callbacks=[lightning_nan.NaNGuard(), lightning_nan.BatchBisection(), KillPoint()])
t.fit(Model(), loader())
"""


def test_kill_9_mid_run_then_resume_in_a_new_log_dir(tmp_path, uninterrupted):
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    root = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, env=_env(), text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    version_0 = root / "lightning_logs" / "version_0"
    assert [r["index"] for r in Quarantine(version_0 / "quarantine.jsonl").records()] == list(POISON)
    assert [r["samples"] for r in read_jsonl(version_0 / "nan_incidents.jsonl")] == [[5], [30]]
    (ckpt,) = (version_0 / "checkpoints").iterdir()
    model = Model()
    resumed = trainer(root, max_epochs=3)
    resumed.fit(model, loader(), ckpt_path=ckpt)
    assert bisection_of(resumed).quarantine_file == str(root / "lightning_logs" / "version_1" / "quarantine.jsonl")
    assert not set().union(*map(set, model.seen)) & set(POISON)
    assert len(guard_of(resumed).incidents) == 2  # restored, none new
    assert Quarantine(bisection_of(resumed).quarantine_file).indices() == set(POISON)
    assert_bit_equal(weights(model), weights(uninterrupted))
