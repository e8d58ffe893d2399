"""CheckpointRollback: restore the last known-good training state in memory and carry on.

The hooks are here; what they use is apart: the restoring itself
(:mod:`~lightning_nan.callbacks._rollback_actions`), the sources of the states restored
(:mod:`~lightning_nan.callbacks._memory_source`, :mod:`~lightning_nan.callbacks._checkpoint_source`,
one interface in :mod:`~lightning_nan.callbacks._rollback_sources`), the triggers
(:mod:`lightning_nan.core.rollback_triggers`) and the cross-rank agreement
(:mod:`~lightning_nan.callbacks._rank_agreement`).
"""

from __future__ import annotations

import copy
import os
from collections import deque
from typing import Any

import torch

from lightning_nan.callbacks._checkpoint_source import CheckpointSource
from lightning_nan.callbacks._memory_source import MemorySource
from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._rank_agreement import distributed
from lightning_nan.callbacks._rollback_actions import RollbackActions
from lightning_nan.callbacks._rollback_arguments import check_arguments
from lightning_nan.callbacks._rollback_sources import Restoration, RollbackSource
from lightning_nan.callbacks._shared_grads import find_step_grads, skip_step
from lightning_nan.callbacks._trainer import grad_scaler, starts_afresh
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.incident import IncidentAction
from lightning_nan.core.losses import unscaled_loss
from lightning_nan.core.rollback_triggers import SkipTrigger, SpikeTrigger, curable, escalation_reason
from lightning_nan.core.snapshots import DEFAULT_EVERY_N_STEPS, SnapshotStore
from lightning_nan.core.spikes import LossSpikeDetector
from lightning_nan.core.validate import integer


class CheckpointRollbackBase(RollbackActions):
    """Keep known-good snapshots of the training state; on a blow-up, restore the newest and continue.

    Every ``every_n_steps`` optimizer steps (and at the start of training, trusted at once when finite:
    nothing earlier exists to go back to) the model, optimizers,
    LR schedulers, AMP scaler and the state of callbacks that derive from
    :class:`~lightning_nan.core.events.RestoredOnRollback` (GradientClipping's statistics) are copied to CPU memory (asynchronously from a GPU). The copy is *pending* until
    ``confirm_steps`` steps later; it becomes *good* only if no NaN/Inf incident and no loss spike
    (a robust z-score above ``spike_threshold`` at two steps in a row: one outlier batch does not
    count) came within ``confirm_steps`` steps of it, and its
    weights and the weights at confirmation are finite with a 2-norm that grew at most
    ``max_norm_growth``-fold per interval since the previous good snapshot. So a snapshot taken
    in the middle of a blow-up is never used. The newest ``max_snapshots`` good snapshots are kept
    (also on disk with ``dirpath``).

    Triggers (the same decision on every rank under DDP):

    1. NaNGuard escalates (the weights are non-finite, or its ``max_consecutive`` skips in a row);
    2. ``max_consecutive_skips`` skipped steps in a row (fewer than NaNGuard's limit), or ``k`` of the
       last ``n`` steps skipped (``skip_rate=(k, n)``): a state that fails every other batch is as
       broken as one that fails every batch. An incident blamed on the data (BatchBisection found the
       samples) never triggers it: restoring the weights does not help against dirty samples;
    3. a loss spike that persists: robust z above ``spike_threshold`` for ``spike_patience`` steps.

    Action: restore the newest good snapshot in place (a snapshot that was already restored and
    failed again before a newer one was confirmed is dropped for the one before it, if any; when
    triggered inside an optimizer step, the weights at once and the rest at the end of the batch,
    after that step's hooks and scheduler step, so every state ends exactly as in the snapshot; a
    strategy that loads a checkpoint in place loads the optimizers at once too, and their settings
    are put back at the end of the batch), reset
    NaNGuard's consecutive-skip count, announce the rollback (``on_nan_rollback``: ``LRBackoff``
    goes one level below the factor the run left that state with; without one the LR stays as it
    was, with a warning), restore
    the loss-spike statistics of the snapshot (not those of the blow-up), drop the updates of the
    next ``skip_batches`` batches, and carry on with the next batches: the data is not rewound and
    ``trainer.global_step`` keeps counting steps attempted. NaNGuard's incidents and LRBackoff's
    memory are never rolled back. After ``max_rollbacks`` rollbacks the next trigger raises
    :class:`~lightning_nan.core.errors.NonFiniteError` listing them (for trigger 2: once NaNGuard
    reaches its own ``max_consecutive``). Before the first good snapshot exists nothing can be
    restored: NaNGuard then raises, saying so.

    Args:
        every_n_steps: steps between snapshots (default 100: see
            :data:`~lightning_nan.core.snapshots.DEFAULT_EVERY_N_STEPS`).
        confirm_steps: steps a snapshot stays pending; must be smaller than ``every_n_steps``.
        max_snapshots: good snapshots kept.
        max_norm_growth: allowed growth of the weights' 2-norm per snapshot interval (> 1).
        max_consecutive_skips: skipped steps in a row that trigger a rollback (trigger 2).
        skip_rate: ``(k, n)``: ``k`` skipped steps among the last ``n`` trigger a rollback too
            (trigger 2; ``None``: only steps in a row count). Incidents blamed on the data (culprit
            samples found, ``cause == "dirty_data"``, non-finite inputs) never trigger a rollback.
        spike_threshold: robust z-score of the loss that counts as a spike; ``None`` turns the loss
            tests off (trigger 3 and the spike part of the known-good test). Default 6: for Gaussian
            noise a z of 6 happens once in 10^9 steps, and batch losses, though heavier-tailed,
            rarely reach it ``spike_patience`` times in a row.
        spike_patience: consecutive spiking steps that trigger a rollback (0: never; the losses are
            then still read to test snapshots). The losses are read from the device in one transfer
            every ``spike_patience`` steps (every ``confirm_steps`` when 0), right after NaNGuard's
            own transfer of that step, when the device has nothing queued; under DDP they are
            averaged over the ranks first, so the score is that of the global batch.
        spike_window: recent losses that make the median and MAD of the z-score.
        skip_batches: batches whose updates are dropped after a rollback (PaLM skipped 200-500).
        max_rollbacks: rollbacks allowed in the run (state_dict keeps the count across resumes).
        source: ``"memory"`` (the snapshots) or ``"checkpoint"``: restore model, optimizer, scheduler
            and scaler states from the newest ``ModelCheckpoint`` save with finite weights instead (no
            snapshots taken): any ``*.ckpt`` in the ModelCheckpoints' folders, a file or a folder of
            shards (``ModelParallelStrategy``/FSDP, which load it in place: it is checked aside first).
        dirpath: also write good snapshots there (found again when a run resumes from a checkpoint).

    The snapshots themselves are not in the Lightning checkpoint (``state_dict`` holds the history,
    the rollback count and the test's state); in memory they are gone after a restart, on disk
    (``dirpath``) they are picked up again. Every rank keeps its own copies in its host memory: up
    to ``max_snapshots + 1`` of the full state (the good ones and the pending one, whose buffers are
    reused). With ``dirpath`` each confirmed snapshot is written synchronously (about 3 s per GB here).

    Each rollback, done or refused, is recorded on the incident that asked for it
    (``incident.rollback``, a :class:`~lightning_nan.core.rollback.RollbackRecord`, also in
    ``nan_incidents.jsonl``); ``history`` lists the rollbacks done.

    Logged through the trainer's loggers:

    ============================  ================================================
    key                           value
    ============================  ================================================
    ``rollback/count``            rollbacks so far (at each rollback)
    ``rollback/restored_step``    the step of the state restored (at each rollback)
    ``rollback/snapshot_step``    the newest good snapshot (when one is confirmed)
    ============================  ================================================

    Example:
        >>> import torch, pytorch_lightning as pl, tempfile, warnings
        >>> from lightning_nan import CheckpointRollback, NaNGuard
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         if self.global_step == 7:  # a weight silently turns NaN
        ...             with torch.no_grad():
        ...                 self.layer.weight[0, 0] = float("nan")
        ...         return self.layer(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(40, 2, generator=torch.Generator().manual_seed(0)))
        >>> rollback = CheckpointRollback(every_n_steps=4, confirm_steps=2)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[NaNGuard(), rollback], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
        >>> with warnings.catch_warnings(record=True):
        ...     trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))
        1 non-finite incident, step 7
        ...
        >>> rollback.history
        [{'step': 7, 'restored_step': 4, 'reason': 'non-finite weights'}]
        >>> trainer.callbacks[0].incidents[0].rollback.summary()
        'step 7: rolled back to step 4 (the snapshot of step 4) for non-finite weights'
        >>> trainer.global_step, all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())
        (10, True)
    """

    def __init__(
        self,
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        confirm_steps: int = 20,
        max_snapshots: int = 2,
        max_norm_growth: float = 2.0,
        max_consecutive_skips: int = 5,
        skip_rate: tuple[int, int] | None = (3, 10),
        spike_threshold: float | None = 6.0,
        spike_patience: int = 10,
        spike_window: int = 100,
        skip_batches: int = 0,
        max_rollbacks: int = 5,
        source: str = "memory",
        dirpath: str | os.PathLike[str] | None = None,
    ) -> None:
        dirpath = check_arguments(
            every_n_steps=every_n_steps, confirm_steps=confirm_steps, max_norm_growth=max_norm_growth,
            max_consecutive_skips=max_consecutive_skips, skip_rate=skip_rate, spike_threshold=spike_threshold,
            spike_patience=spike_patience, skip_batches=skip_batches, max_rollbacks=max_rollbacks, source=source,
            dirpath=dirpath,
        )
        super().__init__()
        self.every_n_steps = every_n_steps
        self.confirm_steps = confirm_steps
        self.max_norm_growth = float(max_norm_growth)
        self.max_consecutive_skips = max_consecutive_skips
        self.skip_rate = None if skip_rate is None else (int(skip_rate[0]), int(skip_rate[1]))
        self.spike_patience = spike_patience
        self.skip_batches = skip_batches
        self.max_rollbacks = max_rollbacks
        self.source = source
        self.store = SnapshotStore(max_snapshots, dirpath)
        integer("spike_window", spike_window, low=5)
        detector = None if spike_threshold is None else LossSpikeDetector(spike_window, spike_threshold)
        #: Trigger 2 (skipped steps) and trigger 3 (loss spikes, also read by the known-good test).
        self.skips = SkipTrigger(max_consecutive_skips, self.skip_rate)
        self.spikes = SpikeTrigger(detector, spike_patience, confirm_steps)
        #: One dict per rollback: ``step`` (when), ``restored_step``, ``reason``.
        self.history: list[dict[str, Any]] = []
        #: ``(step, reason)`` of the latest pending snapshots that were not promoted.
        self.rejected: deque[tuple[int, str]] = deque(maxlen=100)
        self._source: RollbackSource = (
            MemorySource(self.store, every_n_steps, confirm_steps, self.max_norm_growth, self.rejected)
            if source == MemorySource.name
            else CheckpointSource()
        )
        self._reset()
        self._warned: set[str] = set()

    def _reset(self) -> None:
        """Per-run state (the policy part of it is also in ``state_dict``)."""
        self._trainer: TrainerLike | None = None
        self._rank_zero = True
        self.spikes.reset()
        self.skips.steps.clear()
        self._source.reset()
        self._last_incident_step: int | None = None
        self._drop_left = 0
        self._dropping = False
        self._dropped_in_batch = False
        self._deferred: Restoration | None = None  # a rollback started inside an optimizer step, to finish
        self._checked_step = -1
        self._start_step = 0  # the step this fit started from

    @property
    def rollbacks(self) -> int:
        return len(self.history)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_trainer=None, _deferred=None)
        return state

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        self._source.check(trainer)
        self._reset()
        self.store.clear()  # snapshots of an earlier fit belong to another run
        if starts_afresh(trainer):  # so do its rollbacks (against max_rollbacks) and warnings; a resume loads its own
            self.history, self._warned = [], set()
            self._source.load_state_dict({})
            self.rejected.clear()
        self._trainer = trainer
        self._rank_zero = trainer.is_global_zero
        if self._guard(trainer) is None:
            self._warn(
                "guard",
                "CheckpointRollback without NaNGuard only reacts to loss spikes: add NaNGuard() to the Trainer's "
                "callbacks so that non-finite weights and skipped steps trigger a rollback too.",
            )

    def on_train_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._start_step = trainer.global_step
        self.spikes.drop_before(self._start_step)
        self._source.start(trainer, pl_module, lambda: self._kept_with(trainer))

    def on_train_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._drop_left > 0 and not self._dropping:
            self._dropping = True
            self._drop_left -= 1

    def on_before_backward(self, trainer: TrainerLike, pl_module: Any, loss: torch.Tensor) -> None:
        if self.detector is not None:
            self.spikes.record(trainer.global_step, unscaled_loss(loss, grad_scaler(trainer)))

    def on_before_optimizer_step(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if step != self._checked_step:  # the first optimizer of this step: the periodic reads
            self._checked_step = step
            confirm_due = self._source.confirm_due(step)
            flush_due = self.spikes.flush_due(step, confirm_due)
            if confirm_due or flush_due:
                # NaNGuard's check (and its one host transfer) first: what is read below then finds the
                # device idle, so it does not stall it. The check may itself roll back.
                find_step_grads(trainer, pl_module, optimizer)
                if self._deferred is not None:
                    return
                if flush_due:  # under DDP averaged over the ranks first: every rank scores the global batch
                    mean = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if distributed(trainer) else None
                    self.spikes.flush(step, mean, pl_module.device)
                if self.spikes.fired:
                    self._on_spike(trainer, pl_module, optimizer)
                    return
                if confirm_due:
                    self._source.confirm(trainer, pl_module, self._last_incident_step, self.spikes)
        if self._dropping:
            skip_step(trainer, pl_module, optimizer)  # the guard checks the step first (and may roll back)
            self._dropped_in_batch = True

    def on_train_batch_end(self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        dropped = self._dropped_in_batch
        if dropped:
            self._dropping = self._dropped_in_batch = False
        step = trainer.global_step
        if self._deferred is not None:  # a rollback inside this batch's optimizer step: finish it
            restoration, self._deferred = self._deferred, None
            self._finish(trainer, restoration)
            self.spikes.drop_before(step)
            return
        if dropped or self._dropping:
            return
        if self._source.take(trainer, pl_module, lambda: self._kept_with(trainer)) and self._source.confirm_due(step):
            self._source.confirm(trainer, pl_module, self._last_incident_step, self.spikes)  # confirm_steps=0

    # ------------------------------------------------------------------ incident events (from NaNGuard)
    def on_nan_incident(self, event: Any) -> None:
        """Trigger 2: skipped steps, in a row or spread; the record of the rollback (or why none) goes on the incident."""
        incident = event.incident
        self._last_incident_step = incident.step
        guard = event.guard
        if guard is None or incident.kind == "param":  # non-finite weights: NaNGuard escalates next
            return
        if not curable(incident):  # rolling back does not cure those
            return
        reason = self.skips.observe(incident.step, guard.consecutive_skips, escalates_at=guard.max_consecutive)
        trainer, pl_module = self._objects(event)
        if reason is None or trainer is None:
            return
        incident.rollback = self._rollback(trainer, pl_module, reason, event.optimizer is not None)
        if incident.rollback.restored:
            incident.action = IncidentAction.RECOVERED.by(type(self).__name__)
            guard.recovered()  # agreed on every rank, like the guard's own reset after escalation
        # else keep skipping: NaNGuard escalates at its max_consecutive

    def on_nan_escalation(self, event: Any) -> bool:
        """Trigger 1: skipping cannot help (non-finite weights, too many skips, divergence)."""
        trainer, pl_module = self._objects(event)
        if trainer is None:
            return False
        incident = event.incident
        if not curable(incident):
            incident.detail["escalation"] = (
                f"{incident.detail.get('escalation', '')} CheckpointRollback does not roll back for cause "
                f"{incident.cause}: an earlier state fails the same way."
            ).strip()
            return False
        reason = escalation_reason(incident, event.guard.consecutive_skips if event.guard is not None else "?")
        back_off = incident.cause != "corruption"
        incident.rollback = self._rollback(trainer, pl_module, reason, event.optimizer is not None, back_off=back_off)
        if incident.rollback.restored:
            return True
        incident.detail["escalation"] = f"{incident.detail.get('escalation', '')} {incident.rollback.refused}".strip()
        return False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {
            "rollbacks": len(self.history),
            "history": copy.deepcopy(self.history),
            "good": [],
            "policy": {
                "drop_left": self._drop_left + int(self._dropping),
                **self.spikes.state_dict(),
                "skip_steps": list(self.skips.steps),
                "last_incident_step": self._last_incident_step,
                "warned": sorted(self._warned),
            },
        }
        state.update(self._source.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._source.load_state_dict(state_dict)
        policy = state_dict.get("policy", {})
        self._drop_left = int(policy.get("drop_left", 0))
        self.spikes.load_state_dict(policy)
        self.skips.steps = deque(int(s) for s in policy.get("skip_steps", []))
        self._last_incident_step = policy.get("last_incident_step")
        self._warned = set(policy.get("warned", []))

    def _objects(self, event: Any) -> tuple[Any, Any]:
        trainer = event.extra.get("trainer", self._trainer)
        if trainer is None:
            return None, None
        return trainer, event.extra.get("pl_module", trainer.lightning_module)
