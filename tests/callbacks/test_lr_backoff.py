"""LRBackoff in real Trainers: the effective LR, read off each actual SGD update, equals an independent
replay of the same scheduler times the factor the documented rules give, for every scheduler kind."""

from __future__ import annotations

import itertools
import math

import pytest
import pytorch_lightning as pl
import faulty
from faulty import cause_class
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_nan
from lightning_nan import LRBackoff, NaNGuard
from lightning_nan.core.events import IncidentEvent, RollbackEvent, announce_rollback, notify
from lightning_nan.core.incident import Incident

LR = 0.1
BATCHES = 4  # per epoch
EPOCHS = 4
STEPS = BATCHES * EPOCHS
SKIPPED = "skipped"

SCHEDULERS = {
    "onecycle": lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=n + 1, cycle_momentum=False),
    "lambda": lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "cosine": lambda opt, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n),
    "exponential": lambda opt, n: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "step": lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "plateau": lambda opt, n: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1),
}

# Incidents (skipped steps) at steps 2 and 6 with patience 5. By the documented rules: 1 until
# step 2; back off to 0.5 (step 2); 3 clean steps at 0.5 test it, so step 6 backs off to 0.25;
# 5 clean steps (7-11) -> 0.5 from step 12. Steps 2 and 6 change nothing.
FAULTS = (2, 6)
FACTORS = [1.0, 1.0, None] + [0.5] * 3 + [None] + [0.25] * 5 + [0.5] * 4


def loader(nan_sample: int | None = None, dtype: torch.dtype = torch.float64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCHES, 3, generator=g, dtype=dtype)
    y = torch.randn(2 * BATCHES, 1, generator=g, dtype=dtype)
    if nan_sample is not None:
        x[nan_sample, 0] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=2)


def model_class(pl_ns):
    class Linear(pl_ns.LightningModule):
        """A float64 linear model under plain SGD: ``w_after = w_before - lr * grad`` exactly.

        ``faults``: global steps whose loss is NaN (for NaNGuard; float32 only, as the guard's norms are
        float32); ``spikes``: steps whose loss value jumps 100x with an unchanged gradient."""

        def __init__(self, scheduler=None, interval="step", faults=(), spikes=(), manual=False, dtype=torch.float64):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Linear(3, 1, dtype=dtype)
            self.b = torch.nn.Linear(3, 1, dtype=dtype)
            self.dtype_ = dtype
            self.scheduler, self.interval = scheduler, interval
            self.faults, self.spikes = set(faults), set(spikes)
            self.automatic_optimization = not manual

        def _loss(self, layer, batch):
            x, y = batch
            loss = F.mse_loss(layer(x), y)
            step = self.trainer.global_step
            if step in self.faults:
                loss = loss * float("nan")
            if step in self.spikes:
                loss = loss + 100.0 * loss.detach()  # the loss value jumps, its gradient does not
            return loss

        def training_step(self, batch, batch_idx):
            if self.scheduler == "plateau":
                self.log("flat", 1.0)  # never improves: the plateau scheduler halves the LR every 2 steps
            if self.automatic_optimization:
                return self._loss(self.a, batch)
            for opt, layer in zip(self.optimizers(), (self.a, self.b)):
                opt.zero_grad()
                self.manual_backward(self._loss(layer, batch))
                opt.step()

        def configure_optimizers(self):
            if not self.automatic_optimization:  # two optimizers, the second with two param groups
                return (
                    torch.optim.SGD(self.a.parameters(), lr=LR),
                    torch.optim.SGD([{"params": [self.b.weight]}, {"params": [self.b.bias], "lr": LR / 4}], lr=LR / 2),
                )
            opt = torch.optim.SGD(self.a.parameters(), lr=LR)
            if self.scheduler is None:
                return opt
            n = STEPS if self.interval == "step" else EPOCHS
            config = {"scheduler": SCHEDULERS[self.scheduler](opt, n), "interval": self.interval}
            if self.scheduler == "plateau":
                config["monitor"] = "flat"
            return {"optimizer": opt, "lr_scheduler": config}

    return Linear


def planter_class(pl_ns):
    class Planter(pl_ns.Callback):
        """Plays NaNGuard's part at planted steps of a float64 model: clears the step's gradients, then
        tells every callback through the incident protocol (``on_nan_incident``), as the guard does,
        with the cause its diagnosis gives a blow-up (``divergence``: the cause LRBackoff acts on)."""

        def __init__(self, steps, kind="loss", cause="divergence"):
            self.steps, self.kind, self.cause = set(steps), kind, cause

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step in self.steps:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                incident = Incident(step=trainer.global_step, kind=self.kind, cause=self.cause)
                notify(trainer.callbacks, IncidentEvent(incident, optimizer=optimizer))

    return Planter


def probe_class(pl_ns):
    class Probe(pl_ns.Callback):
        """Reads the effective LR off each update: ``-(w_after - w_before) / grad`` per element with
        ``|grad| > 1e-3`` (the grad as the optimizer sees it), keyed by the global step of the update."""

        def __init__(self, backoff=None):
            self.records: dict[int, torch.Tensor | str] = {}
            self.backoff, self.factor_at_start = backoff, None
            self._pending = []

        def on_train_start(self, trainer, pl_module):
            self.factor_at_start = None if self.backoff is None else self.backoff.factor_now

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            snaps = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in params]
            self._pending.append((trainer.global_step, snaps))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for step, snaps in self._pending:
                if all(g is None for _, _, g in snaps):
                    assert all(torch.equal(p.detach(), before) for p, before, _ in snaps)
                    self.records[step] = SKIPPED
                    continue
                lrs = []
                for p, before, grad in snaps:
                    mask = grad.abs() > 1e-3
                    lrs.append((before - p.detach())[mask] / grad[mask])
                self.records[step] = torch.cat(lrs)
            self._pending = []

    return Probe


def replay(scheduler, interval, n=STEPS, per_epoch=BATCHES) -> list[float]:
    """The LR a fresh scheduler of the same kind gives at each step (and after the last), without backoff."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=LR)
    sched = None if scheduler is None else SCHEDULERS[scheduler](opt, n if interval == "step" else n // per_epoch)
    lrs = []
    for k in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None and (interval == "step" or (k + 1) % per_epoch == 0):
            sched.step(1.0) if scheduler == "plateau" else sched.step()
    return lrs + [opt.param_groups[0]["lr"]]


def assert_trajectory(records, reference, factors, first=0):
    assert sorted(records) == list(range(first, first + len(factors)))
    for k, factor in enumerate(factors, start=first):
        if factor is None:
            assert records[k] == SKIPPED, k
        else:
            lrs = records[k]
            assert isinstance(lrs, torch.Tensor) and lrs.numel() > 0 and reference[k] > 0, k
            torch.testing.assert_close(lrs, torch.full_like(lrs, reference[k] * factor), rtol=1e-6, atol=0, msg=f"step {k}")


def trainer_kwargs(tmp_path, **overrides):
    return faulty.trainer_kwargs(tmp_path, **{"max_epochs": EPOCHS, **overrides})


CASES = [(None, "step")] + list(itertools.product(sorted(SCHEDULERS), ["step", "epoch"]))


@pytest.mark.parametrize("scheduler, interval", CASES)
def test_effective_lr_is_schedule_times_factor(tmp_path, scheduler, interval):
    backoff, probe = LRBackoff(patience=5), probe_class(pl)()
    model = model_class(pl)(scheduler, interval)
    trainer = pl.Trainer(callbacks=[planter_class(pl)(FAULTS), backoff, probe], **trainer_kwargs(tmp_path))
    trainer.fit(model, loader())
    reference = replay(scheduler, interval)
    assert_trajectory(probe.records, reference, FACTORS)
    # the schedule itself was never disturbed: the group ends on the scheduler's own value
    assert trainer.optimizers[0].param_groups[0]["lr"] == reference[STEPS]
    assert [(h["step"], h["reason"], h["factor"]) for h in backoff.history] == [
        (2, "incident: loss", 0.5),
        (6, "incident: loss", 0.25),
        (11, "grow back", 0.5),
    ]


def memory_logger_class(pl_ns):
    class Memory(pl_ns.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    return Memory


def logged(logger, prefix="lr_backoff/"):
    rows = [(step, {k: v for k, v in m.items() if k.startswith(prefix)}) for step, m in logger.rows]
    return [(step, m) for step, m in rows if m]


def test_logged_factor_and_lr_in_both_namespaces(ns, tmp_path):
    backoff, probe, logger = ns.lib.LRBackoff(patience=5), probe_class(ns.pl)(), memory_logger_class(ns.pl)()
    model = model_class(ns.pl)("exponential", "step")
    trainer = ns.pl.Trainer(
        callbacks=[planter_class(ns.pl)(FAULTS), backoff, probe],
        **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=4),
    )
    trainer.fit(model, loader())
    reference = replay("exponential", "step")
    assert_trajectory(probe.records, reference, FACTORS)
    # Logged at the step each value was used for: every 4th step and whenever the factor changed.
    # The incident steps were attempted with 1.0 (step 2) and 0.5 (step 6), then skipped.
    applied = {0: 1.0, 3: 0.5, 4: 0.5, 7: 0.25, 8: 0.25, 12: 0.5}
    rows = logged(logger)
    assert [step for step, _ in rows] == sorted(applied)
    for step, metrics in rows:
        assert metrics.keys() == {"lr_backoff/factor", "lr_backoff/lr"}
        assert metrics["lr_backoff/factor"] == applied[step]
        assert metrics["lr_backoff/lr"] == pytest.approx(reference[step] * applied[step], rel=1e-12)


def test_resume_mid_backoff_keeps_the_factor_and_the_schedule(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    backoff = LRBackoff(patience=100)
    trainer = pl.Trainer(
        callbacks=[planter_class(pl)([1]), backoff, ckpt],
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True),
    )
    trainer.fit(model_class(pl)("exponential", "step"), loader())
    reference = replay("exponential", "step")
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert saved["callbacks"]["LRBackoff"]["factor_now"] == 0.5
    # the checkpoint holds the scheduled LR (after 4 scheduler steps), not a scaled one
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == reference[BATCHES]

    fresh = LRBackoff(patience=100)
    probe = probe_class(pl)(fresh)
    trainer = pl.Trainer(callbacks=[fresh, probe], **trainer_kwargs(tmp_path / "resume", max_epochs=2))
    trainer.fit(model_class(pl)("exponential", "step"), loader(), ckpt_path=ckpt.last_model_path)
    assert probe.factor_at_start == 0.5
    assert_trajectory(probe.records, reference, [0.5] * BATCHES, first=BATCHES)
    assert fresh.history == backoff.history and fresh.factor_now == 0.5


def test_hooks_are_gone_after_fit_and_a_second_fit_reattaches(tmp_path):
    backoff = LRBackoff(patience=100)
    trainer = pl.Trainer(callbacks=[planter_class(pl)([1]), backoff], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model_class(pl)(), loader())
    opt = trainer.optimizers[0]
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    assert backoff.factor_now == 0.5 and backoff.controller.optimizers == []
    # a step taken by hand after fit uses the plain LR
    w = trainer.lightning_module.a.weight
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(before - w.detach(), torch.full_like(w, LR), rtol=1e-12, atol=0)

    # the same instance in a second fit of the same Trainer continues the run: its factor applies to the new optimizer
    probe = probe_class(pl)()
    trainer.callbacks.append(probe)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model_class(pl)(), loader())
    assert_trajectory(probe.records, [LR] * 2 * BATCHES, [0.5] * BATCHES, first=BATCHES)
    assert len(trainer.optimizers[0]._optimizer_step_pre_hooks) == 0
    # in a new Trainer it starts a new run, at factor 1 (issue 16)
    probe = probe_class(pl)()
    trainer = pl.Trainer(callbacks=[backoff, probe], **trainer_kwargs(tmp_path / "again", max_epochs=1))
    trainer.fit(model_class(pl)(), loader())
    assert_trajectory(probe.records, [LR] * BATCHES, [1.0] * BATCHES)
    assert backoff.history == [] and len(trainer.optimizers[0]._optimizer_step_pre_hooks) == 0


class StepSize(torch.optim.Optimizer):
    """Plain SGD whose groups give either ``lr`` or, instead, a ``step_size`` (no numeric ``lr``)."""

    def __init__(self, groups):
        super().__init__(groups, {})

    def step(self, closure=None):
        loss = None if closure is None else closure()
        with torch.no_grad():
            self._update()
        return loss

    def _update(self):
        for group in self.param_groups:
            rate = group.get("lr") or group["step_size"]
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-rate)


def test_param_groups_without_a_numeric_lr_are_left_alone_with_one_warning(tmp_path):
    """Issue 16: a group without a numeric ``lr`` (none at all, or ``lr=None``) was a bare KeyError at step 0."""

    class Model(model_class(pl)):
        def training_step(self, batch, batch_idx):
            return self._loss(self.a, batch) + self._loss(self.b, batch)

        def configure_optimizers(self):
            return StepSize([
                {"params": [self.a.weight], "lr": LR},
                {"params": [self.a.bias], "step_size": LR},
                {"params": list(self.b.parameters()), "lr": None, "step_size": LR},
            ])

    backoff, probe, logger = LRBackoff(patience=100), probe_class(pl)(), memory_logger_class(pl)()
    trainer = pl.Trainer(
        callbacks=[planter_class(pl)([1]), backoff, probe], **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1)
    )
    with pytest.warns(UserWarning, match=r"LRBackoff scales each param group's numeric `lr`, which optimizer 0 \(StepSize\) "
                      r"param group 1 \(lr='<none>'\); optimizer 0 \(StepSize\) param group 2 \(lr=None\) lacks"):
        trainer.fit(Model(), loader())
    assert backoff.factor_now == 0.5 and probe.records[1] == SKIPPED
    for step in (2, 3):  # after the back-off: the weight's update at half the LR, the bias's at its own step size
        lrs = probe.records[step]
        torch.testing.assert_close(lrs, torch.tensor([LR / 2] * 3 + [LR] * 5, dtype=lrs.dtype), rtol=1e-9, atol=0)
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] == LR and "lr" not in groups[1] and groups[2]["lr"] is None  # untouched between steps
    assert {k for _, m in logged(logger) for k in m} == {"lr_backoff/factor", "lr_backoff/lr-0-0"}


def test_manual_optimization_two_optimizers_both_get_the_factor(tmp_path):
    backoff, probe, logger = LRBackoff(patience=100), probe_class(pl)(), memory_logger_class(pl)()

    class Trigger(pl.Callback):  # what CheckpointRollback does after a rollback
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                backoff.back_off(trainer.global_step, "rollback")

    trainer = pl.Trainer(
        callbacks=[Trigger(), backoff, probe], **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1)
    )
    trainer.fit(model_class(pl)(manual=True), loader())
    assert trainer.global_step == 2 * BATCHES  # two optimizer steps per batch
    assert sorted(probe.records) == list(range(2 * BATCHES))
    for step, lrs in probe.records.items():
        factor = 1.0 if step < 4 else 0.5
        if step % 2 == 0:  # optimizer 0, one group
            expected = torch.full_like(lrs, LR * factor)
        else:  # optimizer 1: the weight (3 elements) at LR / 2, the bias at LR / 4
            expected = torch.tensor([LR / 2] * (lrs.numel() - 1) + [LR / 4], dtype=lrs.dtype) * factor
        torch.testing.assert_close(lrs, expected, rtol=1e-6, atol=0, msg=f"step {step}")
    assert backoff.history == [{"step": 4, "reason": "rollback", "factor": 0.5, "ceiling": 1.0}]
    rows = dict(logged(logger))
    assert rows[4] == {"lr_backoff/factor": 0.5, "lr_backoff/lr-0-0": LR * 0.5}
    assert rows[5] == {"lr_backoff/factor": 0.5, "lr_backoff/lr-1-0": LR / 2 * 0.5, "lr_backoff/lr-1-1": LR / 4 * 0.5}
    assert rows[1] == {"lr_backoff/factor": 1.0, "lr_backoff/lr-1-0": LR / 2, "lr_backoff/lr-1-1": LR / 4}


def test_an_exception_in_fit_takes_the_hooks_off(tmp_path):
    """Lightning calls ``on_exception``, not ``teardown``, when fit raises: the hooks must go there too."""

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    backoff = LRBackoff(patience=100)
    trainer = pl.Trainer(callbacks=[planter_class(pl)([1]), backoff, Crash()], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model_class(pl)(), loader())
    opt = trainer.optimizers[0]
    assert backoff.factor_now == 0.5 and backoff.controller.optimizers == []
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    # the user carries on by hand: the plain LR, and it stays
    w = trainer.lightning_module.a.weight
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(before - w.detach(), torch.full_like(w, LR), rtol=1e-12, atol=0)
    assert opt.param_groups[0]["lr"] == LR


def test_an_exception_inside_the_step_leaves_the_scheduled_lr(tmp_path):
    class Crash(pl.Callback):  # raises inside optimizer.step(), between the hooks
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                assert optimizer.param_groups[0]["lr"] == LR * 0.5
                raise RuntimeError("boom")

    backoff = LRBackoff(patience=100)
    trainer = pl.Trainer(callbacks=[planter_class(pl)([1]), backoff, Crash()], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model_class(pl)(), loader())
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == LR and len(opt._optimizer_step_pre_hooks) == 0


def test_a_shared_tensor_lr_gets_the_factor_once_in_a_trainer(tmp_path):
    """``lr=torch.tensor(...)`` as the default puts one tensor in both groups: each update uses LR x 0.5
    after the incident, and the tensor ends on LR (it used to shrink by the factor at every step)."""

    class TensorLR(model_class(pl)):
        def configure_optimizers(self):
            return torch.optim.SGD(
                [{"params": [self.a.weight]}, {"params": [self.a.bias]}], lr=torch.tensor(LR, dtype=torch.float64)
            )

    backoff, probe = LRBackoff(patience=100), probe_class(pl)()
    trainer = pl.Trainer(callbacks=[planter_class(pl)([1]), backoff, probe], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(TensorLR(), loader())
    assert_trajectory(probe.records, [LR] * 2 * BATCHES, [1.0, None] + [0.5] * (2 * BATCHES - 2))
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] is groups[1]["lr"] and float(groups[0]["lr"]) == LR


def test_a_warmup_written_in_on_before_optimizer_step_is_kept(tmp_path):
    """Under automatic optimization ``on_before_optimizer_step`` runs inside ``optimizer.step()``, after
    the pre-hook: an LR written there is used unscaled for that step (documented) and not overwritten."""

    def warmup(step):
        return 0.01 * (step + 1)

    class Warmup(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for group in optimizer.param_groups:
                group["lr"] = warmup(trainer.global_step)

    class Record(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    backoff, probe, record = LRBackoff(patience=100), probe_class(pl)(), Record()
    trainer = pl.Trainer(
        callbacks=[planter_class(pl)([0]), backoff, Warmup(), probe, record], **trainer_kwargs(tmp_path, max_epochs=1)
    )
    trainer.fit(model_class(pl)(), loader())
    assert backoff.factor_now == 0.5
    assert record.lrs == [LR] + [warmup(k) for k in range(BATCHES - 1)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == warmup(BATCHES - 1)
    assert_trajectory(probe.records, [warmup(k) for k in range(BATCHES)], [None] + [1.0] * (BATCHES - 1))


@pytest.mark.parametrize("ignore", [True, False])
def test_data_incidents_never_back_off(tmp_path, ignore):
    backoff = LRBackoff(patience=100, ignore_data_incidents=ignore)
    guard = NaNGuard(check_inputs=True)
    trainer = pl.Trainer(callbacks=[guard, backoff], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model_class(pl)(dtype=torch.float32), loader(nan_sample=3, dtype=torch.float32))  # a NaN input in batch 1
    assert [(i.step, i.kind) for i in guard.incidents] == [(1, "input")]
    assert guard.incidents[0].cause == "dirty_data"
    assert backoff.factor_now == 1.0 and backoff.history == []  # a lower LR does not clean data
    assert backoff.controller.clean_steps == 2  # the dirty step is not clean either way: steps 2, 3


def test_a_loss_spike_backs_off_one_step_later(tmp_path):
    backoff, probe = LRBackoff(patience=100, spike_zscore=6.0, window=8, min_history=4), probe_class(pl)()
    trainer = pl.Trainer(callbacks=[backoff, probe], **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model_class(pl)(spikes=(8,)), loader())
    assert [(h["step"], h["reason"]) for h in backoff.history] == [(8, "loss spike")]
    # the spike step and the next are taken at 1.0 (its flag is read without a sync, at step 9's end)
    assert_trajectory(probe.records, [LR] * 12, [1.0] * 10 + [0.5] * 2)


def test_nan_guard_incidents_back_off_a_float32_model(tmp_path):
    """The real guard: NaN losses at steps 2 and 6 are skipped and reported as a blow-up; the factors follow."""
    backoff, probe, guard = LRBackoff(patience=5), probe_class(pl)(), NaNGuard()
    model = model_class(pl)("exponential", "step", faults=FAULTS, dtype=torch.float32)
    trainer = pl.Trainer(callbacks=[guard, backoff, probe, cause_class(pl)("divergence")], **trainer_kwargs(tmp_path))
    trainer.fit(model, loader(dtype=torch.float32))
    assert [(i.step, i.kind, i.cause) for i in guard.incidents] == [(2, "loss", "divergence"), (6, "loss", "divergence")]
    assert [(h["step"], h["factor"]) for h in backoff.history] == [(2, 0.5), (6, 0.25), (11, 0.5)]
    reference = replay("exponential", "step")
    for k, factor in enumerate(FACTORS):  # float32 weights: the update is exact to ~1e-4 here
        if factor is None:
            assert probe.records[k] == SKIPPED
        else:
            measured = probe.records[k].double().median()
            torch.testing.assert_close(measured, torch.tensor(reference[k] * factor, dtype=torch.float64), rtol=1e-3, atol=0)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="`factor` to be a number in \\(0, 1\\), got 2"):
        LRBackoff(factor=2)
    with pytest.raises(ValueError, match="`ignore_data_incidents`"):
        LRBackoff(ignore_data_incidents=1)
    with pytest.raises(ValueError, match="`log_every_n_steps`"):
        LRBackoff(log_every_n_steps=0)
    assert math.isclose(LRBackoff(factor=0.25).controller.growth, 4.0)
    assert issubclass(lightning_nan.LRBackoff, pl.Callback)


def test_a_nan_the_evidence_does_not_explain_leaves_the_lr(tmp_path):
    """The same NaN losses, with no cause established (``unknown``): skipped, recorded, the LR untouched."""
    backoff, guard = LRBackoff(patience=5), NaNGuard()
    model = model_class(pl)("exponential", "step", faults=FAULTS, dtype=torch.float32)
    trainer = pl.Trainer(callbacks=[guard, backoff], **trainer_kwargs(tmp_path))
    trainer.fit(model, loader(dtype=torch.float32))
    assert [(i.step, i.cause) for i in guard.incidents] == [(2, "unknown"), (6, "unknown")]
    assert backoff.history == [] and backoff.factor_now == 1.0


def test_the_divergence_advice_gets_what_was_learnt_before_the_incident_and_nothing_else_does():
    from lightning_nan.core.diagnosis import DIVERGENCE_ADVICE

    backoff = LRBackoff(patience=100)
    first = Incident(step=3, kind="divergence", cause="divergence", advice=DIVERGENCE_ADVICE)
    notify([backoff], IncidentEvent(first))
    assert first.advice == DIVERGENCE_ADVICE and backoff.factor_now == 0.5  # nothing learnt before it
    for step in range(4, 8):
        backoff.controller.observe(step, clean=True)  # 3 clean steps test 0.5
    second = Incident(step=8, kind="divergence", cause="divergence", advice=DIVERGENCE_ADVICE)
    overflow = Incident(step=8, kind="loss", cause="overflow", advice="Overflow: ...")
    own = Incident(step=8, kind="loss", cause="divergence", advice="A listener's own advice.")
    notify([backoff], IncidentEvent(second))
    notify([backoff], IncidentEvent(overflow))  # the same step: no second back-off
    notify([backoff], IncidentEvent(own))
    assert second.advice == f"{DIVERGENCE_ADVICE} LRBackoff has the learning rate at 0.5x the schedule."
    assert overflow.advice == "Overflow: ..." and own.advice == "A listener's own advice."
    assert backoff.factor_now == 0.25  # backed off once at step 8, after the advice was written
    # a rollback earlier in `callbacks` answers the next incident first: the advice still says what was known before
    for step in range(9, 12):
        backoff.controller.observe(step, clean=True)
    announce_rollback([backoff], RollbackEvent(step=12, restored_step=10, reason="2 consecutive skipped steps"))
    third = Incident(step=12, kind="divergence", cause="divergence", advice=DIVERGENCE_ADVICE)
    notify([backoff], IncidentEvent(third))
    assert third.advice == f"{DIVERGENCE_ADVICE} LRBackoff has the learning rate at 0.25x the schedule."
    assert backoff.factor_now < 0.25  # the rollback backed off


def test_the_spike_test_sees_the_loss_as_computed_under_fp16(tmp_path):
    """fp16 AMP hands ``on_before_backward`` the loss times GradScaler's scale: the spike window holds the
    losses the training step computed, not the scaled ones (whose jumps with the scale would look like spikes)."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    computed: list[float] = []

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.layer(x), y)
            computed.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    backoff = LRBackoff(spike_zscore=6.0, window=8, min_history=4)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    trainer = pl.Trainer(callbacks=[backoff], plugins=[plugin], **trainer_kwargs(tmp_path, max_epochs=None, max_steps=6))
    trainer.fit(Model(), loader(dtype=torch.float32))
    assert len(computed) == 6 and max(computed) < 100  # the scaled losses would be ~1000x these
    assert backoff.controller.spike_window() == pytest.approx(computed, rel=1e-6)
    assert backoff.history == []
