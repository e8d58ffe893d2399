"""When a rollback is wanted: an escalated incident, skipped steps in a row or spread, a lasting loss spike.

Pure PyTorch; :class:`~lightning_nan.CheckpointRollback` feeds these from the guard's incidents and
the losses of ``on_before_backward``, and restores a state when one of them names a reason. Each
reason is a short phrase, recorded in the rollback's history and on the incident.

>>> from lightning_nan.core.incident import Incident
>>> escalation_reason(Incident(step=9, kind="param"), consecutive_skips=1)
'non-finite weights'
>>> curable(Incident(step=9, kind="loss", cause="dirty_data"))  # an earlier state fails the same way
False
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.incident import Incident
from lightning_nan.core.spikes import LossSpikeDetector

#: Causes a rollback does not cure: the same samples or the same operation fail from an earlier state too.
NO_ROLLBACK_CAUSES = ("unsafe_op", "dirty_data", "broken_pipeline")
#: The reason of a rollback for weights found non-finite (trigger 1).
NON_FINITE_WEIGHTS = "non-finite weights"


def curable(incident: Incident) -> bool:
    """Whether restoring an earlier state may help: not when the data is to blame or the cause is one of
    :data:`NO_ROLLBACK_CAUSES`."""
    return not (incident.blames_data or incident.cause in NO_ROLLBACK_CAUSES)


def escalation_reason(incident: Incident, consecutive_skips: int | str) -> str:
    """Trigger 1: why an incident that skipping cannot cure (the guard escalated it) asks for a rollback.

    >>> escalation_reason(Incident(step=4, kind="divergence", detail={"growth": "loss x1e4"}), 0)
    'divergence (loss x1e4)'
    >>> escalation_reason(Incident(step=4, kind="grad"), 8)
    '8 consecutive skipped steps'
    """
    if incident.kind == "param":
        return NON_FINITE_WEIGHTS
    if incident.cause == "corruption":
        return "weight corruption"
    if incident.kind in ("divergence", "jump"):
        return f"divergence ({incident.detail.get('growth', incident.kind)})"
    return f"{consecutive_skips} consecutive skipped steps"


class SkipTrigger:
    """Trigger 2: ``max_consecutive`` skipped steps in a row, or ``k`` skipped among the last ``n`` steps.

    Args:
        max_consecutive: skipped steps in a row that want a rollback.
        rate: ``(k, n)``, or ``None``: only steps in a row count.

    >>> trigger = SkipTrigger(max_consecutive=5, rate=(3, 10))
    >>> [trigger.observe(step, consecutive=1, escalates_at=20) for step in (2, 5, 8)]
    [None, None, '3 of the last 10 steps skipped']
    >>> trigger.observe(9, consecutive=5, escalates_at=20)
    '5 consecutive skipped steps'
    """

    def __init__(self, max_consecutive: int, rate: tuple[int, int] | None) -> None:
        self.max_consecutive = max_consecutive
        self.rate = rate
        #: The skipped steps within the last ``n`` (several optimizers in one step count once).
        self.steps: deque[int] = deque()

    def observe(self, step: int, consecutive: int, escalates_at: int) -> str | None:
        """A step was skipped (``consecutive`` in a row): the reason for a rollback, or ``None``.

        ``None`` too once ``consecutive`` reaches ``escalates_at``: the guard escalates next (trigger 1).
        """
        recent = 0
        if self.rate is not None:
            if not self.steps or self.steps[-1] != step:
                self.steps.append(step)
            while self.steps[0] <= step - self.rate[1]:
                self.steps.popleft()
            recent = len(self.steps)
        if consecutive >= escalates_at:
            return None
        if consecutive >= self.max_consecutive:
            return f"{consecutive} consecutive skipped steps"
        if self.rate is not None and recent >= self.rate[0]:
            return f"{recent} of the last {self.rate[1]} steps skipped"
        return None


class SpikeTrigger:
    """Trigger 3, and the spike facts of the known-good test: the losses, read in batches, scored robustly.

    The losses (scalar tensors on the device) are kept per step and read in one transfer by
    :meth:`flush`, which scores each step's loss (micro-batch losses added up) against the window of
    a :class:`~lightning_nan.core.spikes.LossSpikeDetector`. ``patience`` spiking steps in a row
    fire the trigger.

    Args:
        detector: the z-score test; ``None``: no loss tests at all.
        patience: spiking steps in a row that fire it (0: never; the spikes are still recorded).
        confirm_steps: read at least this often when ``patience`` is 0 (the known-good test needs them).

    >>> spikes = SpikeTrigger(LossSpikeDetector(window=10, threshold=6.0), patience=2, confirm_steps=1)
    >>> for step, loss in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 50.0, 60.0]):
    ...     spikes.record(step, torch.tensor(loss))
    >>> spikes.flush(8)
    >>> spikes.fired, list(spikes.steps), spikes.spiked_near(5)
    (True, [6, 7], True)
    """

    def __init__(self, detector: LossSpikeDetector | None, patience: int, confirm_steps: int) -> None:
        self.detector = detector
        self.patience = patience
        self.confirm_steps = confirm_steps
        self.reset()


    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the unread losses (tensors of the step being taken, maybe on a device)."""
        return {**self.__dict__, "_losses": []}

    def reset(self, step: int = 0) -> None:
        """Forget the losses and the statistics (a new fit starting at ``step``)."""
        if self.detector is not None:
            self.detector = LossSpikeDetector(self.detector.window, self.detector.threshold)
        self._losses: list[tuple[int, Tensor]] = []
        self.flushed_step = step
        #: Spiking steps in a row so far.
        self.run = 0
        #: The latest spiking steps.
        self.steps: deque[int] = deque(maxlen=64)

    @property
    def fired(self) -> bool:
        """Whether ``patience`` steps in a row spiked."""
        return bool(self.patience) and self.run >= self.patience

    def record(self, step: int, loss: Tensor) -> None:
        """Keep a loss of ``step`` (unscaled, on its device: no host sync)."""
        if self.detector is not None:
            self._losses.append((step, loss))

    def flush_due(self, step: int, confirm_due: bool) -> bool:
        """Whether the losses are to be read now: every ``patience`` steps (``confirm_steps`` when 0), or for a confirmation."""
        every = self.patience or self.confirm_steps or 1
        return self.detector is not None and (confirm_due or step - self.flushed_step >= every)

    def flush(self, step: int, reduce: Callable[[Tensor], Tensor] | None = None, device: Any = None) -> None:
        """Read the losses of the steps before ``step`` (one transfer) and score them.

        ``reduce``: averages a vector over the ranks (one collective; ``device`` when this rank has no
        loss to put it on), so every rank scores the same global-batch losses and decides the same.
        """
        start = self.flushed_step
        losses = [(s, v) for s, v in self._losses if start <= s < step]
        self.drop_before(step)
        if step <= start or self.detector is None:
            return
        values = torch.stack([v.to(losses[0][1].device) for _, v in losses]).tolist() if losses else []
        per_step: dict[int, float] = {}
        for (s, _), v in zip(losses, values):
            per_step[s] = per_step.get(s, 0.0) + v  # micro-batch losses add up (NaN stays NaN)
        steps = range(start, step)
        vector = [per_step.get(s, math.nan) for s in steps]
        if reduce is not None:
            vector = reduce(torch.tensor(vector, device=losses[0][1].device if losses else device)).tolist()
        for s, z in zip(steps, self.detector.update(vector)):
            if self.detector.is_spike(z):
                self.run += 1
                self.steps.append(s)
            elif math.isfinite(z):
                self.run = 0

    def drop_before(self, step: int) -> None:
        """Forget the losses of the steps before ``step`` unread (they were undone)."""
        self._losses = [(s, v) for s, v in self._losses if s >= step]
        self.flushed_step = step

    def spiked_near(self, since: int) -> bool:
        """Whether the loss spiked two steps in a row at or after ``since`` (one outlier batch does not count)."""
        spikes = set(self.steps)
        return any(s >= since and s - 1 in spikes for s in spikes)

    def restart(self, step: int) -> None:
        """After a rollback at ``step``: drop the unread losses and the current run."""
        self._losses, self.flushed_step, self.run = [], step, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "spike_run": self.run,
            "spike_steps": list(self.steps),
            "detector": self.detector.state_dict() if self.detector is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run = int(state.get("spike_run", 0))
        self.steps = deque(state.get("spike_steps", []), maxlen=64)
        self.load_statistics(state.get("detector", {}))

    def load_statistics(self, state: dict[str, Any]) -> None:
        """Put back the detector's window (from :meth:`state_dict`'s ``"detector"``)."""
        if self.detector is not None:
            self.detector.load_state_dict(state)

    def statistics(self) -> dict[str, Any]:
        """The detector's window, to restore with :meth:`load_statistics`."""
        return self.detector.state_dict() if self.detector is not None else {}

