"""See divergence when it happens: a loss or gradient norm that grew by orders of magnitude.

:class:`GrowthDetector` watches one positive quantity per step (the loss, the gradient norm), on
host values the guard reads anyway, so it costs no device work. Divergence is a *level* (the median of the last :data:`LEVEL` values)
:data:`GROWTH` times the reference: the larger of the median of the values before them in the
``window`` and a tenth of the run's starting level (the median of its first ``min_history``
values). The growth need not be monotonic, and it is seen a few steps into it. A single hard batch,
or a run that spikes that high now and then, is not divergence: a saturated classifier's loss may
jump from 1e-4 to 10 and back; only when most recent steps stay up has the run diverged.
Values that are not positive switch the test off (a log-likelihood, say).

>>> detector = GrowthDetector("loss")
>>> [detector.update(v) for v in [4.6, 4.5, 4.4, 4.3, 9e3, 4.2, 4.1]]  # one hard batch: a spike
[None, None, None, None, None, None, None]
>>> detector.update(1e4), detector.update(2e4)  # two of the last three steps up 1000x: divergence
(None, 'the loss grew to 2e+04; its level (the median of the last 3 steps, 1e+04) is 2.25e+03x its reference 4.45 (the median of the 6 steps before)')
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

from lightning_nan.core.diagnosis import TREND_STEPS, StepRecord, _weight_jump
from lightning_nan.core.validate import integer, number

__all__ = ["GROWTH", "DivergenceWatch", "GrowthDetector"]

#: Orders of magnitude that make divergence: 1e3 over the reference.
GROWTH = 1e3
#: The reference never drops below this fraction of the run's starting level.
FLOOR = 0.1
#: The recent level is the median of this many last values (so 2 of them must be high).
LEVEL = 3
#: A loss that grew by orders of magnitude is divergence only if the weights' total norm moved by this
#: fraction over the same steps (when the weights are checked).
MOVED = 0.05


class GrowthDetector:
    """Says when a positive quantity has grown :data:`GROWTH` times over its reference (see the module)."""

    def __init__(self, name: str, *, growth: float = GROWTH, window: int = 50, min_history: int = 3) -> None:
        self.name = name
        self.growth = number("growth", growth, low=1, low_open=True)
        self.window = integer("window", window, low=1)
        self.min_history = integer("min_history", min_history, low=1, high=window, hint="at most `window`")
        self.recent: deque[float] = deque(maxlen=window)
        self.start: float | None = None  # the run's starting level
        self._first: list[float] = []
        self.off = False

    def update(self, value: float | None) -> str | None:
        """Take one step's value; the evidence (one sentence) when it diverged, else ``None``."""
        if value is None or self.off or not math.isfinite(value):
            return None
        if value < 0:
            self.off = True  # not a positive quantity: its ratios mean nothing
            return None
        if value == 0:  # a perfect fit (or dead units): no scale to compare with
            return None
        self.recent.append(value)
        if self.start is None:
            self._first.append(value)
            if len(self._first) >= self.min_history:
                self.start = statistics.median(self._first)
        if self.start is None or len(self.recent) < LEVEL + self.min_history:
            return None
        values = list(self.recent)
        level = statistics.median(values[-LEVEL:])
        if level <= self.growth * FLOOR * self.start:  # the common case: no lower reference can make it divergence
            return None
        earlier = statistics.median(values[:-LEVEL])
        reference = max(earlier, FLOOR * self.start)
        if level <= self.growth * reference:
            return None
        what = f"the median of the {len(values) - LEVEL} steps before" if reference == earlier else f"a tenth of the run's starting level {self.start:.3g}"
        return (
            f"the {self.name} grew to {value:.3g}; its level (the median of the last {LEVEL} steps, {level:.3g}) is "
            f"{level / reference:.3g}x its reference {reference:.3g} ({what})"
        )

    def reset(self) -> None:
        """Forget the recent values (after the incident was handled); the starting level stays."""
        self.recent.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "start": self.start, "first": list(self._first), "off": self.off}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(v) for v in state.get("recent", [])), maxlen=self.window)
        self.start = state.get("start", self.start)
        self._first = [float(v) for v in state.get("first", self._first)]
        self.off = bool(state.get("off", self.off))


class DivergenceWatch:
    """The guard's watch over a run's finite values: the loss and gradient norm (each a
    :class:`GrowthDetector`) and the weights' total norm (a jump far beyond any change per step before).

    ``check`` takes one step's host values and says ``("divergence" | "jump", evidence)`` or ``None``.
    A loss that grew counts only if the weights moved by :data:`MOVED` over the same steps: a
    saturated classifier whose loss jumps between 1e-3 and 10 while its (clipped) weights stay put
    is spiky, not diverging.

    >>> watch = DivergenceWatch()
    >>> history = [StepRecord(s, loss=1.0, grad_norm=1.0, weight_norm=10.0 + s) for s in range(6)]
    >>> [watch.check(history[: s + 1], s, 1.0, 1.0) for s in range(6)]
    [None, None, None, None, None, None]
    >>> history.append(StepRecord(6, loss=1.0, grad_norm=1.0, weight_norm=1e30))  # a weight set to 1e30
    >>> watch.check(history, 6, 1.0, 1.0)[0]
    'jump'
    """

    def __init__(self) -> None:
        self.loss = GrowthDetector("loss")
        self.grad = GrowthDetector("gradient norm")

    def check(
        self, history: Sequence[StepRecord], step: int, loss: float | None, grad_norm: float | None
    ) -> tuple[str, str] | None:
        """``history`` ends with this step's record (its ``weight_norm`` when the weights were checked)."""
        recent = list(history)[-TREND_STEPS:]
        checked = bool(recent) and recent[-1].step == step and recent[-1].weight_norm is not None
        jump = _weight_jump(recent, step) if checked else None
        grew = self.loss.update(loss)
        grew_grad = self.grad.update(grad_norm)
        if jump:
            return "jump", jump
        if (grew or grew_grad) and _weights_moved(recent):
            return "divergence", grew or grew_grad or ""
        return None

    def reset(self) -> None:
        """After an incident: the next steps are compared with what follows (the starting levels stay)."""
        self.loss.reset()
        self.grad.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grad": self.grad.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state.get("loss", {}))
        self.grad.load_state_dict(state.get("grad", {}))


def _weights_moved(recent: Sequence[StepRecord]) -> bool:
    """Whether the weights' total norm changed by :data:`MOVED` over the last steps (``True`` when unknown)."""
    norms = [r.weight_norm for r in recent[-(LEVEL + 2) :] if r.weight_norm is not None]
    if len(norms) < 2 or not all(math.isfinite(w) for w in norms):
        return True
    return abs(norms[-1] - norms[0]) > MOVED * max(abs(norms[0]), 1e-12)
