"""A torch function mode that names the operation which made the first NaN/Inf, and describes its operands.

:class:`OpTracer` runs while :func:`~lightning_nan.core.localize.localize` re-runs the loss: it checks
every torch operation's output until a module is named, and remembers those that made a non-finite
value from finite inputs (with their source line and operands, see :func:`describe_operand`).

>>> describe_operand("args[1]", torch.tensor([0.0, 2.0]), None)["has_zero"], op_name(torch.Tensor.__rtruediv__)
(True, ('div', True))
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_nan.core.localization import Localization
from lightning_nan.core.module_trace import ModuleCall, ModuleTracer
from lightning_nan.core.reevaluate import all_finite
from lightning_nan.core.source_location import user_location

__all__ = ["OpTracer", "describe_operand", "op_name"]

_MAX_OPERANDS = 16  # operands described per operation
_MAX_CANDIDATES = 64  # finite-in, non-finite-out operations remembered before a module is named
# Not operations on values: property getters/setters (``.grad``), and uninitialised memory.
_IGNORED = frozenset({"__get__", "__set__", "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
_ALIASES = {"truediv": "div", "rdiv": "div", "rtruediv": "div", "floordiv": "floor_divide", "rfloordiv": "floor_divide",
            "mod": "remainder", "rmod": "remainder", "radd": "add", "rsub": "sub", "rmul": "mul", "rpow": "pow",
            "rmatmul": "matmul", "iadd": "add_", "isub": "sub_", "imul": "mul_", "itruediv": "div_", "idiv": "div_",
            "ipow": "pow_", "ifloordiv": "floor_divide_", "imod": "remainder_"}  # fmt: skip
_REFLECTED = frozenset({"rdiv", "rtruediv", "rfloordiv", "rmod", "radd", "rsub", "rmul", "rpow", "rmatmul"})
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
                              "__ipow__", "__ifloordiv__", "__imod__", "__iand__", "__ior__", "__ixor__"})  # fmt: skip


def op_name(func: Any) -> tuple[str, bool]:
    """A short readable name for ``func`` (``Tensor.__rtruediv__`` -> ``"div"``) and whether it is reflected."""
    name = getattr(func, "__name__", None) or torch.overrides.resolve_name(func) or repr(func)
    name = name.rsplit(".", 1)[-1]
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        core = name[2:-2]
        return _ALIASES.get(core, core), core in _REFLECTED
    return name.lstrip("_") or name, False



def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every tensor and Python number nested in ``obj`` (lists, tuples, dicts)."""
    if isinstance(obj, Tensor) or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):  # NumPy floats too
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{path}[{key!r}]")


def _facts(t: Tensor) -> Tensor:
    """``[non-finite count, min and max of the finite elements, has a zero, has a negative]`` as a
    float64 tensor on ``t``'s device (no host synchronisation)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if not t.is_floating_point():
        t = t.double()  # integers and booleans: exact up to 2**53
    if t.numel() == 0:
        return torch.tensor([0.0, math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64, device=t.device)
    finite = torch.isfinite(t)
    return torch.stack(
        [
            (~finite).sum().double(),
            torch.where(finite, t, math.inf).amin().double(),
            torch.where(finite, t, -math.inf).amax().double(),
            (t == 0).any().double(),
            (t < 0).any().double(),
        ]
    )


def describe_operand(path: str, value: Any, facts: Tensor | None) -> dict[str, Any]:
    """One operand as a JSON-safe dict (see :attr:`Localization.op_inputs`)."""
    if not isinstance(value, Tensor):
        number = float(value) if isinstance(value, float) else int(value)  # also NumPy scalars
        finite = math.isfinite(number)
        return {"arg": path, "dtype": type(value).__name__, "value": number if finite else str(number),
                "nonfinite": int(not finite), "has_zero": number == 0, "has_negative": number < 0}  # fmt: skip
    count, lo, hi, zero, negative = (_facts(value) if facts is None else facts).tolist()
    if lo > hi:  # no finite element
        lo = hi = None
    elif not (value.is_floating_point() or value.is_complex()):
        lo, hi = int(lo), int(hi)
    return {"arg": path, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "min": lo,
            "max": hi, "nonfinite": int(count), "has_zero": bool(zero), "has_negative": bool(negative)}  # fmt: skip



@dataclass
class _Op:
    """An operation whose output held a non-finite value."""

    name: str
    location: str | None
    frames: tuple[ModuleCall, ...]  # the module calls in progress, outermost first
    inputs: list[dict[str, Any]]
    inputs_finite: bool
    output_nonfinite: int


class OpTracer(TorchFunctionMode):
    """Checks every torch operation's output until a module is named; records those that made a
    non-finite value from finite inputs, and the first outside every module that was fed one."""

    def __init__(self, tracer: ModuleTracer) -> None:
        super().__init__()
        self.tracer = tracer
        self.candidates: list[_Op] = []
        self.fed: _Op | None = None  # first op outside every module with non-finite inputs and output
        #: ops inside modules that made NaN from inputs holding +-inf but no NaN (softmax of a fully masked row)
        self.from_inf: list[_Op] = []
        self._paused = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let operations through unchecked (the module hooks' own statistics)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tracer = self.tracer
        if (
            self._paused
            or not tracer.active
            or tracer.loc.module is not None
            or len(self.candidates) >= _MAX_CANDIDATES
            or getattr(func, "__name__", None) in _IGNORED
        ):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None) or ""
        inplace = name.endswith("_") and not name.endswith("__")
        inplace = inplace or name in _INPLACE_DUNDERS or kwargs.get("inplace") is True
        target = None
        if inplace:
            target = args[0] if args else next((kwargs[k] for k in ("input", "tensor", "self") if k in kwargs), None)
            target = target if isinstance(target, Tensor) else None
        before = None
        if target is not None:  # its values before the operation are an input
            try:
                with torch.no_grad():
                    before = _facts(target)
            except Exception:  # noqa: BLE001 - never break the user's forward (e.g. under vmap)
                target = None
        out = func(*args, **kwargs)
        try:
            with torch.no_grad():
                self._check(func, args, kwargs, out, target, before)
        except Exception:  # noqa: BLE001 - a check that cannot run (meta tensors, functorch transforms) is skipped
            pass
        return out

    def _check(self, func: Any, args: Any, kwargs: Any, out: Any, target: Tensor | None, before: Tensor | None) -> None:
        outputs: dict[int, Tensor] = {}
        for _, t in _walk((out, kwargs.get("out"), target), ""):
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
                outputs[id(t)] = t
        if not outputs or all_finite(outputs.values()):
            return
        op, reflected = op_name(func)
        order = [1, 0, *range(2, len(args))] if reflected and len(args) >= 2 else range(len(args))
        operands = [x for i in order for x in _walk(args[i], f"args[{i}]")]
        operands += [x for k, v in kwargs.items() if k != "out" for x in _walk(v, k)]
        floats = [v for _, v in operands if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())]
        finite = (
            all(math.isfinite(v) for _, v in operands if isinstance(v, float))
            and (before is None or bool(before[0] == 0))
            and all_finite(v for v in floats if v is not target)
        )
        frames = tuple(self.tracer.stack)
        if not finite and frames:
            if len(self.from_inf) < _MAX_CANDIDATES and not any(bool(torch.isnan(v).any()) for v in floats if v is not target) and any(
                bool(torch.isnan(t).any()) for t in outputs.values()
            ):
                described = [describe_operand(p, v, before if v is target else None) for p, v in operands[:_MAX_OPERANDS]]
                count = sum(int((~torch.isfinite(t)).sum()) for t in outputs.values())
                self.from_inf.append(_Op(op, user_location(sys._getframe()), frames, described, False, count))
            return
        if not finite and self.fed is not None:
            return
        described = [describe_operand(p, v, before if v is target else None) for p, v in operands[:_MAX_OPERANDS]]
        count = sum(int((~torch.isfinite(t)).sum()) for t in outputs.values())
        record = _Op(op, user_location(sys._getframe()), frames, described, finite, count)
        if finite:
            self.candidates.append(record)
        else:
            self.fed = record

    def choose(self, loc: Localization, culprit: ModuleCall | None) -> _Op | None:
        """The operation behind ``loc``: inside the named module (its own ``forward`` first), outside
        every module when the module received it as input or when no module was named."""
        outside = next((c for c in self.candidates if not c.frames), None)
        if loc.module is not None:
            if loc.inputs_finite is False:
                return outside
            own = next((c for c in self.candidates if c.frames and c.frames[-1] is culprit), None)
            inside = own or next((c for c in self.candidates if any(f is culprit for f in c.frames)), None)
            # none from finite inputs: the module made its own infinities (a -inf mask fill), then NaN from them
            return inside or next((c for c in self.from_inf if any(f is culprit for f in c.frames)), None)
        if loc.loss_finite is True:
            return None
        return outside or self.fed

