"""CheckpointRollback: restore the last known-good training state in memory and carry on."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import deque
from typing import Any

import torch

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks._checkpoint_saves import (
    candidate_saves,
    finite_aside,
    param_group_settings,
    restore_param_group_settings,
)
from lightning_nan.callbacks._shared_grads import find_step_grads, skip_step
from lightning_nan.callbacks._trainer import grad_scaler, log_metrics, max_reducer, partitions_state, starts_afresh
from lightning_nan.core.losses import unscaled_loss
from lightning_nan.core.validate import choice, fs_path, integer, number
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.events import RollbackEvent, announce_rollback
from lightning_nan.core.incident import Incident
from lightning_nan.core.snapshots import (
    DEFAULT_EVERY_N_STEPS,
    LossSpikeDetector,
    Snapshot,
    SnapshotStore,
    check_known_good,
    state_norm,
)

SOURCES = ("memory", "checkpoint")


#: Causes a rollback does not cure: the same samples or the same operation fail from an earlier state too.
NO_ROLLBACK_CAUSES = ("unsafe_op", "dirty_data", "broken_pipeline")


class CheckpointRollbackBase:
    """Keep known-good snapshots of the training state; on a blow-up, restore the newest and continue.

    Every ``every_n_steps`` optimizer steps (and at the start of training, trusted at once when finite:
    nothing earlier exists to go back to) the model, optimizers,
    LR schedulers, AMP scaler and the state of callbacks whose class sets ``restore_on_rollback = True``
    are copied to CPU memory (asynchronously from a GPU). The copy is *pending* until
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
    NaNGuard's consecutive-skip count, call ``back_off(step, reason, since=restored_step)`` on the
    first callback that has it (``LRBackoff``, which goes one level below the factor the run left that
    state with; without one the LR stays as it was, with a warning), restore
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

    Logged through the trainer's loggers:

    ============================  ================================================
    key                           value
    ============================  ================================================
    ``rollback/count``            rollbacks so far (at each rollback)
    ``rollback/restored_step``    the step of the state restored (at each rollback)
    ``rollback/snapshot_step``    the newest good snapshot (when one is confirmed)
    ============================  ================================================

    Example:
        >>> import torch, pytorch_lightning as pl, tempfile
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
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("confirm_steps", confirm_steps, 0),
            ("max_consecutive_skips", max_consecutive_skips, 1),
            ("spike_patience", spike_patience, 0),
            ("skip_batches", skip_batches, 0),
            ("max_rollbacks", max_rollbacks, 0),
        ):
            integer(name, value, low=low)
        if skip_rate is not None and not (
            isinstance(skip_rate, (tuple, list))
            and len(skip_rate) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in skip_rate)
            and 1 <= skip_rate[0] <= skip_rate[1]
        ):
            raise ValueError(
                f"Expected `skip_rate` to be None or (k, n) with ints 1 <= k <= n (k skipped steps among the last n), "
                f"got {skip_rate!r}"
            )
        if confirm_steps >= every_n_steps:
            raise ValueError(
                f"Expected `confirm_steps` < `every_n_steps` ({every_n_steps}), got {confirm_steps!r}: "
                "a snapshot must be confirmed before the next one is taken"
            )
        number("max_norm_growth", max_norm_growth, low=1, low_open=True, infinite=True, hint="inf: no growth test")
        choice("source", source, SOURCES)
        dirpath = fs_path("dirpath", dirpath, optional=True, kind="folder", hint="None: snapshots in memory only")
        number("spike_threshold", spike_threshold, low=0, low_open=True, optional=True, infinite=True, hint="None: no loss tests")
        if dirpath is not None and source != "memory":
            raise ValueError(f"`dirpath` stores snapshots, which source={source!r} does not take: remove `dirpath`")
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
        #: The loss-spike test (``None`` when ``spike_threshold`` is ``None``).
        self.detector = None if spike_threshold is None else LossSpikeDetector(spike_window, spike_threshold)
        #: One dict per rollback: ``step`` (when), ``restored_step``, ``reason``.
        self.history: list[dict[str, Any]] = []
        #: ``(step, reason)`` of the latest pending snapshots that were not promoted.
        self.rejected: deque[tuple[int, str]] = deque(maxlen=100)
        self._reset()
        self._warned: set[str] = set()
        self._resume_good: list[dict[str, Any]] = []

    def _reset(self) -> None:
        """Per-run state (the policy part of it is also in ``state_dict``)."""
        self._trainer: Any = None
        self._rank_zero = True
        self._losses: list[tuple[int, torch.Tensor]] = []
        self._flushed_step = 0
        self._spike_run = 0
        self._spike_steps: deque[int] = deque(maxlen=64)
        self._skip_steps: deque[int] = deque()  # steps skipped (not for the data) within the skip_rate window
        self._last_incident_step: int | None = None
        self._next_snapshot_step = 0
        self._drop_left = 0
        self._dropping = False
        self._dropped_in_batch = False
        self._deferred: Any = None  # the rest of a rollback started inside an optimizer step
        self._checked_step = -1
        self._start_step = 0  # the step this fit started from
        self._start_not_finite: int | None = None  # the same, when its weights were not finite
        detector = getattr(self, "detector", None)
        if detector is not None:
            self.detector = LossSpikeDetector(detector.window, detector.threshold)

    @property
    def rollbacks(self) -> int:
        return len(self.history)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_trainer=None, _losses=[], _deferred=None)
        return state

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        if self.source == "memory" and partitions_state(trainer):
            raise ValueError(
                f"CheckpointRollback(source='memory') copies the full state on every rank, which "
                f"{type(trainer.strategy).__name__} shards: use strategy='ddp', or source='checkpoint'."
            )
        self._reset()
        self.store.clear()  # snapshots of an earlier fit belong to another run
        if starts_afresh(trainer):  # so do its rollbacks (against max_rollbacks) and warnings; a resume loads its own
            self.history, self._warned, self._resume_good = [], set(), []
            self.rejected.clear()
        self._trainer = trainer
        self._rank_zero = trainer.is_global_zero
        if self._guard(trainer) is None:
            self._warn(
                "guard",
                "CheckpointRollback without NaNGuard only reacts to loss spikes: add NaNGuard() to the Trainer's "
                "callbacks so that non-finite weights and skipped steps trigger a rollback too.",
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        self._flushed_step = self._start_step = step
        if self.source == "memory":
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
            snapshot = self._take(trainer, pl_module)
            if not self.store.good:
                # The state training starts from is trusted at once (if finite): there is nothing
                # earlier to go back to, and a run that blows up in its first steps needs it most.
                norm = state_norm(pl_module)
                if not self._agree_any(trainer, not math.isfinite(float(norm)), norm.device):
                    self.store.promote()
                    log_metrics(trainer, {"rollback/snapshot_step": float(snapshot.step)})
                else:
                    self._start_not_finite = step
        self._resume_good = []
        self._next_snapshot_step = (step // self.every_n_steps + 1) * self.every_n_steps

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._drop_left > 0 and not self._dropping:
            self._dropping = True
            self._drop_left -= 1

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self.detector is None:
            return
        self._losses.append((trainer.global_step, unscaled_loss(loss, grad_scaler(trainer))))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if step != self._checked_step:  # the first optimizer of this step: the periodic reads
            self._checked_step = step
            pending = self.store.pending
            confirm_due = self.source == "memory" and pending is not None and step >= pending.step + self.confirm_steps
            every = self.spike_patience or self.confirm_steps or 1
            flush_due = self.detector is not None and (confirm_due or step - self._flushed_step >= every)
            if confirm_due or flush_due:
                # NaNGuard's check (and its one host transfer) first: what is read below then finds the
                # device idle, so it does not stall it. The check may itself roll back.
                find_step_grads(trainer, pl_module, optimizer)
                if self._deferred is not None:
                    return
                if flush_due:
                    self._flush(trainer, pl_module)
                if self.spike_patience and self._spike_run >= self.spike_patience:
                    self._on_spike(trainer, pl_module, optimizer)
                    return
                if confirm_due:
                    self._confirm(trainer, pl_module)
        if self._dropping:
            skip_step(trainer, pl_module, optimizer)  # the guard checks the step first (and may roll back)
            self._dropped_in_batch = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        dropped = self._dropped_in_batch
        if dropped:
            self._dropping = self._dropped_in_batch = False
        step = trainer.global_step
        if self._deferred is not None:  # a rollback inside this batch's optimizer step: finish it
            restore, self._deferred = self._deferred, None
            restore()
            self._losses = [(s, v) for s, v in self._losses if s >= step]
            self._flushed_step = step
            return
        if self.source != "memory" or step < self._next_snapshot_step or dropped or self._dropping:
            return
        self._take(trainer, pl_module)  # no host sync: asynchronous copies from a GPU
        self._next_snapshot_step = (step // self.every_n_steps + 1) * self.every_n_steps
        if self.confirm_steps == 0:
            self._confirm(trainer, pl_module)

    # ------------------------------------------------------------------ incident events (from NaNGuard)
    def on_nan_incident(self, event: Any) -> None:
        incident = event.incident
        self._last_incident_step = incident.step
        guard = event.guard
        if guard is None or incident.kind == "param":  # non-finite weights: NaNGuard escalates next
            return
        if incident.blames_data or incident.cause in NO_ROLLBACK_CAUSES:  # rolling back does not cure those
            return
        skips, recent = guard.consecutive_skips, 0
        if self.skip_rate is not None:
            if not self._skip_steps or self._skip_steps[-1] != incident.step:  # several optimizers: one step
                self._skip_steps.append(incident.step)
            while self._skip_steps[0] <= incident.step - self.skip_rate[1]:
                self._skip_steps.popleft()
            recent = len(self._skip_steps)
        if skips >= guard.max_consecutive:
            return  # NaNGuard escalates next
        if skips >= self.max_consecutive_skips:
            reason = f"{skips} consecutive skipped steps"
        elif self.skip_rate is not None and recent >= self.skip_rate[0]:
            reason = f"{recent} of the last {self.skip_rate[1]} steps skipped"
        else:
            return
        trainer, pl_module = self._objects(event)
        if trainer is None:
            return
        ok, why = self._rollback(trainer, pl_module, reason, event.optimizer is not None)
        if ok:
            incident.action = f"recovered by {type(self).__name__}"
            incident.detail["rollback"] = dict(self.history[-1])
            guard.recovered()  # agreed on every rank, like the guard's own reset after escalation
        else:  # keep skipping: NaNGuard escalates at its max_consecutive and raises with this reason
            incident.detail["rollback"] = why

    def on_nan_escalation(self, event: Any) -> bool:
        trainer, pl_module = self._objects(event)
        if trainer is None:
            return False
        incident = event.incident
        if incident.blames_data or incident.cause in NO_ROLLBACK_CAUSES:
            incident.detail["escalation"] = (
                f"{incident.detail.get('escalation', '')} CheckpointRollback does not roll back for cause "
                f"{incident.cause}: an earlier state fails the same way."
            ).strip()
            return False
        if incident.kind == "param":
            reason = "non-finite weights"
        elif incident.cause == "corruption":
            reason = "weight corruption"
        elif incident.kind in ("divergence", "jump"):
            reason = f"divergence ({incident.detail.get('growth', incident.kind)})"
        else:
            reason = f"{getattr(event.guard, 'consecutive_skips', '?')} consecutive skipped steps"
        ok, why = self._rollback(
            trainer, pl_module, reason, event.optimizer is not None, back_off=incident.cause != "corruption"
        )
        if ok:
            incident.detail["rollback"] = dict(self.history[-1])
            return True
        incident.detail["escalation"] = f"{incident.detail.get('escalation', '')} {why}".strip()
        return False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rollbacks": len(self.history),
            "history": copy.deepcopy(self.history),
            "good": [{"step": s.step, "norm": s.norm, "restores": s.restores} for s in self.store.good],
            "policy": {
                "drop_left": self._drop_left + int(self._dropping),
                "spike_run": self._spike_run,
                "spike_steps": list(self._spike_steps),
                "skip_steps": list(self._skip_steps),
                "last_incident_step": self._last_incident_step,
                "detector": self.detector.state_dict() if self.detector is not None else {},
                "warned": sorted(self._warned),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._resume_good = [dict(g) for g in state_dict.get("good", [])]
        policy = state_dict.get("policy", {})
        self._drop_left = int(policy.get("drop_left", 0))
        self._spike_run = int(policy.get("spike_run", 0))
        self._spike_steps = deque(policy.get("spike_steps", []), maxlen=64)
        self._skip_steps = deque(int(s) for s in policy.get("skip_steps", []))
        self._last_incident_step = policy.get("last_incident_step")
        self._warned = set(policy.get("warned", []))
        if self.detector is not None:
            self.detector.load_state_dict(policy.get("detector", {}))

    # ------------------------------------------------------------------ snapshots
    def _take(self, trainer: Any, pl_module: Any) -> Snapshot:
        states = {
            _key(cb): cb.state_dict()
            for cb in trainer.callbacks
            if getattr(type(cb), "restore_on_rollback", False) is True and cb is not self
        }
        return self.store.take(
            trainer.global_step,
            pl_module,
            trainer.optimizers,
            [config.scheduler for config in trainer.lr_scheduler_configs],
            grad_scaler(trainer),
            {"callbacks": states, "detector": self.detector.state_dict() if self.detector is not None else {}},
        )

    def _confirm(self, trainer: Any, pl_module: Any) -> None:
        """Promote the pending snapshot if it is known-good, else discard it (agreed across ranks)."""
        pending = self.store.pending
        if pending is None:
            return
        near = pending.step - self.confirm_steps
        incident = self._last_incident_step is not None and self._last_incident_step >= near
        spikes = set(self._spike_steps)
        spike = any(s >= near and s - 1 in spikes for s in spikes)  # two in a row: not one outlier batch
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
            spike=spike,
        )
        if self._agree_any(trainer, reason is not None, norms.device) and reason is None:
            reason = "another rank found it not good"
        if reason is None:
            self.store.promote()
            log_metrics(trainer, {"rollback/snapshot_step": float(pending.step)})
        else:
            self.rejected.append((pending.step, reason))
            self.store.discard()

    def _flush(self, trainer: Any, pl_module: Any) -> None:
        """Read the losses since the last flush (one transfer), average them over ranks, score them.

        Under DDP the per-step losses are averaged across ranks first (one collective), so every rank
        scores the same global-batch loss and reaches the same decisions.
        """
        step, start = trainer.global_step, self._flushed_step
        losses = [(s, v) for s, v in self._losses if start <= s < step]
        self._losses = [(s, v) for s, v in self._losses if s >= step]
        self._flushed_step = step
        if step <= start or self.detector is None:
            return
        values = torch.stack([v.to(losses[0][1].device) for _, v in losses]).tolist() if losses else []
        per_step: dict[int, float] = {}
        for (s, _), v in zip(losses, values):
            per_step[s] = per_step.get(s, 0.0) + v  # micro-batch losses add up (NaN stays NaN)
        steps = range(start, step)
        vector = [per_step.get(s, math.nan) for s in steps]
        if self._distributed(trainer):
            device = losses[0][1].device if losses else pl_module.device
            vector = trainer.strategy.reduce(torch.tensor(vector, device=device), reduce_op="mean").tolist()
        for s, z in zip(steps, self.detector.update(vector)):
            if self.detector.is_spike(z):
                self._spike_run += 1
                self._spike_steps.append(s)
            elif math.isfinite(z):
                self._spike_run = 0

    # ------------------------------------------------------------------ rollback
    def _on_spike(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """Trigger 3, from inside an optimizer step (whose update is then dropped)."""
        steps = self.spike_patience
        assert self.detector is not None  # a spike was detected
        reason = f"loss spike (robust z > {self.detector.threshold:g} for {steps} steps in a row)"
        ok, why = self._rollback(trainer, pl_module, reason, in_step=True)
        self._spike_run = 0
        if ok:
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
                detail={"escalation": f"The loss spiked (robust z > {self.detector.threshold:g} for {steps} steps). {why}"},
                action="raised",
                advice="Lower the learning rate, clip gradients, or check the data around these steps.",
            )
            guard = self._guard(trainer)
            raise NonFiniteError(incident, list(guard.incidents) if guard is not None else [])
        self._warn("spike", f"CheckpointRollback could not roll back a {reason}: {why}")

    def _rollback(self, trainer: Any, pl_module: Any, reason: str, in_step: bool, back_off: bool = True) -> tuple[bool, str]:
        """Restore the newest good state; ``(True, "")``, or ``(False, why not)``. Same answer on every rank.

        ``in_step``: called from inside ``optimizer.step()`` (NaNGuard's check). The weights are
        restored at once (the step itself changes nothing: the guard cleared the gradients); the
        optimizers, schedulers, scaler and callback states at the end of the batch, after
        ``optimizer.step()`` and its hooks (LRBackoff's) and the scheduler step have run, so those
        end exactly as in the snapshot. (A strategy that loads a checkpoint in place has loaded the
        optimizers at once; their param-group settings are put back at the end of the batch.)
        """
        step = trainer.global_step
        if len(self.history) >= self.max_rollbacks:
            return False, f"CheckpointRollback: max_rollbacks={self.max_rollbacks} reached ({self._listing()})."
        if self.source == "checkpoint":
            ckpt, why = self._find_checkpoint(trainer)
            if ckpt is None and reason == "non-finite weights" and step == self._start_step:  # no update yet
                return False, self._not_finite_at_start(step)
            if ckpt is None:
                return False, why
            restored = int(ckpt.get("global_step", -1))
            # Loaded in place, the optimizers' settings (lr, ...) are the save's now, before this step's
            # scheduler step moves them: put them back once the schedulers are restored, as a load would.
            settings = param_group_settings(trainer.optimizers) if partitions_state(trainer) else None

            def weights() -> None:
                trainer.strategy.load_model_state_dict(ckpt)

            def everything() -> None:
                self._apply_checkpoint(trainer, ckpt)
                if settings is not None:
                    restore_param_group_settings(trainer.optimizers, settings)

        else:
            snap = self._choose()
            if snap is None and self._start_not_finite is not None:
                return False, self._not_finite_at_start(self._start_not_finite)
            if snap is None:
                first = self.store.pending.step if self.store.pending is not None else None
                return False, (
                    "CheckpointRollback had no known-good snapshot yet"
                    + (f" (the one of step {first} was still pending)" if first is not None else "")
                    + f": a snapshot is taken every every_n_steps={self.every_n_steps} steps and confirmed "
                    f"confirm_steps={self.confirm_steps} steps later; use a smaller `every_n_steps`."
                )
            self._agree_step(trainer, snap.step, pl_module.device)
            restored = snap.step

            def weights() -> None:
                self.store.restore_model(snap, pl_module)

            def everything() -> None:
                extra = self.store.restore(
                    snap,
                    pl_module,
                    trainer.optimizers,
                    [config.scheduler for config in trainer.lr_scheduler_configs],
                    grad_scaler(trainer),
                )
                self._load_callbacks(trainer, extra.get("callbacks", {}))
                if self.detector is not None:  # the loss statistics of the good state, not of the blow-up
                    self.detector.load_state_dict(extra.get("detector", {}))

        if in_step:
            weights()
            self._deferred = everything
        else:
            everything()
        self.store.discard()  # a pending snapshot is newer than the state restored
        self.history.append({"step": step, "restored_step": restored, "reason": reason})
        self._skip_steps.clear()
        self._last_incident_step = step
        self._losses, self._flushed_step, self._spike_run = [], step + int(in_step), 0
        self._drop_left, self._dropping = self.skip_batches, False
        metrics = {"rollback/count": float(len(self.history)), "rollback/restored_step": float(restored)}
        if self.store.newest is not None:
            metrics["rollback/snapshot_step"] = float(self.store.newest.step)
        log_metrics(trainer, metrics)
        listeners = [cb for cb in trainer.callbacks if cb is not self]
        acted = announce_rollback(listeners, RollbackEvent(step, restored, reason, lr_to_blame=back_off))
        if back_off and not acted:  # (not after weight corruption: the learning rate is not to blame)
            self._warn(
                "backoff",
                "CheckpointRollback restored an earlier state but the learning rate is unchanged, so the same "
                "blow-up may recur: add LRBackoff() to the Trainer's callbacks.",
            )
        return True, ""

    @staticmethod
    def _not_finite_at_start(start: int) -> str:
        return (
            f"CheckpointRollback has nothing to go back to: the weights training started from (step {start}) "
            "were already not finite, before any update. "
            + ("Check the model's initialisation (and any weights loaded into it) before `fit`"
               if start == 0 else "The checkpoint resumed from holds non-finite weights: resume from an earlier one")
            + ", e.g. all(bool(p.isfinite().all()) for p in model.parameters())."
        )

    def _choose(self) -> Snapshot | None:
        """The newest good snapshot; one restored before that failed again gives way to the one before it."""
        newest = self.store.newest
        if newest is not None and newest.restores >= 1 and len(self.store.good) > 1:
            self.store.discard(newest)
            newest = self.store.newest
        return newest

    def _find_checkpoint(self, trainer: Any) -> tuple[dict[str, Any] | None, str]:
        """The newest ModelCheckpoint save (by rank zero's reckoning) whose weights are finite, loaded.

        Where the strategy loads a save into the model and optimizers in place (ModelParallelStrategy,
        FSDP, DeepSpeed: see :mod:`~lightning_nan.callbacks._checkpoint_saves`), each candidate is
        read aside and checked first (all ranks agree), so a non-finite save never reaches the live
        state; one that cannot be read aside (a DeepSpeed folder, untested) is loaded, then checked.
        """
        chosen = gather_objects(candidate_saves(trainer))[0]  # rank zero's saves
        in_place, module = partitions_state(trainer), trainer.lightning_module
        for path in chosen:
            if not in_place:  # the states are handed back: check them before anything is loaded
                ckpt = trainer.strategy.load_checkpoint(path, weights_only=False)
                weights = [v for v in ckpt.get("state_dict", {}).values() if isinstance(v, torch.Tensor)]
                if weights and bool(torch.isfinite(state_norm(weights))):
                    return ckpt, ""
                continue
            finite = finite_aside(trainer, path)
            if finite is not None and self._agree_any(trainer, not finite, module.device):
                continue
            ckpt = trainer.strategy.load_checkpoint(path, weights_only=False)
            if finite is None and self._agree_any(trainer, not bool(torch.isfinite(state_norm(module))), module.device):
                continue
            return ckpt, ""
        return None, (
            "CheckpointRollback(source='checkpoint') found no ModelCheckpoint save with finite weights yet: "
            "save checkpoints more often (ModelCheckpoint(every_n_train_steps=...)) or use source='memory'."
        )

    def _apply_checkpoint(self, trainer: Any, ckpt: dict[str, Any]) -> None:
        """Model, optimizer, scheduler, precision-plugin and opt-in callback states of a Lightning checkpoint."""
        trainer.strategy.load_model_state_dict(ckpt)
        if "optimizer_states" in ckpt:
            trainer.strategy.load_optimizer_state_dict(ckpt)
        for config, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)
        key = type(trainer.precision_plugin).__qualname__
        if key in ckpt:
            trainer.precision_plugin.load_state_dict(ckpt[key])
        self._load_callbacks(trainer, ckpt.get("callbacks", {}))

    def _load_callbacks(self, trainer: Any, states: dict[str, Any]) -> None:
        for cb in trainer.callbacks:
            if getattr(type(cb), "restore_on_rollback", False) is True and cb is not self and _key(cb) in states:
                cb.load_state_dict(states[_key(cb)])

    # ------------------------------------------------------------------ helpers
    def _agree_step(self, trainer: Any, step: int, device: torch.device) -> None:
        if not self._distributed(trainer):
            return
        low, high = max_reducer(trainer)(torch.tensor([-float(step), float(step)], device=device)).tolist()
        if -low != high:
            raise RuntimeError(
                f"CheckpointRollback: the ranks hold different snapshots (steps {-low:g} to {high:g}); every rank must "
                "take and confirm snapshots at the same steps. Report this with the run's settings."
            )

    def _agree_any(self, trainer: Any, flag: bool, device: torch.device) -> bool:
        if not self._distributed(trainer):
            return flag
        return bool(max_reducer(trainer)(torch.tensor([float(flag)], device=device)).item() > 0)

    @staticmethod
    def _distributed(trainer: Any) -> bool:
        return world()[1] > 1 or getattr(trainer, "world_size", 1) > 1

    @staticmethod
    def _guard(trainer: Any) -> NaNGuardBase | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, NaNGuardBase)), None)

    def _objects(self, event: Any) -> tuple[Any, Any]:
        trainer = event.extra.get("trainer", self._trainer)
        if trainer is None:
            return None, None
        return trainer, event.extra.get("pl_module", trainer.lightning_module)

    def _listing(self) -> str:
        return "; ".join(f"step {h['step']} -> {h['restored_step']} ({h['reason']})" for h in self.history) or "none"

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if self._rank_zero:
            warnings.warn(message, UserWarning, stacklevel=3)


def _key(callback: Any) -> str:
    return getattr(callback, "state_key", type(callback).__qualname__)
