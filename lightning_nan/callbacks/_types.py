"""The Trainer as the callbacks see it, typed once for both Lightning namespaces.

``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` are two classes with one interface; the
namespace-free ``...Base`` callbacks take either, so their hooks are typed with :class:`TrainerLike`
(a structural type both Trainers satisfy; mypy checks it where the written-out classes combine a Base
with each namespace's ``Callback``). ``callbacks_of`` reads the callbacks Lightning sets on a Trainer.

>>> import pytorch_lightning as pl
>>> trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
>>> [type(c).__name__ for c in callbacks_of(trainer)]
[]
"""

from __future__ import annotations

from typing import Any, Protocol


class TrainerLike(Protocol):
    """What the callbacks read of a Lightning ``Trainer`` (either namespace)."""

    @property
    def global_step(self) -> int: ...
    @property
    def current_epoch(self) -> int: ...
    @property
    def is_global_zero(self) -> bool: ...
    @property
    def world_size(self) -> int: ...
    @property
    def strategy(self) -> Any: ...
    @property
    def precision_plugin(self) -> Any: ...
    @property
    def lightning_module(self) -> Any: ...
    @property
    def optimizers(self) -> list[Any]: ...
    @property
    def lr_scheduler_configs(self) -> list[Any]: ...
    @property
    def loggers(self) -> list[Any]: ...
    @property
    def log_dir(self) -> str | None: ...
    @property
    def default_root_dir(self) -> str: ...
    @property
    def sanity_checking(self) -> bool: ...
    @property
    def training(self) -> bool: ...
    @property
    def checkpoint_callbacks(self) -> list[Any]: ...
    @property
    def gradient_clip_val(self) -> int | float | None: ...
    @property
    def train_dataloader(self) -> Any: ...
    @property
    def val_dataloaders(self) -> Any: ...
    @property
    def test_dataloaders(self) -> Any: ...


def log_every_n_steps(trainer: TrainerLike) -> int:
    """The trainer's ``log_every_n_steps`` (set by Lightning's logger connector, not declared on the class)."""
    return int(getattr(trainer, "log_every_n_steps", 50))


def callbacks_of(trainer: TrainerLike) -> list[Any]:
    """The trainer's callbacks (Lightning sets ``trainer.callbacks`` without declaring it on the class)."""
    return list(getattr(trainer, "callbacks", []))
