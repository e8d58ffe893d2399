"""The incident record: what turned non-finite, where, when, and what was done about it.

>>> inc = Incident(step=7, kind="loss", advice="use log_softmax")
>>> inc.summary()
'step 7: non-finite loss, cause unknown -> skipped. use log_softmax'
>>> Incident.from_dict(inc.to_dict()) == inc
True
>>> inc.kind == IncidentKind.LOSS, inc.cause == IncidentCause.UNKNOWN, IncidentKind("grad").name
(True, True, 'GRAD')
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lightning_nan.core.records import BisectionRecord, LocalizationRecord
from lightning_nan.core.rollback import RollbackRecord

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)

        __format__ = str.__format__


class IncidentKind(StrEnum):
    """What was found wrong (:attr:`Incident.kind`). Members are ``str``: ``incident.kind == IncidentKind.LOSS``.

    ``SCALE``: the fp16 GradScaler's loss scale fell below its floor; ``DIVERGENCE``: a finite loss or
    gradient norm grew by orders of magnitude (caught before the first NaN); ``JUMP``: finite weights
    moved far more in one step than an update moves them; ``VAL``/``TEST``: a validation/test batch's
    loss or logged values (no optimizer step involved).
    """

    LOSS = "loss"
    GRAD = "grad"
    PARAM = "param"
    INPUT = "input"
    SCALE = "scale"
    DIVERGENCE = "divergence"
    JUMP = "jump"
    VAL = "val"
    TEST = "test"


class IncidentCause(StrEnum):
    """Why (:attr:`Incident.cause`), filled in by the diagnosis; ``UNKNOWN`` until then. Members are ``str``."""

    UNKNOWN = "unknown"
    DIVERGENCE = "divergence"
    DIRTY_DATA = "dirty_data"
    UNSAFE_OP = "unsafe_op"
    OVERFLOW = "overflow"
    CORRUPTION = "corruption"
    BROKEN_PIPELINE = "broken_pipeline"


class IncidentAction(StrEnum):
    """What was done (:attr:`Incident.action`). Members are ``str``; the file keeps the plain words.

    >>> IncidentAction.RECOVERED.by("CheckpointRollback"), IncidentAction.LEFT_OUT.samples(2, 8)
    ('recovered by CheckpointRollback', 'left out 2 of 8 samples')
    """

    SKIPPED = "skipped"  # the step was skipped: nothing changed
    RAISED = "raised"  # skipping could not help and nothing recovered: NonFiniteError
    RECOVERED = "recovered"  # an escalation handler restored a finite state: "recovered by <Name>"
    FOUND_AFTER_TRAINING = "found after training"  # the final weights, checked once training ended
    LEFT_OUT = "left out"  # val/test: "left out the batch", or "left out <k> of <n> samples" of the epoch's values

    def by(self, name: str) -> str:
        """``"<action> by <name>"``, e.g. the handler that recovered."""
        return f"{self.value} by {name}"

    def samples(self, left_out: int, of: int) -> str:
        """``"left out <k> of <n> samples"``."""
        return f"{self.value} {left_out} of {of} samples"


KINDS: tuple[str, ...] = tuple(k.value for k in IncidentKind)
#: The kinds found outside training: they never skip a step, back the LR off or roll back.
EVAL_KINDS: tuple[str, ...] = (IncidentKind.VAL.value, IncidentKind.TEST.value)
CAUSES: tuple[str, ...] = tuple(c.value for c in IncidentCause)
#: What an incident of each finite kind is called in a summary (the others read "non-finite <kind>").
_FINITE_KINDS = {"divergence": "training diverged", "jump": "the weights jumped"}


@dataclass
class Incident:
    """One non-finite event, as recorded in ``guard.incidents`` and ``nan_incidents.jsonl``.

    Attributes:
        step: the optimizer step that was attempted (``trainer.global_step`` at the check).
        kind: what was non-finite (:class:`IncidentKind`): ``loss``, ``grad``, ``param``, ``input``, ``scale``, or ``val`` /
            ``test`` for a validation/test batch.
        cause: why (:class:`IncidentCause`); ``"unknown"`` until a diagnosis fills it.
        module: the first module whose output turned non-finite, when localization ran.
        samples: data set indices of the samples shown to be dirty (their own input is non-finite,
            extreme or a gross outlier) and quarantined, when bisection ran.
        triggers: data set indices of samples with ordinary, finite inputs that alone make an unsafe
            operation fail (confirmed by bisection): named to reproduce the fault, never quarantined.
        advice: one sentence a user can act on.
        epoch: the training epoch, when known.
        batch_idx: the batch (or, with accumulation, the batches) that fed this step.
        ranks: the ranks that saw the fault (``[0]`` when not distributed).
        params: the first parameter names with non-finite gradients or values.
        detail: free-form facts (loss value, gradient norm, consecutive skips, ...).
        bisection: what BatchBisection's search found (:class:`~lightning_nan.core.records.BisectionRecord`).
        localization: where the NaN first appeared (:class:`~lightning_nan.core.records.LocalizationRecord`).
        rollback: the rollback this incident triggered, done or refused (:class:`~lightning_nan.core.rollback.RollbackRecord`).
        action: what was done (:class:`IncidentAction`): ``skipped``, ``raised``, ``recovered by <Name>``,
            ``found after training``, or for ``val``/``test`` what was left out of the epoch's metrics.
        time: wall-clock time of the check, seconds since the epoch.
    """

    step: int
    kind: str
    cause: str = "unknown"
    module: str | None = None
    samples: list[int] | None = None
    advice: str = ""
    epoch: int | None = None
    batch_idx: list[int] | None = None
    ranks: list[int] = field(default_factory=lambda: [0])
    params: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    action: str = IncidentAction.SKIPPED.value
    time: float = field(default_factory=time.time, compare=False)
    triggers: list[int] | None = None
    rollback: RollbackRecord | None = None
    bisection: BisectionRecord | None = None
    localization: LocalizationRecord | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Expected `kind` in {KINDS}, got {self.kind!r}")
        if isinstance(self.kind, enum.Enum):  # stored as the plain str a JSON file gives back
            self.kind = self.kind.value
        if isinstance(self.cause, enum.Enum):
            self.cause = self.cause.value
        if isinstance(self.rollback, dict):  # as a JSON line gives it back
            self.rollback = RollbackRecord.from_dict(self.rollback)
        if isinstance(self.bisection, dict):
            self.bisection = BisectionRecord.from_dict(self.bisection)
        if isinstance(self.localization, dict):
            self.localization = LocalizationRecord.from_dict(self.localization)
        if isinstance(self.action, enum.Enum):
            self.action = self.action.value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (primitives, lists and dicts only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Incident:
        """Rebuild from :meth:`to_dict` output; unknown keys (from newer versions) are ignored.

        Files written before the typed records kept them in ``detail``: they are moved to their fields.

        >>> old = {"step": 9, "kind": "param", "detail": {"rollback": {"step": 9, "restored_step": 5, "reason": "r"}}}
        >>> inc = Incident.from_dict(old)
        >>> inc.rollback.restored_step, inc.detail
        (5, {})
        """
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        detail = fields.get("detail")
        if isinstance(detail, dict) and any(key in detail for key in ("bisection", "localization", "rollback")):
            detail = dict(detail)
            for key in ("bisection", "localization", "rollback"):
                if fields.get(key) is None and key in detail:
                    fields[key] = detail.pop(key)
            if "rollback" in fields and not isinstance(fields["rollback"], (dict, RollbackRecord, type(None))):
                fields["rollback"] = RollbackRecord.from_legacy(int(data["step"]), fields["rollback"])
            fields["detail"] = detail
        for key, record in (("bisection", BisectionRecord), ("localization", LocalizationRecord)):
            value = fields.get(key)
            if isinstance(value, dict):
                fields[key] = record.from_dict(value)
            elif value is not None and not isinstance(value, record):  # a hand-edited file: not a record
                fields[key] = None
        return cls(**fields)

    @property
    def blames_data(self) -> bool:
        """Whether the data, not the model, is to blame: non-finite inputs, dirty samples found, or a
        broken data pipeline. Lowering the LR or rolling back does not help against those."""
        return self.kind == "input" or self.cause in ("dirty_data", "broken_pipeline") or bool(self.samples)

    def where(self) -> str:
        """Where the fault was seen, in words: parameters, batches, ranks."""
        parts = []
        if self.params:
            shown = ", ".join(self.params[:3]) + (f" (+{len(self.params) - 3} more)" if len(self.params) > 3 else "")
            parts.append(f"in {shown}")
        if self.module:
            parts.append(f"first in module {self.module}")
        if self.batch_idx:
            parts.append(f"batch {', '.join(map(str, self.batch_idx))}")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.ranks and self.ranks != [0]:
            parts.append(f"rank {', '.join(map(str, self.ranks))}")
        if self.samples:
            parts.append(f"samples {self.samples}")
        if self.triggers:
            parts.append(f"triggered by samples {self.triggers}")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line: step, what, where, cause, action and advice."""
        where = self.where()
        where = f" ({where})" if where else ""
        what = _FINITE_KINDS.get(self.kind, f"non-finite {self.kind}")
        return f"step {self.step}: {what}{where}, cause {self.cause} -> {self.action}. {self.advice}".rstrip()
