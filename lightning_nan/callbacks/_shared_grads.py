"""One pass over the gradients per optimizer step, shared by NaNGuard, GradientClipping and NormMonitor.

Whichever of them reaches ``on_before_optimizer_step`` first makes the guard check the step (when a
guard is in the Trainer) and publishes the pre-clipping gradient norms; the others reuse them. So
the guard's skip decision comes first whatever the order of ``callbacks``, and each callback still
works alone (it computes the norms itself).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_nan.core.norms import tensor_norms


@dataclass
class StepGrads:
    """The gradients of the optimizer step being taken.

    Attributes:
        params: the optimizer's parameters that had gradients, in ``param_groups`` order.
        norms: their gradient 2-norms before any clipping (float32, on the device).
        skipped: the step will not update anything (the guard cleared the gradients, or GradScaler
            skips it): nothing to clip.
        norm_bound: the guard's host bound on their total 2-norm (``StepGuard.last_grad_norm_bound``),
            when a guard checked the step.
    """

    params: list[Tensor]
    norms: Tensor | None
    skipped: bool = False
    norm_bound: float | None = None


_STEPS: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], StepGrads]] = weakref.WeakKeyDictionary()


def step_key(trainer: Any, optimizer: Any, step: int | None = None) -> tuple[int, int]:
    return (id(optimizer), trainer.global_step if step is None else step)


def publish(trainer: Any, optimizer: Any, grads: StepGrads, step: int | None = None) -> None:
    _STEPS[trainer] = (step_key(trainer, optimizer, step), grads)


def step_grads(trainer: Any, pl_module: Any, optimizer: Any, step: int | None = None) -> StepGrads:
    """The current step's :class:`StepGrads`, computed at most once per step (``step``: the trainer's
    ``global_step``, when the caller has read it)."""
    key = step_key(trainer, optimizer, step)
    cached = _STEPS.get(trainer)
    if cached is not None and cached[0] == key:
        return cached[1]
    guard = next((cb for cb in trainer.callbacks if hasattr(cb, "ensure_checked")), None)
    if guard is not None:
        guard.ensure_checked(trainer, pl_module, optimizer)  # publishes
        return _STEPS[trainer][1]
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = StepGrads(params, tensor_norms([p.grad for p in params]) if params else None)
    publish(trainer, optimizer, grads, step)
    return grads
