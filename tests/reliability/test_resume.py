"""Resume from a checkpoint, in a new log dir or the same one: the quarantine comes along.

Epoch 0 quarantines samples 5 and 30 (two incidents); a checkpoint is saved at its end. The resumed
run must train exactly as the uninterrupted one: the same batches, no new incident, the same weights
bit for bit.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from reliability_common import POISON, Model, assert_bit_equal, bisection_of, guard_of, loader, trainer, weights

from lightning_nan import BatchBisection, NaNGuard
from lightning_nan.cli import main
from lightning_nan.core.files import FileWarning
from lightning_nan.core.jsonl import read_jsonl
from lightning_nan.core.quarantine import Quarantine


def interrupted(root, callbacks=None):
    """Epoch 0 with the default logger (``lightning_logs/version_0``); returns the trainer and its checkpoint."""
    first = trainer(root, max_epochs=1, callbacks=callbacks)
    first.fit(Model(), loader())
    ckpt = first.checkpoint_callback.best_model_path  # version_0/checkpoints/epoch=0-step=6.ckpt
    assert ckpt.endswith("epoch=0-step=6.ckpt")
    return first, ckpt


def resume(root, ckpt, poison=POISON, **kwargs):
    model = Model()
    second = trainer(root, max_epochs=3, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FileWarning)
        second.fit(model, loader(poison), ckpt_path=ckpt)
    return second, model, [w for w in caught if issubclass(w.category, FileWarning)]


def test_resume_in_a_new_log_dir_excludes_every_sample_quarantined_before(tmp_path, uninterrupted, capsys):
    first, ckpt = interrupted(tmp_path)
    old_file = bisection_of(first).quarantine_file
    assert old_file == str(tmp_path / "lightning_logs" / "version_0" / "quarantine.jsonl")
    state = torch.load(ckpt, weights_only=False)["callbacks"]["BatchBisection"]
    assert state["quarantine_file"] == old_file  # where it was, and what it held, travel in the checkpoint
    assert sorted(r["index"] for r in state["quarantine"]) == list(POISON)

    second, model, file_warnings = resume(tmp_path, ckpt)
    new_file = bisection_of(second).quarantine_file
    assert new_file == str(tmp_path / "lightning_logs" / "version_1" / "quarantine.jsonl")
    assert file_warnings == []  # the old file is intact: nothing to report
    assert bisection_of(second).quarantined == set(POISON)
    assert not set().union(*map(set, model.seen)) & set(POISON)  # epochs 1 and 2 never saw them
    assert len(guard_of(second).incidents) == 2  # the two of epoch 0, restored; none new
    assert_bit_equal(weights(model), weights(uninterrupted))
    # the new run's file holds the whole quarantine, and the CLI says the same as training
    assert Quarantine(new_file).records() == Quarantine(old_file).records()  # the same records, each once
    # and its incidents file starts with the checkpoint's incidents: the whole run in one place
    old_incidents = read_jsonl(os.path.join(os.path.dirname(old_file), "nan_incidents.jsonl"))
    assert read_jsonl(os.path.join(os.path.dirname(new_file), "nan_incidents.jsonl")) == old_incidents
    assert [r["samples"] for r in old_incidents] == [[5], [30]]
    capsys.readouterr()
    assert main(["quarantine", "list", os.path.dirname(new_file)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"2 quarantined sample(s) in {new_file} (2 with a dataset index)"


@pytest.mark.parametrize("where", ["new_dir", "same_file"])
@pytest.mark.parametrize("change", ["deleted", "lost_a_record"])
def test_a_missing_or_changed_file_is_reported_and_the_checkpoint_wins(tmp_path, uninterrupted, change, where):
    path = tmp_path / "q.jsonl"
    incidents = tmp_path / "i.jsonl"
    make = (lambda: None) if where == "new_dir" else (lambda: [NaNGuard(incidents_path=incidents), BatchBisection(quarantine_path=path)])
    first, ckpt = interrupted(tmp_path, make())
    old_file = bisection_of(first).quarantine_file
    if change == "deleted":
        os.remove(old_file)
    else:  # a hand edit dropped sample 30
        lines = open(old_file).read().splitlines(keepends=True)
        open(old_file, "w").writelines(line for line in lines if '"index": 30' not in line)
    second, model, file_warnings = resume(tmp_path, ckpt, callbacks=make())
    new_file = bisection_of(second).quarantine_file
    assert (new_file == old_file) == (where == "same_file")
    (warning,) = file_warnings
    message = str(warning.message)
    assert old_file in message and new_file in message
    assert ("is missing" in message) if change == "deleted" else ("no longer holds 1 of its 2 record(s)" in message)
    assert ("[5, 30]" in message) if change == "deleted" else ("[30]" in message)
    assert "exclude_quarantined=False" in message  # the way to train on them again
    assert bisection_of(second).quarantined == set(POISON)
    assert sorted(r["index"] for r in Quarantine(new_file).records()) == list(POISON)  # each once
    if where == "same_file":
        assert [r["samples"] for r in read_jsonl(incidents)] == [[5], [30]]  # each once
    assert_bit_equal(weights(model), weights(uninterrupted))


def test_a_state_loaded_by_hand_before_fit_applies_to_that_fit(tmp_path):
    first, ckpt = interrupted(tmp_path)
    bisection = bisection_of(first)  # the same object, used again: its state loaded before the next fit
    bisection.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"]["BatchBisection"])
    model = Model()
    t = trainer(tmp_path / "again", max_epochs=1, logger=False, callbacks=[NaNGuard(), bisection])
    t.fit(model, loader())
    assert bisection.quarantine_file == str(tmp_path / "again" / "quarantine.jsonl")
    assert bisection.quarantined == set(POISON) and not set().union(*map(set, model.seen)) & set(POISON)
    assert Quarantine(bisection.quarantine_file).indices() == set(POISON)


def test_a_quarantine_that_never_had_a_record_is_not_reported_missing(tmp_path):
    first = trainer(tmp_path, max_epochs=1)
    first.fit(Model(), loader(poison=()))  # no incident: no quarantine file was ever written
    second, model, file_warnings = resume(tmp_path, first.checkpoint_callback.best_model_path, poison=())
    assert file_warnings == [] and bisection_of(second).quarantined == set()
