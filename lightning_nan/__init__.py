"""lightning_nan: keep Lightning training alive through NaN/Inf, find out why, show it in TensorBoard.

``from lightning_nan import NaNGuard`` gives callbacks for ``pytorch_lightning.Trainer``;
``from lightning_nan.lightning import NaNGuard`` the same for ``lightning.pytorch.Trainer``.
``lightning_nan.core`` is plain PyTorch, for hand-written loops. Importing ``lightning_nan`` alone
does not import Lightning: the callbacks load on first use.

>>> import lightning_nan
>>> lightning_nan.NaNGuard.__module__
'lightning_nan._pytorch_lightning'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_nan.core import *  # noqa: F403
from lightning_nan.callbacks import CALLBACKS
from lightning_nan.core import __all__ as _core_all

if TYPE_CHECKING:
    from lightning_nan.callbacks.gradient_clipping import GradientClippingBase as GradientClipping
    from lightning_nan.callbacks.nan_guard import NaNGuardBase as NaNGuard
    from lightning_nan.callbacks.norm_monitor import NormMonitorBase as NormMonitor

__version__ = "0.1.0.dev0"

__all__ = [*sorted(CALLBACKS), "recommended", *_core_all]


def recommended(**overrides: Any) -> list[Any]:
    """NaNGuard, GradientClipping, BatchBisection, LRBackoff, CheckpointRollback and NormMonitor, ready to use.

    ``Trainer(callbacks=recommended())``. Each keyword names a part (``guard``, ``clipping``,
    ``bisection``, ``backoff``, ``rollback``, ``norms``): a dict updates its arguments, ``False``
    leaves it out; defaults in :data:`lightning_nan.callbacks.presets.PARTS`.

    >>> [type(cb).__name__ for cb in recommended(norms=False, clipping={"method": "norm", "max_norm": 2.0})]
    ['NaNGuard', 'GradientClipping', 'BatchBisection', 'LRBackoff', 'CheckpointRollback']
    """
    from lightning_nan.callbacks.presets import recommended_for

    return recommended_for("lightning_nan", **overrides)


def __getattr__(name: str) -> Any:
    if name in CALLBACKS:
        from lightning_nan import _pytorch_lightning

        return getattr(_pytorch_lightning, name)
    raise AttributeError(f"module 'lightning_nan' has no attribute {name!r}")
