"""Reading a loss the way every component needs it: one float32 scalar, unscaled, without a host sync.

The guard, the LR backoff's spike test and the rollback's spike trigger all read the loss handed to
``on_before_backward``; they read it here, the same way.

>>> import torch
>>> scalar_loss(torch.tensor([1.0, 2.0], dtype=torch.float16))
tensor(3.)
>>> class Scaler:  # a stand-in for torch.amp.GradScaler(init_scale=1024.0)
...     def is_enabled(self): return True
...     def get_scale(self): return 1024.0
>>> loss_scale(Scaler()), loss_scale(None)
(tensor(1024.), None)
>>> unscaled_loss(torch.tensor(2048.0), Scaler())
tensor(2.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def scalar_loss(loss: float | Tensor) -> Tensor:
    """A loss (a tensor of any shape, summed, or a number) as a float32 scalar tensor, detached.

    It is non-finite exactly when ``loss`` has a NaN/Inf (or sums past float32)."""
    x = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
    return x.float() if x.dim() == 0 else x.float().sum()


def loss_scale(scaler: Any) -> Tensor | None:
    """The fp16 GradScaler's current scale as a scalar tensor (``None`` without an enabled scaler).

    The scale stays on the device where the scaler keeps it (no host sync); a scaler that only offers
    ``get_scale()`` gives it as a CPU tensor."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)  # the live tensor: get_scale() would sync the host
    if isinstance(scale, Tensor):
        return scale.reshape(())
    return torch.tensor(float(scaler.get_scale()))


def unscaled_loss(loss: float | Tensor, scaler: Any = None) -> Tensor:
    """The loss as the user computed it: fp16 AMP hands ``on_before_backward`` the scaled loss."""
    x = scalar_loss(loss)
    scale = loss_scale(scaler)
    return x if scale is None else x / scale.to(x.device)
