"""lightning_nan for the unified ``lightning`` package: the same names, for ``lightning.pytorch.Trainer``.

>>> from lightning_nan.lightning import NaNGuard
>>> import lightning.pytorch as L
>>> isinstance(NaNGuard(), L.Callback)
True
"""

from lightning.pytorch import Callback

from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.core import *  # noqa: F403
from lightning_nan.core import __all__ as _core_all


class NaNGuard(NaNGuardBase, Callback):
    """:class:`~lightning_nan.callbacks.nan_guard.NaNGuardBase` for ``lightning.pytorch.Trainer``."""


__all__ = ["NaNGuard", *_core_all]
