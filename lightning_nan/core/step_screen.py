"""The healthy path of a step check: one vector of everything screened, one device-to-host transfer.

The vector holds the gradient norms and (when checked) the weight norms of the one fused norm pass,
the loss of each micro-batch, the input sums and the fp16 loss scale. In a single process it comes
to the host as it is (one ``.tolist()``); under DDP each rank first reduces it on the device to the
totals of its segments (a fixed length, the same on every rank), and the ranks keep the largest
magnitudes, so that a fault on one rank is every rank's. Either way one reading, on the host,
(:meth:`Layout.read`) turns the values into a :class:`Screen`.

>>> import torch
>>> norms = torch.tensor([3.0, 4.0, 10.0])  # two gradient norms, then one weight norm
>>> seen = screen(norms, grads=2, weights=1, losses=[torch.tensor(0.5)], inputs=[], scale=None, min_loss_scale=1.0)
>>> seen.failed, seen.loss, seen.grad_norm, seen.weight_norm, seen.bound
(False, 0.5, 7.0, 10.0, 5.0)
>>> screen(norms, grads=2, weights=1, losses=[torch.tensor(float("nan"))], inputs=[], scale=None, min_loss_scale=1.0).faults
{'input': False, 'loss': True, 'grad': False, 'param': False, 'scale': False}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nan.core.losses import scalar_loss

#: The screened values, in the order of :attr:`Screen.faults`.
FLAGS = ("input", "loss", "grad", "param", "scale")


@dataclass
class Screen:
    """What the one transfer of a step says (the same on every rank).

    Attributes:
        faults: per value of :data:`FLAGS`, whether it was screened non-finite (the loss scale: below
            its floor). A 2-norm can overflow on finite values: the failure path checks exactly.
        loss: the sum of the micro-batches' losses.
        grad_norm: the sum of the per-tensor gradient 2-norms (its trend is what counts).
        weight_norm: the sum of the per-tensor weight 2-norms (0 when the weights were not checked).
        bound: the 2-norm of all gradients together.

    Under DDP the four numbers are the largest magnitude over the ranks.
    """

    faults: dict[str, bool]
    loss: float
    grad_norm: float
    weight_norm: float
    bound: float

    @property
    def failed(self) -> bool:
        """Whether anything was screened non-finite (or the loss scale fell below its floor)."""
        return any(self.faults.values())


@dataclass(frozen=True)
class Layout:
    """Where each screened value sits in the vector (``bound``: the values whose 2-norm bounds the gradients)."""

    grad: slice
    param: slice
    loss: slice
    input: slice
    scale: slice
    bound: slice
    inverse_scale: bool = False  # the scale is held as 1/scale, so that a max over ranks keeps the lowest

    @classmethod
    @functools.cache  # one per shape of step: a run has a handful
    def of(cls, grads: int, params: int, losses: int, inputs: int, scaled: bool) -> Layout:
        """The vector as :func:`screen` builds it: gradient norms, weight norms, losses, input sums, scale."""
        ends = [grads]
        for n in (params, losses, inputs, int(scaled)):
            ends.append(ends[-1] + n)
        grad, param, loss, input_, scale = (slice(a, b) for a, b in zip([0, *ends], ends))
        return cls(grad, param, loss, input_, scale, bound=grad)

    @classmethod
    @functools.cache
    def of_totals(cls, scaled: bool) -> Layout:
        """The vector :meth:`totals` makes: one value per segment, then the bound, then the scale."""
        return cls(slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4), slice(5, 5 + int(scaled)), slice(4, 5), True)

    def totals(self, values: Tensor) -> Tensor:
        """Each segment's sum, the bound's 2-norm and 1/scale, on the device (laid out as :meth:`of_totals`)."""
        sums = [values[s].sum() for s in (self.grad, self.param, self.loss, self.input)]
        return torch.stack([*sums, torch.linalg.vector_norm(values[self.bound]), *values[self.scale].reciprocal()])

    def read(self, values: Sequence[float], min_loss_scale: float) -> Screen:
        """The :class:`Screen` of the values (host arithmetic, in float64)."""
        loss, grad, param, scale = sum(values[self.loss]), sum(values[self.grad]), sum(values[self.param]), values[self.scale]
        if self.inverse_scale:  # the lowest scale of any rank
            scale = [math.inf if v == 0 else 1.0 / v for v in scale]
        finite = math.isfinite
        faults = {
            "input": not finite(sum(values[self.input])),
            "loss": not finite(loss),
            "grad": not finite(grad),
            "param": not finite(param),
            "scale": bool(scale) and scale[0] < min_loss_scale,
        }
        return Screen(faults, loss, grad, param, bound=math.hypot(*values[self.bound]))


def screen(
    norms: Tensor,
    *,
    grads: int,
    weights: int,
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    scale: Tensor | None,
    min_loss_scale: float,
    device: torch.device | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Screen:
    """Screen a step in one transfer: ``norms`` holds ``grads`` gradient norms, then ``weights`` weight norms.

    ``reduce``: the in-place element-wise max over ranks when there are several (``None``: a single
    process). ``device``: where to gather the values (default: that of ``norms``).
    """
    device = norms.device if device is None else device
    tail = [scalar_loss(v) for v in losses] + list(inputs) + ([scale.float()] if scale is not None else [])
    parts = [norms.reshape(-1).to(device), *(t.reshape(1).to(device, non_blocking=True) for t in tail)]
    values = parts[0] if len(parts) == 1 else torch.cat(parts)
    layout = Layout.of(grads, weights, len(losses), len(inputs), scale is not None)
    if reduce is not None:  # agree: the largest magnitude of each total (NaN counts as Inf), the lowest scale
        values = reduce(torch.nan_to_num(layout.totals(values).abs(), nan=math.inf, posinf=math.inf))
        layout = Layout.of_totals(scale is not None)
    return layout.read(values.tolist(), min_loss_scale)  # the one transfer
