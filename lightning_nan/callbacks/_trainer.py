"""What the callbacks need from a Trainer, read the same way from either Lightning namespace."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.distributed import all_reduce_max


def run_dir(trainer: TrainerLike) -> str:
    """The trainer's log dir, or ``default_root_dir`` without a logger (a collective under DDP)."""
    return trainer.log_dir or trainer.default_root_dir or os.getcwd()


def starts_afresh(trainer: TrainerLike) -> bool:
    """Whether this fit starts a new run: no step taken yet. Call it in ``setup``: a fit that resumes from a
    checkpoint starts afresh there too, and Lightning then hands each callback its saved state
    (``load_state_dict``, after ``setup``); a second ``fit`` of the same Trainer continues its run."""
    return getattr(trainer, "global_step", 0) == 0


def lightning_instance(obj: Any, package: str, *classes: str) -> bool:
    """Whether ``obj`` is an instance of one of Lightning's ``classes`` of ``package`` (``"strategies"``,
    ``"loggers"``) in either namespace, subclasses included.

    Only namespaces already imported are looked at (an object of one was made by its module, so nothing is
    imported here); a class that a Lightning version lacks matches nothing.

    >>> from pytorch_lightning.loggers import CSVLogger
    >>> lightning_instance(CSVLogger("."), "loggers", "TensorBoardLogger"), lightning_instance(CSVLogger("."), "loggers", "CSVLogger")
    (False, True)
    """
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        module = sys.modules.get(f"{namespace}.{package}")
        if module is None:
            continue
        kinds = tuple(cls for cls in (getattr(module, name, None) for name in classes) if isinstance(cls, type))
        if kinds and isinstance(obj, kinds):
            return True
    return False


def strategy_is(trainer: Any, *classes: str) -> bool:
    """Whether the trainer's strategy is an instance of one of Lightning's strategy ``classes`` (by name in
    ``pytorch_lightning.strategies`` or ``lightning.pytorch.strategies``: ``"FSDPStrategy"``), subclasses included.

    >>> from types import SimpleNamespace
    >>> from pytorch_lightning.strategies import DDPStrategy
    >>> trainer = SimpleNamespace(strategy=DDPStrategy())
    >>> strategy_is(trainer, "FSDPStrategy"), strategy_is(trainer, "ParallelStrategy"), strategy_is(trainer, "NoSuchStrategy")
    (False, True, False)
    """
    return lightning_instance(trainer.strategy, "strategies", *classes)


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every Lightning ``TensorBoardLogger`` (either namespace) among ``loggers``.

    >>> from pytorch_lightning.loggers import CSVLogger
    >>> tensorboard_writers([CSVLogger(".")])
    []
    """
    return [logger.experiment for logger in loggers if lightning_instance(logger, "loggers", "TensorBoardLogger")]


def partitions_state(trainer: TrainerLike) -> bool:
    """Whether the trainer's strategy may leave each rank only a part of the parameters, gradients or
    optimizer state, and loads checkpoints into the model and optimizers in place: FSDP,
    ``ModelParallelStrategy`` or DeepSpeed."""
    return strategy_is(trainer, "FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def shards_parameters(trainer: TrainerLike) -> bool:
    """Whether the trainer's strategy may split parameters across ranks: FSDP or ``ModelParallelStrategy``
    (DeepSpeed only at ZeRO stage 3: callers that care about its sharded optimizer state check it themselves)."""
    return strategy_is(trainer, "FSDPStrategy", "ModelParallelStrategy")


def grad_scaler(trainer: TrainerLike) -> Any:
    """The fp16 GradScaler of the trainer's precision plugin, or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def max_reducer(trainer: TrainerLike) -> Callable[[Tensor], Tensor]:
    """An element-wise max over ranks with one collective and no host sync."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return all_reduce_max
    if getattr(trainer, "world_size", 1) > 1:  # a strategy not built on torch.distributed
        return lambda t: trainer.strategy.reduce(t, reduce_op="max")
    return all_reduce_max  # a no-op in a single process


def log_metrics(trainer: TrainerLike, metrics: dict[str, float], step: int | None = None) -> None:
    """Send scalars to every logger of the trainer at ``step`` (default: the global step), rank zero only."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if step is None else step)

