"""The callbacks bound to ``pytorch_lightning.Callback`` (re-exported by ``lightning_nan``).

>>> from lightning_nan._pytorch_lightning import NaNGuard
>>> import pytorch_lightning as pl
>>> issubclass(NaNGuard, pl.Callback), NaNGuard.__module__
(True, 'lightning_nan._pytorch_lightning')
"""

from typing import Any

from pytorch_lightning import Callback

from lightning_nan.callbacks import CALLBACKS, bind

__all__ = sorted(CALLBACKS)


def __getattr__(name: str) -> Any:
    return bind(name, Callback, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(CALLBACKS))
