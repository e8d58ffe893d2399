"""A failing loss captured with :func:`torch.export`, replayable without the user's source code.

:func:`export_loss` traces ``loss_fn(batch)`` (the model's forward, or a LightningModule's
``training_step``) into an exported program: the graph of torch operations with the weights and
buffers, each operation tagged with the module it ran in and the line of code that called it. It
loads in any process with the same torch (:func:`load_program`), where :func:`replay_program`
runs it on the failing batch and names the first operation whose output turned non-finite, as
:func:`~lightning_nan.core.localize.localize` does with the model's own code.

>>> import torch
>>> class Log(torch.nn.Module):
...     def forward(self, x):
...         return torch.log(x).sum()
>>> log = Log()
>>> data, error = export_loss(log, log, torch.tensor([1.0, 0.0]))
>>> error is None
True
>>> reproduced, loc = replay_program(load_program(data), torch.tensor([1.0, 0.0]))
>>> reproduced, loc.op, loc.module, loc.op_output_nonfinite
(True, 'log', '', 1)
"""

from __future__ import annotations

import inspect
import io
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.export.passes
import torch.fx.traceback
from torch import Tensor
from torch.utils import _pytree as pytree

from lightning_nan.core.localize import Localization, first_nonfinite_grad
from lightning_nan.core.op_trace import describe_operand
from lightning_nan.core.reevaluate import all_finite, as_loss, loss_is_finite, preserved

#: The name the model has inside the exported program (``model.conv.0`` is the model's ``conv.0``).
PREFIX = "model"


class _Loss(torch.nn.Module):
    """``loss_fn(batch)`` as a module holding ``model``, for :func:`torch.export.export`."""

    _loss_fn: Callable[[Any], Any]

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_loss_fn", loss_fn)  # not a submodule even when it is the model itself

    def forward(self, batch: Any) -> Tensor:
        return as_loss(self._loss_fn(batch))


def export_loss(module: torch.nn.Module, loss_fn: Callable[[Any], Any], batch: Any) -> tuple[bytes | None, str | None]:
    """``(the exported program as bytes, None)``, or ``(None, why not)`` when torch cannot export it.

    ``loss_fn(batch)`` must run ``module`` and return the loss. Traced with fake tensors
    (``strict=False``): nothing is computed, and ``module`` (buffers, gradients, train/eval flags,
    random state) is left as it was. The program is saved for the CPU (weights, buffers and the
    devices named in the graph), to be replayed by :func:`replay_program` on a CPU batch.
    """
    try:
        _keep_frames_of(module)
        with preserved(module), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(_Loss(module, loss_fn), (batch,), strict=False)
            program = torch.export.passes.move_to_device_pass(program, "cpu")  # replayed where there is no GPU
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
        return buffer.getvalue(), None
    except Exception as err:  # noqa: BLE001 - any failure only means "not exportable"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {first[:300]}"


def _keep_frames_of(module: torch.nn.Module) -> None:
    """Have the exporter record the lines of the model's own methods (``training_step``, helpers), not
    only of ``forward``s, in each operation's stack trace (:func:`torch.fx.traceback.annotate_fn`)."""
    annotate_fn = getattr(torch.fx.traceback, "annotate_fn", None)  # torch marks it not backward compatible
    if annotate_fn is None:  # then only the lines of forward()s are recorded
        return
    for cls in type(module).__mro__:
        if cls.__module__.split(".")[0] in _LIBRARIES:
            continue
        for fn in vars(cls).values():
            if inspect.isfunction(fn) and fn.__name__ != "forward":
                annotate_fn({})(fn)  # registers the function's frames as worth recording


_LIBRARIES = {"builtins", "torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "lightning_nan"}


def load_program(data: bytes) -> Any:
    """The :class:`torch.export.ExportedProgram` saved by :func:`export_loss`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(io.BytesIO(data))


def replay_program(program: Any, batch: Any, *, backward: bool = False) -> tuple[bool, Localization]:
    """Run the exported loss on ``batch``: ``(whether it is non-finite, where it first turned so)``.

    The first operation, in execution order, whose floating-point output holds a NaN/Inf while its
    inputs were finite is ``op`` (e.g. ``"div"``), in ``module`` (the innermost module it ran in, as
    named in the model; ``None`` outside the model's modules), called from ``op_location`` (the
    training machine's file and line). When the batch itself holds NaN/Inf, the first operation fed
    it is named with ``inputs_finite=False``. With ``backward`` and a finite loss, ``grad_param`` is
    the first parameter whose gradient is non-finite.
    """
    gm = program.module()
    flat = pytree.tree_leaves(((batch,), {}))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.set_grad_enabled(backward):
        if len(placeholders) == len(flat):
            finder = _FirstNonFinite(gm)
            out = next((t for t in pytree.tree_leaves(finder.run(*flat)) if isinstance(t, Tensor)), None)
            loc = finder.loc
        else:  # inputs the exporter turned into constants: no per-operation search
            out, loc = None, Localization()
        loss = as_loss(out if out is not None else gm(batch))
        loc.loss_finite = loss_is_finite(loss)
        reproduced = not loc.loss_finite
        if backward and loc.loss_finite:
            named = [(_model_name(n), p) for n, p in gm.named_parameters()]
            loc.grad_param = first_nonfinite_grad(loss, named)
            reproduced = loc.grad_param is not None
    return reproduced, loc


class _FirstNonFinite(torch.fx.Interpreter):
    """Runs the graph, recording the first operation that made, or was fed, a non-finite value."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.loc = Localization()
        self._found = False
        self._outside = False  # found outside every module: the first module it reaches is still wanted

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "call_function":
            return out
        if self._outside:
            self._reaching(n)
        if self._found:
            return out
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
        if all_finite(outputs):
            return out
        self._found = True
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        operands = [(f"args[{i}]", a) for i, a in enumerate(args)] + [(f"kwargs[{k!r}]", v) for k, v in kwargs.items()]
        operands = [(p, v) for p, v in operands if isinstance(v, Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))]
        inputs = [describe_operand(p, v, None) for p, v in operands[:16]]
        inputs_finite = all_finite([v for _, v in operands if isinstance(v, Tensor) and v.is_floating_point()])
        module, module_type = _module_of(n)
        ranges = [(e["min"], e["max"]) for e in inputs if e.get("min") is not None and "shape" in e]
        count = sum(int((~torch.isfinite(t)).sum()) for t in outputs)
        self.loc = Localization(
            module=module,
            module_type=module_type,
            inputs_finite=inputs_finite,
            input_range=(min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None,
            output_nonfinite=count,
            first_nonfinite_input=None if inputs_finite else module,
        )
        if not inputs_finite and module is not None:  # the data reached this module non-finite
            self.loc.module, self.loc.module_type = _module_of(n, outermost=True)
            self.loc.first_nonfinite_input = self.loc.module
        else:  # made here (or fed from outside every module): name the operation
            self.loc.op, self.loc.op_location, self.loc.op_inputs = _op_name(n.target), _location(n), inputs
            self.loc.op_output_nonfinite, self.loc.op_inputs_finite = count, inputs_finite
            self._outside = module is None and inputs_finite
        return out

    def _reaching(self, n: torch.fx.Node) -> None:
        """After an operation outside every module made a NaN/Inf: the first module it reaches as input."""
        module, module_type = _module_of(n, outermost=True)
        if module is None:
            return
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        floats = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.is_floating_point()]
        if not all_finite(floats):
            self.loc.module, self.loc.module_type, self.loc.inputs_finite = module, module_type, False
            self.loc.first_nonfinite_input, self._outside = module, False


def _model_name(name: str) -> str:
    """``model.conv.0`` -> ``conv.0``; ``model`` -> ``""`` (the model itself)."""
    return "" if name == PREFIX else name.removeprefix(PREFIX + ".")


def _module_of(node: torch.fx.Node, outermost: bool = False) -> tuple[str | None, str | None]:
    """The innermost (or outermost) module of the model ``node`` ran in, and its class name (``None`` outside)."""
    stack = node.meta.get("nn_module_stack") or {}
    inner = [(path, kind) for path, kind in stack.values() if path == PREFIX or path.startswith(PREFIX + ".")]
    if not inner:
        return None, None
    path, kind = inner[0 if outermost else -1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return _model_name(path), kind.rsplit(".", 1)[-1]


def _op_name(target: Any) -> str:
    """``aten.div.Tensor`` -> ``"div"``; in-place variants keep their ``_``."""
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _location(node: torch.fx.Node) -> str | None:
    """``file:line in function`` of the last frame of the operation's recorded stack outside torch."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    user = [f for f in frames if not f[0].startswith((os.path.dirname(torch.__file__), ours))]
    if not user:
        return None
    path, line, function = user[-1]
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    except ValueError:  # another drive (Windows)
        pass
    return f"{path}:{line} in {function}"
