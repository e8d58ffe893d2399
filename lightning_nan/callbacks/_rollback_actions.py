"""CheckpointRollback's restoring side: roll back (or say why not), finish a rollback begun inside a step,
act on a persistent loss spike. The hooks that keep the snapshots and hear the triggers are in
:mod:`~lightning_nan.callbacks.checkpoint_rollback`; this mixin holds what they call to restore.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_nan.callbacks._rollback_sources import Restoration, RollbackSource, callback_states, load_callback_states
from lightning_nan.callbacks._shared_grads import skip_step
from lightning_nan.callbacks._trainer import log_metrics
from lightning_nan.callbacks._types import TrainerLike, callbacks_of
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.events import RollbackEvent, announce_rollback
from lightning_nan.core.incident import Incident, IncidentAction
from lightning_nan.core.rollback import RollbackRecord
from lightning_nan.core.rollback_triggers import SkipTrigger, SpikeTrigger
from lightning_nan.core.snapshots import SnapshotStore
from lightning_nan.core.spikes import LossSpikeDetector


class RollbackActions:
    """Restoring a known-good state, for :class:`~lightning_nan.callbacks.checkpoint_rollback.CheckpointRollbackBase`."""

    # set by CheckpointRollbackBase
    max_rollbacks: int
    skip_batches: int
    spike_patience: int
    store: SnapshotStore
    history: list[dict[str, Any]]
    skips: SkipTrigger
    spikes: SpikeTrigger
    _source: RollbackSource
    _deferred: Restoration | None
    _last_incident_step: int | None
    _drop_left: int
    _dropping: bool
    _warned: set[str]
    _rank_zero: bool

    @property
    def detector(self) -> LossSpikeDetector | None:
        """The loss-spike test (``None`` when ``spike_threshold`` is ``None``)."""
        return self.spikes.detector

    def _on_spike(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """Trigger 3, from inside an optimizer step (whose update is then dropped)."""
        steps = self.spike_patience
        assert self.detector is not None  # a spike was detected
        reason = f"loss spike (robust z > {self.detector.threshold:g} for {steps} steps in a row)"
        record = self._rollback(trainer, pl_module, reason, in_step=True)
        self.spikes.run = 0
        if record.restored:
            skip_step(trainer, pl_module, optimizer)
            guard = self._guard(trainer)
            if guard is not None:
                guard.guard.recovered()
            return
        if len(self.history) >= self.max_rollbacks:
            incident = Incident(
                step=trainer.global_step,
                kind="loss",
                cause="divergence",
                epoch=trainer.current_epoch,
                detail={"escalation": f"The loss spiked (robust z > {self.detector.threshold:g} for {steps} steps). {record.refused}"},
                action=IncidentAction.RAISED,
                advice="Lower the learning rate, clip gradients, or check the data around these steps.",
                rollback=record,
            )
            guard = self._guard(trainer)
            raise NonFiniteError(incident, list(guard.incidents) if guard is not None else [])
        self._warn("spike", f"CheckpointRollback could not roll back a {reason}: {record.refused}")

    def _rollback(self, trainer: TrainerLike, pl_module: Any, reason: str, in_step: bool, back_off: bool = True) -> RollbackRecord:
        """Restore the newest good state, or say why not (the same answer on every rank).

        ``in_step``: called from inside ``optimizer.step()`` (NaNGuard's check). The weights are
        restored at once (the step itself changes nothing: the guard cleared the gradients); the
        optimizers, schedulers, scaler and callback states at the end of the batch, after
        ``optimizer.step()`` and its hooks (LRBackoff's) and the scheduler step have run, so those
        end exactly as in the snapshot. (A strategy that loads a checkpoint in place has loaded the
        optimizers at once; their param-group settings are put back at the end of the batch.)
        """
        step = trainer.global_step
        record = RollbackRecord(step=step, reason=reason, source=self._source.name)
        if len(self.history) >= self.max_rollbacks:
            record.refused = f"CheckpointRollback: max_rollbacks={self.max_rollbacks} reached ({self._listing()})."
            return record
        found = self._source.restore(trainer, pl_module, reason)
        if isinstance(found, str):
            record.refused = found
            return record
        if in_step:
            found.weights()
            self._deferred = found
        else:
            self._finish(trainer, found)
        record.restored_step, record.restored_from = found.step, found.description
        self.history.append({"step": step, "restored_step": found.step, "reason": reason})
        self.skips.steps.clear()
        self._last_incident_step = step
        self.spikes.restart(step + int(in_step))
        self._drop_left, self._dropping = self.skip_batches, False
        metrics = {"rollback/count": float(len(self.history)), "rollback/restored_step": float(found.step)}
        if self.store.newest is not None:
            metrics["rollback/snapshot_step"] = float(self.store.newest.step)
        log_metrics(trainer, metrics)
        listeners = [cb for cb in callbacks_of(trainer) if cb is not self]
        acted = announce_rollback(listeners, RollbackEvent(step, found.step, reason, lr_to_blame=back_off))
        if back_off and not acted:  # (not after weight corruption: the learning rate is not to blame)
            self._warn(
                "backoff",
                "CheckpointRollback restored an earlier state but the learning rate is unchanged, so the same "
                "blow-up may recur: add LRBackoff() to the Trainer's callbacks.",
            )
        return record

    def _finish(self, trainer: TrainerLike, restoration: Restoration) -> None:
        """Everything but the weights: optimizers, schedulers, scaler, opt-in callbacks, loss statistics."""
        restored = restoration.rest()
        load_callback_states(trainer, restored.callbacks, exclude=self)
        if restored.loss_statistics is not None:  # those of the good state, not of the blow-up
            self.spikes.load_statistics(restored.loss_statistics)

    def _kept_with(self, trainer: TrainerLike) -> dict[str, Any]:
        """What a snapshot keeps besides the training state: opt-in callback states, the loss statistics."""
        return {"callbacks": callback_states(trainer, exclude=self), "detector": self.spikes.statistics()}

    @staticmethod
    def _guard(trainer: TrainerLike) -> NaNGuardBase | None:
        return next((cb for cb in callbacks_of(trainer) if isinstance(cb, NaNGuardBase)), None)

    def _listing(self) -> str:
        return "; ".join(f"step {h['step']} -> {h['restored_step']} ({h['reason']})" for h in self.history) or "none"

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if self._rank_zero:
            warnings.warn(message, UserWarning, stacklevel=3)


