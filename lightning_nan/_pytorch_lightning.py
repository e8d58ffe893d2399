"""The six callbacks for ``pytorch_lightning.Trainer`` (re-exported by ``lightning_nan``).

Each class is written out against ``pytorch_lightning.Callback``, as Lightning writes its own
(``class SpikeDetection(FabricSpikeDetection, Callback)``): the logic lives in the namespace-free
``...Base`` classes of :mod:`lightning_nan.callbacks`; :mod:`lightning_nan.lightning` writes out the
same names for ``lightning.pytorch``.

>>> from lightning_nan._pytorch_lightning import NaNGuard
>>> import pytorch_lightning as pl
>>> issubclass(NaNGuard, pl.Callback), NaNGuard.__module__
(True, 'lightning_nan._pytorch_lightning')
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning import Callback

from lightning_nan.callbacks.batch_bisection import BatchBisectionBase
from lightning_nan.callbacks.checkpoint_rollback import CheckpointRollbackBase
from lightning_nan.callbacks.gradient_clipping import GradientClippingBase
from lightning_nan.callbacks.lr_backoff import LRBackoffBase
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks.norm_monitor import NormMonitorBase
from lightning_nan.callbacks.presets import recommended_for

__all__ = ["BatchBisection", "CheckpointRollback", "GradientClipping", "LRBackoff", "NaNGuard", "NormMonitor", "recommended"]


class NaNGuard(NaNGuardBase, Callback):
    __doc__ = NaNGuardBase.__doc__


class GradientClipping(GradientClippingBase, Callback):
    __doc__ = GradientClippingBase.__doc__


class BatchBisection(BatchBisectionBase, Callback):
    __doc__ = BatchBisectionBase.__doc__


class LRBackoff(LRBackoffBase, Callback):
    __doc__ = LRBackoffBase.__doc__


class CheckpointRollback(CheckpointRollbackBase, Callback):
    __doc__ = CheckpointRollbackBase.__doc__


class NormMonitor(NormMonitorBase, Callback):
    __doc__ = NormMonitorBase.__doc__


def recommended(**overrides: Any) -> list[Callback]:
    """:func:`lightning_nan.recommended`: the six callbacks for ``pytorch_lightning.Trainer``."""
    return recommended_for(__name__, **overrides)
