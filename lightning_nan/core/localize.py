"""Localization: the first module (and parameter gradient) where a NaN/Inf appears.

:func:`localize` runs a loss function once with temporary hooks on every submodule, checking each
module's floating-point inputs and outputs exactly, and reports the first module, in execution
order, that turned finite inputs into a non-finite value, or that received non-finite inputs from
outside any module (dirty data). A :class:`~torch.overrides.TorchFunctionMode`, active only while
``loss_fn`` runs, also names the torch operation (``"div"``, ``"log"``, ``"exp"``...) that made the
first non-finite value from finite inputs, and the line of user code that called it. With
``backward=True`` it also names the first parameter, in backward execution order, whose gradient is
non-finite. It runs on the failure path only: nothing is installed when it is not called, and it
leaves no hook, mode, gradient, buffer or random state behind.

>>> import torch
>>> class Log(torch.nn.Module):
...     def forward(self, x):
...         return torch.log(x)
>>> model = torch.nn.Sequential(torch.nn.Identity(), Log())
>>> loc = localize(model, lambda: model(torch.tensor([1.0, 0.0, -2.0])).sum())
>>> loc.module, loc.module_type, loc.input_range, loc.output_nonfinite, loc.loss_finite
('1', 'Log', (-2.0, 1.0), 2, False)
>>> loc.op, loc.op_location, loc.op_inputs[0]["has_zero"], loc.op_output_nonfinite
('log', '<doctest lightning_nan.core.localize[1]>:3 in forward', True, 2)
>>> loc.summary()
'first non-finite value from log at <doctest lightning_nan.core.localize[1]>:3 in forward (inputs finite: min -2, max 1 — log(<=0)?), 2 non-finite elements, inside 1 (Log)'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.localization import Localization
from lightning_nan.core.module_trace import ModuleTracer
from lightning_nan.core.op_trace import OpTracer
from lightning_nan.core.reevaluate import all_finite, as_loss, loss_is_finite, preserved

__all__ = ["Localization", "first_nonfinite_grad", "localize"]


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
    While ``loss_fn`` runs (and only then: not during the backward pass), a torch function mode
    checks each operation's output until a module is named, to find :attr:`Localization.op`.
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
    tracer = ModuleTracer()
    ops = OpTracer(tracer)

    def pre(name: str, m: torch.nn.Module, args: Any, kwargs: Any) -> None:
        with ops.paused():
            tracer.pre(name, m, args, kwargs)

    def post(name: str, m: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        with ops.paused():
            tracer.post(name, m, args, kwargs, output)

    handles = []
    try:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(lambda m, a, k, n=name: pre(n, m, a, k), with_kwargs=True))
            handles.append(sub.register_forward_hook(lambda m, a, k, o, n=name: post(n, m, a, k, o), with_kwargs=True))
        with preserved(module), torch.set_grad_enabled(backward):
            with ops:  # only while the loss function runs: the backward pass below is not traced
                out = loss_fn()
            tracer.active = False
            for h in handles:
                h.remove()
            loss = None if out is None else as_loss(out)
            loc = tracer.loc
            loc.loss_finite = None if loss is None else loss_is_finite(loss)
            op = ops.choose(loc, tracer.culprit)
            if op is not None:
                loc.op, loc.op_location, loc.op_inputs = op.name, op.location, op.inputs
                loc.op_output_nonfinite, loc.op_inputs_finite = op.output_nonfinite, op.inputs_finite
            if backward and loss is not None and loc.loss_finite:
                loc.grad_param = first_nonfinite_grad(loss, named)
    finally:
        for h in handles:
            h.remove()
    if backward and loc.loss_finite and loc.grad_param is not None:  # a backward-only fault: name its node
        from lightning_nan.core.backward_fault import backward_fault

        fault = backward_fault(module, loss_fn, params=[p for _, p in named])
        if fault is not None:
            loc.backward_op, loc.backward_location = fault.op, fault.location
            loc.backward_module, loc.backward_module_type = fault.module, fault.module_type
    return loc


def first_nonfinite_grad(loss: Tensor, named: list[tuple[str, Tensor]]) -> str | None:
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
