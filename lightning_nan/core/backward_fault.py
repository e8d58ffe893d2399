"""Name the backward operation that made a gradient non-finite from finite incoming gradients.

A loss can be finite while its gradients are not: ``sqrt`` at 0 (infinite derivative), the
``torch.where(mask, x, log(x))`` trap (the unused branch's gradient, ``0 * inf``, is NaN),
``x.norm()`` at 0. :func:`backward_fault` replays the loss once under
:func:`torch.autograd.detect_anomaly` (which records each node's forward traceback), hooks every
node of the graph, and reports the first node, in backward execution order, whose outgoing
gradients were non-finite while its incoming ones were finite: its name, the line of user code
whose forward call made it, and the module whose ``forward`` holds that line. It runs on the
failure path only (anomaly mode is slow); nothing stays installed.

>>> import torch
>>> class Radius(torch.nn.Module):
...     def forward(self, x):
...         return torch.sqrt((x * x).sum(-1))
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), Radius())
>>> with torch.no_grad():
...     _ = model[0].weight.zero_(), model[0].bias.zero_()
>>> fault = backward_fault(model, lambda: model(torch.ones(1, 2)).sum())
>>> fault.op, fault.module, fault.module_type, fault.location.endswith("in forward")
('SqrtBackward0', '1', 'Radius', True)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.reevaluate import all_finite, as_loss, preserved

__all__ = ["BackwardFault", "backward_fault"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[<>\w.]+)')


@dataclass
class BackwardFault:
    """The first backward node that turned finite gradients into NaN/Inf.

    Attributes:
        op: the autograd node, e.g. ``"SqrtBackward0"``.
        location: ``"file.py:LINE in function"`` of the user code whose forward call made the node.
        module: qualified name of the module whose ``forward`` holds that line (``""``: the root).
        module_type: its class name.
        produced: ``"nan"`` or ``"inf"``: what the node produced.
    """

    op: str
    location: str | None = None
    module: str | None = None
    module_type: str | None = None
    produced: str = "nan"

    @property
    def forward_op(self) -> str:
        """The forward operation's name: ``"SqrtBackward0"`` -> ``"sqrt"``."""
        return re.sub(r"Backward\d*$", "", self.op).lower()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backward_fault(
    module: torch.nn.Module, loss_fn: Callable[[], Any], *, params: Iterable[Tensor] | None = None
) -> BackwardFault | None:
    """Replay ``loss_fn()`` under anomaly mode and name the first backward node that went non-finite.

    ``None`` when the loss is not finite, needs no gradient, or every gradient stayed finite. Runs
    under :func:`~lightning_nan.core.reevaluate.preserved`; gradients come from
    :func:`torch.autograd.grad` (no ``.grad`` written, no DDP collective).
    """
    wanted = [p for p in (module.parameters() if params is None else params) if p.requires_grad]
    found: list[tuple[Any, bool]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's own banner
        with preserved(module), torch.enable_grad(), torch.autograd.detect_anomaly(check_nan=False):
            out = loss_fn()
            if out is None:
                return None
            loss = as_loss(out)
            if not loss.requires_grad or loss.grad_fn is None or not all_finite([loss.detach()]) or not wanted:
                return None
            handles = []

            def hook(node: Any) -> Callable[..., None]:
                def check(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
                    if found:
                        return
                    produced = [g for g in grad_inputs if g is not None]
                    if produced and not all_finite(produced) and all_finite([g for g in grad_outputs if g is not None]):
                        found.append((node, any(bool(torch.isnan(g).any()) for g in produced)))

                return check

            for node in _nodes(loss.grad_fn):
                try:
                    handles.append(node.register_hook(hook(node)))
                except RuntimeError:  # some nodes take no hooks
                    continue
            try:
                torch.autograd.grad(loss if loss.numel() == 1 else loss.sum(), wanted, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
    if not found:
        return None
    node, nan = found[0]
    trace = str(node.metadata.get("traceback_", "")) if hasattr(node, "metadata") else ""
    fault = BackwardFault(op=node.name(), produced="nan" if nan else "inf")
    fault.location, frames = _user_frame(trace)
    fault.module, fault.module_type = _module_of(module, frames)
    return fault


def _nodes(root: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))
    return list(seen.values())


def _user_frame(trace: str) -> tuple[str | None, list[tuple[str, int]]]:
    """The innermost user frame of a formatted forward traceback, and every user frame (outermost first)."""
    from lightning_nan.core.source_location import is_library_file, relative_path

    frames = [(m["file"], int(m["line"]), m["func"]) for m in _FRAME.finditer(trace)]
    user = [f for f in frames if not is_library_file(f[0])]
    if not user:
        return None, []
    file, line, func = user[-1]
    return f"{relative_path(file)}:{line} in {func}", [(f, ln) for f, ln, _ in user]


def _module_of(model: torch.nn.Module, frames: list[tuple[str, int]]) -> tuple[str | None, str | None]:
    """The module whose ``forward`` source holds the innermost of ``frames``."""
    spans: list[tuple[str, int, int, str, str]] = []
    for name, m in model.named_modules():
        functions = [getattr(type(m), "forward", None)]
        if name == "":  # the root's own steps too: a LightningModule's training_step
            functions += [f for cls in type(m).__mro__ for f in vars(cls).values() if callable(f)]
        for function in functions:
            code = getattr(function, "__code__", None)
            if code is None:
                continue
            lines = [ln for _, _, ln in code.co_lines() if ln is not None]
            spans.append((code.co_filename, min(lines, default=code.co_firstlineno), max(lines, default=code.co_firstlineno), name, type(m).__name__))
    for file, line in reversed(frames):
        inside = [(hi - lo, name, kind) for f, lo, hi, name, kind in spans if f == file and lo <= line <= hi]
        if inside:
            _, name, kind = min(inside)  # the innermost function that holds the line
            return name, kind
    return None, None
