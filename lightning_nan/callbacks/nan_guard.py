"""NaNGuard: the Lightning callback around :class:`~lightning_nan.core.step_guard.StepGuard`."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from lightning_nan.callbacks._eval_guard import EvalGuard
from lightning_nan.callbacks._incident_output import log_incident_text, norm_running_stats, print_summary
from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._step_traces import StepTraces
from lightning_nan.callbacks._trainer import grad_scaler, log_metrics, max_reducer, run_dir, starts_afresh
from lightning_nan.callbacks._types import TrainerLike, callbacks_of, log_every_n_steps
from lightning_nan.core.errors import NonFiniteWarning
from lightning_nan.core.events import EscalationHandler, EvalIncidentListener, IncidentListener, phase_of
from lightning_nan.core.incident import Incident
from lightning_nan.core.jsonl import append_jsonl, missing_from
from lightning_nan.core.pending import PendingRecords
from lightning_nan.core.recurrence import UNSAFE_OP_REPEATS
from lightning_nan.core.step_grads import HeldGrads, StepGrads
from lightning_nan.core.step_guard import DEFAULT_MAX_CONSECUTIVE, StepGuard, StepVerdict
from lightning_nan.core.validate import boolean, fs_path, integer

INCIDENTS_FILE = "nan_incidents.jsonl"
#: Listeners hear of an incident in the order of their declared phase (:class:`~lightning_nan.core.events.Phase`), then
#: in the order of ``callbacks``: fact finders (bisection 10, diagnosis 20) before actors (50).


class NaNGuardBase:
    """Skip every optimizer step whose loss, gradients, weights (or inputs) are NaN/Inf.

    Checks, per optimizer step: the loss of every micro-batch (gradient accumulation included), the
    gradients (after AMP unscaling, before clipping), the weights the previous step produced (every
    ``check_params_every_n_steps``), and optionally the input batch. All of it in one fused norm pass
    and one device-to-host transfer; under DDP the ranks agree, so a fault on one rank skips the step
    on all of them. A skipped step leaves weights, optimizer moments and optimizer step counters
    untouched (its gradients are set to ``None``); the trainer's ``global_step`` and LR schedulers
    still advance, as they do for steps GradScaler skips.

    With fp16 AMP, GradScaler's own overflow skips are not failures (counted as ``scaler_overflows``);
    a non-finite loss or a loss scale under ``min_loss_scale`` is. After ``max_consecutive`` skips in
    a row, or as soon as the weights are non-finite, the guard escalates: callbacks with
    ``on_nan_escalation`` (rollback) may recover, otherwise it raises
    :class:`~lightning_nan.core.errors.NonFiniteError`. Every callback with ``on_nan_incident`` hears
    of each incident (see :mod:`lightning_nan.core.events`).

    Args:
        max_consecutive: skipped steps in a row before escalating (default 20, see
            :data:`~lightning_nan.core.step_guard.DEFAULT_MAX_CONSECUTIVE`).
        check_inputs: also check the floating-point tensors of each input batch.
        check_params_every_n_steps: check the weights every n optimizer steps (0: never).
        min_loss_scale: fp16 loss scale below which a step counts as failed.
        incidents_path: where to append incidents as JSON lines; default
            ``<trainer.log_dir>/nan_incidents.jsonl`` (or ``default_root_dir`` without a logger).
            Checked at setup: if it cannot be written, training goes on (incidents stay in
            ``incidents`` and in checkpoints, retried at each write) after one warning. A run resumed
            from a checkpoint in a new log dir starts the file with the checkpoint's incidents.
        log_every_n_steps: how often to log the counters; default: the trainer's ``log_every_n_steps``.
            Steps with an incident are always logged.
        restore_norm_stats: a skipped step also leaves the running statistics of normalisation
            layers (BatchNorm, InstanceNorm with ``track_running_stats``) as they were before its
            forward pass; otherwise one NaN batch leaves NaN in ``running_mean``/``running_var`` and
            every later evaluation returns NaN. Costs one fused copy of those buffers per step.
        detect_divergence: also skip a step whose finite loss or gradient norm grew 1000x over its
            reference, or whose finite weights jumped far beyond what the steps before moved them
            (incidents of kind ``"divergence"`` / ``"jump"``, before the first NaN; CheckpointRollback
            restores the state before the blow-up). Host arithmetic only.
        unsafe_op_repeats: raise :class:`~lightning_nan.core.errors.NonFiniteError` once the same unsafe
            operation (op and line, named by BatchBisection's localization) has failed on this many
            steps (0: never): skipping would hide a model bug.
        clean_metrics: a skipped step's values leave no trace in the epoch: what its batches logged
            with ``self.log``/``self.log_dict`` (``on_epoch=True``) is taken back out of the epoch
            aggregates, and the ``torchmetrics`` metrics of the module are put back to their states
            before it, so the epoch's values (and EarlyStopping, ModelCheckpoint, ReduceLROnPlateau
            reading them) are those of the run without those batches. Step-level values stay as
            logged. Costs one fused copy of the metrics' tensor states per step.
        check_eval: a validation or test batch whose loss (what its step returns) or logged values are
            NaN/Inf is an incident (kind ``val``/``test``): its values are left out of the epoch's (with
            BatchBisection, only those of the samples it names), so one dirty sample does not make the
            epoch's value NaN (nor stop EarlyStopping). One fused check and one transfer per batch.

    Logged through the trainer's loggers:

    ==============================  ====================================================
    key                             value
    ==============================  ====================================================
    ``nan_guard/skipped_steps``     steps skipped so far
    ``nan_guard/consecutive_skips`` skipped steps in a row right now
    ``nan_guard/incidents``         incidents recorded so far
    ``nan_guard/scaler_overflows``  fp16 steps GradScaler skipped by itself
    ==============================  ====================================================

    Example:
        >>> import torch, pytorch_lightning as pl
        >>> from lightning_nan import NaNGuard
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         (x,) = batch
        ...         return self.layer(x).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.ones(8, 2)
        >>> data[3, 0] = float("nan")  # the second batch of two is poisoned
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
        >>> import tempfile
        >>> guard = NaNGuard()
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[guard], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      default_root_dir=tempfile.mkdtemp())
        >>> with warnings.catch_warnings(record=True):
        ...     trainer.fit(Model(), loader)
        1 non-finite incident, step 1
        step  epoch  kind  cause    module  samples  action
        ...
        >>> [(i.step, i.kind, i.action) for i in guard.incidents]
        [(1, 'loss', 'skipped')]
        >>> all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())
        True
        >>> os.path.basename(guard.path)
        'nan_incidents.jsonl'
    """

    def __init__(
        self,
        *,
        max_consecutive: int = DEFAULT_MAX_CONSECUTIVE,
        check_inputs: bool = False,
        check_params_every_n_steps: int = 1,
        min_loss_scale: float = 1.0,
        incidents_path: str | os.PathLike[str] | None = None,
        log_every_n_steps: int | None = None,
        restore_norm_stats: bool = True,
        detect_divergence: bool = True,
        unsafe_op_repeats: int = UNSAFE_OP_REPEATS,
        clean_metrics: bool = True,
        check_eval: bool = True,
    ) -> None:
        boolean("check_inputs", check_inputs)
        boolean("restore_norm_stats", restore_norm_stats)
        boolean("clean_metrics", clean_metrics)
        boolean("check_eval", check_eval)
        integer("log_every_n_steps", log_every_n_steps, low=1, optional=True, hint="None: the Trainer's")
        path: str | None = fs_path("incidents_path", incidents_path, optional=True, hint=f"None: {INCIDENTS_FILE} in the log dir")
        super().__init__()
        self.guard = StepGuard(
            max_consecutive=max_consecutive,
            check_params_every_n_steps=check_params_every_n_steps,
            min_loss_scale=min_loss_scale,
            detect_divergence=boolean("detect_divergence", detect_divergence),
            unsafe_op_repeats=unsafe_op_repeats,
        )
        self.check_inputs = check_inputs
        self.incidents_path = path
        self.log_every_n_steps = log_every_n_steps
        self.restore_norm_stats = restore_norm_stats
        self.clean_metrics = clean_metrics
        self._traces = StepTraces()
        self.check_eval = check_eval
        self._eval = EvalGuard()
        self._eval_listeners: list[Any] = []
        self._norm_stats: list[torch.Tensor] = []
        self._norm_stats_before: list[torch.Tensor] = []
        self._path: str | None = None
        self._unwritten = PendingRecords(
            "NaNGuard", "the incidents file", fix="make its folder writable, or pass NaNGuard(incidents_path=...) a writable file"
        )
        self._rank_zero = True
        self._grads = HeldGrads()  # the step checked last, for the callbacks that clip or monitor it
        self._verdict = StepVerdict()
        self._trainer: TrainerLike | None = None
        self._incidents_at_start = 0

    @property
    def incidents(self) -> list[Incident]:
        """Every incident so far, oldest first."""
        return self.guard.incidents

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        return self.guard.consecutive_skips

    @property
    def path(self) -> str | None:
        """The incidents file of the current run (known once ``fit`` has started)."""
        return self._path

    def __getstate__(self) -> dict[str, Any]:
        # Lightning binds the module's `log`/`log_dict` onto every callback; they are re-bound on the next fit.
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_verdict=StepVerdict(), _norm_stats=[], _norm_stats_before=[], _trainer=None, _traces=StepTraces())
        state.update(_eval=EvalGuard(), _eval_listeners=[])
        return state

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        self._eval_listeners = sorted(
            (cb for cb in callbacks_of(trainer) if cb is not self and isinstance(cb, EvalIncidentListener)),
            key=phase_of,
        )
        if stage != "fit":  # validate / test: their incidents are recorded as fit's are
            self._rank_zero, self._trainer = trainer.is_global_zero, trainer
            self._path = self.incidents_path or os.path.join(run_dir(trainer), INCIDENTS_FILE)
            return
        if starts_afresh(trainer):  # a new run starts with no incidents (a resume loads its own after setup)
            self.guard.reset()
        self.guard.set_parameter_names(pl_module)
        self.guard.reduce = max_reducer(trainer)
        # Listeners that establish facts (BatchBisection: the samples) hear of an incident before those
        # that act on it (LRBackoff, CheckpointRollback), whatever their order in `callbacks`.
        self.guard.listeners = sorted(
            (cb for cb in callbacks_of(trainer) if cb is not self and isinstance(cb, (IncidentListener, EscalationHandler))),
            key=phase_of,
        )
        self.guard.on_record = self._record
        self._rank_zero = trainer.is_global_zero
        self._path = self.incidents_path or os.path.join(run_dir(trainer), INCIDENTS_FILE)
        self._unwritten.reset()
        if self._rank_zero:
            self._unwritten.check(self._path)
        self._grads.clear()
        self._trainer = trainer
        self._incidents_at_start = len(self.guard.incidents)

    def on_train_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self.guard.set_parameter_names(pl_module)  # again: a strategy may have replaced them (FSDP2's ``fully_shard``)
        # Here, not in setup: the strategy has moved the module to its device (new buffer tensors) by now.
        self._norm_stats = norm_running_stats(pl_module) if self.restore_norm_stats else []
        self._norm_stats_before = [t.clone() for t in self._norm_stats]
        self._traces = StepTraces()
        if self.clean_metrics:
            self._traces.attach(pl_module)
        for opt in trainer.optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                raise ValueError(
                    "NaNGuard cannot skip LBFGS steps (LBFGS evaluates its closure several times per step). "
                    "Use another optimizer, or remove NaNGuard from the Trainer's callbacks."
                )

    def on_train_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.guard._window:  # the first micro-batch of this optimizer step
            if self._norm_stats:
                torch._foreach_copy_(self._norm_stats_before, self._norm_stats)
            if self.clean_metrics:
                self._traces.save(trainer)
        self.guard.observe_batch(batch, batch_idx, check_inputs=self.check_inputs)

    def on_train_batch_end(self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After training_step, manual optimization's steps and their logs included; before Lightning
        # logs the step and before any epoch-end hook reads the epoch's values.
        self._traces.batch_end(trainer)

    def on_train_epoch_end(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._traces.epoch_end()  # runs before EarlyStopping's and ModelCheckpoint's (monitoring callbacks go last)

    def on_before_backward(self, trainer: TrainerLike, pl_module: Any, loss: torch.Tensor) -> None:
        self.guard.observe_loss(loss)

    def on_before_optimizer_step(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.step_grads(trainer, pl_module, optimizer)
        every = self.log_every_n_steps or log_every_n_steps(trainer)
        if self._verdict.incident is not None or trainer.global_step % every == 0:
            log_metrics(trainer, self.metrics())

    # ------------------------------------------------------------------ validation and test
    def on_validation_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._eval.start(pl_module)

    def on_test_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._eval.start(pl_module)

    def on_validation_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.check_eval:
            self._eval.save(trainer)

    def on_test_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.check_eval:
            self._eval.save(trainer)

    def on_validation_batch_end(
        self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check_eval(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "validation")

    def on_test_batch_end(
        self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._check_eval(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "test")

    def _check_eval(self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        if not self.check_eval:
            return
        incident = self._eval.check(
            trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, stage, self._eval_listeners, self.guard.reduce
        )
        if incident is not None:
            self.guard.incidents.append(incident)
            self._record(incident)

    def step_grads(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> StepGrads:
        """The current step's gradients and their norms, checking the step first if it has not been yet.

        Callbacks that clip or monitor gradients call this (through
        :class:`~lightning_nan.core.step_grads.GradsSource`), so the step is checked once, before them.
        """
        grads = self._grads.get(optimizer, trainer.global_step)
        if grads is not None:
            return grads
        verdict = self._verdict = self.guard.check(
            optimizer,
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            scaler=grad_scaler(trainer),
            extra={"trainer": trainer, "pl_module": pl_module},
        )
        if verdict.skipped and self._norm_stats:  # the failed forward pass also moved the running statistics
            torch._foreach_copy_(self._norm_stats, self._norm_stats_before)
        if verdict.skipped and self.clean_metrics:  # its logged values and metric updates go at the batch's end
            self._traces.mark_skipped()
        guard = self.guard
        skipped = verdict.skipped or verdict.scaler_overflow
        grads = StepGrads(guard.last_grad_params, guard.last_grad_norms, skipped, guard.last_grad_norm_bound)
        return self._grads.hold(optimizer, trainer.global_step, grads)

    def on_train_end(self, trainer: TrainerLike, pl_module: Any) -> None:
        if self.guard.check_params_every_n_steps > 0:
            self.guard.check_parameters(
                pl_module.parameters(),
                step=trainer.global_step,
                epoch=trainer.current_epoch,
                extra={"trainer": trainer, "pl_module": pl_module},
            )
        self._write([])  # incidents a write could not take: one more try
        self._print_summary(trainer)

    def on_exception(self, trainer: TrainerLike, pl_module: Any, exception: BaseException) -> None:
        self._print_summary(trainer)

    def _print_summary(self, trainer: TrainerLike) -> None:
        """The run's incidents as a table on the console (rank zero, only when there were some)."""
        incidents = self.guard.incidents[self._incidents_at_start :]
        if self._rank_zero and incidents:
            print_summary(trainer, incidents)
            self._incidents_at_start = len(self.guard.incidents)

    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.guard.load_state_dict(state_dict)
        if self._path is not None and self._rank_zero:  # Trainer.fit(ckpt_path=...), maybe in a new log dir
            self._write_restored()

    def _write_restored(self) -> None:
        """Append the checkpoint's incidents that this run's incidents file lacks (a new ``version_N``)."""
        if self._path is None:  # not started
            return
        restored = [i.to_dict() for i in self.guard.incidents]
        try:
            missing = missing_from(self._path, restored, ("step", "kind", "time"))
        except (OSError, ValueError):  # unreadable: leave it as it is; the incidents stay in the checkpoint
            return
        self._write(missing)

    # ------------------------------------------------------------------ output
    def metrics(self) -> dict[str, float]:
        """The counters, under the keys this callback logs."""
        return {
            "nan_guard/skipped_steps": float(self.guard.skipped_steps),
            "nan_guard/consecutive_skips": float(self.guard.consecutive_skips),
            "nan_guard/incidents": float(len(self.guard.incidents)),
            "nan_guard/scaler_overflows": float(self.guard.scaler_overflows),
        }

    def _record(self, incident: Incident) -> None:
        if not self._rank_zero:
            return
        self._write([incident.to_dict()])
        if self._trainer is not None:
            log_incident_text(self._trainer, incident)
        warnings.warn(f"NaNGuard: {incident.summary()}", NonFiniteWarning, stacklevel=2)

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Append to the incidents file; never raises (see :class:`~lightning_nan.core.pending.PendingRecords`)."""
        path = self._path
        if path is not None and self._rank_zero:
            self._unwritten.write(path, records, lambda batch: append_jsonl(path, batch))
