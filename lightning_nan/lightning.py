"""lightning_nan for the unified ``lightning`` package: the same names, for ``lightning.pytorch.Trainer``.

>>> from lightning_nan.lightning import NaNGuard
>>> import lightning.pytorch as L
>>> isinstance(NaNGuard(), L.Callback)
True
"""

from lightning.pytorch import Callback

from lightning_nan.callbacks.gradient_clipping import GradientClippingBase
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks.norm_monitor import NormMonitorBase
from lightning_nan.core import *  # noqa: F403
from lightning_nan.core import __all__ as _core_all


class NaNGuard(NaNGuardBase, Callback):
    """:class:`~lightning_nan.callbacks.nan_guard.NaNGuardBase` for ``lightning.pytorch.Trainer``."""


class GradientClipping(GradientClippingBase, Callback):
    """:class:`~lightning_nan.callbacks.gradient_clipping.GradientClippingBase` for ``lightning.pytorch.Trainer``."""


class NormMonitor(NormMonitorBase, Callback):
    """:class:`~lightning_nan.callbacks.norm_monitor.NormMonitorBase` for ``lightning.pytorch.Trainer``."""


__all__ = ["GradientClipping", "NaNGuard", "NormMonitor", *_core_all]
