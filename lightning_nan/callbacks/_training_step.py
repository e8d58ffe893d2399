"""Re-evaluate a LightningModule's ``training_step`` in a sandbox: ``self.log`` muted, under manual
optimization the ``manual_backward`` losses recorded and the optimizers no-ops.

Used by BatchBisection to re-run sub-batches and by ``lightning-nan replay``.

>>> import torch, pytorch_lightning as pl
>>> class Model(pl.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.layer = torch.nn.Linear(2, 1)
...     def training_step(self, batch, batch_idx):
...         self.log("loss", 1.0)  # muted: no Trainer here
...         return self.layer(batch).sum() * 0 + 1
>>> training_step_loss(Model(), torch.ones(3, 2), 0, manual=False)
tensor(1., grad_fn=<AddBackward0>)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_nan.callbacks._types import TrainerLike

__all__ = ["loss_fn_factory", "patched", "training_step_loss"]


def loss_fn_factory(trainer: TrainerLike, pl_module: Any, manual: bool) -> Callable[[int], Callable[[Any], torch.Tensor | None]]:
    """``factory(batch_idx)(sub_batch) -> loss``: the module's ``training_step``, muted, under the trainer's precision."""
    n_optimizers = len(trainer.optimizers)
    context = trainer.precision_plugin.train_step_context

    def factory(batch_idx: int) -> Callable[[Any], torch.Tensor | None]:
        def loss_fn(sub: Any) -> torch.Tensor | None:
            with context():
                return training_step_loss(pl_module, sub, batch_idx, manual=manual, n_optimizers=n_optimizers)

        return loss_fn

    return factory


def training_step_loss(pl_module: Any, batch: Any, batch_idx: int, *, manual: bool, n_optimizers: int = 1) -> torch.Tensor | None:
    """Run ``training_step`` in a sandbox and return its loss (manual optimization: the sum of the
    losses given to ``manual_backward``), or ``None`` when it returned nothing."""
    with _sandbox(pl_module, manual, n_optimizers) as losses:
        out = pl_module.training_step(batch, batch_idx)
    if manual:
        if not losses:
            return None
        return torch.stack([loss.float().sum() for loss in losses]).sum()
    if isinstance(out, dict):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) else None


class _NoOpOptimizer:
    """Stands in for the optimizers ``training_step`` reaches under manual optimization."""

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextmanager
def _sandbox(pl_module: Any, manual: bool, n_optimizers: int) -> Iterator[list[torch.Tensor]]:
    """Mute ``self.log``; under manual optimization record ``manual_backward`` losses and no-op the optimizers."""
    losses: list[torch.Tensor] = []
    patches: dict[str, Any] = {
        "log": lambda *args, **kwargs: None,
        "log_dict": lambda *args, **kwargs: None,
    }
    if manual:
        stand_ins = [_NoOpOptimizer() for _ in range(max(n_optimizers, 1))]
        patches.update(
            manual_backward=lambda loss, *args, **kwargs: losses.append(loss),
            optimizers=lambda *args, **kwargs: stand_ins[0] if len(stand_ins) == 1 else stand_ins,
            lr_schedulers=lambda *args, **kwargs: None,
            toggle_optimizer=lambda *args, **kwargs: None,
            untoggle_optimizer=lambda *args, **kwargs: None,
        )
    with patched(pl_module, patches):
        yield losses


@contextmanager
def patched(pl_module: Any, patches: dict[str, Any]) -> Iterator[None]:
    """Shadow methods of this module instance (``self.log``, ...) with ``patches`` for the block, then put
    back exactly what the instance had (its class's methods are never touched)."""
    own = vars(pl_module)  # the instance's own attributes (a shadow set before, by the user or a test)
    saved = {name: own[name] for name in patches if name in own}
    try:
        for name, fn in patches.items():
            setattr(pl_module, name, fn)  # a plain function: nn.Module keeps it as an instance attribute
        yield
    finally:
        for name in patches:
            if name in saved:
                setattr(pl_module, name, saved[name])
            elif name in vars(pl_module):
                delattr(pl_module, name)  # the class's method shows through again
