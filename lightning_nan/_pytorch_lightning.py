"""The callbacks bound to ``pytorch_lightning.Callback`` (re-exported by ``lightning_nan``)."""

from pytorch_lightning import Callback

from lightning_nan.callbacks.gradient_clipping import GradientClippingBase
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks.norm_monitor import NormMonitorBase


class NaNGuard(NaNGuardBase, Callback):
    """:class:`~lightning_nan.callbacks.nan_guard.NaNGuardBase` for ``pytorch_lightning.Trainer``."""


class GradientClipping(GradientClippingBase, Callback):
    """:class:`~lightning_nan.callbacks.gradient_clipping.GradientClippingBase` for ``pytorch_lightning.Trainer``."""


class NormMonitor(NormMonitorBase, Callback):
    """:class:`~lightning_nan.callbacks.norm_monitor.NormMonitorBase` for ``pytorch_lightning.Trainer``."""
