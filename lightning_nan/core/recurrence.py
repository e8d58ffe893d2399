"""When skipping stops being the answer: the same unsafe operation again, a broken pipeline again.

A skipped step is the right action for one bad batch. :class:`Recurrence` remembers, per run, the
unsafe operations (op and source line) and the batches non-finite in every sample that incidents
were diagnosed with, and says when the next one must stop training instead: the same unsafe op on
``unsafe_op_repeats`` steps is a model bug that will fail at inference too; a second distinct batch
whose every sample is non-finite is a broken data pipeline, not one bad shard. It also gives each
failing batch a content key, so that a cause carries over only to the very same samples.

>>> from lightning_nan.core.incident import Incident
>>> from lightning_nan.core.records import LocalizationRecord
>>> recurrence = Recurrence(unsafe_op_repeats=2)
>>> loc = LocalizationRecord(op="log", op_location="model.py:7 in forward")
>>> first = Incident(step=3, kind="loss", cause="unsafe_op", localization=loc)
>>> recurrence.stop(first) is None
True
>>> recurrence.stop(Incident(step=9, kind="loss", cause="unsafe_op", localization=loc))
'The unsafe operation log at model.py:7 in forward failed on 2 steps (3, 9): skipping its batches hides a bug in the model that will fail at inference too.'
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_nan.core.batches import BatchSplitError, fingerprints
from lightning_nan.core.fingerprint import sample_fingerprint
from lightning_nan.core.incident import Incident
from lightning_nan.core.records import LocalizationRecord
from lightning_nan.core.validate import integer

__all__ = ["PIPELINE_REPEATS", "UNSAFE_OP_REPEATS", "Recurrence", "batch_key", "joined_key"]

#: The same unsafe operation (op and line) failing on this many steps is a bug to fix, not a batch to skip.
UNSAFE_OP_REPEATS = 3
#: Distinct batches non-finite in every sample that make a broken pipeline (one alone may be a bad shard).
PIPELINE_REPEATS = 2


class Recurrence:
    """Counts recurring unsafe operations and broken-pipeline batches over a run (see the module)."""

    def __init__(self, unsafe_op_repeats: int = UNSAFE_OP_REPEATS) -> None:
        self.unsafe_op_repeats = integer("unsafe_op_repeats", unsafe_op_repeats, low=0, hint="0: never raise")
        self.unsafe_ops: dict[str, list[int]] = {}
        self.pipeline_steps: list[int] = []
        self.pipeline_keys: list[str | None] = []

    def stop(self, incident: Incident) -> str | None:
        """Record ``incident`` (already diagnosed); the reason to stop training now, else ``None``."""
        if incident.cause == "broken_pipeline":
            return self._pipeline(incident)
        if incident.cause == "unsafe_op":
            return self._unsafe_op(incident)
        return None

    def _pipeline(self, incident: Incident) -> str | None:
        key = incident.detail.get("batch_key")
        if key not in self.pipeline_keys:  # one batch seen by several optimizers counts once
            self.pipeline_keys.append(key)
            self.pipeline_steps.append(incident.step)
        if len(self.pipeline_keys) < PIPELINE_REPEATS:
            incident.advice += " Training stops at the next batch that is non-finite in every sample."
            return None
        steps = ", ".join(map(str, self.pipeline_steps[-PIPELINE_REPEATS:]))
        return f"The data pipeline is broken (steps {steps}): {incident.detail.get('pipeline')}."

    def _unsafe_op(self, incident: Incident) -> str | None:
        if not self.unsafe_op_repeats:
            return None
        loc = incident.localization or LocalizationRecord()
        op = loc.op or loc.backward_op
        if op is None and not incident.module:
            return None
        key = f"{op} at {loc.op_location or loc.backward_location or incident.module}" if op else f"module {incident.module}"
        steps = self.unsafe_ops.setdefault(key, [])
        if not steps or steps[-1] != incident.step:  # several optimizers on one batch: one step
            steps.append(incident.step)
        if len(steps) < self.unsafe_op_repeats:
            return None
        return (
            f"The unsafe operation {key} failed on {len(steps)} steps ({', '.join(map(str, steps[-5:]))}): skipping its "
            f"batches hides a bug in the model that will fail at inference too."
        )

    def reset(self) -> None:
        """Forget the run."""
        self.unsafe_ops, self.pipeline_steps, self.pipeline_keys = {}, [], []

    def state_dict(self) -> dict[str, Any]:
        return {
            "unsafe_ops": {k: list(v) for k, v in self.unsafe_ops.items()},
            "pipeline_steps": list(self.pipeline_steps),
            "pipeline_keys": list(self.pipeline_keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unsafe_ops = {str(k): [int(s) for s in v] for k, v in state.get("unsafe_ops", {}).items()}
        self.pipeline_steps = [int(s) for s in state.get("pipeline_steps", [])]
        self.pipeline_keys = list(state.get("pipeline_keys", []))


def batch_key(batches: Sequence[tuple[int, Any]]) -> str:
    """A content hash of the batches (failure path only): the same samples give the same key. It is made
    of the samples' own fingerprints (:func:`~lightning_nan.core.batches.fingerprints`; a batch that
    cannot be split counts as one sample).

    >>> import torch
    >>> batch_key([(0, (torch.ones(2), torch.tensor([1, 2])))]) == batch_key([(5, (torch.ones(2), torch.tensor([1, 2])))])
    True
    """
    keys = []
    for _, batch in batches:
        try:
            keys.extend(fingerprints(batch))
        except BatchSplitError:
            keys.append(sample_fingerprint(batch))
        keys.append("")  # where a batch ends
    return joined_key(keys)


def joined_key(keys: Iterable[str]) -> str:
    """One key for the keys of every rank's batches."""
    return hashlib.sha256("/".join(keys).encode()).hexdigest()[:16]
