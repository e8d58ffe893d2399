"""Forward hooks that find the first module whose output (or own operation) turned non-finite.

:class:`ModuleTracer` keeps the stack of module calls in progress and fills a
:class:`~lightning_nan.core.localization.Localization`'s module fields; used by
:func:`~lightning_nan.core.localize.localize`.

>>> import torch
>>> tracer = ModuleTracer()
>>> relu = torch.nn.ReLU()
>>> tracer.pre("act", relu, (torch.ones(2),), {})
>>> tracer.post("act", relu, (torch.ones(2),), {}, torch.tensor([1.0, float("inf")]))
>>> tracer.loc.module, tracer.loc.inputs_finite, tracer.loc.output_nonfinite
('act', True, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.localization import Localization
from lightning_nan.core.norms import iter_tensors

__all__ = ["ModuleCall", "ModuleTracer", "nonfinite_stats"]


def nonfinite_stats(obj: Any) -> tuple[int, float, float]:
    """``(number of non-finite elements, min, max of the finite ones)`` over the floating tensors in
    ``obj``; min > max when no element is finite. One host synchronisation per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for _, t in iter_tensors(obj):
        if t.numel() == 0:
            continue
        t = t.detach()
        if t.is_complex():
            t = torch.view_as_real(t)
        finite = torch.isfinite(t)
        by_device.setdefault(t.device, []).append(
            torch.stack(
                [
                    (~finite).sum().double(),
                    torch.where(finite, t, math.inf).amin().double(),
                    torch.where(finite, t, -math.inf).amax().double(),
                ]
            )
        )
    count, lo, hi = 0, math.inf, -math.inf
    for rows in by_device.values():
        for c, a, b in torch.stack(rows).tolist():
            count, lo, hi = count + int(c), min(lo, a), max(hi, b)
    return count, lo, hi


@dataclass
class ModuleCall:
    """One module call in progress: its name and what its inputs looked like."""

    module: torch.nn.Module
    name: str
    inputs_nonfinite: int = 0
    lo: float = math.inf
    hi: float = -math.inf


class ModuleTracer:
    """Forward hooks that record the first non-finite value; the call stack attributes it."""

    def __init__(self) -> None:
        self.loc = Localization()
        self.stack: list[ModuleCall] = []
        self.pending: ModuleCall | None = None  # the culprit, found before its own output was seen
        self.active = True  # False once the loss function returned (e.g. checkpoint recomputation)
        self.culprit: ModuleCall | None = None  # the frame of ``loc.module``

    def _record(self, frame: ModuleCall, inputs_finite: bool) -> None:
        self.culprit = frame
        loc = self.loc
        loc.module, loc.module_type, loc.inputs_finite = frame.name, type(frame.module).__name__, inputs_finite
        loc.input_range = (frame.lo, frame.hi) if frame.lo <= frame.hi else None
        if not inputs_finite:
            loc.first_nonfinite_input = frame.name

    def pre(self, name: str, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        frame = ModuleCall(module, name)
        self.stack.append(frame)
        if self.loc.module is not None:
            return
        frame.inputs_nonfinite, frame.lo, frame.hi = nonfinite_stats((args, kwargs))
        if frame.inputs_nonfinite:
            if len(self.stack) > 1:  # made by an operation in the enclosing module's own forward
                self.pending = self.stack[-2]
                self._record(self.pending, inputs_finite=True)
            else:  # it came from outside every module: the data
                self.pending = frame
                self._record(frame, inputs_finite=False)

    def post(self, name: str, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not self.active:
            return
        # Pop this call's frame, and any left by a child whose forward raised and was caught.
        idx = next((i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i].module is module), None)
        if idx is None:
            return
        frame = self.stack[idx]
        del self.stack[idx:]
        if frame is self.pending:
            self.loc.output_nonfinite = nonfinite_stats(output)[0]
            self.pending = None
        elif self.loc.module is None:
            count = nonfinite_stats(output)[0]
            if count:
                self._record(frame, inputs_finite=True)
                self.loc.output_nonfinite = count

