"""Refuse a callback of one Lightning namespace in the other namespace's Trainer.

``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` are different classes; Lightning
happens to run either kind in either Trainer, but its ``isinstance`` checks (and ours) do not see a
callback of the other namespace, so a mixed set-up fails in ways far from its cause. Each callback's
``setup`` calls :func:`check_namespace` first.

>>> class Callback: ...  # stands for a namespace's Callback: only its module is read
>>> Callback.__module__ = "pytorch_lightning.callbacks.callback"
>>> class Trainer: ...
>>> Trainer.__module__ = "lightning.pytorch.trainer.trainer"
>>> class NaNGuard(Callback): ...
>>> check_namespace(NaNGuard(), Trainer())
Traceback (most recent call last):
TypeError: NaNGuard is a pytorch_lightning callback (`from lightning_nan import NaNGuard`), but the Trainer is a lightning.pytorch.Trainer: import it with `from lightning_nan.lightning import NaNGuard`
"""

from __future__ import annotations

from typing import Any

from lightning_nan.callbacks._types import TrainerLike

#: Root module of a Lightning namespace -> (its name in messages, the lightning_nan module serving it).
_NAMESPACES = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_nan"),
    "lightning": ("lightning.pytorch", "lightning_nan.lightning"),
}


def _namespace_of(cls: type) -> str | None:
    root = cls.__module__.split(".")[0]
    return root if root in _NAMESPACES else None


def check_namespace(callback: Any, trainer: TrainerLike) -> None:
    """Raise ``TypeError`` naming the right import if ``callback`` and ``trainer`` are from different namespaces.

    A callback without a Lightning ``Callback`` base (a namespace-free ``...Base``) or a trainer
    outside both namespaces is left alone.
    """
    ours = next((ns for cls in type(callback).__mro__ if cls.__name__ == "Callback" and (ns := _namespace_of(cls))), None)
    theirs = _namespace_of(type(trainer))
    if ours is None or theirs is None or ours == theirs:
        return
    name = type(callback).__name__
    (ours_name, ours_module), (theirs_name, theirs_module) = _NAMESPACES[ours], _NAMESPACES[theirs]
    raise TypeError(
        f"{name} is a {ours_name} callback (`from {ours_module} import {name}`), but the Trainer is a "
        f"{theirs_name}.Trainer: import it with `from {theirs_module} import {name}`"
    )
