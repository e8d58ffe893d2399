"""The gradients of one optimizer step: one pass over them, shared by whoever reads them.

The guard checks a step with one fused norm pass over its gradients; clipping and monitoring reuse
those norms instead of a second pass. Whoever computed them holds them (:class:`HeldGrads`) and hands
them out through one typed call (:class:`GradsSource`): the guard checks the step when first asked,
so its decision to skip comes first whatever the order of the callbacks.

>>> import torch
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
>>> held = HeldGrads()
>>> grads = held.hold(opt, 3, StepGrads([], None))
>>> held.get(opt, 3) is grads, held.get(opt, 4)
(True, None)
"""

from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class StepGrads:
    """The gradients of the optimizer step being taken.

    Attributes:
        params: the optimizer's parameters that had gradients, in ``param_groups`` order.
        norms: their gradient 2-norms before any clipping (float32, on the device).
        skipped: the step will not update anything (the guard or a rollback cleared the gradients, or
            GradScaler skips it): nothing to clip or monitor.
        norm_bound: a host bound on their total 2-norm, the same on every rank
            (``StepGuard.last_grad_norm_bound``), when a guard checked the step.
    """

    params: list[Tensor]
    norms: Tensor | None
    skipped: bool = False
    norm_bound: float | None = None


class HeldGrads:
    """The :class:`StepGrads` of one optimizer step, kept by the callback that computed them.

    Keyed by the optimizer (a weak reference: a new optimizer never finds an old one's gradients) and
    the step. Not pickled: a copy of the callback starts empty.
    """

    def __init__(self) -> None:
        self._key: tuple[weakref.ref[Any], int] | None = None
        self._grads: StepGrads | None = None

    def get(self, optimizer: Any, step: int) -> StepGrads | None:
        """The held gradients if they are ``optimizer``'s at ``step``, else ``None``."""
        if self._key is None or self._key[1] != step or self._key[0]() is not optimizer:
            return None
        return self._grads

    def hold(self, optimizer: Any, step: int, grads: StepGrads) -> StepGrads:
        """Keep ``grads`` as ``optimizer``'s at ``step`` (replacing what was held); return them."""
        self._key, self._grads = (weakref.ref(optimizer), step), grads
        return grads

    def clear(self) -> None:
        """Forget what is held (a new run)."""
        self._key = self._grads = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._key = self._grads = None


class GradsSource(abc.ABC):
    """A callback that may have the current step's :class:`StepGrads`.

    The guard returns them always (it checks the step first if it has not yet); a callback that
    computed them itself returns them; any other returns ``None``. Any class with a ``step_grads``
    method counts, without deriving from this one (as with ``collections.abc``): the check is made
    once per class and cached, so asking the callbacks on every step costs next to nothing.

    >>> class Held:
    ...     def step_grads(self, trainer, pl_module, optimizer): return None
    >>> isinstance(Held(), GradsSource), isinstance(object(), GradsSource)
    (True, False)
    """

    @abc.abstractmethod
    def step_grads(self, trainer: Any, pl_module: Any, optimizer: Any) -> StepGrads | None:
        """The step's gradients, if this callback has them."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool | Any:
        if cls is GradsSource:
            return any(callable(vars(k).get("step_grads")) for k in other.__mro__) or NotImplemented
        return NotImplemented
