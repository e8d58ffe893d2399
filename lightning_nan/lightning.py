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

__all__ = [*sorted(CALLBACKS), "recommended", *_core_all]


def recommended(**overrides: Any) -> list[Any]:
    """:func:`lightning_nan.recommended`, for ``lightning.pytorch.Trainer``.

    >>> len(recommended(bisection=False))
    5
    """
    from lightning_nan.callbacks.presets import recommended_for

    return recommended_for(__name__, **overrides)


def __getattr__(name: str) -> Any:
    return bind(name, Callback, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(CALLBACKS))
