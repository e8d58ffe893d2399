"""CheckpointRollback's checkpoint source: the newest ModelCheckpoint save with finite weights.

No copies of its own: it restores the model, optimizer, scheduler, precision-plugin and opt-in
callback states of a save the Trainer's ``ModelCheckpoint`` callbacks wrote (found and checked by
:mod:`~lightning_nan.callbacks._checkpoint_saves`), the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_nan.callbacks._checkpoint_saves import (
    candidate_saves,
    finite_aside,
    param_group_settings,
    restore_param_group_settings,
)
from lightning_nan.callbacks._rank_agreement import agree_any
from lightning_nan.callbacks._rollback_sources import Restoration, Restored, RollbackSource, not_finite_at_start
from lightning_nan.callbacks._trainer import partitions_state
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.distributed import gather_objects
from lightning_nan.core.known_good import state_norm
from lightning_nan.core.rollback_triggers import NON_FINITE_WEIGHTS


class CheckpointSource(RollbackSource):
    """Restores from ``ModelCheckpoint``'s saves: a file, or a folder of shards (loaded in place, checked aside first)."""

    name = "checkpoint"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._start_step = 0  # the step this fit started from

    def start(self, trainer: TrainerLike, pl_module: Any, extra: Callable[[], dict[str, Any]]) -> None:
        self._start_step = trainer.global_step

    def restore(self, trainer: TrainerLike, pl_module: Any, reason: str) -> Restoration | str:
        found = self._find(trainer)
        if isinstance(found, str):
            step = trainer.global_step
            if reason == NON_FINITE_WEIGHTS and step == self._start_step:  # no update yet
                return not_finite_at_start(step)
            return found
        path, ckpt = found
        # Loaded in place, the optimizers' settings (lr, ...) are the save's now, before this step's
        # scheduler step moves them: put them back once the schedulers are restored, as a load would.
        settings = param_group_settings(trainer.optimizers) if partitions_state(trainer) else None

        def weights() -> None:
            trainer.strategy.load_model_state_dict(ckpt)

        def rest() -> Restored:
            _apply_checkpoint(trainer, ckpt)
            if settings is not None:
                restore_param_group_settings(trainer.optimizers, settings)
            return Restored(ckpt.get("callbacks", {}))

        return Restoration(int(ckpt.get("global_step", -1)), f"the ModelCheckpoint save {path}", weights, rest)

    def _find(self, trainer: TrainerLike) -> tuple[str, dict[str, Any]] | str:
        """The newest ModelCheckpoint save (by rank zero's reckoning) whose weights are finite, loaded.

        Where the strategy loads a save into the model and optimizers in place (ModelParallelStrategy,
        FSDP, DeepSpeed: see :mod:`~lightning_nan.callbacks._checkpoint_saves`), each candidate is
        read aside and checked first (all ranks agree), so a non-finite save never reaches the live
        state; one that cannot be read aside (a DeepSpeed folder, untested) is loaded, then checked.
        """
        chosen = gather_objects(candidate_saves(trainer))[0]  # rank zero's saves
        in_place, module = partitions_state(trainer), trainer.lightning_module
        for path in chosen:
            if not in_place:  # the states are handed back: check them before anything is loaded
                ckpt = trainer.strategy.load_checkpoint(path, weights_only=False)
                weights = [v for v in ckpt.get("state_dict", {}).values() if isinstance(v, torch.Tensor)]
                if weights and bool(torch.isfinite(state_norm(weights))):
                    return path, ckpt
                continue
            finite = finite_aside(trainer, path)
            if finite is not None and agree_any(trainer, not finite, module.device):
                continue
            ckpt = trainer.strategy.load_checkpoint(path, weights_only=False)
            if finite is None and agree_any(trainer, not bool(torch.isfinite(state_norm(module))), module.device):
                continue
            return path, ckpt
        return (
            "CheckpointRollback(source='checkpoint') found no ModelCheckpoint save with finite weights yet: "
            "save checkpoints more often (ModelCheckpoint(every_n_train_steps=...)) or use source='memory'."
        )


def _apply_checkpoint(trainer: TrainerLike, ckpt: dict[str, Any]) -> None:
    """Model, optimizer, scheduler and precision-plugin states of a Lightning checkpoint (callbacks: the caller)."""
    trainer.strategy.load_model_state_dict(ckpt)
    if "optimizer_states" in ckpt:
        trainer.strategy.load_optimizer_state_dict(ckpt)
    for config, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
        config.scheduler.load_state_dict(state)
    key = type(trainer.precision_plugin).__qualname__
    if key in ckpt:
        trainer.precision_plugin.load_state_dict(ckpt[key])
