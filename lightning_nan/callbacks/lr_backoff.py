"""LRBackoff: the Lightning callback around :class:`~lightning_nan.core.lr_backoff.LRBackoffController`."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._trainer import grad_scaler, log_metrics, max_reducer, starts_afresh
from lightning_nan.callbacks._types import TrainerLike, log_every_n_steps
from lightning_nan.core.diagnosis import DIVERGENCE_ADVICE
from lightning_nan.core.events import IncidentEvent, Phase, RollbackEvent
from lightning_nan.core.losses import unscaled_loss
from lightning_nan.core.lr_backoff import LRBackoffController
from lightning_nan.core.lr_scaling import has_numeric_lr
from lightning_nan.core.validate import boolean, integer

#: The diagnosed causes a lower learning rate cures; dirty data, unsafe operations, weight corruption,
#: a broken pipeline and causes the evidence does not decide leave the learning rate alone.
BACKOFF_CAUSES = ("divergence", "overflow")


class LRBackoffBase:
    """Lower the learning rate when an incident is diagnosed as divergence or overflow (and optionally on loss spikes), scheduler-safe.

    At every optimizer step the update uses ``the LR the scheduler set x the backoff factor``: the
    factor is applied inside ``optimizer.step()`` by torch step hooks and taken out right after, so
    ``group["lr"]`` always holds the scheduler's value between steps. OneCycleLR, LambdaLR,
    CosineAnnealingLR, ExponentialLR, StepLR, ReduceLROnPlateau, ``interval: "step"`` or
    ``"epoch"``, no scheduler, automatic or manual optimization: all see and write their own values
    (so do checkpoints, and ``LearningRateMonitor``, which therefore shows the scheduled LR; the
    effective one is logged here).

    Each incident NaNGuard reports (on every rank, already agreed) whose diagnosed cause a lower
    learning rate cures (``divergence`` or ``overflow``, see :data:`BACKOFF_CAUSES`; divergence is
    caught before the first NaN) multiplies the factor by ``factor``, down to ``min_factor``, once the current factor has been tested by 3 clean steps in
    a row (failures right after a back-off come from the state the higher LR broke; rolling back
    cures those). After ``patience`` clean training steps it grows back by ``growth``, on trial: if
    the mean loss of the next ``growth_trial`` steps is worse than that of the ``growth_trial``
    before, the growth is undone for good. The ceiling also drops whenever a level it grew back to
    fails again, so recovery cannot loop (the exact rules are in
    :class:`~lightning_nan.core.lr_backoff.LRBackoffController`). ``back_off(step, reason, since=None)``
    is public; a rollback announces what it restored (``on_nan_rollback``) and LRBackoff calls it with
    ``since`` the restored step, so the factor goes one level below the highest one used since then (nothing changes if the incident it
    rolled back from already did that). With
    ``spike_zscore`` set, a loss spike (robust z-score against the last ``window`` losses, agreed
    across ranks) backs off too, one step after it happened (no host sync is spent on it).

    Incidents with any other cause (dirty data, an unsafe operation, weight corruption, a broken
    pipeline, or ``unknown`` when the evidence does not decide) leave the learning rate alone: a
    sporadic fault cannot pin it at ``min_factor`` (they still reset the clean-step count). NaNGuard
    diagnoses an incident, with BatchBisection's findings, before LRBackoff hears of it, whatever
    their order in ``callbacks``.

    The factor, the ceiling and the history belong to the run: a run resumed from a checkpoint gets
    them back, and a second ``fit`` of the same Trainer continues with them; a new run (a fit that
    starts at step 0) starts at factor 1, even with the same callback object.

    Args:
        factor: multiplier at each back-off, in (0, 1).
        min_factor: floor of the factor.
        patience: clean training steps (batches that stepped the optimizers) before growing back.
        growth: multiplier when growing back; default ``1 / factor``.
        spike_zscore: robust z-score threshold for loss spikes; ``None`` (default) disables them.
        window: losses kept for the spike statistics.
        min_history: losses needed before spikes are tested.
        growth_trial: training-step losses on each side of a growth compared to keep or undo it
            (the growth is undone, and its level never tried again, if the loss got worse);
            ``None``: no trial.
        ignore_data_incidents: kept for compatibility: incidents blamed on the data never back off.
        log_every_n_steps: how often to log; default: the trainer's ``log_every_n_steps``. A step
            whose factor differs from the last logged one is always logged.

    Logged through the trainer's loggers, at the step the values were used for:

    ==============================  ================================================================
    key                             value
    ==============================  ================================================================
    ``lr_backoff/factor``           the factor the optimizer step was taken with
    ``lr_backoff/lr``               the effective LR of that step (scheduled x factor); with several
                                    optimizers or param groups ``lr_backoff/lr-<optimizer>-<group>``
    ==============================  ================================================================

    Example:
        >>> import torch, pytorch_lightning as pl, tempfile
        >>> from lightning_nan import LRBackoff, NaNGuard
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         loss = self.layer(batch[0]).pow(2).mean()
        ...         return loss * 1e6 if batch_idx == 4 else loss  # its update throws the weights off
        ...     def configure_optimizers(self):
        ...         opt = torch.optim.SGD(self.parameters(), lr=0.1)
        ...         return [opt], [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)]
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(20, 2)), batch_size=2)
        >>> backoff = LRBackoff(patience=2)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[NaNGuard(), backoff], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):  # NaNGuard prints its incident table at the end
        ...     trainer.fit(Model(), loader)
        >>> [(h["step"], h["reason"], h["factor"]) for h in backoff.history]
        [(5, 'incident: jump', 0.5), (7, 'grow back', 1.0)]
        >>> trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.9  # the schedule (stepped once, per epoch), untouched
        True
    """

    #: Acts on the diagnosed incident (after NaNGuard's diagnosis and BatchBisection's evidence).
    incident_phase = Phase.ACTION

    def __init__(
        self,
        factor: float = 0.5,
        *,
        min_factor: float = 1.0 / 1024,
        patience: int = 200,
        growth: float | None = None,
        spike_zscore: float | None = None,
        window: int = 50,
        min_history: int = 20,
        growth_trial: int | None = 50,
        ignore_data_incidents: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        boolean("ignore_data_incidents", ignore_data_incidents)
        integer("log_every_n_steps", log_every_n_steps, low=1, optional=True, hint="None: the Trainer's")
        super().__init__()
        self.controller = LRBackoffController(
            factor,
            min_factor=min_factor,
            patience=patience,
            growth=growth,
            spike_zscore=spike_zscore,
            window=window,
            min_history=min_history,
            growth_trial=growth_trial,
        )
        self.ignore_data_incidents = ignore_data_incidents
        self.log_every_n_steps = log_every_n_steps
        self._loss: torch.Tensor | None = None  # the losses of the step being taken (spike detection only)
        self._dirty = False  # an incident hit the step being taken
        self._hint_before: tuple[int, str | None] | None = None  # (step, hint) read just before a rollback backed off
        self._observed_step = -1  # trainer.global_step at the last observation
        self._logged: dict[int, float] = {}  # optimizer index -> factor last logged

    @property
    def factor_now(self) -> float:
        """The factor the next optimizer step will be taken with."""
        return self.controller.factor_now

    @property
    def history(self) -> list[dict[str, Any]]:
        """The changes of the factor, oldest first: ``{"step", "reason", "factor", "ceiling"}``."""
        return self.controller.history

    def lr_hint(self) -> str | None:
        """What the backoff has learnt about a safe learning rate (``None``: nothing yet).

        Added to the advice of a divergence (:data:`~lightning_nan.core.diagnosis.DIVERGENCE_ADVICE`)
        when LRBackoff hears of it, after the diagnosis and before it backs off.
        """
        controller = self.controller
        if not controller.history:
            return None
        opts = controller.optimizers
        lr = next((v for v in controller.effective_lrs(opts[0]) if v is not None), None) if opts else None
        text = f"LRBackoff has the learning rate at {controller.factor_now:.3g}x the schedule"
        text += f" ({lr:.3g} for the first param group)" if lr is not None else ""
        if controller.ceiling < 1.0:
            text += f"; levels above {controller.ceiling:.3g}x failed twice, so a safe learning rate is below that"
        return text + "."

    def back_off(self, step: int, reason: str = "rollback", since: int | None = None) -> float:
        """Lower the factor now (call it on every rank; once per step); returns the new factor.

        ``since``: the step of the state a rollback restored; the factor then goes one level below the
        one the run left that state with, unless it is already lower
        (:meth:`~lightning_nan.core.lr_backoff.LRBackoffController.back_off_below`).
        """
        self._dirty = True
        if since is not None:
            return self.controller.back_off_below(since, step, reason)
        return self.controller.back_off(step, reason)

    def on_nan_rollback(self, event: RollbackEvent) -> bool:
        """A rollback restored ``event.restored_step``: go one level below the factor the run left it with
        (unless the learning rate is not to blame, after weight corruption)."""
        if not event.lr_to_blame:
            return False
        self._hint_before = (event.step, self.lr_hint())  # a rollback heard before the incident it answers
        self.back_off(event.step, event.reason, since=event.restored_step)
        return True

    def on_nan_incident(self, event: IncidentEvent) -> None:
        """Back off on a diagnosed divergence or overflow; add to the divergence advice what is known so far."""
        incident = event.incident
        self._dirty = True
        before = self._hint_before  # set when this incident's rollback (earlier in `callbacks`) backed off already
        self._hint_before = None
        known = before[1] if before is not None and before[0] == incident.step else self.lr_hint()
        hint = known if incident.cause == "divergence" and incident.advice == DIVERGENCE_ADVICE else None
        if hint:  # what the run learnt before this incident
            incident.advice = f"{incident.advice} {hint}"
        if incident.cause not in BACKOFF_CAUSES:  # a lower LR cures none of the others: record, do not act
            return
        self.controller.back_off(incident.step, f"incident: {incident.kind}")

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        if starts_afresh(trainer):  # a new run starts at factor 1 (a resume loads its factor after setup)
            c = self.controller
            c.detach()
            self.controller = LRBackoffController(
                c.factor, min_factor=c.min_factor, patience=c.patience, growth=c.growth, spike_zscore=c.spike_zscore,
                window=c.window, min_history=c.min_history, growth_trial=c.growth_trial,
            )
        self.controller.reduce = max_reducer(trainer)

    def on_train_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        unscalable = [
            f"optimizer {i} ({type(opt).__name__}) param group {g} (lr={group.get('lr', '<none>')!r})"
            for i, opt in enumerate(trainer.optimizers)
            for g, group in enumerate(opt.param_groups)
            if not has_numeric_lr(group)
        ]
        if unscalable and trainer.is_global_zero:
            warnings.warn(
                f"LRBackoff scales each param group's numeric `lr`, which {'; '.join(unscalable)} lacks: its steps are "
                "not backed off (nor logged). Give that group an explicit learning rate to back it off (e.g. "
                "Adafactor(..., lr=1e-3, relative_step=False)), or leave LRBackoff out.",
                UserWarning,
                stacklevel=2,
            )
        self.controller.detach()  # a previous fit's optimizers
        self.controller.attach(trainer.optimizers)
        self._loss, self._dirty, self._logged, self._hint_before = None, False, {}, None
        self._observed_step = trainer.global_step

    def on_before_backward(self, trainer: TrainerLike, pl_module: Any, loss: torch.Tensor) -> None:
        if self.controller.wants_losses:
            loss = unscaled_loss(loss, grad_scaler(trainer))  # fp16 AMP hands the hook the scaled loss
            self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if not trainer.loggers:
            return
        optimizers = trainer.optimizers
        index = next((i for i, o in enumerate(optimizers) if o is optimizer), 0)
        factor = self.controller.step_factor(optimizer)
        every = self.log_every_n_steps or log_every_n_steps(trainer)
        if self._logged.get(index) == factor and (trainer.global_step // max(len(optimizers), 1)) % every != 0:
            return
        self._logged[index] = factor
        lrs = self.controller.effective_lrs(optimizer)
        several = len(optimizers) > 1 or len(lrs) > 1
        metrics = {"lr_backoff/factor": factor}
        metrics.update({(f"lr_backoff/lr-{index}-{g}" if several else "lr_backoff/lr"): lr for g, lr in enumerate(lrs) if lr is not None})
        log_metrics(trainer, metrics)

    def on_train_batch_end(self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._observed_step:  # accumulating gradients: no step yet
            return
        self._observed_step = trainer.global_step
        loss, self._loss = self._loss, None
        clean, self._dirty = not self._dirty, False
        self.controller.observe(trainer.global_step - 1, loss, clean)

    def on_exception(self, trainer: TrainerLike, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls `on_exception`, not `teardown`, when fit raises: put the scheduled LRs back and
        # take the hooks off, or a later manual `optimizer.step()` would still be scaled.
        self.controller.detach()
        self._loss = None

    def on_train_end(self, trainer: TrainerLike, pl_module: Any) -> None:
        self.controller.detach()

    def teardown(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        self.controller.detach()
        self._loss = None

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        # Lightning binds the module's `log`/`log_dict` onto every callback; they are re-bound on the next fit.
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state["_loss"] = None
        return state
