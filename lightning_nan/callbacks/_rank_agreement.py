"""Cross-rank agreement for CheckpointRollback: every rank takes the same decision on the same state.

Each helper is one collective (an element-wise max) under DDP and a no-op in a single process.

>>> import torch
>>> from types import SimpleNamespace
>>> trainer = SimpleNamespace(world_size=1)
>>> distributed(trainer), agree_any(trainer, True, torch.device("cpu"))
(False, True)
>>> agree_step(trainer, 20, torch.device("cpu"))  # one rank: nothing to compare
"""

from __future__ import annotations

import torch

from lightning_nan.callbacks._trainer import max_reducer
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.distributed import world


def distributed(trainer: TrainerLike) -> bool:
    """Whether more than one rank trains."""
    return world()[1] > 1 or getattr(trainer, "world_size", 1) > 1


def agree_any(trainer: TrainerLike, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (the same answer on every rank)."""
    if not distributed(trainer):
        return flag
    return bool(max_reducer(trainer)(torch.tensor([float(flag)], device=device)).item() > 0)


def agree_step(trainer: TrainerLike, step: int, device: torch.device) -> None:
    """Raise ``RuntimeError`` unless every rank is about to restore the snapshot of the same ``step``."""
    if not distributed(trainer):
        return
    low, high = max_reducer(trainer)(torch.tensor([-float(step), float(step)], device=device)).tolist()
    if -low != high:
        raise RuntimeError(
            f"CheckpointRollback: the ranks hold different snapshots (steps {-low:g} to {high:g}); every rank must "
            "take and confirm snapshots at the same steps. Report this with the run's settings."
        )
