"""lightning_nan: keep Lightning training alive through NaN/Inf, find out why, show it in TensorBoard.

``from lightning_nan import NaNGuard`` gives callbacks for ``pytorch_lightning.Trainer``;
``from lightning_nan.lightning import NaNGuard`` the same for ``lightning.pytorch.Trainer``.
The top level holds the six callbacks, :func:`recommended`, :class:`Incident`, :class:`IncidentEvent`,
:class:`NonFiniteError` and :class:`NonFiniteWarning`; everything else is under
:mod:`lightning_nan.core` (plain PyTorch, for hand-written loops). Importing ``lightning_nan`` alone
does not import Lightning: the callbacks (``lightning_nan._pytorch_lightning``) load on first use.

>>> import lightning_nan
>>> lightning_nan.NaNGuard.__module__
'lightning_nan._pytorch_lightning'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_nan.core.errors import NonFiniteError, NonFiniteWarning
from lightning_nan.core.events import IncidentEvent
from lightning_nan.core.incident import Incident

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_nan._pytorch_lightning import (
        BatchBisection,
        CheckpointRollback,
        GradientClipping,
        LRBackoff,
        NaNGuard,
        NormMonitor,
    )

__version__ = "0.1.0.dev0"

_CALLBACKS = ("BatchBisection", "CheckpointRollback", "GradientClipping", "LRBackoff", "NaNGuard", "NormMonitor")

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


def recommended(**overrides: Any) -> list[pl.Callback]:
    """NaNGuard, GradientClipping, BatchBisection, LRBackoff, CheckpointRollback and NormMonitor, ready to use.

    ``Trainer(callbacks=recommended())``. Each keyword names a part (``guard``, ``clipping``,
    ``bisection``, ``backoff``, ``rollback``, ``norms``): a dict updates its arguments, ``False``
    leaves it out; defaults in :data:`lightning_nan.callbacks.presets.PARTS`.

    >>> [type(cb).__name__ for cb in recommended(norms=False, clipping={"method": "norm", "max_norm": 2.0})]
    ['NaNGuard', 'GradientClipping', 'BatchBisection', 'LRBackoff', 'CheckpointRollback']
    """
    from lightning_nan._pytorch_lightning import recommended

    return recommended(**overrides)


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:  # loaded on first use, so that `import lightning_nan` does not import Lightning
        from lightning_nan import _pytorch_lightning

        return getattr(_pytorch_lightning, name)
    raise AttributeError(f"module 'lightning_nan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CALLBACKS))
