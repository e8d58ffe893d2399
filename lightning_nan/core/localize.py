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

import dataclasses
import functools
import importlib.util
import math
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

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
        op: the torch operation that made the first non-finite value, e.g. ``"div"``, ``"log"``,
            ``"pow"`` (in-place variants end in ``_``): the first one, in execution order, whose
            floating-point output held a NaN/Inf while all its floating-point inputs (tensors and
            Python numbers) were finite, within ``module`` when it is set and outside every module
            otherwise (explicit ``-inf`` fills such as attention masks are not counted: their input
            is not finite). When no module was named and no such operation ran outside the modules,
            the first operation outside every module that was *fed* a non-finite value
            (``op_inputs_finite=False``). ``None`` when none was found.
        op_location: ``"path/to/file.py:LINE in function"`` of the innermost caller of ``op`` outside
            torch, Lightning, ``lightning_nan`` and the standard library (relative to the working
            directory when under it).
        op_inputs: one dict per operand of ``op`` (at most 16), in the order they appear in the
            expression: tensors give ``arg``, ``shape``, ``dtype``, ``min``/``max`` (over the finite
            elements; ``None`` when there are none), ``nonfinite``, ``has_zero``, ``has_negative``;
            Python numbers give ``arg``, ``dtype``, ``value`` and the same flags.
        op_output_nonfinite: the number of non-finite elements ``op`` produced.
        op_inputs_finite: whether all of ``op``'s floating-point inputs were finite. ``False`` inside a
            named module means the module made its own infinities (a ``-inf`` mask fill, say) and ``op``
            turned them into NaN (softmax of a row that is all ``-inf``, ``inf - inf``, ``0 * inf``).
        backward_op: with ``backward=True``, a finite loss and a non-finite gradient: the first
            autograd node that turned finite gradients into NaN/Inf (e.g. ``"SqrtBackward0"``), found by
            one replay under anomaly mode (:func:`~lightning_nan.core.backward_fault.backward_fault`).
        backward_location: the line of user code whose forward call made that node.
        backward_module: the module whose ``forward`` holds that line; ``backward_module_type`` its class.
    """

    module: str | None = None
    module_type: str | None = None
    inputs_finite: bool | None = None
    input_range: tuple[float, float] | None = None
    output_nonfinite: int | None = None
    first_nonfinite_input: str | None = None
    grad_param: str | None = None
    loss_finite: bool | None = None
    op: str | None = None
    op_location: str | None = None
    op_inputs: list[dict[str, Any]] | None = None
    op_output_nonfinite: int | None = None
    op_inputs_finite: bool | None = None
    backward_op: str | None = None
    backward_location: str | None = None
    backward_module: str | None = None
    backward_module_type: str | None = None

    def summary(self) -> str:
        """One line for a log or an incident record.

        >>> Localization(module="enc.2", module_type="Linear", inputs_finite=True, input_range=(-3.14, 4.2)).summary()
        'first non-finite output in enc.2 (Linear) from finite inputs in [-3.14, 4.2]'
        >>> Localization(module="", module_type="Net", inputs_finite=False, first_nonfinite_input="").summary()
        'non-finite input already reaching <root> (Net): the data (or code outside the modules) was not finite'
        >>> zero = {"arg": "args[0]", "shape": [4], "dtype": "float32", "min": 0.0, "max": 0.0, "has_zero": True}
        >>> Localization(module="", module_type="Net", inputs_finite=True, op="div", op_location="model.py:88 in forward",
        ...              op_inputs=[zero, zero], op_output_nonfinite=4, op_inputs_finite=True).summary()
        'first non-finite value from div at model.py:88 in forward (inputs finite: min 0, max 0 — 0/0?), 4 non-finite elements, inside <root> (Net)'
        """
        if self.op is not None:
            text = self._op_text()
        elif self.module is not None:
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
        if self.backward_op is not None:
            text += f"; backward: {self.backward_op} made it" + (f" (forward at {self.backward_location})" if self.backward_location else "")
            if self.backward_module is not None:
                text += f" inside {self.backward_module or '<root>'} ({self.backward_module_type})"
        return text

    def _op_text(self) -> str:
        at = f"{self.op}" + (f" at {self.op_location}" if self.op_location else "")
        where = None if self.module is None else f"{self.module or '<root>'} ({self.module_type})"
        if self.op_inputs_finite is False and self.module is not None:  # NaN made from the module's own infinities
            hint = _hint(self.op or "", self.op_inputs or [])
            text = f"first NaN from {at}, made from +-inf inputs (no NaN){f' — {hint}' if hint else ''}"
            return text + f", inside {self.module or '<root>'} ({self.module_type})"
        if self.op_inputs_finite is False:
            text = "every module's output was finite but the loss was not: a non-finite input reached"
            return f"{text} {at}, outside every module"
        inputs = self.op_inputs or []
        tensors = [e for e in inputs if "shape" in e]  # Python numbers (dims, exponents) only when no tensor
        bounds = [e.get(k) for e in tensors or inputs for k in ("min", "max", "value")]
        values = [v for v in bounds if isinstance(v, (int, float))]
        facts = f"inputs finite: min {min(values):.3g}, max {max(values):.3g}" if values else "inputs finite"
        hint = _hint(self.op or "", inputs)
        text = f"first non-finite value from {at} ({facts}{f' — {hint}' if hint else ''})"
        if self.op_output_nonfinite:
            text += f", {self.op_output_nonfinite} non-finite element{'s' * (self.op_output_nonfinite > 1)}"
        if where is None:
            return text + ", outside every module"
        if self.inputs_finite is False:
            return text + f", outside every module, then reaching {where} as input"
        return text + f", inside {where}"

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
        self.culprit: _Frame | None = None  # the frame of ``loc.module``

    def _record(self, frame: _Frame, inputs_finite: bool) -> None:
        self.culprit = frame
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
_OVERFLOW_OPS = frozenset({"exp", "exp2", "expm1", "cosh", "sinh", "square", "mul", "multiply", "matmul", "mm", "bmm",
                           "addmm", "linear", "einsum", "add", "sub", "sum", "cumsum", "prod", "cumprod", "norm",
                           "ldexp", "conv1d", "conv2d", "conv3d"})  # fmt: skip


def _op_name(func: Any) -> tuple[str, bool]:
    """A short readable name for ``func`` (``Tensor.__rtruediv__`` -> ``"div"``) and whether it is reflected."""
    name = getattr(func, "__name__", None) or torch.overrides.resolve_name(func) or repr(func)
    name = name.rsplit(".", 1)[-1]
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        core = name[2:-2]
        return _ALIASES.get(core, core), core in _REFLECTED
    return name.lstrip("_") or name, False


def _hint(op: str, inputs: list[dict[str, Any]]) -> str | None:
    """A guess at the cause from cheap facts about the operands (``"0/0?"``, ``"log(0)?"``...).

    >>> _hint("div", [{"has_zero": True}, {"has_zero": True}]), _hint("sqrt_", [{"has_negative": True}])
    ('0/0?', 'sqrt(<0)?')
    """
    base = op.rstrip("_")
    if not inputs:
        return None
    first = inputs[0]
    lo: Any = first.get("min", first.get("value"))
    hi: Any = first.get("max", first.get("value"))
    known = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
    if base in {"div", "divide", "true_divide", "floor_divide", "remainder", "fmod"}:
        if len(inputs) >= 2 and inputs[1].get("has_zero"):
            return "0/0?" if first.get("has_zero") else "division by zero?"
    elif base == "reciprocal" and first.get("has_zero"):
        return "1/0?"
    elif base in {"log", "log2", "log10", "sqrt", "rsqrt"}:
        zero, negative = first.get("has_zero") and base != "sqrt", first.get("has_negative")
        if zero or negative:
            return f"{base}({'<=0' if zero and negative else '0' if zero else '<0'})?"
    elif base == "log1p" and known and lo <= -1:
        return "log1p(<=-1)?"
    elif base in {"acos", "asin", "arccos", "arcsin"} and known and (lo < -1 or hi > 1):
        return "outside [-1, 1]?"
    elif base in {"atanh", "arctanh"} and known and (lo <= -1 or hi >= 1):
        return "outside (-1, 1)?"
    elif base in {"softmax", "log_softmax", "_softmax"} and first.get("nonfinite"):
        return "a row that is all -inf (fully masked)?"
    elif base in {"std", "var", "std_mean", "var_mean"}:
        return "too few elements for the correction, or overflow?"
    elif base in {"pow", "float_power"} and len(inputs) >= 2:
        exponent = inputs[1]
        value = exponent.get("value")
        if first.get("has_negative") and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return "negative base to a fractional power?"
        if first.get("has_zero") and exponent.get("has_negative"):
            return "0 to a negative power?"
        return "overflow?"
    elif base in _OVERFLOW_OPS:
        return "overflow?"
    return None


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


def _describe(path: str, value: Any, facts: Tensor | None) -> dict[str, Any]:
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


@functools.cache
def _library_roots() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The folders of torch, Lightning and ``lightning_nan``; those of the standard library."""
    roots = [os.path.dirname(torch.__file__), str(Path(__file__).resolve().parents[1])]
    for name in ("pytorch_lightning", "lightning", "lightning_fabric"):
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            roots.extend(spec.submodule_search_locations)
    paths = sysconfig.get_paths()
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    folders = lambda paths: tuple(os.path.join(os.path.realpath(r), "") for r in paths)  # noqa: E731
    return folders(roots), folders(stdlib)


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    """Whether ``filename`` belongs to torch, Lightning, ``lightning_nan`` or the standard library."""
    if filename.startswith("<"):  # <frozen ...> is the standard library; <doctest ...>, <string>, <stdin> user code
        return filename.startswith("<frozen")
    real = os.path.realpath(filename)
    packages, stdlib = _library_roots()
    if real.startswith(packages):
        return True
    # The standard library's folder may hold site-packages (a virtual environment's, or a plain installation's).
    third_party = {"site-packages", "dist-packages"}
    return any(real.startswith(r) and not third_party & set(real[len(r) :].split(os.sep)) for r in stdlib)


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
        except ValueError:  # another drive
            rel = os.pardir
        path = path if rel.startswith(os.pardir) else rel
    return path


def _user_location(frame: Any) -> str | None:
    """``"file.py:LINE in function"`` of the innermost frame, from ``frame`` outwards, in user code."""
    while frame is not None:
        code = frame.f_code
        if not _is_library_file(code.co_filename):
            return f"{_relative(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return None


@dataclass
class _Op:
    """An operation whose output held a non-finite value."""

    name: str
    location: str | None
    frames: tuple[_Frame, ...]  # the module calls in progress, outermost first
    inputs: list[dict[str, Any]]
    inputs_finite: bool
    output_nonfinite: int


class _OpTracer(TorchFunctionMode):
    """Checks every torch operation's output until a module is named; records those that made a
    non-finite value from finite inputs, and the first outside every module that was fed one."""

    def __init__(self, tracer: _Tracer) -> None:
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
        op, reflected = _op_name(func)
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
                described = [_describe(p, v, before if v is target else None) for p, v in operands[:_MAX_OPERANDS]]
                count = sum(int((~torch.isfinite(t)).sum()) for t in outputs.values())
                self.from_inf.append(_Op(op, _user_location(sys._getframe()), frames, described, False, count))
            return
        if not finite and self.fed is not None:
            return
        described = [_describe(p, v, before if v is target else None) for p, v in operands[:_MAX_OPERANDS]]
        count = sum(int((~torch.isfinite(t)).sum()) for t in outputs.values())
        record = _Op(op, _user_location(sys._getframe()), frames, described, finite, count)
        if finite:
            self.candidates.append(record)
        else:
            self.fed = record

    def choose(self, loc: Localization, culprit: _Frame | None) -> _Op | None:
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
    tracer = _Tracer()
    ops = _OpTracer(tracer)

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
                loc.grad_param = _first_nonfinite_grad(loss, named)
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
