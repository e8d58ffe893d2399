"""The growth trial of the LR backoff: keep a grown learning rate only if the loss did not get worse.

:class:`GrowthTrial` keeps the last ``size`` clean losses in a device ring. When the factor grows it
sets them aside as *before*, collects ``size`` more as *after*, and compares the means (Welch's z,
one-sided): the verdict is an agreed device flag read back at the next step, so collecting costs no
host sync. :class:`~lightning_nan.core.lr_backoff.LRBackoffController` decides what a verdict means.

>>> import torch
>>> trial = GrowthTrial(10)
>>> for i in range(10):
...     trial.collect(torch.tensor(1.0 + 0.01 * (i % 3)), reduce=lambda t: t)
>>> trial.start(factor_before=0.5, step=10)
True
>>> for i in range(10):
...     trial.collect(torch.tensor(2.0 + 0.01 * (i % 3)), reduce=lambda t: t)  # worse after the growth
>>> trial.judge()  # the factor to go back to, and the step of the growth
(0.5, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.spikes import DeferredFlag, LossRing, finite_values, read_flag

#: A growth is undone when the mean loss after it exceeds the mean before it by more than this many
#: standard errors (one-sided; about one false alarm in six on a flat, noisy loss).
TRIAL_Z = 1.0
#: Losses needed on each side of a growth for the trial to be run.
TRIAL_MIN_LOSSES = 10


class GrowthTrial:
    """Compare the mean clean loss of the ``size`` steps after a growth with that of the ``size`` before it.

    Args:
        size: losses on each side; ``None``: no trial (nothing is collected).
    """

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.ring = LossRing(size or TRIAL_MIN_LOSSES)  # the last clean losses (NaN: empty)
        self.running: tuple[Tensor, float, int] | None = None  # (losses before, factor before, step of the growth)
        self.verdict: tuple[DeferredFlag | bool, float, int] | None = None  # (worse flag, factor before, step)

    def collecting(self, factor: float, ceiling: float) -> bool:
        """Whether losses are needed: a growth may come (``factor < ceiling``) or a trial runs."""
        return self.size is not None and (factor < ceiling or self.running is not None)

    @torch.no_grad()
    def collect(self, loss: Tensor, reduce: Callable[[Tensor], Tensor]) -> None:
        """Put a clean step's loss in the ring; at the end of a trial, compare the two sides.

        ``reduce``: in-place element-wise max over ranks (the loss got worse on any rank).
        """
        ring = self.ring
        ring.push(loss)
        if self.running is not None and ring.count >= ring.size:
            before, f, step = self.running
            self.running = None
            worse = (welch_z(before.to(ring.values.device), ring.values) > TRIAL_Z).float().reshape(1)
            self.verdict = (DeferredFlag(reduce(worse)), f, step)

    def start(self, factor_before: float, step: int) -> bool:
        """The factor grew from ``factor_before`` at ``step``: start a trial if enough losses are in."""
        if self.ring.count < TRIAL_MIN_LOSSES:
            return False
        self.running = (self.ring.values.clone(), factor_before, step)
        self.ring.clear()
        return True

    def cancel(self) -> None:
        """A failure has decided: drop the trial in progress and any verdict not read yet."""
        self.running = self.verdict = None

    def judge(self) -> tuple[float, int] | None:
        """Read the pending verdict: ``(factor before, step of the growth)`` if the growth made the loss worse."""
        if self.verdict is None:
            return None
        flag, before, grown_at = self.verdict
        self.verdict = None
        return (before, grown_at) if read_flag(flag) else None

    def state_dict(self) -> dict[str, Any]:
        """The trial's part of the controller's state, as primitives (reads the losses to the host)."""
        return {
            "trial_losses": self.ring.tolist(),
            "trial": None if self.running is None else {
                "before": finite_values(self.running[0]), "factor": self.running[1], "step": self.running[2]
            },
            "verdict": None if self.verdict is None else [read_flag(self.verdict[0]), self.verdict[1], self.verdict[2]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a missing ``trial_losses`` keeps the current ones."""
        if "trial_losses" in state:
            self.ring.load(state["trial_losses"])
        trial = state.get("trial")
        if trial:
            self.running = (torch.tensor([float(v) for v in trial["before"]]), float(trial["factor"]), int(trial["step"]))
        else:
            self.running = None
        verdict = state.get("verdict")
        self.verdict = None if not verdict else (bool(verdict[0]), float(verdict[1]), int(verdict[2]))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle with the verdict read (a CUDA event does not pickle)."""
        state = self.__dict__.copy()
        if self.verdict is not None:
            state["verdict"] = (read_flag(self.verdict[0]), *self.verdict[1:])
        return state


def welch_z(before: Tensor, after: Tensor) -> Tensor:
    """Welch's z of ``mean(after) - mean(before)`` over the finite values of each (0 with too few), on the device.

    >>> float(welch_z(torch.tensor([1.0, 2.0] * 5), torch.tensor([2.0, 3.0] * 5)))
    4.2426...
    """
    stats = []
    for x in (before, after):
        ok = torch.isfinite(x)
        n = ok.sum().clamp_min(1)
        mean = torch.where(ok, x, 0.0).sum() / n
        var = torch.where(ok, (x - mean) ** 2, 0.0).sum() / (n - 1).clamp_min(1)
        stats.append((mean, var / n, ok.sum()))
    (mb, vb, nb), (ma, va, na) = stats
    z = (ma - mb) / (vb + va).sqrt().clamp_min(1e-12 * mb.abs().clamp_min(1e-30))
    return torch.where((nb >= TRIAL_MIN_LOSSES) & (na >= TRIAL_MIN_LOSSES), z, torch.zeros_like(z))
