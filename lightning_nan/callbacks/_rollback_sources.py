"""Where CheckpointRollback finds the state it restores: one interface, two sources.

:class:`RollbackSource` is what the callback asks: take a copy of the live state when one is due,
confirm it, and, on a rollback, find a state to :meth:`~RollbackSource.restore`. The memory source
(:mod:`~lightning_nan.callbacks._memory_source`) keeps snapshots in host memory; the checkpoint
source (:mod:`~lightning_nan.callbacks._checkpoint_source`) reads the saves Lightning's
``ModelCheckpoint`` wrote. Callbacks that derive from
:class:`~lightning_nan.core.events.RestoredOnRollback` have their state restored with the weights.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_nan.callbacks._types import TrainerLike, callbacks_of
from lightning_nan.core.events import RestoredOnRollback
from lightning_nan.core.rollback_triggers import SpikeTrigger


@dataclass
class Restored:
    """What a restoration hands back besides the states it wrote in place.

    Attributes:
        callbacks: the saved states of the :class:`RestoredOnRollback` callbacks, by ``state_key``.
        loss_statistics: the loss-spike window of the restored state (``None``: the source has none).
    """

    callbacks: dict[str, Any] = field(default_factory=dict)
    loss_statistics: dict[str, Any] | None = None


@dataclass
class Restoration:
    """A state found to restore.

    Attributes:
        step: the step it was saved at.
        description: what it is, in words (the snapshot, or the save's path).
        weights: writes the model's parameters and buffers back at once (inside an optimizer step).
        rest: writes the rest back (optimizers, schedulers, scaler), once the step's hooks have run.
    """

    step: int
    description: str
    weights: Callable[[], None]
    rest: Callable[[], Restored]


class RollbackSource(abc.ABC):
    """Keeps known-good states (or finds them) and restores one; the same answers on every rank."""

    #: The ``source`` argument of CheckpointRollback that picks it.
    name: ClassVar[str]

    def check(self, trainer: TrainerLike) -> None:  # noqa: B027 (optional hook)
        """Refuse, in ``setup``, a strategy this source cannot serve (``ValueError`` saying what to do)."""

    def reset(self) -> None:  # noqa: B027
        """Forget the per-fit state (a new fit starts)."""

    def start(self, trainer: TrainerLike, pl_module: Any, extra: Callable[[], dict[str, Any]]) -> None:  # noqa: B027
        """Training starts: the state it starts from may be taken (``extra()``: what else to keep with it)."""

    def take(self, trainer: TrainerLike, pl_module: Any, extra: Callable[[], dict[str, Any]]) -> bool:
        """After a batch: take a copy of the live state if one is due; whether one was taken."""
        return False

    def confirm_due(self, step: int) -> bool:
        """Whether a copy taken earlier is to be confirmed (or rejected) at ``step``."""
        return False

    def confirm(self, trainer: TrainerLike, pl_module: Any, last_incident_step: int | None, spikes: SpikeTrigger) -> None:  # noqa: B027
        """Declare the copy taken earlier good, unless an incident or a loss spike came near it."""

    @abc.abstractmethod
    def restore(self, trainer: TrainerLike, pl_module: Any, reason: str) -> Restoration | str:
        """The newest good state to restore, or why there is none (a message naming the fix)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to find the states again (merged into the callback's state)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: B027
        """Read :meth:`state_dict` back (``{}``: a fresh run, forget what an earlier one left)."""


def state_key(callback: Any) -> str:
    """The key of a callback's state in a Lightning checkpoint (Lightning's ``Callback.state_key``)."""
    return str(getattr(callback, "state_key", type(callback).__qualname__))


def callback_states(trainer: TrainerLike, exclude: Any) -> dict[str, Any]:
    """The states of the trainer's :class:`RestoredOnRollback` callbacks (but ``exclude``), by ``state_key``."""
    return {
        state_key(cb): cb.state_dict()
        for cb in callbacks_of(trainer)
        if isinstance(cb, RestoredOnRollback) and cb is not exclude
    }


def load_callback_states(trainer: TrainerLike, states: dict[str, Any], exclude: Any) -> None:
    """Hand each :class:`RestoredOnRollback` callback (but ``exclude``) its state in ``states``."""
    for cb in callbacks_of(trainer):
        if isinstance(cb, RestoredOnRollback) and cb is not exclude and state_key(cb) in states:
            cb.load_state_dict(states[state_key(cb)])


def not_finite_at_start(start: int) -> str:
    """Why nothing can be restored when the weights a fit started from were already not finite."""
    return (
        f"CheckpointRollback has nothing to go back to: the weights training started from (step {start}) "
        "were already not finite, before any update. "
        + ("Check the model's initialisation (and any weights loaded into it) before `fit`"
           if start == 0 else "The checkpoint resumed from holds non-finite weights: resume from an earlier one")
        + ", e.g. all(bool(p.isfinite().all()) for p in model.parameters())."
    )
