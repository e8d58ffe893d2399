"""Files that cannot be written never end training: records stay in memory and in the checkpoint, one
warning per file names it and the fix, and setup says so before the first step."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from reliability_common import POISON, Model, assert_bit_equal, loader, trainer, weights

from lightning_nan import BatchBisection, NaNGuard
from lightning_nan.core.files import FileWarning
from lightning_nan.core.jsonl import read_jsonl
from lightning_nan.core.quarantine import Quarantine


def fit(root, incidents_path, quarantine_path, *, poison=POISON, extra=()):
    guard, bisection = NaNGuard(incidents_path=incidents_path), BatchBisection(quarantine_path=quarantine_path)
    model = Model()
    t = trainer(root, max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[guard, bisection, *extra])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FileWarning)
        t.fit(model, loader(poison))
    return t, model, guard, bisection, [str(w.message) for w in caught if issubclass(w.category, FileWarning)]


@pytest.fixture(scope="module")
def writable_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("writable")
    _, model, guard, _, messages = fit(root, root / "i.jsonl", root / "q.jsonl")
    assert messages == [] and len(guard.incidents) == 2
    return model


def _blocked(tmp_path, how):
    """Two paths that cannot be written, and what the message says about them."""
    if how == "folder_at_the_path":
        paths = tmp_path / "nan_incidents.jsonl", tmp_path / "quarantine.jsonl"
        for p in paths:
            p.mkdir()
        return paths, "it is a folder"
    (tmp_path / "logs").write_text("a file where the log folder should be")
    return (tmp_path / "logs" / "nan_incidents.jsonl", tmp_path / "logs" / "quarantine.jsonl"), "is a file, not a folder"


@pytest.mark.parametrize("how", ["folder_at_the_path", "file_at_the_folder"])
def test_training_goes_on_records_stay_in_memory_and_in_the_checkpoint(tmp_path, writable_run, how):
    (incidents_path, quarantine_path), reason = _blocked(tmp_path, how)
    t, model, guard, bisection, messages = fit(tmp_path, incidents_path, quarantine_path)
    assert [i.samples for i in guard.incidents] == [[5], [30]]
    assert bisection.quarantined == set(POISON)
    assert not set().union(*map(set, model.seen[6:])) & set(POISON)  # left out of epoch 1 all the same
    assert_bit_equal(weights(model), weights(writable_run))  # the run a writable folder would have made
    # one warning per file, naming it, why, and the argument that fixes it
    guard_message, bisection_message = sorted(messages, key=lambda m: not m.startswith("NaNGuard"))
    assert guard_message.startswith(f"NaNGuard cannot write the incidents file {incidents_path} (")
    assert bisection_message.startswith(f"BatchBisection cannot write the quarantine file {quarantine_path} (")
    for message, arg in ((guard_message, "NaNGuard(incidents_path="), (bisection_message, "BatchBisection(quarantine_path=")):
        assert reason in message and arg in message and "training goes on" in message
    ckpt = tmp_path / "end.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert [i["samples"] for i in state["NaNGuard"]["incidents"]] == [[5], [30]]
    assert sorted(r["index"] for r in state["BatchBisection"]["quarantine"]) == list(POISON)


def test_setup_warns_before_the_first_step_even_without_an_incident(tmp_path):
    (incidents_path, quarantine_path), reason = _blocked(tmp_path, "folder_at_the_path")
    _, _, guard, _, messages = fit(tmp_path, incidents_path, quarantine_path, poison=())
    assert guard.incidents == []
    assert sorted(messages) == sorted(
        [
            f"NaNGuard cannot write the incidents file {incidents_path} ({reason}); training goes on, and its records"
            " stay in memory and in the checkpoint (retried at each write). Fix: make its folder writable, or pass"
            " NaNGuard(incidents_path=...) a writable file.",
            f"BatchBisection cannot write the quarantine file {quarantine_path} ({reason}); training goes on, and its"
            " records stay in memory and in the checkpoint (retried at each write). Fix: make its folder writable, or"
            " pass BatchBisection(quarantine_path=...) a writable file.",
        ]
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_log_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _, _, guard, bisection, messages = fit(tmp_path, folder / "i.jsonl", folder / "q.jsonl")
    finally:
        folder.chmod(0o755)
    assert len(guard.incidents) == 2 and bisection.quarantined == set(POISON)
    assert len(messages) == 2 and all(str(folder) in m and "Permission denied" in m for m in messages)


class Unblock:
    """Removes the folders standing where the files should be once the first incident is recorded."""

    def __init__(self, *paths):
        self.paths = paths

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            for p in self.paths:
                if p.is_dir():
                    p.rmdir()


def test_pending_records_are_written_as_soon_as_the_file_can_be(tmp_path):
    import pytorch_lightning as pl

    (incidents_path, quarantine_path), _ = _blocked(tmp_path, "folder_at_the_path")
    unblock = type("UnblockCallback", (Unblock, pl.Callback), {})(incidents_path, quarantine_path)
    _, _, guard, _, messages = fit(tmp_path, incidents_path, quarantine_path, extra=[unblock])
    assert len(messages) == 2  # one each, though the first incident's write failed too
    # the second incident's write (batch 3) takes the first one's records along, in order
    assert [r["step"] for r in read_jsonl(incidents_path)] == [i.step for i in guard.incidents] == [0, 3]
    assert [r["index"] for r in Quarantine(quarantine_path).records()] == [5, 30]
