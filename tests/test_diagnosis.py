"""The diagnosis names the cause of each story behind this library, and shows it on the console, in
TensorBoard, in ``lightning-nan report`` and in NonFiniteError."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nan.core.diagnosis import StepRecord, diagnose
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.events import Evidence, evidence_of
from lightning_nan.core.incident import Incident
from lightning_nan.core.records import BatchRecord, BisectionRecord, LocalizationRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "callbacks"))

import dirty_data  # noqa: E402
import exploding_cnn  # noqa: E402
import exploding_mlp  # noqa: E402
import unsafe_op  # noqa: E402


def guard_and_bisection():
    from lightning_nan import BatchBisection, NaNGuard

    return [NaNGuard(max_consecutive=1000), BatchBisection()]


# ---------------------------------------------------------------------------------------- the stories


def test_exploding_two_layer_net_is_divergence(tmp_path):
    callbacks = guard_and_bisection()
    exploding_mlp.run(1e-4, callbacks, steps=10, root=str(tmp_path))
    first = callbacks[0].incidents[0]
    assert first.cause == "divergence" and first.step <= 5
    assert first.params == ["w1", "w2"]  # where: both weight matrices got non-finite gradients
    assert any(e.startswith("the loss rose from 2.89e+07") for e in first.detail["evidence"])
    assert "lower the learning rate" in first.advice


def test_exploding_cnn_with_unnormalised_input_is_divergence_ending_in_log_of_zero(tmp_path):
    callbacks = guard_and_bisection()
    _, guard = exploding_cnn.run(True, epochs=1, root=str(tmp_path), callbacks=callbacks)
    first = guard.incidents[0]
    assert first.cause == "divergence" and first.module == "PatchCNN"
    assert first.localization.op == "log"  # the saturated softmax fed to log, in training_step
    assert first.localization.op_location.startswith("examples/exploding_cnn.py:")
    assert any("gradient norm grew" in e for e in first.detail["evidence"])
    assert "normalise the inputs" in first.advice


def test_nan_samples_are_dirty_data(tmp_path):
    result = dirty_data.train(True, str(tmp_path), n=2048, epochs=1, workers=0)
    incidents = [i for i in result.guard.incidents if i.samples]
    assert incidents and all(i.cause == "dirty_data" for i in incidents)
    assert incidents[0].module == "Net"  # localization: the NaN already reached the model
    assert sorted(s for i in incidents for s in i.samples) == sorted(k for k, v in dirty_data.CULPRITS.items() if v != "zero")
    # the all-zero image is ordinary data the model's 0/0 trips on: an unsafe op, named, not quarantined
    zero = [i for i in result.guard.incidents if not i.samples]
    assert [(i.cause, i.triggers) for i in zero] == [("unsafe_op", [1777])]
    assert "quarantined" in incidents[0].advice and str(incidents[0].samples) in incidents[0].advice


def test_log_of_a_learned_variance_is_an_unsafe_op(tmp_path):
    guard = unsafe_op.run(str(tmp_path))
    first = guard.incidents[0]
    assert first.cause == "unsafe_op" and first.module == "GaussianRegressor"
    loc = first.localization
    assert loc.op == "log" and loc.op_location == f"examples/unsafe_op.py:{_line_of('torch.log(self.var)')} in training_step"
    assert "its input holds negative values" in " ".join(first.detail["evidence"])
    assert "softplus" in first.advice
    assert all(i.cause == "unsafe_op" for i in guard.incidents)  # each incident diagnosed on its own batch
    # the same op failing on 3 steps is a bug to fix: the guard stopped the run, naming it
    assert len(guard.incidents) == 3 and guard.incidents[-1].action == "raised"
    assert "failed on 3 steps" in guard.incidents[-1].detail["escalation"]


def _line_of(text: str) -> int:
    lines = (ROOT / "examples" / "unsafe_op.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def test_healthy_runs_have_no_incident(tmp_path):
    from faulty import loader, model_class, trainer_kwargs

    import pytorch_lightning as pl

    callbacks = guard_and_bisection()
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model_class(pl)(), loader())
    assert callbacks[0].incidents == []
    model = exploding_mlp.run(1e-6, guard_and_bisection(), steps=50, root=str(tmp_path / "mlp"))
    assert model.losses[-1] < model.losses[0]


# ---------------------------------------------------------------------------------------- the rules


def test_rules_on_hand_made_evidence():
    steady = [StepRecord(s, loss=1.0 + 0.01 * s, grad_norm=2.0) for s in range(10)]
    assert diagnose(Incident(step=10, kind="loss"), steady).cause == "unknown"
    missing = diagnose(Incident(step=10, kind="loss"), steady).missing
    assert any("BatchBisection" in m for m in missing)
    # a spike of the gradient norm alone is divergence too
    spiky = steady + [StepRecord(10, loss=1.1, grad_norm=500.0)]
    assert diagnose(Incident(step=10, kind="grad"), spiky).cause == "divergence"
    # the input: dirty data even without bisection
    assert diagnose(Incident(step=3, kind="input", detail={"input_fields": ["batch 3[0]"]}), steady).cause == "dirty_data"
    # values at float32's limit in the failing op: overflow
    loc = LocalizationRecord(op="pow", op_location="m.py:3 in forward", op_inputs=[{"dtype": "torch.float32", "min": 0.0, "max": 1e38}])
    assert diagnose(Incident(step=10, kind="loss", localization=loc), steady).cause == "overflow"
    # fp16's limit is 65504
    loc16 = LocalizationRecord(op="mul", op_location="m.py:3", op_inputs=[{"dtype": "torch.float16", "min": 0.0, "max": 6e4}])
    assert diagnose(Incident(step=10, kind="loss", localization=loc16), steady).cause == "overflow"
    # samples that fail alone with ordinary inputs trigger an unsafe op: never dirty data
    triggers = BisectionRecord(step=10, batches=[BatchRecord(batch_idx=0, reproduced=True, size=64)], whole_batch=False, triggers=[4])
    assert diagnose(Incident(step=10, kind="loss", triggers=[4], bisection=triggers), steady).cause == "unknown"
    # confirmed samples whose own input is bad, quarantined by bisection: dirty data, and the advice says so
    big = BisectionRecord(step=10, batches=[BatchRecord(batch_idx=0, reproduced=True, size=64)], whole_batch=False, forward_passes=8, quarantined=[4])
    dirty = diagnose(Incident(step=10, kind="loss", samples=[4], bisection=big), steady)
    assert dirty.cause == "dirty_data" and "quarantined" in dirty.advice
    # without bisection a NaN input is still the data's fault, but nothing claims a quarantine
    alone = diagnose(Incident(step=3, kind="input"), steady)
    assert "quarantined" not in alone.advice and "BatchBisection would find" in alone.advice
    assert "BatchBisection would find" not in diagnose(Incident(step=3, kind="input"), steady, finders={Evidence.SAMPLES, Evidence.LOCALIZATION}).advice
    assert not any("add BatchBisection" in m for m in diagnose(Incident(step=10, kind="loss"), steady, finders={Evidence.SAMPLES, Evidence.LOCALIZATION}).missing)


def test_missing_evidence_follows_what_the_finders_in_the_trainer_establish():
    from lightning_nan import BatchBisection

    steady = [StepRecord(s, loss=1.0, grad_norm=1.0) for s in range(10)]

    def missing(*listeners: object) -> str:
        found = diagnose(Incident(step=10, kind="loss"), steady, finders=evidence_of(listeners))
        return next(m for m in found.missing if m.startswith("no localization"))

    assert "add BatchBisection" in missing(object())
    assert "localizes each incident" in missing(BatchBisection())
    assert "localize='every'" in missing(BatchBisection(localize="never"))
    assert "localizes each incident" in missing(BatchBisection(localize="first"))  # its first incident


def test_nonfinite_error_leads_with_cause_and_advice():
    err = NonFiniteError(Incident(step=9, kind="param", cause="divergence", advice="Lower the learning rate."))
    assert str(err).startswith("Cause: divergence. Lower the learning rate.")
    assert err.incident.cause == "divergence"


# ---------------------------------------------------------------------------------------- where it shows


def test_console_summary_tensorboard_text_and_report(tmp_path, capsys):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_nan.cli import main

    callbacks = guard_and_bisection()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=callbacks, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    with pytest.raises(NonFiniteError, match="failed on 3 steps"):  # the same unsafe op, 3 times: stopped
        trainer.fit(unsafe_op.GaussianRegressor(), torch.utils.data.DataLoader(unsafe_op.data(), batch_size=32))
    guard = callbacks[0]
    out = capsys.readouterr().out
    assert "unsafe_op" in out and f"{len(guard.incidents)} non-finite incident" in out  # the console table

    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("nan_guard/incidents/text_summary")
    assert [e.step for e in texts] == [i.step for i in guard.incidents]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert "cause unsafe_op" in first and "log" in first

    assert main(["report", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "unsafe_op" in report and str(guard.incidents[0].step) in report

    from lightning_nan import BatchBisection, NaNGuard

    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[NaNGuard(max_consecutive=2), BatchBisection()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    with pytest.raises(NonFiniteError, match=r"^Cause: unsafe_op\. Unsafe operation log at examples/unsafe_op.py") as info:
        trainer.fit(unsafe_op.GaussianRegressor(), torch.utils.data.DataLoader(unsafe_op.data(), batch_size=32))
    assert info.value.incident.cause == "unsafe_op" and info.value.incident.action == "raised"


def test_divergence_advice_carries_what_lr_backoff_learnt(tmp_path):
    from lightning_nan import LRBackoff, NaNGuard

    callbacks = [NaNGuard(max_consecutive=100), LRBackoff()]
    exploding_mlp.run(1e-4, callbacks, steps=8, root=str(tmp_path))
    first, *later = callbacks[0].incidents
    assert first.cause == "divergence" and "LRBackoff has" not in first.advice  # nothing learnt yet
    hinted = [i for i in later if "LRBackoff has the learning rate at" in i.advice]
    assert hinted, [i.advice for i in later]
    assert f"{callbacks[1].history[0]['factor']:.3g}x the schedule" in hinted[0].advice
