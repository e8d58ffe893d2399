"""Typed records that BatchBisection puts on an incident: what the search found, where the NaN appeared.

:class:`BisectionRecord` (``incident.bisection``) sums up one incident's search, with one
:class:`BatchRecord` per batch searched; :class:`LocalizationRecord` (``incident.localization``) is
the JSON form of a :class:`~lightning_nan.core.localize.Localization` plus its one-line summary and
the model's class name. Fields are plain JSON values; ``Incident.to_dict()`` writes them as the
top-level keys ``"bisection"``/``"localization"`` of an incident's JSON line and ``from_dict`` reads
them back (unknown keys, from newer versions, are ignored).

>>> rec = BisectionRecord(step=4, forward_passes=9, reproduced=True, quarantined=[17],
...                       batches=[BatchRecord(batch_idx=2, size=16, forward_passes=9, dirty=[17])])
>>> BisectionRecord.from_dict(rec.to_dict()) == rec
True
>>> loc = LocalizationRecord(module="", module_type="Net", op="log", model="Net")
>>> loc.module_name(), LocalizationRecord(module="head.1").module_name()
('Net', 'head.1')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightning_nan.core.localization import LocalizationFacts

__all__ = ["BatchRecord", "BisectionRecord", "LocalizationRecord"]

_R = TypeVar("_R")


def _known(cls: type[_R], data: Mapping[str, Any]) -> _R:
    """``cls`` built from the keys of ``data`` that are its fields (others, from newer versions, ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class BatchRecord:
    """One batch searched by bisection (under DDP, on one rank).

    Sample lists hold data set indices when ``indices_known``, else positions in the batch.

    Attributes:
        batch_idx: the batch's index in its epoch.
        rank: the rank that searched it.
        size: the number of samples in the batch.
        forward_passes: passes spent, search and confirmation.
        reproduced: the whole batch failed again when re-evaluated.
        whole_batch: (nearly) every sample fails alone: a model problem, not the data.
        complete: the search ran to the end (``max_tests`` not reached).
        indices_known: whether the samples are named by data set index.
        groups: the minimal failing groups found.
        dirty: confirmed culprits whose own input is bad (quarantined).
        triggers: confirmed culprits with ordinary inputs (never quarantined).
        unconfirmed: groups that failed only together or only once.
        evidence: what each culprit's input says, by sample (the key is the index or position as text).
        confirm_passes: passes spent on confirmation.
        seconds: wall time of the search.
    """

    batch_idx: int
    rank: int = 0
    size: int = 0
    forward_passes: int = 0
    reproduced: bool = False
    whole_batch: bool = False
    complete: bool = True
    indices_known: bool = True
    groups: list[list[int]] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    triggers: list[int] = field(default_factory=list)
    unconfirmed: list[list[int]] = field(default_factory=list)
    evidence: dict[str, str] = field(default_factory=dict)
    confirm_passes: int = 0
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchRecord:
        """Rebuild from :func:`dataclasses.asdict` output (or an older file's dict)."""
        return _known(cls, data)


@dataclass
class BisectionRecord:
    """What BatchBisection found at one incident (``incident.bisection``).

    Attributes:
        step: the incident's step.
        forward_passes: passes spent over every batch and rank.
        reproduced: some batch failed again when re-evaluated (``False``: a transient fault).
        whole_batch: every sample of some batch fails alone: the model, not the data.
        indices_known: the samples are named by data set index (``False``: an iterable data set or a
            custom loader; ``positions`` and ``fingerprints`` name them).
        batches: one record per batch searched.
        errors: ``"rank R: error"`` for each rank whose search failed.
        note: a sentence on how to read the result (indices unknown, whole batch, unconfirmed groups).
        quarantined: the data set indices quarantined, or ``[rank, batch_idx, position]`` when unknown.
        triggers: data set indices of confirmed samples with ordinary inputs (not quarantined).
        confirm_passes: of ``forward_passes``, those spent on confirmation.
        unconfirmed: groups that failed only together or only once (not quarantined).
        positions: ``[rank, batch_idx, position]`` of each quarantined sample when indices are unknown.
        fingerprints: the content fingerprint of each of ``positions``.
        skipped: why nothing was searched (a broken pipeline, ``ddp=False`` under DDP).
        split: ``"val"``/``"test"`` for an evaluation incident.
        quarantine: the quarantine file an evaluation incident's samples went to.
    """

    step: int
    forward_passes: int = 0
    reproduced: bool = False
    whole_batch: bool = False
    indices_known: bool = True
    batches: list[BatchRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str | None = None
    quarantined: list[Any] = field(default_factory=list)
    triggers: list[int] = field(default_factory=list)
    confirm_passes: int = 0
    unconfirmed: list[list[int]] = field(default_factory=list)
    positions: list[list[int]] | None = None
    fingerprints: list[str] | None = None
    skipped: str | None = None
    split: str | None = None
    quarantine: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BisectionRecord:
        """Rebuild from :meth:`to_dict` output (or an older file's ``detail["bisection"]``)."""
        record = _known(cls, data)
        record.batches = [b if isinstance(b, BatchRecord) else BatchRecord.from_dict(b) for b in record.batches or []]
        return record


@dataclass
class LocalizationRecord(LocalizationFacts):
    """Where the NaN first appeared (``incident.localization``): the fields of
    :class:`~lightning_nan.core.localize.Localization` (non-finite floats as ``"nan"``/``"inf"`` text),
    its ``summary`` line and the ``model``'s class name.
    """

    input_range: list[Any] | None = None
    summary: str = ""
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalizationRecord:
        """Rebuild from :meth:`to_dict` output (or an older file's ``detail["localization"]``)."""
        return _known(cls, data)

    def module_name(self) -> str | None:
        """The name to give ``incident.module``: the module named, its class for the model itself
        (or the model's class for an operation in ``training_step``); for a backward-only fault the
        module whose ``forward`` made the failing node.

        >>> LocalizationRecord(backward_op="SqrtBackward0", backward_module="", model="Net").module_name()
        'Net'
        >>> LocalizationRecord(op="log", model="LitModel").module_name(), LocalizationRecord().module_name() is None
        ('LitModel', True)
        """
        name = self.module
        if name == "" or (name is None and self.op):  # the model itself, or its training_step
            name = self.module_type or self.model
        if name is None and self.backward_op:  # a backward-only fault: where its forward ran
            name = self.backward_module or self.model
            if name == "":
                name = self.backward_module_type or self.model
        return name
