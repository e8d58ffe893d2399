"""How a localization reads: where a forward (and backward) pass first turned non-finite, in words.

:class:`Localization` is what :func:`~lightning_nan.core.localize.localize` finds; its
:meth:`~Localization.summary` names the module, the operation, its source line and a guess at the
cause from cheap facts about the operands (``"0/0?"``, ``"log(<=0)?"``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Localization", "LocalizationFacts"]


@dataclass
class LocalizationFacts:
    """The facts of a localization (each explained on :class:`Localization`), shared by :class:`Localization`
    (what the search found) and its JSON form, :class:`~lightning_nan.core.records.LocalizationRecord`
    (non-finite floats as text)."""

    module: str | None = None
    module_type: str | None = None
    inputs_finite: bool | None = None
    input_range: Any = None  # (min, max); the record keeps non-finite bounds as text
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


@dataclass
class Localization(LocalizationFacts):
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

    input_range: tuple[float, float] | None = None

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


_OVERFLOW_OPS = frozenset({"exp", "exp2", "expm1", "cosh", "sinh", "square", "mul", "multiply", "matmul", "mm", "bmm",
                           "addmm", "linear", "einsum", "add", "sub", "sum", "cumsum", "prod", "cumprod", "norm",
                           "ldexp", "conv1d", "conv2d", "conv3d"})  # fmt: skip


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

