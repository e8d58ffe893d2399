"""Localization: the first module (and parameter gradient) where a NaN/Inf appears.

:func:`localize` runs a loss function once with temporary hooks on every submodule, checking each
module's floating-point inputs and outputs exactly, and reports the first module, in execution
order, that turned finite inputs into a non-finite value, or that received non-finite inputs from
outside any module (dirty data). With ``backward=True`` it also names the first parameter, in
backward execution order, whose gradient is non-finite. It runs on the failure path only: nothing
is installed when it is not called, and it leaves no hook, gradient, buffer or random state behind.

>>> import torch
>>> class Log(torch.nn.Module):
...     def forward(self, x):
...         return torch.log(x)
>>> model = torch.nn.Sequential(torch.nn.Identity(), Log())
>>> loc = localize(model, lambda: model(torch.tensor([1.0, 0.0, -2.0])).sum())
>>> loc.module, loc.module_type, loc.input_range, loc.output_nonfinite, loc.loss_finite
('1', 'Log', (-2.0, 1.0), 2, False)
>>> loc.summary()
'first non-finite output in 1 (Log) from finite inputs in [-2, 1], 2 non-finite output elements'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.norms import iter_tensors
from lightning_nan.core.reevaluate import all_finite, as_loss, loss_is_finite, preserved

__all__ = ["Localization", "localize"]


@dataclass
class Localization:
    """Where a forward (and backward) pass first turned non-finite.

    Attributes:
        module: qualified name (``""`` for the root) of the first module, in execution order, where
            a non-finite value showed up: either its output (or a value made by an operation in its
            own ``forward``) was non-finite while its inputs were finite, or, when
            ``inputs_finite`` is ``False``, it was the first module to receive non-finite inputs,
            which came from outside every module (the data). ``None`` if every module stayed finite.
        module_type: the class name of that module, e.g. ``"Linear"``.
        inputs_finite: whether that module's floating-point inputs were all finite.
        input_range: ``(min, max)`` over the finite elements of its floating-point inputs (``None``
            when there are none).
        output_nonfinite: the number of non-finite elements in its output (``None`` if its forward
            did not return).
        first_nonfinite_input: that module's name when its inputs were already non-finite (the data
            was dirty), else ``None``.
        grad_param: the first parameter, in backward execution order, whose gradient is non-finite;
            ``None`` when gradients were not checked or all were finite.
        loss_finite: whether the loss was finite (``None`` when the loss function returned nothing).
    """

    module: str | None = None
    module_type: str | None = None
    inputs_finite: bool | None = None
    input_range: tuple[float, float] | None = None
    output_nonfinite: int | None = None
    first_nonfinite_input: str | None = None
    grad_param: str | None = None
    loss_finite: bool | None = None

    def summary(self) -> str:
        """One line for a log or an incident record.

        >>> Localization(module="enc.2", module_type="Linear", inputs_finite=True, input_range=(-3.14, 4.2)).summary()
        'first non-finite output in enc.2 (Linear) from finite inputs in [-3.14, 4.2]'
        >>> Localization(module="", module_type="Net", inputs_finite=False, first_nonfinite_input="").summary()
        'non-finite input already reaching <root> (Net): the data (or code outside the modules) was not finite'
        """
        if self.module is not None:
            where = f"{self.module or '<root>'} ({self.module_type})"
            if self.inputs_finite is False:
                text = f"non-finite input already reaching {where}: the data (or code outside the modules) was not finite"
            else:
                rng = "" if self.input_range is None else f" in [{self.input_range[0]:.3g}, {self.input_range[1]:.3g}]"
                text = f"first non-finite output in {where} from finite inputs{rng}"
                if self.output_nonfinite:
                    text += f", {self.output_nonfinite} non-finite output element{'s' * (self.output_nonfinite > 1)}"
        elif self.loss_finite is False:
            text = "every module's output was finite but the loss was not (computed outside the modules)"
        else:
            text = "forward finite" + (" (no loss returned)" if self.loss_finite is None else "")
        if self.grad_param is not None:
            text += f"; first non-finite gradient in {self.grad_param}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``).

        >>> Localization(module="0", input_range=(0.0, float("inf"))).to_dict()["input_range"]
        [0.0, 'inf']
        """
        out = dataclasses.asdict(self)
        if self.input_range is not None:
            out["input_range"] = [x if math.isfinite(x) else str(x) for x in self.input_range]
        return out


def _stats(obj: Any) -> tuple[int, float, float]:
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
class _Frame:
    """One module call in progress: its name and what its inputs looked like."""

    module: torch.nn.Module
    name: str
    inputs_nonfinite: int = 0
    lo: float = math.inf
    hi: float = -math.inf


class _Tracer:
    """Forward hooks that record the first non-finite value; the call stack attributes it."""

    def __init__(self) -> None:
        self.loc = Localization()
        self.stack: list[_Frame] = []
        self.pending: _Frame | None = None  # the culprit, found before its own output was seen
        self.active = True  # False once the loss function returned (e.g. checkpoint recomputation)

    def _record(self, frame: _Frame, inputs_finite: bool) -> None:
        loc = self.loc
        loc.module, loc.module_type, loc.inputs_finite = frame.name, type(frame.module).__name__, inputs_finite
        loc.input_range = (frame.lo, frame.hi) if frame.lo <= frame.hi else None
        if not inputs_finite:
            loc.first_nonfinite_input = frame.name

    def pre(self, name: str, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not self.active:
            return
        frame = _Frame(module, name)
        self.stack.append(frame)
        if self.loc.module is not None:
            return
        frame.inputs_nonfinite, frame.lo, frame.hi = _stats((args, kwargs))
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
            self.loc.output_nonfinite = _stats(output)[0]
            self.pending = None
        elif self.loc.module is None:
            count = _stats(output)[0]
            if count:
                self._record(frame, inputs_finite=True)
                self.loc.output_nonfinite = count


def localize(
    module: torch.nn.Module,
    loss_fn: Callable[[], Tensor | None],
    *,
    backward: bool = False,
    params: Iterable[tuple[str, Tensor]] | None = None,
) -> Localization:
    """Run ``loss_fn()`` once with hooks on every submodule of ``module`` and say where it turned non-finite.

    ``loss_fn`` must call ``module`` (for DDP, the wrapped ``ddp.module``) and return the loss (or a
    mapping with a ``"loss"`` entry, or ``None``: then only the forward is localized); it must not
    step an optimizer. It runs under :func:`~lightning_nan.core.reevaluate.preserved` (buffers,
    ``.grad``, train/eval flags and random states are restored) and :func:`torch.no_grad` unless
    ``backward``. With ``backward=True`` and a finite loss, the gradients w.r.t. ``params`` (default
    ``module.named_parameters()``) come from :func:`torch.autograd.grad`, which neither writes
    ``.grad`` nor starts DDP's all-reduce, and tensor hooks give the order in which they arrive.
    Every check is exact and synchronises with the device: use this on the failure path only.
    An exception from ``loss_fn`` propagates, after the hooks are removed and the state restored.

    >>> import torch
    >>> lin = torch.nn.Linear(1, 1, bias=False)
    >>> model = torch.nn.Sequential(lin, torch.nn.Tanh())
    >>> with torch.no_grad():
    ...     _ = lin.weight.zero_()
    >>> loc = localize(model, lambda: model(torch.ones(1, 1)).sqrt().sum(), backward=True)  # sqrt'(0) = inf
    >>> loc.module, loc.loss_finite, loc.grad_param, lin.weight.grad
    (None, True, '0.weight', None)
    """
    named = list(module.named_parameters() if params is None else params)
    tracer = _Tracer()
    handles = []
    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(lambda m, a, k, n=name: tracer.pre(n, m, a, k), with_kwargs=True))
            handles.append(sub.register_forward_hook(lambda m, a, k, o, n=name: tracer.post(n, m, a, k, o), with_kwargs=True))
        with preserved(module), torch.set_grad_enabled(backward):
            out = loss_fn()
            tracer.active = False
            for h in handles:
                h.remove()
            loss = None if out is None else as_loss(out)
            loc = tracer.loc
            loc.loss_finite = None if loss is None else loss_is_finite(loss)
            if backward and loc.loss_finite:
                loc.grad_param = _first_nonfinite_grad(loss, named)
    finally:
        for h in handles:
            h.remove()
    return loc


def _first_nonfinite_grad(loss: Tensor, named: list[tuple[str, Tensor]]) -> str | None:
    """The first parameter, in the order its gradient arrives, whose gradient of ``loss`` is non-finite."""
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named or not loss.requires_grad:
        return None
    order: list[int] = []
    hooks = [p.register_hook(lambda g, i=i: order.append(i)) for i, (_, p) in enumerate(named)]
    try:
        grads = torch.autograd.grad(loss if loss.numel() == 1 else loss.sum(), [p for _, p in named], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    seen = set(order)
    for i in [*dict.fromkeys(order), *(i for i in range(len(named)) if i not in seen)]:
        if grads[i] is not None and not all_finite([grads[i]]):
            return named[i][0]
    return None
