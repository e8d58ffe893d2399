"""CheckpointRollback with real Trainers: faults planted at known steps, states recorded independently."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from faulty import cause_class, identical, trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan.core import NonFiniteError, read_jsonl
from lightning_nan.core.events import RestoredOnRollback
from lightning_nan.core.rollback import RollbackRecord

STEPS_PER_EPOCH = 16  # 64 samples, batches of 4


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(64, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def net_class(pl):
    class Net(pl.LightningModule):
        """A small regression net; ``loss_hook(module, loss)`` may change the loss (planted faults)."""

        def __init__(self, optimizer: str = "sgd", scheduler: bool = False, loss_hook=None):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
            self.head = torch.nn.Linear(8, 1)
            self.optimizer_name, self.scheduler, self.loss_hook = optimizer, scheduler, loss_hook

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.head(self.body(x)), y)
            return self.loss_hook(self, loss) if self.loss_hook is not None else loss

        def configure_optimizers(self):
            if self.optimizer_name == "adam":
                opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            else:
                opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            if not self.scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Net


def helpers(pl):
    class Record(pl.Callback):
        """Weights, optimizer and scheduler state after every step, keyed by ``global_step`` (a deep copy)."""

        def __init__(self):
            self.states: dict[int, dict] = {}

        def _snap(self, trainer, pl_module):
            self.states[trainer.global_step] = copy.deepcopy(
                {
                    "model": pl_module.state_dict(),
                    "opt": trainer.optimizers[0].state_dict(),
                    "sched": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                }
            )

        def on_train_start(self, trainer, pl_module):
            self._snap(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._snap(trainer, pl_module)

    class Corrupt(pl.Callback):
        """Silently set one weight to NaN right after the optimizer step that makes ``global_step`` one of ``steps``."""

        def __init__(self, *steps: int, scale: float | None = None):
            self.steps, self.scale = set(steps), scale

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in self.steps:
                self.steps.discard(trainer.global_step)
                with torch.no_grad():
                    if self.scale is None:
                        pl_module.head.weight[0, 3] = float("nan")
                    else:  # finite but huge
                        for p in pl_module.parameters():
                            p.mul_(self.scale)

    class Backoff(pl.Callback):
        """Hears CheckpointRollback's announcements as LRBackoff does (``on_nan_rollback``) and records them."""

        def __init__(self):
            self.calls: list[tuple[int, str]] = []
            self.since: list[int] = []  # the restored step of each call

        def on_nan_rollback(self, event) -> bool:
            if not event.lr_to_blame:
                return False
            self.calls.append((event.step, event.reason))
            self.since.append(event.restored_step)
            return True

    class Counter(pl.Callback, RestoredOnRollback):
        """A callback whose state rolls back with the model."""

        def __init__(self):
            self.seen = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen += 1

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]

    return Record, Corrupt, Backoff, Counter


def fit(ns, tmp_path, rollback, *, callbacks=(), model=None, guard=None, ckpt_path=None, **kw):
    Record = helpers(ns.pl)[0]
    record = Record()
    guard = guard if guard is not None else ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[guard, rollback, record, *callbacks], **trainer_kwargs(tmp_path, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model or net_class(ns.pl)(), loader(), ckpt_path=ckpt_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return trainer, guard, record, messages


def finite(module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def same_state(a: dict, b: dict) -> bool:
    return identical(a["model"], b["model"]) and identical(a["opt"], b["opt"])


# ---------------------------------------------------------------------------------------------- tests
def test_nan_weight_is_rolled_back_to_a_bit_identical_snapshot(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    assert isinstance(rollback, ns.pl.Callback)
    trainer, guard, rec, messages = fit(ns, tmp_path, rollback, callbacks=[Corrupt(25)], max_epochs=3)
    # NaNGuard's weight check at step 25 saw the NaN planted after step 24's update; the rollback recovered
    assert [(i.step, i.kind, i.action) for i in guard.incidents] == [(25, "param", "recovered by CheckpointRollback")]
    assert rollback.history == [{"step": 25, "restored_step": 20, "reason": "non-finite weights"}]
    record = RollbackRecord(
        step=25, reason="non-finite weights", source="memory", restored_step=20, restored_from="the snapshot of step 20"
    )
    assert guard.incidents[0].rollback == record and "rollback" not in guard.incidents[0].detail
    (written,) = read_jsonl(tmp_path / "nan_incidents.jsonl")
    assert written["action"] == "recovered by CheckpointRollback" and written["rollback"] == record.to_dict()
    # right after the rollback: bit for bit the state recorded at step 20, weights and momentum
    assert not same_state(rec.states[25], rec.states[20])
    assert same_state(rec.states[26], rec.states[20])
    # then training went on, and the run completed every epoch with finite weights
    assert not identical(rec.states[27]["model"], rec.states[26]["model"])
    assert trainer.global_step == 3 * STEPS_PER_EPOCH and finite(trainer.lightning_module)
    assert guard.consecutive_skips == 0 and guard.skipped_steps == 1
    assert [s.step for s in rollback.store.good] == [30, 40]
    # a weight turning NaN in a steady run is corruption: rolled back, and the learning rate is not to blame
    assert guard.incidents[0].cause == "corruption"
    assert not any("learning rate is unchanged" in m for m in messages)


def test_adam_step_counters_and_the_scheduler_roll_back_too(ns, tmp_path):
    _, Corrupt, Backoff, Counter = helpers(ns.pl)
    backoff, counter = Backoff(), Counter()
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    model = net_class(ns.pl)(optimizer="adam", scheduler=True)
    _, guard, rec, messages = fit(ns, tmp_path, rollback, model=model, callbacks=[Corrupt(15), backoff, counter])
    assert rollback.history == [{"step": 15, "restored_step": 10, "reason": "non-finite weights"}]
    assert same_state(rec.states[16], rec.states[10])
    assert rec.states[10]["opt"]["state"][0]["step"] == torch.tensor(10.0)
    # the scheduler and the LR it set came back to step 10's (the rest is restored after the batch's scheduler step)
    assert identical(rec.states[16]["sched"], rec.states[10]["sched"]) and rec.states[16]["sched"][0]["last_epoch"] == 10
    assert rec.states[16]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.9 ** (10 // 3))
    assert rec.states[15]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.9 ** (15 // 3))
    # the opt-in callback's state rolled back: 10 batches had started at step 10's snapshot (16 without the rollback)
    assert counter.seen == 10
    # NaNGuard's history is not rolled back; corruption leaves the learning rate alone: no back-off, no warning
    assert [(i.step, i.action, i.cause) for i in guard.incidents] == [(15, "recovered by CheckpointRollback", "corruption")]
    assert backoff.calls == [] and backoff.since == []
    assert not any("learning rate is unchanged" in m for m in messages)


@pytest.mark.parametrize("blowup", ["loss", "weights"])
def test_a_snapshot_taken_during_a_blowup_is_never_promoted(ns, tmp_path, blowup):
    """Steps 27-33 blow up (the loss value grows 10x per step, or the weights are scaled 5x at step 28);
    the snapshot of step 30 is pending through it and is rejected at step 34, so the NaN at step 35 goes back to 20."""
    _, Corrupt, _, _ = helpers(ns.pl)

    def growing_loss(module, loss):
        k = module.global_step - 26
        if 1 <= k <= 7:  # the value grows, the gradient stays: only the loss test can tell
            return loss + (10.0**k - 1) * loss.detach()
        return loss

    if blowup == "loss":
        rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=4, spike_window=20)
        model, extra = net_class(ns.pl)(loss_hook=growing_loss), [Corrupt(35)]
        reason = "the loss spiked near it"
    else:
        rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=4, spike_threshold=None)
        model, extra = net_class(ns.pl)(), [Corrupt(28, scale=5.0), Corrupt(35)]
        reason = "the weight norm grew"
    # The guard's own divergence and jump detection would catch both blow-ups first: off, to test the snapshots'.
    guard = ns.NaNGuard(detect_divergence=False)
    _, guard, rec, _ = fit(ns, tmp_path, rollback, model=model, callbacks=extra, max_epochs=3, guard=guard)
    assert [step for step, _ in rollback.rejected] == [30]
    assert rollback.rejected[0][1].startswith(reason)
    assert rollback.history == [{"step": 35, "restored_step": 20, "reason": "non-finite weights"}]
    assert same_state(rec.states[36], rec.states[20])
    assert guard.skipped_steps == 1 and finite(model)


def test_consecutive_skips_trigger_a_rollback(ns, tmp_path):
    def nan_loss(module, loss):
        return loss * float("nan") if module.global_step in (26, 27, 28, 29, 30) else loss

    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, max_consecutive_skips=3)
    model = net_class(ns.pl)(loss_hook=nan_loss)
    trainer, guard, rec, _ = fit(ns, tmp_path, rollback, model=model, max_epochs=3)
    assert [(i.step, i.kind, i.action, i.detail["consecutive_skips"]) for i in guard.incidents] == [
        (26, "loss", "skipped", 1),
        (27, "loss", "skipped", 2),
        (28, "loss", "recovered by CheckpointRollback", 3),
        (29, "loss", "skipped", 1),  # the count starts again after the rollback: no second one yet
        (30, "loss", "skipped", 2),
    ]
    assert rollback.history == [{"step": 28, "restored_step": 20, "reason": "3 consecutive skipped steps"}]
    assert same_state(rec.states[29], rec.states[20])
    assert not identical(rec.states[28]["model"], rec.states[20]["model"])  # it did go back
    assert guard.consecutive_skips == 0 and guard.skipped_steps == 5
    assert trainer.global_step == 3 * STEPS_PER_EPOCH and finite(trainer.lightning_module)


@pytest.mark.parametrize("skip_rate", [(3, 10), None])
def test_skips_spread_over_a_window_trigger_a_rollback(ns, tmp_path, skip_rate):
    """A state that fails every other batch is as broken as one that fails every batch."""

    def nan_loss(module, loss):
        return loss * float("nan") if module.global_step in (26, 28, 30) and not rollback.history else loss

    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, skip_rate=skip_rate)
    model = net_class(ns.pl)(loss_hook=nan_loss)
    trainer, guard, rec, _ = fit(ns, tmp_path, rollback, model=model, max_epochs=3)
    if skip_rate is None:  # never two in a row: only consecutive skips would count
        assert rollback.history == [] and [i.action for i in guard.incidents] == ["skipped"] * 3
        return
    assert [(i.step, i.action) for i in guard.incidents] == [
        (26, "skipped"), (28, "skipped"), (30, "recovered by CheckpointRollback")
    ]
    assert rollback.history == [{"step": 30, "restored_step": 20, "reason": "3 of the last 10 steps skipped"}]
    assert same_state(rec.states[31], rec.states[20])
    assert trainer.global_step == 3 * STEPS_PER_EPOCH and finite(trainer.lightning_module)


def test_skips_blamed_on_the_data_do_not_trigger_a_rollback(ns, tmp_path):
    """Dirty samples in three batches in a row: BatchBisection names them, so no rollback (it would not help)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5
    dirty = [4 * 6 + 1, 4 * 7 + 2, 4 * 8]  # one sample in each of the batches of steps 6, 7 and 8
    x[dirty, 0] = float("nan")
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, max_consecutive_skips=3)
    guard = ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[guard, ns.lib.BatchBisection(), rollback], **trainer_kwargs(tmp_path, max_epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net_class(ns.pl)(), DataLoader(TensorDataset(x, y), batch_size=4))
    assert [(i.step, i.samples) for i in guard.incidents] == [(6, [dirty[0]]), (7, [dirty[1]]), (8, [dirty[2]])]
    assert rollback.history == [] and all(i.action == "skipped" for i in guard.incidents)


def test_rollback_restores_the_loss_statistics_of_the_snapshot(ns, tmp_path):
    """The loss window the spike test uses goes back with the state: losses of the discarded steps
    (here huge ones, read before the NaN) would otherwise be the baseline of every later test."""
    _, Corrupt, _, _ = helpers(ns.pl)

    def huge_after_20(module, loss):  # steps 21-24: 1000x the loss value, not the gradient
        return loss + 999 * loss.detach() if 21 <= module.global_step <= 24 and not rollback.history else loss

    class Capture(ns.pl.Callback):  # the detector's window when the snapshot of step 20 is taken
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 20:
                self.window = list(rollback.detector.history)

    capture = Capture()
    # spike_patience=0: no spike trigger, the losses are read at every step (every confirm_steps)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=1, spike_patience=0, spike_window=50)
    model = net_class(ns.pl)(loss_hook=huge_after_20)
    seen = {}

    class Before(ns.pl.Callback):  # the window just before the rollback
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 26:
                seen["window"] = list(rollback.detector.history)

    guard = ns.NaNGuard(detect_divergence=False)  # the guard would skip the 1000x losses itself
    trainer, guard, _, _ = fit(
        ns, tmp_path, rollback, model=model, callbacks=[capture, Before(), Corrupt(26)], max_epochs=2, guard=guard
    )
    assert [(h["step"], h["restored_step"]) for h in rollback.history] == [(26, 20)]
    assert max(seen["window"]) > 100 * max(capture.window)  # the huge losses had been read
    after = list(rollback.detector.history)
    assert after[: len(capture.window)] == capture.window  # then the window went back to the snapshot's
    assert max(after) < 10 * max(capture.window)  # and only ordinary losses joined it since


def test_a_snapshot_that_fails_again_gives_way_to_the_one_before(ns, tmp_path):
    _, Corrupt, Backoff, _ = helpers(ns.pl)
    backoff = Backoff()
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    _, guard, rec, _ = fit(ns, tmp_path, rollback, callbacks=[Corrupt(25, 27), backoff], max_epochs=3)
    assert [(h["step"], h["restored_step"]) for h in rollback.history] == [(25, 20), (27, 10)]
    assert same_state(rec.states[26], rec.states[20]) and same_state(rec.states[28], rec.states[10])
    assert backoff.calls == [] and backoff.since == []  # corruption: the learning rate is not to blame
    assert [s.step for s in rollback.store.good][0] == 10


def test_max_rollbacks_then_nonfinite_error_lists_them(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, max_rollbacks=2)
    with pytest.raises(NonFiniteError) as info:
        fit(ns, tmp_path, rollback, callbacks=[Corrupt(15, 25, 35)], max_epochs=3)
    err = info.value
    assert err.incident.step == 35 and err.incident.kind == "param" and err.incident.action == "raised"
    assert "max_rollbacks=2 reached (step 15 -> 10 (non-finite weights); step 25 -> 20 (non-finite weights))" in str(err)
    refused = err.incident.rollback  # the refusal is recorded on the incident, typed
    assert (refused.step, refused.reason, refused.restored_step) == (35, "non-finite weights", None)
    assert refused.refused.startswith("CheckpointRollback: max_rollbacks=2 reached")
    assert [i.action for i in err.history] == ["recovered by CheckpointRollback"] * 2
    assert [r["action"] for r in read_jsonl(tmp_path / "nan_incidents.jsonl")] == [
        "recovered by CheckpointRollback",
        "recovered by CheckpointRollback",
        "raised",
    ]


def test_a_failure_before_the_first_interval_rolls_back_to_the_start(ns, tmp_path):
    """The state training starts from is trusted at once: a blow-up in the first steps goes back to it."""
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    trainer, guard, rec, _ = fit(ns, tmp_path, rollback, callbacks=[Corrupt(2)])
    assert [(h["step"], h["restored_step"]) for h in rollback.history] == [(2, 0)]
    assert identical(rec.states[3]["model"], rec.states[0]["model"])  # back to the start (step 2's update dropped)
    assert finite(trainer.lightning_module) and guard.incidents[0].action == "recovered by CheckpointRollback"


def test_non_finite_start_is_not_trusted_and_the_guard_raises_saying_so(ns, tmp_path):
    """NaN already in the initial weights: the error says so, not that a snapshot was pending (issue 16)."""
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    model = net_class(ns.pl)()
    with torch.no_grad():
        model.head.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the weights training started from \(step 0\) were already not finite") as info:
        fit(ns, tmp_path, rollback, model=model)
    message = str(info.value)
    assert "Check the model's initialisation" in message and rollback.history == []
    assert "pending" not in message and "every_n_steps" not in message  # advice that cannot help
    # restoring ModelCheckpoint saves: not "save checkpoints more often" either
    rollback = ns.lib.CheckpointRollback(source="checkpoint")
    with pytest.raises(NonFiniteError, match=r"the weights training started from \(step 0\) were already not finite") as info:
        fit(ns, tmp_path / "ckpt", rollback, model=model)
    assert "more often" not in str(info.value)


def test_persistent_loss_spike_triggers_a_rollback(ns, tmp_path):
    _, _, Backoff, _ = helpers(ns.pl)
    backoff = Backoff()
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, spike_patience=4, spike_window=20)

    def spiking(module, loss):  # from step 25 on, 50x the loss value (not the gradient) until rolled back
        return loss + 49 * loss.detach() if module.global_step >= 25 and not rollback.history else loss

    model = net_class(ns.pl)(loss_hook=spiking)
    trainer, guard, rec, _ = fit(ns, tmp_path, rollback, model=model, callbacks=[backoff], max_epochs=3)
    assert len(rollback.history) == 1 and guard.incidents == []
    (event,) = rollback.history
    assert event["reason"] == "loss spike (robust z > 6 for 4 steps in a row)"
    assert event["restored_step"] == 20
    # detected once 4 spiking steps were read (at the next reading): within patience + one reading interval
    assert 25 + 4 <= event["step"] <= 25 + 2 * 4
    assert same_state(rec.states[event["step"] + 1], rec.states[20])  # that step's update dropped, all restored
    assert backoff.calls == [(event["step"], event["reason"])]
    assert trainer.global_step == 3 * STEPS_PER_EPOCH


def test_skip_batches_drops_the_next_updates(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, skip_batches=3)
    _, _, rec, _ = fit(ns, tmp_path, rollback, callbacks=[Corrupt(25)], max_epochs=3)
    assert same_state(rec.states[26], rec.states[20])
    # the batches of steps 26, 27, 28 changed nothing; step 29 trained again
    assert all(same_state(rec.states[s], rec.states[26]) for s in (27, 28, 29))
    assert not identical(rec.states[30]["model"], rec.states[29]["model"])


def test_dropped_updates_are_neither_clipped_nor_monitored(ns, tmp_path):
    """The updates ``skip_batches`` drops after a rollback leave nothing for a NormMonitor (or clipper) placed
    after CheckpointRollback: no norms are logged for them, as none were applied."""
    _, Corrupt, _, _ = helpers(ns.pl)

    class Memory(ns.pl.loggers.logger.Logger):
        name, version = "memory", 0

        def __init__(self):
            super().__init__()
            self.steps: list[int] = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("norms/grad/") for k in metrics):
                self.steps.append(step)

    logger = Memory()
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3, skip_batches=3)
    monitor = ns.lib.NormMonitor(every_n_steps=1)
    fit(ns, tmp_path, rollback, callbacks=[Corrupt(25), monitor], max_steps=32, max_epochs=3, logger=logger)
    assert rollback.history[0]["step"] == 25
    assert [s for s in range(20, 32) if s not in logger.steps] == [26, 27, 28]  # the three dropped updates


def test_resume_after_a_rollback_keeps_the_policy_and_finds_disk_snapshots(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    snapdir = tmp_path / "snapshots"
    kwargs = dict(every_n_steps=10, confirm_steps=3, skip_batches=4, max_rollbacks=2, dirpath=snapdir)
    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True)
    first = ns.lib.CheckpointRollback(**kwargs)
    _, _, rec_a, _ = fit(
        ns, tmp_path / "a", first, callbacks=[Corrupt(25), ckpt], max_steps=28, max_epochs=2, enable_checkpointing=True
    )
    assert first.history == [{"step": 25, "restored_step": 20, "reason": "non-finite weights"}]
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "CheckpointRollback" in k]
    assert state["rollbacks"] == 1 and state["policy"]["drop_left"] == 2  # stopped in the middle of the drops
    assert [g["step"] for g in state["good"]] == [10, 20] and sorted(p.name for p in snapdir.iterdir()) == [
        "snapshot-step0000000010.pt",
        "snapshot-step0000000020.pt",
    ]

    resumed = ns.lib.CheckpointRollback(**kwargs)
    _, _, rec_b, _ = fit(
        ns, tmp_path / "b", resumed, callbacks=[Corrupt(31)], max_steps=40, max_epochs=3, ckpt_path=ckpt.last_model_path
    )
    # the two batches still to drop were dropped after the resume
    assert same_state(rec_b.states[29], rec_b.states[28]) and same_state(rec_b.states[30], rec_b.states[28])
    assert not identical(rec_b.states[31]["model"], rec_b.states[30]["model"])
    # the snapshots on disk came back: step 20 had already been restored once, so the one before it is used
    assert resumed.history[0] == first.history[0]
    assert resumed.history[1] == {"step": 31, "restored_step": 10, "reason": "non-finite weights"}
    assert same_state(rec_b.states[32], rec_a.states[10])
    # and the budget carried over: a third rollback would raise
    assert resumed.state_dict()["rollbacks"] == 2 == resumed.max_rollbacks


def test_restore_from_the_newest_modelcheckpoint_file(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    rollback = ns.lib.CheckpointRollback(source="checkpoint")
    trainer, guard, rec, _ = fit(
        ns, tmp_path, rollback, callbacks=[Corrupt(12), ckpt], max_epochs=2, enable_checkpointing=True
    )
    assert rollback.history == [{"step": 12, "restored_step": 10, "reason": "non-finite weights"}]
    restored = guard.incidents[0].rollback
    assert restored.source == "checkpoint" and restored.restored_from.endswith("epoch=0-step=10.ckpt")
    assert rollback.store.good == [] and rollback.store.pending is None  # no snapshots in this mode
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=10.ckpt", weights_only=False)
    assert identical(rec.states[13]["model"], saved["state_dict"])
    assert identical(rec.states[13]["opt"]["state"], saved["optimizer_states"][0]["state"])
    assert same_state(rec.states[13], rec.states[10])
    assert trainer.global_step == 2 * STEPS_PER_EPOCH and finite(trainer.lightning_module)


def test_without_a_checkpoint_file_the_guard_raises_saying_so(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(source="checkpoint")
    with pytest.raises(NonFiniteError, match="found no ModelCheckpoint save with finite weights") as info:
        fit(ns, tmp_path, rollback, callbacks=[Corrupt(3)])
    refused = info.value.incident.rollback
    assert (refused.source, refused.restored_step, refused.restored) == ("checkpoint", None, False)
    assert "found no ModelCheckpoint save with finite weights" in refused.refused


def test_logged_metrics(ns, tmp_path):
    _, Corrupt, _, _ = helpers(ns.pl)

    class Memory(ns.pl.loggers.logger.Logger):
        def __init__(self):
            super().__init__()
            self.records = []

        name, version = "memory", 0

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.records.append((step, dict(metrics)))

    logger = Memory()
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    fit(ns, tmp_path, rollback, callbacks=[Corrupt(25)], max_epochs=2, logger=logger)
    ours = [(s, m) for s, m in logger.records if any(k.startswith("rollback/") for k in m)]
    assert ours == [
        (0, {"rollback/snapshot_step": 0.0}),  # the start: trusted at once
        (13, {"rollback/snapshot_step": 10.0}),
        (23, {"rollback/snapshot_step": 20.0}),
        (25, {"rollback/count": 1.0, "rollback/restored_step": 20.0, "rollback/snapshot_step": 20.0}),
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 10, "confirm_steps": 10}, "confirm_steps"),
        ({"confirm_steps": -1}, "confirm_steps"),
        ({"max_snapshots": 0}, "max_snapshots"),
        ({"max_norm_growth": 1.0}, "max_norm_growth"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"skip_rate": (4, 3)}, "skip_rate"),
        ({"skip_rate": 3}, "skip_rate"),
        ({"spike_threshold": -1.0}, "threshold"),
        ({"spike_patience": -1}, "spike_patience"),
        ({"spike_window": 2}, "window"),
        ({"skip_batches": 1.5}, "skip_batches"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"source": "disk"}, "source"),
        ({"source": "checkpoint", "dirpath": "x"}, "dirpath"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    from lightning_nan import CheckpointRollback

    with pytest.raises(ValueError, match=match):
        CheckpointRollback(**kwargs)


def test_warns_without_nanguard(tmp_path):
    import pytorch_lightning as pl

    from lightning_nan import CheckpointRollback

    trainer = pl.Trainer(callbacks=[CheckpointRollback()], **trainer_kwargs(tmp_path, max_steps=2))
    with pytest.warns(UserWarning, match="without NaNGuard only reacts to loss spikes"):
        trainer.fit(net_class(pl)(), loader())
    assert trainer.global_step == 2 and finite(trainer.lightning_module)


def test_with_lrbackoff_the_rolled_back_state_keeps_the_scheduled_lr(ns, tmp_path):
    """LRBackoff scales the LR inside ``optimizer.step()``; a rollback from inside that step still ends with
    exactly the snapshot's optimizer state (scheduled LR included), and LRBackoff is asked to back off."""
    _, Corrupt, _, _ = helpers(ns.pl)

    def nan_loss(module, loss):
        return loss * float("nan") if module.global_step == 12 else loss  # LRBackoff backs off before the rollback

    lrb = ns.lib.LRBackoff(patience=1000)
    rollback = ns.lib.CheckpointRollback(every_n_steps=10, confirm_steps=3)
    model = net_class(ns.pl)(scheduler=True, loss_hook=nan_loss)
    blowup = cause_class(ns.pl)("divergence")  # both planted faults stand for a blow-up (the cause LRBackoff acts on)
    _, guard, rec, messages = fit(ns, tmp_path, rollback, model=model, callbacks=[Corrupt(25), lrb, blowup], max_epochs=2)
    assert rollback.history == [{"step": 25, "restored_step": 20, "reason": "non-finite weights"}]
    assert same_state(rec.states[26], rec.states[20]) and identical(rec.states[26]["sched"], rec.states[20]["sched"])
    assert rec.states[26]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.9 ** (20 // 3))
    assert lrb.factor_now < 1.0
    assert not any("learning rate is unchanged" in m for m in messages)  # it heard the rollback and backed off


def test_gradient_accumulation(ns, tmp_path):
    """Two batches per optimizer step: snapshots, the check and the rollback follow optimizer steps, not batches."""
    _, Corrupt, _, _ = helpers(ns.pl)
    rollback = ns.lib.CheckpointRollback(every_n_steps=4, confirm_steps=1)
    trainer, guard, rec, _ = fit(
        ns, tmp_path, rollback, callbacks=[Corrupt(11)], max_epochs=3, accumulate_grad_batches=2
    )
    assert [(i.step, i.kind, i.batch_idx) for i in guard.incidents] == [(11, "param", [6, 7])]
    assert rollback.history == [{"step": 11, "restored_step": 8, "reason": "non-finite weights"}]
    assert same_state(rec.states[12], rec.states[8])
    assert trainer.global_step == 3 * STEPS_PER_EPOCH // 2 and finite(trainer.lightning_module)
    assert [s.step for s in rollback.store.good] == [16, 20]


def test_candidate_saves_are_every_save_in_the_folders_newest_first_each_once(tmp_path):
    """With monitor=None and save_top_k=-1 ModelCheckpoint lists only its newest save: the older ones are
    found in its folder; a ``last`` link counts once; a folder of shards is as new as its newest entry."""
    import os
    import time
    from types import SimpleNamespace

    from lightning_nan.callbacks._checkpoint_saves import candidate_saves, finite_aside

    old, shards, new = tmp_path / "step=1.ckpt", tmp_path / "step=2.ckpt", tmp_path / "step=3.ckpt"
    old.write_bytes(b"x")
    shards.mkdir()
    new.write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a save")
    os.symlink(new, tmp_path / "last.ckpt")
    now = time.time()
    for path, age in ((old, 30), (shards, 20), (new, 10)):
        os.utime(path, (now - age, now - age))
    (shards / "meta.pt").write_bytes(b"x")  # rewritten in place: the folder's own mtime stays old
    os.utime(shards / "meta.pt", (now, now))
    cb = SimpleNamespace(dirpath=str(tmp_path), best_model_path=str(new), last_model_path=str(tmp_path / "last.ckpt"))
    saves = candidate_saves(SimpleNamespace(checkpoint_callbacks=[cb]))
    assert [os.path.basename(p) for p in saves] == ["step=2.ckpt", "step=3.ckpt", "step=1.ckpt"]
    # a file's weights are read aside, without a model: NaN found, none to read, a folder without shards
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, old)
    torch.save({"global_step": 3}, new)
    assert finite_aside(None, str(old)) is False and finite_aside(None, str(new)) is None
    assert finite_aside(None, str(tmp_path / "empty")) is None
