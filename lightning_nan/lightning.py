"""The six callbacks for ``lightning.pytorch.Trainer`` (the unified ``lightning`` package).

Each class is written out against ``lightning.pytorch.Callback``, as Lightning writes its own
(``class SpikeDetection(FabricSpikeDetection, Callback)``): the logic lives in the namespace-free
``...Base`` classes of :mod:`lightning_nan.callbacks`; ``lightning_nan`` has the same names for
``pytorch_lightning``. Everything else is under :mod:`lightning_nan.core`.

>>> from lightning_nan.lightning import NaNGuard, recommended
>>> import lightning.pytorch as L
>>> issubclass(NaNGuard, L.Callback), NaNGuard.__module__, len(recommended(bisection=False))
(True, 'lightning_nan.lightning', 5)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from lightning_nan.callbacks.batch_bisection import BatchBisectionBase
from lightning_nan.callbacks.checkpoint_rollback import CheckpointRollbackBase
from lightning_nan.callbacks.gradient_clipping import GradientClippingBase
from lightning_nan.callbacks.lr_backoff import LRBackoffBase
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks.norm_monitor import NormMonitorBase
from lightning_nan.callbacks.presets import recommended_for
from lightning_nan.core.errors import NonFiniteError, NonFiniteWarning
from lightning_nan.core.events import IncidentEvent
from lightning_nan.core.incident import Incident

__all__ = [
    "BatchBisection",
    "CheckpointRollback",
    "GradientClipping",
    "Incident",
    "IncidentEvent",
    "LRBackoff",
    "NaNGuard",
    "NonFiniteError",
    "NonFiniteWarning",
    "NormMonitor",
    "recommended",
]


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
    """:func:`lightning_nan.recommended`: the six callbacks for ``lightning.pytorch.Trainer``."""
    return recommended_for(__name__, **overrides)
