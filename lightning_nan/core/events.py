"""The incident event protocol: how the guard tells other components what happened.

The guard detects, agrees across ranks and skips; everything else (bisection, LR backoff, rollback,
diagnosis) reacts to its events. Any object with the method below takes part; in a Lightning
``Trainer`` every callback that has it is subscribed automatically. Each listener declares its
:class:`Phase` in a class attribute ``incident_phase`` (``Phase.ACTION`` when absent): listeners
that establish facts (``EVIDENCE``: BatchBisection names the samples and localizes) hear of an
incident first, then the guard diagnoses it, then those that act on it (``ACTION``: LR backoff,
rollback), each phase in the order of ``callbacks``.

``on_nan_incident(event) -> None``
    Called once per incident, on every rank (the decision is already agreed), after the step was
    skipped and before the incident is recorded. A listener may fill ``event.incident.samples``,
    ``.module``, ``.cause``, ``.advice`` or add to ``.detail``; what it writes is what gets recorded.

``on_nan_escalation(event) -> bool``
    Called when skipping cannot help: the weights are non-finite, or ``max_consecutive`` steps in a
    row were skipped. Handlers are asked in order until one returns ``True``, meaning "I restored a
    finite state, carry on" (a rollback, say). Every rank must return the same answer; the guard
    checks that they do. When no handler returns ``True`` the guard raises
    :class:`~lightning_nan.core.errors.NonFiniteError`.

``on_nan_rollback(event: RollbackEvent) -> bool``
    Called on every rank when a rollback restored an earlier state: the step it happened at, the step
    restored, why, and whether the learning rate is to blame (not after weight corruption). A
    listener that acted on it (LRBackoff lowers the factor) returns ``True``.

``on_nan_eval_incident(event) -> None``
    Called once per validation/test incident (kind ``val`` or ``test``), on every rank. No step was
    skipped and nothing trains: only fact finders take part (BatchBisection names the samples and may
    put the batch without them in ``event.extra["clean_batch"]``); LR backoff and rollback do not hear of it.

>>> from lightning_nan.core.incident import Incident
>>> class Printer:
...     def on_nan_incident(self, event):
...         print("saw", event.incident.kind, "at step", event.incident.step)
>>> event = IncidentEvent(Incident(step=4, kind="grad"))
>>> notify([Printer(), object()], event)
saw grad at step 4
>>> isinstance(Printer(), IncidentListener), isinstance(object(), IncidentListener)
(True, False)
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from lightning_nan.core.incident import Incident


class Phase(enum.IntEnum):
    """When a listener hears of an incident: facts first, then the diagnosis, then actions.

    >>> class Finder:
    ...     incident_phase = Phase.EVIDENCE
    >>> phase_of(Finder()), phase_of(object())
    (<Phase.EVIDENCE: 1>, <Phase.ACTION: 3>)
    """

    EVIDENCE = 1  # establishes facts about the incident (samples, localization) before it is diagnosed
    DIAGNOSIS = 2  # the guard's own diagnosis
    ACTION = 3  # acts on the diagnosed incident (LR backoff, rollback)


def phase_of(listener: Any) -> Phase:
    """The :class:`Phase` a listener declared (``incident_phase``), ``Phase.ACTION`` when it declared none."""
    phase = getattr(type(listener), "incident_phase", Phase.ACTION)
    return phase if isinstance(phase, Phase) else Phase.ACTION


@dataclass
class IncidentEvent:
    """What a listener gets: the incident and the live objects needed to act on it.

    Attributes:
        incident: the record; listeners may fill its fields.
        optimizer: the optimizer whose step was skipped (``None`` for checks outside a step).
        batches: ``(batch_idx, batch)`` for every batch that fed the skipped step (several with
            gradient accumulation), as the training step received them.
        grad_norms: per-parameter gradient 2-norms of the step (float32, on the device), in the order
            of ``param_names``; ``None`` when gradients were not checked.
        param_names: the names of the optimizer's parameters that had gradients.
        guard: the :class:`~lightning_nan.core.step_guard.StepGuard` that raised the event.
        extra: framework objects, e.g. ``{"trainer": trainer, "pl_module": module}`` under Lightning.
    """

    incident: Incident
    optimizer: Any = None
    batches: Sequence[tuple[int, Any]] = ()
    grad_norms: Tensor | None = None
    param_names: Sequence[str] = ()
    guard: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class IncidentListener(Protocol):
    """Reacts to every incident (bisection, backoff, diagnosis)."""

    def on_nan_incident(self, event: IncidentEvent) -> None: ...


@runtime_checkable
class EscalationHandler(Protocol):
    """Tries to recover when skipping cannot help (rollback); returns ``True`` if it did."""

    def on_nan_escalation(self, event: IncidentEvent) -> bool: ...


class Evidence(enum.Enum):
    """What a fact finder establishes about an incident (:class:`EvidenceSource`), so that the diagnosis
    never asks for a finder that is there.

    >>> class Finder:
    ...     incident_evidence = frozenset({Evidence.SAMPLES})
    >>> evidence_of([Finder(), object()]) == {Evidence.SAMPLES}
    True
    """

    SAMPLES = "samples"  # which samples make the step fail (bisection)
    LOCALIZATION = "localization"  # which module and operation made the first NaN/Inf


@runtime_checkable
class EvidenceSource(Protocol):
    """A listener that establishes facts about the coming incidents (BatchBisection)."""

    @property
    def incident_evidence(self) -> frozenset[Evidence]: ...


def evidence_of(listeners: Iterable[Any]) -> frozenset[Evidence]:
    """Everything the listeners that are :class:`EvidenceSource` establish about the next incident."""
    found: frozenset[Evidence] = frozenset()
    for listener in listeners:
        if isinstance(listener, EvidenceSource):
            found |= listener.incident_evidence
    return found


@runtime_checkable
class EvalIncidentListener(Protocol):
    """Establishes facts about a validation/test incident (bisection)."""

    def on_nan_eval_incident(self, event: IncidentEvent) -> None: ...


@dataclass
class RollbackEvent:
    """What a rollback announces: it happened at ``step``, restored ``restored_step``, for ``reason``;
    ``lr_to_blame`` is ``False`` when a lower learning rate would not help (weight corruption)."""

    step: int
    restored_step: int
    reason: str
    lr_to_blame: bool = True


class RestoredOnRollback(abc.ABC):
    """Base of a component whose state a rollback restores with the weights (GradientClipping's statistics).

    CheckpointRollback keeps :meth:`state_dict` in every snapshot and hands it back to
    :meth:`load_state_dict` when it restores that snapshot (from a ModelCheckpoint save: the state
    Lightning saved for the callback), so a blow-up's numbers do not outlive the rollback. Derive
    from it, or declare a class that already has both methods with ``@RestoredOnRollback.register``.

    >>> class Counter(RestoredOnRollback):
    ...     def __init__(self): self.seen = 0
    ...     def state_dict(self): return {"seen": self.seen}
    ...     def load_state_dict(self, state_dict): self.seen = state_dict["seen"]
    >>> @RestoredOnRollback.register
    ... class Stats:
    ...     def state_dict(self): return {}
    ...     def load_state_dict(self, state_dict): pass
    >>> isinstance(Counter(), RestoredOnRollback), isinstance(Stats(), RestoredOnRollback), isinstance(object(), RestoredOnRollback)
    (True, True, False)
    """

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The state to restore with the weights."""

    @abc.abstractmethod
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put back a state :meth:`state_dict` gave."""


@runtime_checkable
class RollbackListener(Protocol):
    """Hears of every rollback (LRBackoff backs off); returns ``True`` if it acted on it."""

    def on_nan_rollback(self, event: RollbackEvent) -> bool: ...


def announce_rollback(listeners: Iterable[Any], event: RollbackEvent) -> bool:
    """Tell every listener that has ``on_nan_rollback``; whether any acted on it.

    >>> class Backoff:
    ...     def on_nan_rollback(self, event):
    ...         return event.lr_to_blame
    >>> announce_rollback([Backoff(), object()], RollbackEvent(step=9, restored_step=5, reason="non-finite weights"))
    True
    """
    acted = False
    for listener in listeners:
        if isinstance(listener, RollbackListener):
            acted = bool(listener.on_nan_rollback(event)) or acted
    return acted


def notify_eval(listeners: Iterable[Any], event: IncidentEvent) -> None:
    """Call ``on_nan_eval_incident`` on every listener that has it, in order."""
    for listener in listeners:
        if isinstance(listener, EvalIncidentListener):
            listener.on_nan_eval_incident(event)


def notify(listeners: Iterable[Any], event: IncidentEvent) -> None:
    """Call ``on_nan_incident`` on every listener that has it, in order."""
    for listener in listeners:
        if isinstance(listener, IncidentListener):
            listener.on_nan_incident(event)


def escalate(handlers: Iterable[Any], event: IncidentEvent) -> str | None:
    """Ask handlers in order; return the class name of the first that recovered, else ``None``."""
    for handler in handlers:
        if isinstance(handler, EscalationHandler) and handler.on_nan_escalation(event):
            return type(handler).__name__
    return None
