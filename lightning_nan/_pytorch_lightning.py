"""The callbacks bound to ``pytorch_lightning.Callback`` (re-exported by ``lightning_nan``)."""

from pytorch_lightning import Callback

from lightning_nan.callbacks.nan_guard import NaNGuardBase


class NaNGuard(NaNGuardBase, Callback):
    """:class:`~lightning_nan.callbacks.nan_guard.NaNGuardBase` for ``pytorch_lightning.Trainer``."""
