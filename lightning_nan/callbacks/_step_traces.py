"""Take a skipped step's values back out of Lightning's epoch aggregates and the module's torchmetrics.

``self.log(..., on_epoch=True)`` accumulates into Lightning's result collection (one entry per
logged key: a running ``value`` and, for means, ``cumulated_batch_size``); ``torchmetrics`` objects
accumulate in their own states. When a step is skipped, both must look as if its batches had never
been seen, so that the epoch's values, and EarlyStopping, ModelCheckpoint, ReduceLROnPlateau read
from them, are those of the run without those batches.

Lightning has no public access to the result collection: ``trainer._results`` (the active loop's
collection) is the one place it lives, read here through :func:`result_collection` only, guarded,
and left alone (with one warning) if a Lightning version no longer has it. Its entries rebind
``value`` and ``cumulated_batch_size`` on every update (``value = value + v * batch_size``), never
change them in place, so a save is a reference per entry: no copy on a healthy step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.metric_states import MetricStates, find_metrics

_warned = False


def result_collection(trainer: Any) -> Any:  # Any: it reads a private attribute no Protocol declares
    """The active loop's collection of ``self.log`` values (private in Lightning: a dict with attributes), or ``None``."""
    global _warned
    try:
        results = trainer._results
    except Exception:  # noqa: BLE001 - outside a loop Lightning raises RuntimeError
        return None
    if isinstance(results, dict) and all(hasattr(e, "meta") and hasattr(e, "has_reset") for e in results.values()):
        return results
    if results is not None and not _warned:
        _warned = True
        warnings.warn(
            "lightning_nan: this Lightning version keeps logged values where NaNGuard cannot find them; "
            "the epoch aggregates of `self.log` keep the values of skipped steps.",
            stacklevel=2,
        )
    return None


@dataclass
class _Saved:
    entry: Any
    value: Any
    count: Any  # cumulated_batch_size, for means
    has_reset: bool
    update_count: int


class LoggedValues:
    """The epoch accumulators of ``self.log`` values, as of the last :meth:`save`."""

    def __init__(self) -> None:
        self._saved: dict[str, _Saved] = {}
        self._pending: list[Any] = []  # entries to hide from the epoch once their step values are logged

    def save(self, results: dict[str, Any] | None) -> None:
        self.flush()
        self._saved = {} if results is None else {
            key: _Saved(e, e.value, getattr(e, "cumulated_batch_size", None), e.has_reset, e._update_count)
            for key, e in results.items()
        }

    def updated(self, key: str, entry: Any) -> bool:
        """Whether ``entry`` was logged since :meth:`save`."""
        saved = self._saved.get(key)
        return saved is None or saved.entry is not entry or entry._update_count != saved.update_count

    def restore(self, results: dict[str, Any] | None) -> list[str]:
        """Put every entry back; return the names of those whose epoch value changed."""
        names = []
        for key, entry in (results or {}).items():
            saved = self._saved.get(key)
            if entry.has_reset:  # not logged since its last reset
                continue
            if saved is not None and saved.entry is entry and not saved.has_reset:
                if entry.is_tensor and entry.value is not saved.value:
                    entry.value = saved.value
                    if saved.count is not None:
                        entry.cumulated_batch_size = saved.count
                    entry._update_count, entry._computed = saved.update_count, None
                    names.append(entry.meta.name)
                continue
            # The skipped step gave this entry its first value of the epoch: back to its defaults, and
            # out of the epoch's metrics (as if never logged) once this step's own values have gone out.
            if entry.is_tensor:
                cache = entry._forward_cache
                entry.reset()
                entry._forward_cache = cache
            entry.has_reset = False
            self._pending.append(entry)
            names.append(entry.meta.name)
        return names

    def flush(self) -> None:
        """Hide the entries only the skipped step had logged (after that step's logging)."""
        for entry in self._pending:
            entry.has_reset = True
        self._pending = []


class StepTraces:
    """What a window of micro-batches (one optimizer step) left in logged values and torchmetrics.

    :meth:`save` at the window's first batch, :meth:`mark_skipped` when its step is skipped,
    :meth:`batch_end` at the end of each batch: after a skip it puts everything back.
    """

    def __init__(self) -> None:
        self.metrics = MetricStates([])
        self.logged = LoggedValues()
        self.skipped = False
        self.cleaned: list[str] = []

    def attach(self, pl_module: Any) -> None:
        self.metrics = MetricStates(find_metrics(pl_module))
        self.logged = LoggedValues()
        self.skipped = False

    def save(self, trainer: TrainerLike) -> None:
        self.logged.save(result_collection(trainer))
        self.metrics.save()
        self.skipped = False

    def mark_skipped(self) -> None:
        self.skipped = True

    def batch_end(self, trainer: TrainerLike) -> bool:
        """After a skipped step, restore what was saved; return whether it did."""
        if not self.skipped:
            return False
        self.cleaned = self.logged.restore(result_collection(trainer))
        self.metrics.restore()
        self.skipped = False
        return True

    def epoch_end(self) -> None:
        self.logged.flush()
