"""Adaptive clipping thresholds from the history of gradient norms: AutoClip and ZClip.

Each rule works on the device: its statistics are tensors, updated with ``torch.where``, so a step
whose gradient norm is NaN/Inf leaves them untouched, with no host synchronisation.

>>> import torch
>>> rule = AutoClip(percentile=50, window=3)
>>> [round(float(rule.threshold(torch.tensor(n))), 2) for n in (1.0, 3.0, float("nan"), 2.0)]
[1.0, 2.0, 2.0, 2.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.validate import integer, number

#: ZClip's cap on every step's norm unless told otherwise: the reference ``zclip`` package's
#: ``max_grad_norm=1.0``, which is what lets a model that blows up in its first (warm-up) steps survive.
ZCLIP_MAX_NORM = 1.0


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): the threshold is the ``percentile``-th percentile of the
    total gradient norms seen so far (the current one included), over the last ``window`` finite ones.

    The history is a device tensor; non-finite norms never enter it.
    """

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        self.percentile = number("percentile", percentile, low=0, high=100, low_open=True)
        self.window = integer("window", window, low=1)
        self.history: Tensor | None = None

    def threshold(self, total_norm: Tensor) -> Tensor:
        """Record ``total_norm`` (if finite) and return the current threshold (NaN: nothing seen yet)."""
        norm = total_norm.detach().float().reshape(1)
        if self.history is None:
            self.history = torch.full((self.window,), math.nan, device=norm.device)
        self.history = self.history.to(norm.device)  # e.g. loaded from a checkpoint on the CPU
        shifted = torch.cat([self.history[1:], norm])
        self.history = torch.where(torch.isfinite(norm), shifted, self.history)
        return torch.nanquantile(self.history, self.percentile / 100.0)

    def reset(self) -> None:
        """Forget the norms seen (a new run)."""
        self.history = None

    def state_dict(self) -> dict[str, Any]:
        """The recorded norms, oldest first (empty slots are not stored)."""
        if self.history is None:
            return {"history": []}
        return {"history": self.history[torch.isfinite(self.history)].tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history")
        if history:
            values = torch.tensor(history, dtype=torch.float32)[-self.window :]
            self.history = torch.cat([torch.full((self.window - len(values),), math.nan), values])


class ZClip:
    """Z-score clipping (Kumar et al. 2025) over an EMA of the gradient norm's mean and variance.

    The first ``warmup`` finite norms initialise the mean and variance (clipping only to
    ``max_norm`` meanwhile). Then a norm whose z-score exceeds ``z_thresh`` is clipped to
    ``mean + z_thresh * std / (z / z_thresh)`` (the paper's adaptive scaling), the EMA is updated
    with the clipped value, and ``max_norm`` (1.0 by default, as the reference's ``max_grad_norm``;
    ``None``: no cap) caps every threshold. Matches the reference ``zclip`` package (mode "zscore",
    clip_option "adaptive_scaling") for the same arguments, without its host syncs.

    >>> rule = ZClip(warmup=2)
    >>> [float(rule.threshold(torch.tensor(n))) for n in (0.5, 40.0)]  # warm-up: only the cap applies
    [0.5, 1.0]
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        max_norm: float | None = ZCLIP_MAX_NORM,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = number("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
        self.z_thresh = number("z_thresh", z_thresh, low=0, low_open=True)
        self.warmup = integer("warmup", warmup, low=1)
        self.max_norm = number("max_norm", max_norm, low=0, low_open=True, optional=True, infinite=True)
        self.eps = number("eps", eps, low=0, low_open=True)
        self.buffer: Tensor | None = None  # warm-up norms, NaN where not yet seen
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.seen: Tensor | None = None  # finite norms seen (a device counter)

    def reset(self) -> None:
        """Forget the statistics (a new run): the next norms warm up again."""
        self.buffer = self.mean = self.var = self.seen = None

    def _init(self, device: torch.device) -> None:
        self.buffer = torch.full((self.warmup,), math.nan, device=device)
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def threshold(self, total_norm: Tensor) -> Tensor:
        """Update the statistics with ``total_norm`` (if finite) and return the norm to clip to.

        Returns ``total_norm`` itself (no clipping) when it is not a spike and no cap applies.
        """
        g = total_norm.detach().float().reshape(())
        if self.buffer is None:
            self._init(g.device)
        assert self.buffer is not None and self.mean is not None and self.var is not None and self.seen is not None
        if self.buffer.device != g.device:  # e.g. loaded from a checkpoint on the CPU
            self.buffer, self.mean, self.var, self.seen = (t.to(g.device) for t in (self.buffer, self.mean, self.var, self.seen))
        finite = torch.isfinite(g)
        warm = self.seen < self.warmup
        # warm-up: collect; the norm that fills the buffer initialises mean and (population) variance
        slot = torch.arange(self.warmup, device=g.device) == self.seen.long()
        buffer = torch.where(slot & finite & warm, g, self.buffer)
        filled = warm & finite & (self.seen + 1 >= self.warmup)
        init_mean = buffer.nanmean()
        init_var = ((buffer - init_mean) ** 2).nanmean()
        # after warm-up: z-score against the EMA
        std = self.var.sqrt()
        z = (g - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        adaptive = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        clip_to = torch.where(spike & ~warm, adaptive, g)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * clip_to
        new_var = self.alpha * self.var + (1 - self.alpha) * (clip_to - new_mean) ** 2
        update = finite & ~warm
        self.mean = torch.where(filled, init_mean, torch.where(update, new_mean, self.mean))
        self.var = torch.where(filled, init_var, torch.where(update, new_var, self.var))
        self.buffer = buffer
        self.seen = self.seen + finite.float()
        if self.max_norm is not None:
            clip_to = torch.clamp(clip_to, max=self.max_norm)
        return clip_to

    def state_dict(self) -> dict[str, Any]:
        """Mean, variance, count and the warm-up norms recorded so far (no NaN placeholders)."""
        if self.buffer is None:
            return {}
        state = {k: getattr(self, k).item() for k in ("mean", "var", "seen")}
        state["buffer"] = self.buffer[torch.isfinite(self.buffer)].tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seen" in state:
            self._init(torch.device("cpu"))
            recorded = torch.tensor(state.get("buffer", []), dtype=torch.float32)[: self.warmup]
            self.buffer = torch.cat([recorded, torch.full((self.warmup - len(recorded),), math.nan)])
            for k in ("mean", "var", "seen"):
                setattr(self, k, torch.tensor(float(state[k])))
