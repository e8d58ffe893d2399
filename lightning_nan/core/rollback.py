"""The rollback record: what a rollback restored, from which step and source, and why (or why it could not).

:class:`~lightning_nan.CheckpointRollback` writes one on the incident that asked for the rollback
(:attr:`Incident.rollback <lightning_nan.core.incident.Incident.rollback>`), so it is saved with the
incident in ``nan_incidents.jsonl``.

>>> done = RollbackRecord(step=25, reason="non-finite weights", source="memory", restored_step=20,
...                       restored_from="the snapshot of step 20")
>>> done.restored, done.summary()
(True, 'step 25: rolled back to step 20 (the snapshot of step 20) for non-finite weights')
>>> refused = RollbackRecord(step=3, reason="3 consecutive skipped steps", source="checkpoint",
...                          refused="no ModelCheckpoint save yet")
>>> refused.restored, refused.summary()
(False, 'step 3: no rollback for 3 consecutive skipped steps: no ModelCheckpoint save yet')
>>> RollbackRecord.from_dict(done.to_dict()) == done
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Where a rollback finds the state it restores (``CheckpointRollback(source=...)``).
SOURCES = ("memory", "checkpoint")


@dataclass
class RollbackRecord:
    """One rollback, done or refused.

    Attributes:
        step: the step it was asked for at (``trainer.global_step``).
        reason: what triggered it (``"non-finite weights"``, ``"3 consecutive skipped steps"``, ...).
        source: where the state came from: ``"memory"`` (snapshots) or ``"checkpoint"`` (a
            ModelCheckpoint save); ``""`` in records of older versions.
        restored_step: the step of the state restored; ``None`` when nothing was restored.
        restored_from: what was restored, in words (the snapshot, or the save's path).
        refused: why nothing was restored (``None`` when a state was restored).
    """

    step: int
    reason: str
    source: str = ""
    restored_step: int | None = None
    restored_from: str = ""
    refused: str | None = None

    @property
    def restored(self) -> bool:
        """Whether a state was restored."""
        return self.restored_step is not None

    def summary(self) -> str:
        """One line: when, to which step (or why not), for what."""
        if self.restored_step is None:
            return f"step {self.step}: no rollback for {self.reason}: {self.refused}"
        source = f" ({self.restored_from})" if self.restored_from else ""
        return f"step {self.step}: rolled back to step {self.restored_step}{source} for {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RollbackRecord:
        """Rebuild from :meth:`to_dict` output; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_legacy(cls, step: int, value: Any) -> RollbackRecord:
        """Read what older versions wrote in ``incident.detail["rollback"]``: the history entry of a
        rollback (a dict) or, when it was refused, why (a string).

        >>> RollbackRecord.from_legacy(9, {"step": 9, "restored_step": 5, "reason": "non-finite weights"}).restored_step
        5
        >>> RollbackRecord.from_legacy(9, "no snapshot yet").refused
        'no snapshot yet'
        """
        if isinstance(value, dict):
            return cls.from_dict({"step": step, "reason": "", **value})
        return cls(step=step, reason="", refused=str(value))
