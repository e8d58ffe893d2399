"""A new run with the same callback objects starts afresh; a resumed one gets its state back (issue 16)."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
from faulty import cause_class, identical, loader, model_class, trainer_kwargs

import lightning_nan as ln

FAULTS = {1: "loss", 5: "param"}  # a skipped step, then NaN weights that only a rollback cures


def callbacks():
    return [
        ln.NaNGuard(),
        ln.GradientClipping("autoclip", percentile=50),
        ln.LRBackoff(),
        ln.CheckpointRollback(every_n_steps=3, confirm_steps=1, max_rollbacks=1),
        ln.BatchBisection(),
    ]


def fit(tmp_path, cbs, *extra, ckpt_path=None, **kw):
    blowup = cause_class(pl)("divergence")  # the planted faults stand for a blow-up: the backoff acts on it
    trainer = pl.Trainer(callbacks=[*cbs, *extra, blowup], **trainer_kwargs(tmp_path, **kw))
    model = model_class(pl)(faults=FAULTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model


def summary(cbs):
    guard, clip, backoff, rollback, bisection = cbs
    return {
        "bisection": (bisection.reports, bisection.forward_passes),
        "incidents": [(i.step, i.kind, i.action) for i in guard.incidents],
        "skipped": guard.skipped_steps,
        "autoclip": clip.clipper.state_dict(),
        "backoff": backoff.history,
        "rollbacks": rollback.history,
    }


def test_a_new_run_with_the_same_callbacks_starts_afresh_and_a_resume_restores(tmp_path):
    used = callbacks()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(tmp_path / "first", used, ckpt, enable_checkpointing=True)
    first = summary(used)
    assert len(first["rollbacks"]) == 1 == used[3].max_rollbacks and len(first["incidents"]) == 2
    assert first["autoclip"]["history"] and first["backoff"] and first["bisection"][1] > 0

    # The same objects in a new Trainer with a new model: the run is exactly that of new callbacks (the
    # rollback budget is not spent already, AutoClip's norms and the incidents are this run's only).
    again = fit(tmp_path / "again", used)
    new = callbacks()
    reference = fit(tmp_path / "reference", new)
    assert summary(used) == summary(new) == first
    assert identical(again.state_dict(), reference.state_dict())

    # Resuming from the first run's checkpoint, the same objects get that run's state back.
    fit(tmp_path / "resume", used, ckpt_path=ckpt.last_model_path, max_epochs=1)
    assert summary(used) == first
