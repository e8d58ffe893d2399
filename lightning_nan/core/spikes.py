"""Loss spikes: one robust z-score, ``(loss - median) / (1.4826 * MAD)``, over a ring of recent losses.

Two callers use it, each at its own pace. :class:`LossSpikeDetector` scores host floats that the
caller read in one transfer (CheckpointRollback's spike trigger); :class:`SpikeTest` scores each
step's loss on its device (LRBackoff's), and its flag is read back a step later through a
:class:`DeferredFlag`, so healthy steps spend no host sync on it.

The median is that of the finite losses in the window (the mean of the two middle ones for an even
count), MAD the median of their absolute deviations from it; the spread is floored at ``1e-3 x
|median|`` (a wobble of 0.1% on a flat loss is not a spike) and at ``1e-12``.

>>> import torch
>>> ring = LossRing(8)
>>> for v in [1.0, 1.5, 0.5, 1.0, float("nan")]:  # a non-finite loss takes a slot but never counts
...     ring.push(torch.tensor(v))
>>> ring.tolist(), ring.filled
([1.0, 1.5, 0.5, 1.0], 5)
>>> round(float(robust_zscore(torch.tensor(2.0), ring.values)), 2)  # median 1, MAD 0.25
2.7
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.validate import integer, number

#: Robust z-score scale: ``1.4826 * MAD`` estimates the standard deviation of normal data.
MAD_TO_STD = 1.4826
#: Floor of the spread, relative to the median: on a flat loss (MAD ~ 0) a wobble of 0.1% is not a spike.
REL_SCALE_FLOOR = 1e-3
#: Absolute floor of the spread (a loss that sits at exactly 0).
ABS_SCALE_FLOOR = 1e-12


def nan_median(values: Tensor) -> Tensor:
    """The median of a 1-d tensor's non-NaN entries (mean of the two middle ones; NaN if none), without a host sync.

    >>> nan_median(torch.tensor([3.0, float("nan"), 1.0, 2.0, 10.0]))
    tensor(2.5000)
    """
    ordered = values.sort().values  # NaN sorts last
    n = (~values.isnan()).sum()
    middle = torch.stack([(n - 1).clamp_min(0) // 2, n // 2])
    return ordered.gather(0, middle).mean()


def robust_zscore(x: Tensor, window: Tensor) -> Tensor:
    """``(x - median) / max(1.4826 * MAD, 1e-3 * |median|, 1e-12)`` over the finite losses of ``window``.

    ``window`` holds NaN in its empty slots. Device ops only: no host sync.

    >>> round(float(robust_zscore(torch.tensor(5.0), torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95]))), 1)
    54.0
    """
    median = nan_median(window)
    mad = nan_median((window - median).abs())
    scale = torch.maximum(MAD_TO_STD * mad, REL_SCALE_FLOOR * median.abs()).clamp_min(ABS_SCALE_FLOOR)
    return (x - median) / scale


class LossRing:
    """The last ``size`` losses in a tensor (NaN: empty or non-finite); writing one needs no host sync.

    It moves to the device of the first loss pushed; ``dtype`` is that of the values kept.

    >>> ring = LossRing(3, dtype=torch.float64)
    >>> for v in [1.0, 2.0, 3.0, 4.0]:
    ...     ring.push(torch.tensor(v))
    >>> ring.tolist(), ring.count, ring.filled
    ([2.0, 3.0, 4.0], 4, 3)
    """

    def __init__(self, size: int, dtype: torch.dtype = torch.float32) -> None:
        self.size = size
        self.values: Tensor = torch.full((size,), math.nan, dtype=dtype)
        self.count = 0  # losses written since the last clear

    @property
    def filled(self) -> int:
        """Slots written (non-finite losses included), at most ``size``."""
        return min(self.count, self.size)

    def push(self, x: Tensor) -> None:
        """Write ``x`` (a scalar tensor) over the oldest slot; a non-finite ``x`` is written as NaN."""
        if self.values.device != x.device:
            self.values = self.values.to(x.device)
        self.values[self.count % self.size] = torch.where(torch.isfinite(x), x, math.nan)
        self.count += 1

    def clear(self) -> None:
        """Empty every slot."""
        self.values.fill_(math.nan)
        self.count = 0

    def tolist(self) -> list[float]:
        """The finite losses, oldest first (reads them to the host)."""
        if not self.count:
            return []
        start = self.count % self.size if self.count >= self.size else 0
        return finite_values(torch.roll(self.values, -start)[: self.filled])

    def load(self, values: Iterable[float]) -> None:
        """Start again from ``values`` (oldest first; only the last ``size`` are kept)."""
        kept = [float(v) for v in values][-self.size :]
        self.values = torch.full((self.size,), math.nan, dtype=self.values.dtype, device=self.values.device)
        if kept:
            self.values[: len(kept)] = torch.tensor(kept, dtype=self.values.dtype, device=self.values.device)
        self.count = len(kept)


def finite_values(x: Tensor) -> list[float]:
    """The finite entries of ``x`` as host floats, in order (reads ``x`` to the host).

    >>> finite_values(torch.tensor([1.0, float("nan"), float("inf"), 2.0]))
    [1.0, 2.0]
    """
    return [v for v in x.tolist() if math.isfinite(v)]


class DeferredFlag:
    """A device 0/1 flag read back later without stalling: a non-blocking copy to the host on CUDA.

    >>> DeferredFlag(torch.tensor([1.0])).get(), read_flag(None), read_flag(True)
    (True, False, True)
    """

    def __init__(self, flag: Tensor) -> None:
        self.event: Any = None
        if flag.device.type == "cuda":
            self.value = flag.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = flag

    def get(self) -> bool:
        """Whether the flag is set (waits for the copy, recorded a step ago: long done)."""
        if self.event is not None:
            self.event.synchronize()
        return bool(self.value.item() > 0)


def read_flag(flag: DeferredFlag | bool | None) -> bool:
    """A :class:`DeferredFlag`'s value, or a plain (restored) bool; ``None`` is unset."""
    if isinstance(flag, DeferredFlag):
        return flag.get()
    return bool(flag)


class SpikeTest:
    """One loss per step tested on its device, sync-free: the agreed flag is read back later (LRBackoff's).

    Each loss is tested against the ring *before* it once ``min_history`` slots are written, then
    joins the ring (a non-finite one takes a slot as NaN and is never a spike).

    >>> spikes = SpikeTest(window=8, min_history=4)
    >>> flags = [spikes.test(torch.tensor(v), 6.0, reduce=lambda t: t) for v in [1.0, 1.1, 0.9, 1.0, 9.0]]
    >>> [None if f is None else f.get() for f in flags]
    [None, None, None, None, True]
    """

    def __init__(self, window: int, min_history: int) -> None:
        self.ring = LossRing(window)
        self.min_history = min_history
        self.seen = 0  # losses tested or put into the ring so far (a counter, for the record)

    @torch.no_grad()
    def test(self, x: Tensor, threshold: float, reduce: Callable[[Tensor], Tensor]) -> DeferredFlag | None:
        """Whether ``x`` is above ``threshold`` (a flag reduced by ``reduce``, max over ranks); ``None`` before
        ``min_history`` losses. ``x`` then joins the ring."""
        flag = None
        if self.ring.filled >= self.min_history:
            spike = torch.isfinite(x) & (robust_zscore(x, self.ring.values) > threshold)
            flag = DeferredFlag(reduce(spike.float().reshape(1)))
        self.ring.push(x)
        self.seen += 1
        return flag


class LossSpikeDetector:
    """Robust z-scores of new losses against a running window, on host floats (see the module's formula).

    The caller reads a batch of losses at once (one transfer) and passes them to :meth:`update`. Each
    value is scored against the window *before* it, then joins the window; non-finite values are
    neither scored nor kept. Scores are ``nan`` until ``min_history`` values are in. Computed in float64.

    Args:
        window: how many recent losses make the reference.
        threshold: a robust z above it is a spike (:meth:`is_spike`).
        min_history: values needed before scoring (default ``max(5, window // 5)``).

    >>> det = LossSpikeDetector(window=20, threshold=6.0)
    >>> z = det.update([1.0, 1.1, 0.9, 1.05, 0.95] * 2 + [5.0])
    >>> [det.is_spike(v) for v in z[-2:]], round(z[-1], 1)
    ([False, True], 54.0)
    """

    def __init__(self, window: int = 100, threshold: float = 6.0, min_history: int | None = None) -> None:
        self.window = integer("window", window, low=5)
        self.threshold = number("threshold", threshold, low=0, low_open=True, infinite=True)
        min_history = max(5, window // 5) if min_history is None else min_history
        self.min_history = integer("min_history", min_history, low=1, high=window, hint="at most `window`")
        self._ring = LossRing(window, dtype=torch.float64)

    @property
    def history(self) -> list[float]:
        """The losses of the window, oldest first."""
        return self._ring.tolist()

    def zscore(self, value: float) -> float:
        """The robust z of ``value`` against the current window (``nan`` with too little history)."""
        if self._ring.filled < self.min_history or not math.isfinite(value):
            return math.nan
        return float(robust_zscore(torch.tensor(value, dtype=torch.float64), self._ring.values))

    def update(self, values: Iterable[float]) -> list[float]:
        """Score each value in turn, then add it to the window; return the scores."""
        out = []
        for v in values:
            v = float(v)
            out.append(self.zscore(v))
            if math.isfinite(v):
                self._ring.push(torch.tensor(v, dtype=torch.float64))
        return out

    def is_spike(self, z: float) -> bool:
        """Whether a score from :meth:`update` or :meth:`zscore` is above ``threshold``."""
        return math.isfinite(z) and z > self.threshold

    def state_dict(self) -> dict[str, Any]:
        """The window, as host floats."""
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (an empty window when ``history`` is missing)."""
        self._ring.load(state.get("history", []))
