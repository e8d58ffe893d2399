"""One pass over the gradients per optimizer step, shared by NaNGuard, GradientClipping and NormMonitor.

Each of them asks its peers in ``trainer.callbacks`` for the step's
:class:`~lightning_nan.core.step_grads.StepGrads` (:class:`~lightning_nan.core.step_grads.GradsSource`)
before computing them: a guard checks the step when first asked, so its decision to skip comes first
whatever the order of ``callbacks``; without a guard the first to compute the norms holds them for
the others. Each callback still works alone.
"""

from __future__ import annotations

from typing import Any

from lightning_nan.callbacks._types import TrainerLike, callbacks_of
from lightning_nan.core.norms import tensor_norms
from lightning_nan.core.step_grads import GradsSource, HeldGrads, StepGrads

__all__ = ["find_step_grads", "skip_step", "step_grads"]


def find_step_grads(trainer: TrainerLike, pl_module: Any, optimizer: Any) -> StepGrads | None:
    """The step's gradients as a peer has them (a guard checks the step now if it has not yet), or ``None``."""
    for callback in callbacks_of(trainer):
        if isinstance(callback, GradsSource):
            grads = callback.step_grads(trainer, pl_module, optimizer)
            if grads is not None:
                return grads
    return None


def step_grads(trainer: TrainerLike, pl_module: Any, optimizer: Any, held: HeldGrads) -> StepGrads:
    """The step's gradients: a peer's (:func:`find_step_grads`), else computed here and kept in ``held``."""
    grads = held.get(optimizer, trainer.global_step) or find_step_grads(trainer, pl_module, optimizer)
    if grads is not None:
        return grads
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return held.hold(optimizer, trainer.global_step, StepGrads(params, tensor_norms([p.grad for p in params]) if params else None))


def skip_step(trainer: TrainerLike, pl_module: Any, optimizer: Any) -> None:
    """Clear the step's gradients, so ``optimizer.step()`` changes nothing, and leave the callbacks that clip
    or monitor them nothing to see (the guard checks the step first, if it has not yet): a dropped update
    is neither clipped nor logged."""
    grads = find_step_grads(trainer, pl_module, optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    if grads is not None:
        grads.params, grads.norms, grads.skipped = [], None, True
