"""CheckpointRollback's memory source: snapshots of the training state in host memory, known-good only.

Every ``every_n_steps`` steps (and at the start of training, trusted at once when finite) the model,
optimizers, schedulers, AMP scaler and the opt-in callback states are copied by a
:class:`~lightning_nan.core.snapshots.SnapshotStore`; the copy stays *pending* until
``confirm_steps`` later, when :func:`~lightning_nan.core.known_good.check_known_good` (agreed by
every rank) promotes it to *good* or rejects it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from lightning_nan.callbacks._rank_agreement import agree_any, agree_step
from lightning_nan.callbacks._rollback_sources import Restoration, Restored, RollbackSource, not_finite_at_start
from lightning_nan.callbacks._trainer import grad_scaler, log_metrics, partitions_state
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.known_good import check_known_good, state_norm
from lightning_nan.core.rollback_triggers import SpikeTrigger
from lightning_nan.core.snapshots import Snapshot, SnapshotStore


class MemorySource(RollbackSource):
    """Snapshots in ``store``, taken every ``every_n_steps`` steps, confirmed ``confirm_steps`` later.

    Args:
        store: where the snapshots are kept (the callback's ``store``).
        every_n_steps: steps between snapshots.
        confirm_steps: steps a snapshot stays pending.
        max_norm_growth: allowed growth of the weights' 2-norm per snapshot interval.
        rejected: where ``(step, why)`` of each rejected snapshot is appended (the callback's ``rejected``).
    """

    name = "memory"

    def __init__(
        self,
        store: SnapshotStore,
        every_n_steps: int,
        confirm_steps: int,
        max_norm_growth: float,
        rejected: deque[tuple[int, str]],
    ) -> None:
        self.store = store
        self.every_n_steps = every_n_steps
        self.confirm_steps = confirm_steps
        self.max_norm_growth = max_norm_growth
        self.rejected = rejected
        self._resume_good: list[dict[str, Any]] = []  # the good snapshots a resumed run's checkpoint lists
        self.reset()

    def reset(self) -> None:
        self._next_step = 0  # the step of the next snapshot
        self._start_not_finite: int | None = None  # the step this fit started from, when its weights were not finite

    def check(self, trainer: TrainerLike) -> None:
        if partitions_state(trainer):
            raise ValueError(
                f"CheckpointRollback(source='memory') copies the full state on every rank, which "
                f"{type(trainer.strategy).__name__} shards: use strategy='ddp', or source='checkpoint'."
            )

    def start(self, trainer: TrainerLike, pl_module: Any, extra: Callable[[], dict[str, Any]]) -> None:
        """Find the resumed run's snapshots on disk again, and take (and trust, when finite) the start."""
        step = trainer.global_step
        if self._resume_good and self.store.dirpath is not None:
            found = self.store.reload(
                [g["step"] for g in self._resume_good], {g["step"]: g.get("norm") for g in self._resume_good}
            )
            for g in self._resume_good:
                snap = next((s for s in self.store.good if s.step == g["step"]), None)
                if snap is not None:
                    snap.restores = int(g.get("restores", 0))
            if found and trainer.is_global_zero:
                log_metrics(trainer, {"rollback/snapshot_step": float(found[-1])})
        snapshot = self._snapshot(trainer, pl_module, extra())
        if not self.store.good:
            # The state training starts from is trusted at once (if finite): there is nothing
            # earlier to go back to, and a run that blows up in its first steps needs it most.
            norm = state_norm(pl_module)
            if not agree_any(trainer, not math.isfinite(float(norm)), norm.device):
                self.store.promote()
                log_metrics(trainer, {"rollback/snapshot_step": float(snapshot.step)})
            else:
                self._start_not_finite = step
        self._resume_good = []
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps

    def take(self, trainer: TrainerLike, pl_module: Any, extra: Callable[[], dict[str, Any]]) -> bool:
        step = trainer.global_step
        if step < self._next_step:
            return False
        self._snapshot(trainer, pl_module, extra())  # no host sync: asynchronous copies from a GPU
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
        return True

    def confirm_due(self, step: int) -> bool:
        pending = self.store.pending
        return pending is not None and step >= pending.step + self.confirm_steps

    def confirm(self, trainer: TrainerLike, pl_module: Any, last_incident_step: int | None, spikes: SpikeTrigger) -> None:
        """Promote the pending snapshot if it is known-good, else discard it (agreed across ranks)."""
        pending = self.store.pending
        if pending is None:
            return
        near = pending.step - self.confirm_steps
        incident = last_incident_step is not None and last_incident_step >= near
        norms = state_norm(pl_module)
        snap_norm = pending._norm if isinstance(pending._norm, torch.Tensor) else torch.tensor(pending.norm)
        snap_value, current = torch.stack([snap_norm.to(norms.device).float(), norms.float()]).tolist()
        pending._norm = snap_value
        ref = self.store.newest
        reason = check_known_good(
            snap_value,
            current,
            reference_norm=None if ref is None else ref.norm,
            intervals=1.0 if ref is None else (pending.step - ref.step) / self.every_n_steps,
            max_norm_growth=self.max_norm_growth,
            incident=incident,
            spike=spikes.spiked_near(near),
        )
        if agree_any(trainer, reason is not None, norms.device) and reason is None:
            reason = "another rank found it not good"
        if reason is None:
            self.store.promote()
            log_metrics(trainer, {"rollback/snapshot_step": float(pending.step)})
        else:
            self.rejected.append((pending.step, reason))
            self.store.discard()

    def restore(self, trainer: TrainerLike, pl_module: Any, reason: str) -> Restoration | str:
        snap = self._choose()
        if snap is None and self._start_not_finite is not None:
            return not_finite_at_start(self._start_not_finite)
        if snap is None:
            first = self.store.pending.step if self.store.pending is not None else None
            return (
                "CheckpointRollback had no known-good snapshot yet"
                + (f" (the one of step {first} was still pending)" if first is not None else "")
                + f": a snapshot is taken every every_n_steps={self.every_n_steps} steps and confirmed "
                f"confirm_steps={self.confirm_steps} steps later; use a smaller `every_n_steps`."
            )
        agree_step(trainer, snap.step, pl_module.device)
        self.store.discard()  # a pending snapshot is newer than the state restored

        def weights() -> None:
            self.store.restore_model(snap, pl_module)

        def rest() -> Restored:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            extra = self.store.restore(snap, pl_module, trainer.optimizers, schedulers, grad_scaler(trainer))
            # the loss statistics of the good state, not of the blow-up
            return Restored(extra.get("callbacks", {}), extra.get("detector", {}))

        where = f" ({snap.path})" if snap.path is not None else ""
        return Restoration(snap.step, f"the snapshot of step {snap.step}{where}", weights, rest)

    def state_dict(self) -> dict[str, Any]:
        return {"good": [{"step": s.step, "norm": s.norm, "restores": s.restores} for s in self.store.good]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_good = [dict(g) for g in state_dict.get("good", [])]

    def _choose(self) -> Snapshot | None:
        """The newest good snapshot; one restored before that failed again gives way to the one before it."""
        newest = self.store.newest
        if newest is not None and newest.restores >= 1 and len(self.store.good) > 1:
            self.store.discard(newest)
            newest = self.store.newest
        return newest

    def _snapshot(self, trainer: TrainerLike, pl_module: Any, extra: dict[str, Any]) -> Snapshot:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        return self.store.take(trainer.global_step, pl_module, trainer.optimizers, schedulers, grad_scaler(trainer), extra)
