"""NaNGuard with real Trainers, in both Lightning namespaces."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from faulty import loader, model_class, recorder_class, trainer_kwargs, unchanged_batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nan.core import NonFiniteError, NonFiniteWarning, read_jsonl


def fit(ns, tmp_path, *, guard=None, faults=None, data=None, callbacks=(), model=None, ckpt_path=None, **kw):
    model = model or model_class(ns.pl)(faults=faults)
    recorder = recorder_class(ns.pl)()
    guard = guard if guard is not None else ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[guard, recorder, *callbacks], **trainer_kwargs(tmp_path, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteWarning)
        trainer.fit(model, data or loader(), ckpt_path=ckpt_path)
    guard_warnings = [w for w in caught if issubclass(w.category, NonFiniteWarning)]
    return trainer, guard, recorder, guard_warnings


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_planted_faults_skip_exactly_their_steps(ns, tmp_path, optimizer):
    model = model_class(ns.pl)(faults={2: "loss", 5: "grad"}, optimizer=optimizer)
    trainer, guard, rec, warned = fit(ns, tmp_path, model=model)
    assert unchanged_batches(rec.snaps) == [2, 5]
    assert unchanged_batches(rec.snaps, "opt") == [2, 5]  # momentum / Adam moments and step counters too
    assert [(i.step, i.kind, i.action) for i in guard.incidents] == [(2, "loss", "skipped"), (5, "grad", "skipped")]
    assert guard.incidents[1].params == ["body.0.weight"]
    assert guard.incidents[0].batch_idx == [2] and guard.incidents[0].epoch == 0
    assert guard.skipped_steps == 2 and trainer.global_step == 8
    # one warning per incident, and the JSON lines file in default_root_dir (no logger)
    assert len(warned) == 2 and "step 2: non-finite loss" in str(warned[0].message)
    records = read_jsonl(tmp_path / "nan_incidents.jsonl")
    assert [(r["step"], r["kind"], r["cause"], r["module"], r["samples"]) for r in records] == [
        (2, "loss", "unknown", None, None),
        (5, "grad", "unknown", None, None),
    ]
    assert all(r["advice"] for r in records)
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_nan_input_sample_is_reported_as_input(ns, tmp_path):
    data = loader(nan_sample=13)  # batch 3 of 4 samples
    _, guard, rec, _ = fit(ns, tmp_path, guard=ns.NaNGuard(check_inputs=True), data=data)
    assert unchanged_batches(rec.snaps) == [3]
    (incident,) = guard.incidents
    assert incident.kind == "input" and incident.detail["input_fields"] == ["batch 3[0]"]
    # without the input check the same fault is caught at the loss
    _, guard, rec, _ = fit(ns, tmp_path / "b", data=loader(nan_sample=13))
    assert [i.kind for i in guard.incidents] == ["loss"] and unchanged_batches(rec.snaps) == [3]


def test_nan_weight_raises_naming_parameter_and_step(ns, tmp_path):
    with pytest.raises(NonFiniteError) as info:
        fit(ns, tmp_path, faults={4: "param"})
    err = info.value
    assert err.incident.kind == "param" and err.incident.step == 4 and err.incident.params == ["head.weight"]
    assert "head.weight" in str(err) and "step 4" in str(err)
    assert [r["action"] for r in read_jsonl(tmp_path / "nan_incidents.jsonl")] == ["raised"]


def test_gradient_accumulation_skips_the_whole_accumulated_step(ns, tmp_path):
    _, guard, rec, _ = fit(ns, tmp_path, faults={3: "loss"}, accumulate_grad_batches=2)
    # batches 2 and 3 make optimizer step 1; the weights do not change after batch 2 (accumulating) nor 3 (skipped)
    assert unchanged_batches(rec.snaps) == [0, 2, 3, 4, 6]
    (incident,) = guard.incidents
    assert incident.step == 1 and incident.batch_idx == [2, 3] and incident.detail["loss_batches"] == [3]


def test_manual_optimization_with_two_optimizers(ns, tmp_path):
    model = model_class(ns.pl)(faults={3: "loss2", 5: "loss"}, manual=True)
    trainer, guard, rec, _ = fit(ns, tmp_path, model=model)
    body = [{k: v for k, v in s["params"].items() if k.startswith("body")} for s in rec.snaps]
    head = [{k: v for k, v in s["params"].items() if k.startswith("head")} for s in rec.snaps]
    assert unchanged_batches([{"params": b} for b in body]) == [5]  # opt 1 skipped at batch 5 only
    assert unchanged_batches([{"params": h} for h in head]) == [3, 5]  # loss2 NaN at 3; NaN grads reach head at 5
    assert [(i.step, i.kind) for i in guard.incidents] == [(7, "loss"), (10, "loss"), (11, "loss")]
    assert trainer.global_step == 16  # two optimizer steps per batch


def test_bf16_mixed_precision_is_guarded(ns, tmp_path):
    _, guard, rec, _ = fit(ns, tmp_path, faults={2: "loss", 4: "grad"}, precision="bf16-mixed")
    assert unchanged_batches(rec.snaps) == [2, 4]
    assert [i.kind for i in guard.incidents] == ["loss", "grad"]


def test_fp16_grad_scaler_overflows_are_left_to_the_scaler(ns, tmp_path):
    amp = pytest.importorskip(f"{ns.pl.__name__}.plugins.precision")
    plugin = amp.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    _, guard, rec, _ = fit(ns, tmp_path, faults={2: "grad", 5: "loss"}, plugins=[plugin])
    assert 2 in unchanged_batches(rec.snaps) and 5 in unchanged_batches(rec.snaps)
    assert guard.guard.scaler_overflows >= 1
    assert [(i.step, i.kind) for i in guard.incidents] == [(5, "loss")]  # the overflow at 2 is the scaler's
    assert guard.incidents[0].detail["loss_scale"] == 512.0


def test_collapsed_loss_scale_is_a_failure(ns, tmp_path):
    amp = pytest.importorskip(f"{ns.pl.__name__}.plugins.precision")
    plugin = amp.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    faults = {i: "grad" for i in range(4)}
    _, guard, _, _ = fit(ns, tmp_path, guard=ns.NaNGuard(min_loss_scale=1.0), faults=faults, plugins=[plugin])
    kinds = [(i.step, i.kind) for i in guard.incidents]
    assert kinds[0] == (3, "scale")  # 4 -> 2 -> 1 -> 0.5 after three overflows
    assert guard.incidents[0].detail["loss_scale"] == 0.5


def test_escalation_handler_and_listener_callbacks(ns, tmp_path):
    class Handler(ns.pl.Callback):
        def __init__(self):
            self.incidents, self.escalations = [], []

        def on_nan_incident(self, event):
            self.incidents.append((event.incident.step, type(event.extra["trainer"]).__name__))
            event.incident.samples = [99]

        def on_nan_escalation(self, event):
            self.escalations.append(event.incident.step)
            return True

    handler = Handler()
    faults = {i: "loss" for i in range(1, 6)}
    _, guard, _, _ = fit(ns, tmp_path, guard=ns.NaNGuard(max_consecutive=3), faults=faults, callbacks=[handler])
    assert handler.incidents == [(s, "Trainer") for s in range(1, 6)]
    assert handler.escalations == [3]
    assert [i.action for i in guard.incidents] == ["skipped", "skipped", "recovered by Handler", "skipped", "skipped"]
    assert [r["samples"] for r in read_jsonl(tmp_path / "nan_incidents.jsonl")] == [[99]] * 5


def test_too_many_consecutive_skips_raise(ns, tmp_path):
    faults = {i: "loss" for i in range(2, 8)}
    with pytest.raises(NonFiniteError, match="3 steps in a row were skipped") as info:
        fit(ns, tmp_path, guard=ns.NaNGuard(max_consecutive=3), faults=faults)
    assert info.value.incident.step == 4 and len(info.value.history) == 2


def test_counters_reach_tensorboard(ns, tmp_path):
    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer, guard, _, _ = fit(ns, tmp_path, faults={2: "loss", 3: "loss", 6: "grad"}, logger=logger, log_every_n_steps=2)
    trainer.logger.finalize("success")
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    skipped = {e.step: e.value for e in acc.Scalars("nan_guard/skipped_steps")}
    consecutive = {e.step: e.value for e in acc.Scalars("nan_guard/consecutive_skips")}
    assert skipped == {0: 0.0, 2: 1.0, 3: 2.0, 4: 2.0, 6: 3.0}  # every 2nd step, plus each incident
    assert consecutive == {0: 0.0, 2: 1.0, 3: 2.0, 4: 0.0, 6: 1.0}
    assert [e.value for e in acc.Scalars("nan_guard/incidents")][-1] == 3.0
    assert [r["step"] for r in read_jsonl(f"{logger.log_dir}/nan_incidents.jsonl")] == [2, 3, 6]


def test_resume_keeps_the_counters(ns, tmp_path):
    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _, first, _, _ = fit(ns, tmp_path, faults={1: "loss", 2: "loss"}, enable_checkpointing=True, callbacks=[ckpt])
    assert first.skipped_steps == 2 and first.consecutive_skips == 0

    class Probe(ns.pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.seen = (trainer.callbacks[0].skipped_steps, len(trainer.callbacks[0].incidents))

    probe = Probe()
    _, second, _, _ = fit(ns, tmp_path, faults={5: "loss"}, max_epochs=2, callbacks=[probe], ckpt_path=ckpt.last_model_path)
    assert probe.seen == (2, 2)
    assert second.skipped_steps == 3 and [i.step for i in second.incidents] == [1, 2, 13]  # epoch 1, batch 5


def test_setup_refuses_two_guards_and_lbfgs(ns, tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `NaNGuard`"):
        fit(ns, tmp_path, callbacks=[ns.NaNGuard()])  # Lightning refuses it: a step must not be guarded twice
    with pytest.raises(ValueError, match="LBFGS"):
        fit(ns, tmp_path, model=model_class(ns.pl)(optimizer="lbfgs"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"check_inputs": "yes"}, "check_inputs"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"min_loss_scale": -1.0}, "min_loss_scale"),
    ],
)
def test_bad_arguments(ns, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ns.NaNGuard(**kwargs)


def test_callback_classes_belong_to_their_namespace(ns):
    assert isinstance(ns.NaNGuard(), ns.pl.Callback)


def test_core_and_package_import_without_lightning():
    code = (
        "import sys, lightning_nan, lightning_nan.core;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'lightning_fabric')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_skipped_step_leaves_batchnorm_running_stats_as_before(ns, tmp_path):
    """A NaN batch's forward pass moved BatchNorm's running statistics; the skip puts them back bit for bit."""

    class BNModel(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(ns.pl.Callback):
        def __init__(self):
            self.before, self.after = {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before[batch_idx] = {k: v.clone() for k, v in pl_module.net[1].state_dict().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[batch_idx] = {k: v.clone() for k, v in pl_module.net[1].state_dict().items()}

    recorder = Recorder()
    model = BNModel()
    guard = ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[recorder, guard], **trainer_kwargs(tmp_path))
    trainer.fit(model, loader(nan_sample=9))  # batch 2 of 4 samples holds the NaN
    assert [i.step for i in guard.incidents] == [2]
    for key, value in recorder.before[2].items():
        assert torch.equal(recorder.after[2][key], value), key  # restored, bit for bit
    for b in (1, 3):  # healthy steps do move them
        assert not torch.equal(recorder.after[b]["running_mean"], recorder.before[b]["running_mean"])
    model.eval()
    assert torch.isfinite(model.net(torch.randn(5, 4))).all()

    unguarded = BNModel()
    trainer = ns.pl.Trainer(callbacks=[ns.NaNGuard(restore_norm_stats=False)], **trainer_kwargs(tmp_path / "off"))
    trainer.fit(unguarded, loader(nan_sample=9))
    assert not torch.isfinite(unguarded.net[1].running_mean).all()  # what the option prevents
