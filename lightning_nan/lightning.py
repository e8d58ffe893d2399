"""lightning_nan for the unified ``lightning`` package: the same names, for ``lightning.pytorch.Trainer``.

>>> from lightning_nan.lightning import NaNGuard
>>> import lightning.pytorch as L
>>> isinstance(NaNGuard(), L.Callback)
True
"""

from typing import Any

from lightning.pytorch import Callback

from lightning_nan.callbacks import CALLBACKS, bind
from lightning_nan.core import *  # noqa: F403
from lightning_nan.core import __all__ as _core_all

__all__ = [*sorted(CALLBACKS), *_core_all]


def __getattr__(name: str) -> Any:
    return bind(name, Callback, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(CALLBACKS))
