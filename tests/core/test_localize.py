"""localize() names the first module (and parameter gradient) where a NaN/Inf appears, and leaves no trace."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch
from torch import nn

from lightning_nan.core.localize import Localization, localize


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)  # op


class SqrtMinusOne(nn.Module):
    def forward(self, x):
        return torch.sqrt(x - 1)  # op


class Log(nn.Module):
    def forward(self, x):
        return {"log": torch.log(x), "aux": (x.clone(),)}  # op


class Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()


class LogThenChild(nn.Module):
    """The NaN is made by a functional op in this module's own forward, before its child runs."""

    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(2, 2)

    def forward(self, x):
        return self.child(torch.log(x))


class Net(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(2, 3), middle)
        self.norm = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.drop(self.norm(self.encoder(x))))


def _assert_no_hooks(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._forward_hooks_with_kwargs and not m._forward_pre_hooks_with_kwargs
    for p in model.parameters():
        assert not p._backward_hooks


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _marked_line(fn, marker: str = "# op") -> int:
    """The line of ``fn``'s source that ends with ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    (line,) = [start + i for i, text in enumerate(lines) if text.rstrip().endswith(marker)]
    return line


def _assert_location(loc: Localization, fn, func: str | None = None, marker: str = "# op") -> None:
    """``loc.op_location`` is ``file:line in func`` for the line of ``fn`` marked ``marker``."""
    path, rest = loc.op_location.rsplit(":", 1)
    line, name = rest.split(" in ")
    assert os.path.samefile(path, inspect.getsourcefile(fn))
    assert (int(line), name) == (_marked_line(fn, marker), func or fn.__name__)


def _mode_stack() -> list:
    return torch.overrides._get_current_function_mode_stack()


def test_exp_overflow_is_attributed_to_the_exp_module_with_its_input_range():
    model = Net(Exp())
    with torch.no_grad():
        model.encoder[0].weight[1, 0] = 1e3  # finite, but exp of it overflows
    x = torch.tensor([[0.5, -1.0], [0.2, 0.3], [-0.1, 2.0]])
    h = (x.double() @ model.encoder[0].weight.detach().double().T + model.encoder[0].bias.detach().double()).float()
    loc = localize(model, lambda: model(x).sum())
    assert (loc.module, loc.module_type, loc.inputs_finite, loc.first_nonfinite_input) == ("encoder.1", "Exp", True, None)
    lo, hi = loc.input_range
    assert lo == pytest.approx(float(h.min()), rel=1e-6) and hi == pytest.approx(float(h.max()), rel=1e-6)
    assert loc.output_nonfinite == int((h.double() > math.log(torch.finfo(torch.float32).max)).sum()) == 2
    assert loc.loss_finite is False and loc.grad_param is None
    assert loc.op == "exp" and loc.op_inputs_finite is True and loc.op_output_nonfinite == 2
    _assert_location(loc, Exp.forward)
    (arg,) = loc.op_inputs
    assert arg["shape"] == [3, 3] and arg["dtype"] == "float32" and (arg["min"], arg["max"]) == (lo, hi)
    assert arg["nonfinite"] == 0 and arg["has_negative"] is bool((h < 0).any()) and arg["has_zero"] is False
    assert loc.summary() == (
        f"first non-finite value from exp at {loc.op_location} (inputs finite: min {lo:.3g}, max {hi:.3g} — overflow?), "
        "2 non-finite elements, inside encoder.1 (Exp)"
    )


@pytest.mark.parametrize("call", ["root", "root_kwargs", "submodules"])
def test_nan_input_names_the_first_module_that_saw_it(call):
    model = Net(nn.Tanh())
    model.eval()
    x = torch.tensor([[1.0, float("nan")], [-2.0, 3.0]])
    loss_fns = {
        "root": lambda: model(x).sum(),
        "root_kwargs": lambda: model(x=x).sum(),
        "submodules": lambda: model.head(model.encoder(x)).sum(),  # like a training_step calling submodules
    }
    loc = localize(model, loss_fns[call])
    name, module = ("encoder", model.encoder) if call == "submodules" else ("", model)
    assert (loc.module, loc.first_nonfinite_input, loc.inputs_finite) == (name, name, False)
    assert loc.module_type == type(module).__name__
    assert loc.input_range == (-2.0, 3.0)  # over the finite input elements
    with torch.no_grad():
        assert loc.output_nonfinite == _nonfinite(module(x)) > 0
    assert loc.loss_finite is False
    assert "the data" in loc.summary()


def test_sqrt_of_negative_inside_custom_module_names_its_qualified_name():
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(2, 2), SqrtMinusOne(), nn.Linear(2, 1))
    torch.manual_seed(1)
    x = torch.randn(5, 2)
    with torch.no_grad():
        h = model.body[0](x)
    loc = localize(model, lambda: model.body(x).mean())
    assert (loc.module, loc.module_type, loc.inputs_finite) == ("body.1", "SqrtMinusOne", True)
    assert loc.output_nonfinite == int((h < 1).sum()) > 0
    assert loc.input_range == (float(h.min()), float(h.max()))
    # The operation is sqrt (x - 1 is finite); its input is h - 1, with negatives.
    assert (loc.op, loc.op_output_nonfinite) == ("sqrt", int((h < 1).sum()))
    _assert_location(loc, SqrtMinusOne.forward)
    (arg,) = loc.op_inputs
    assert (arg["min"], arg["max"], arg["has_negative"], arg["has_zero"]) == (float((h - 1).min()), float((h - 1).max()), True, False)
    assert "(<0)?" in loc.summary() and loc.summary().endswith("inside body.1 (SqrtMinusOne)")


def test_log_of_zero_with_nested_outputs():
    model = nn.Sequential(nn.ReLU(), nn.Identity(), Log())
    x = torch.tensor([2.0, -1.0, 0.0, 3.0])  # relu -> [2, 0, 0, 3]: log(0) = -inf twice
    loc = localize(model, lambda: model(x)["log"].sum())
    assert (loc.module, loc.module_type, loc.inputs_finite) == ("2", "Log", True)
    assert loc.output_nonfinite == 2 and loc.input_range == (0.0, 3.0)
    assert (loc.op, loc.op_output_nonfinite, loc.op_inputs_finite) == ("log", 2, True)
    _assert_location(loc, Log.forward)
    assert loc.op_inputs == [
        {"arg": "args[0]", "shape": [4], "dtype": "float32", "min": 0.0, "max": 3.0, "nonfinite": 0, "has_zero": True, "has_negative": False}
    ]
    assert "log(0)?" in loc.summary()


def test_functional_op_in_a_parents_forward_is_attributed_to_the_parent():
    model = nn.Sequential(nn.Identity(), LogThenChild())
    loc = localize(model, lambda: model(torch.tensor([[1.0, -1.0]])).sum())
    assert (loc.module, loc.module_type, loc.inputs_finite, loc.first_nonfinite_input) == ("1", "LogThenChild", True, None)
    assert loc.input_range == (-1.0, 1.0)
    with torch.no_grad():
        assert loc.output_nonfinite == _nonfinite(model(torch.tensor([[1.0, -1.0]]))) == 2


def test_nan_weight_in_embedding_with_integer_inputs():
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
    loc = localize(model, lambda: model(torch.tensor([0, 2, 2, 3])).sum())
    assert (loc.module, loc.module_type, loc.inputs_finite) == ("0", "Embedding", True)
    assert loc.input_range is None and loc.output_nonfinite == 2
    assert loc.op is None  # the NaN was already in an input (the weight): no operation made it
    assert loc.summary() == "first non-finite output in 0 (Embedding) from finite inputs, 2 non-finite output elements"


def test_all_finite():
    model = Net(nn.Tanh())
    loc = localize(model, lambda: model(torch.randn(4, 2)).sum(), backward=True)
    assert loc == Localization(loss_finite=True) and loc.op is None
    assert loc.summary() == "forward finite"
    loc = localize(model, lambda: None)  # manual optimization: nothing returned
    assert loc == Localization() and loc.summary() == "forward finite (no loss returned)"


def test_nonfinite_loss_outside_the_modules():
    model = nn.Linear(2, 1)
    target = torch.full((3, 1), float("inf"))  # dirty targets, never seen by a module
    loc = localize(model, lambda: nn.functional.mse_loss(model(torch.ones(3, 2)), target))  # op
    assert loc.module is None and loc.loss_finite is False
    assert "loss was not" in loc.summary()
    # No operation made the Inf: the first one outside the modules that was fed one is named.
    assert (loc.op, loc.op_inputs_finite, loc.op_output_nonfinite) == ("mse_loss", False, 1)
    assert [(a["arg"], a["nonfinite"], a["shape"]) for a in loc.op_inputs] == [("args[0]", 0, [3, 1]), ("args[1]", 3, [3, 1])]
    _assert_location(loc, test_nonfinite_loss_outside_the_modules, "<lambda>")
    assert loc.summary() == (
        f"every module's output was finite but the loss was not: a non-finite input reached mse_loss at {loc.op_location}, "
        "outside every module"
    )
    # An Inf written explicitly in the loss function is named where it is written.
    loc = localize(model, lambda: (model(torch.ones(3, 2)) - torch.full((3, 1), -math.inf)).sum())  # op2
    assert (loc.module, loc.op, loc.op_inputs_finite) == (None, "full", False)
    _assert_location(loc, test_nonfinite_loss_outside_the_modules, "<lambda>", "# op2")
    assert loc.op_inputs[-1] == {"arg": "args[1]", "dtype": "float", "value": "-inf", "nonfinite": 1, "has_zero": False, "has_negative": True}
    # Without a module named, an operation outside the modules that makes the Inf from finite values is named.
    loc = localize(model, lambda: torch.log(model(torch.ones(3, 2)).abs() * 0).sum())  # op3
    assert (loc.module, loc.op, loc.op_inputs_finite, loc.op_output_nonfinite) == (None, "log", True, 3)
    _assert_location(loc, test_nonfinite_loss_outside_the_modules, "<lambda>", "# op3")
    assert loc.summary().endswith("(inputs finite: min 0, max 0 — log(0)?), 3 non-finite elements, outside every module")


def _double_sqrt_model() -> nn.Sequential:
    """Both weights get non-finite gradients; ``2.weight`` is registered last but its gradient comes first."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), Sqrt(), nn.Linear(1, 1, bias=False), Sqrt(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))  # output 0 on x = [1, 1]: sqrt'(0) = inf
        model[2].weight.fill_(0.5)  # input 0 -> output 0 -> sqrt'(0) = inf again
        model[4].weight.fill_(2.0)
        model[4].bias.fill_(0.25)
    return model


@pytest.mark.parametrize("reverse", [False, True])
def test_backward_names_the_first_parameter_with_a_nonfinite_gradient(reverse):
    model = _double_sqrt_model()
    x = torch.ones(1, 2)
    loss_fn = lambda: model(x).sum()  # noqa: E731
    # Independently: the forward is finite, the two first layers' gradients are not, the last layer's are.
    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(loss_fn(), list(model.parameters()))))
    assert torch.isfinite(loss_fn())
    assert [n for n, g in grads.items() if not torch.isfinite(g).all()] == ["0.weight", "2.weight"]
    named = list(model.named_parameters())
    loc = localize(model, loss_fn, backward=True, params=named[::-1] if reverse else named)
    assert (loc.module, loc.loss_finite, loc.grad_param) == (None, True, "2.weight")  # backward order, not registration
    # The anomaly-mode replay names the backward node and its forward line, inside the Sqrt module.
    assert (loc.backward_op, loc.backward_module, loc.backward_module_type) == ("SqrtBackward0", "1", "Sqrt")
    assert loc.backward_location.startswith(f"{os.path.relpath(__file__)}:") and loc.backward_location.endswith(" in forward")
    assert loc.summary().startswith("forward finite; first non-finite gradient in 2.weight; backward: SqrtBackward0 made it")
    # Only the parameters asked about are checked.
    loc = localize(model, loss_fn, backward=True, params=[named[0], named[3]])
    assert loc.grad_param == "0.weight"
    assert all(p.grad is None for p in model.parameters())
    _assert_no_hooks(model)


def test_backward_sqrt_zero_names_the_parameter_before_it():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), Sqrt(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -2.0]]))
    loc = localize(model, lambda: model(torch.ones(3, 2)).mean(), backward=True)
    assert (loc.module, loc.loss_finite, loc.grad_param) == (None, True, "0.weight")
    # Without backward the gradients are not checked.
    assert localize(model, lambda: model(torch.ones(3, 2)).mean()).grad_param is None


def test_grad_mode():
    model = nn.Linear(2, 1)
    seen = []

    def loss_fn():
        out = model(torch.ones(1, 2)).sum()
        seen.append(out.requires_grad)
        return out

    localize(model, loss_fn)
    with torch.no_grad():
        localize(model, loss_fn, backward=True)
    assert seen == [False, True]


def test_leaves_no_hooks_and_no_state_changes():
    model = Net(Exp())
    model.train()
    model.encoder.eval()  # mixed flags; the dropout stays in training mode and draws
    model(torch.randn(6, 2))  # non-default BatchNorm statistics
    model.head.bias.grad = torch.full((1,), 3.0)
    bias_grad = model.head.bias.grad
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    x = torch.randn(6, 2)

    torch.manual_seed(5)
    expected_mask = nn.functional.dropout(torch.ones(32), 0.5) != 0
    torch.manual_seed(5)
    for backward in (False, True):
        loc = localize(model, lambda: model(x).sum(), backward=backward)
        assert loc.loss_finite is True
    with pytest.raises(RuntimeError, match="boom"):
        localize(model, lambda: (model(x), model.eval(), (_ for _ in ()).throw(RuntimeError("boom"))), backward=True)
    assert torch.equal(nn.functional.dropout(torch.ones(32), 0.5) != 0, expected_mask)

    _assert_no_hooks(model)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert int(model.norm.num_batches_tracked) == 1
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert [m.training for m in model.modules()] == flags
    assert model.head.bias.grad is bias_grad and torch.equal(bias_grad, torch.full((1,), 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.bias")


def test_to_dict_is_json_safe():
    loc = Localization(module="a.b", module_type="Linear", input_range=(float("-inf"), float("nan")), output_nonfinite=3)
    data = json.loads(json.dumps(loc.to_dict(), allow_nan=False))
    assert data["input_range"] == ["-inf", "nan"] and data["module"] == "a.b" and data["output_nonfinite"] == 3
    model = Net(Exp())
    with torch.no_grad():
        model.encoder[0].weight.fill_(1e3)
    real = localize(model, lambda: model(torch.ones(2, 2)).sum())
    assert json.loads(json.dumps(real.to_dict(), allow_nan=False)) == {
        **real.to_dict(),
        "input_range": list(real.input_range),
    }


class Standardize(nn.Module):
    """Per-sample standardisation: an all-zero sample gives 0/0."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        z = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)  # op
        return self.head(z)


class Square(nn.Module):
    def forward(self, x):
        return x.pow(2)  # op


class InPlaceLog(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.log_()  # op
        return y


class Reciprocal(nn.Module):
    def forward(self, x):
        return 1 / x  # op


class MaskedThenLog(nn.Module):
    """A deliberate -inf attention mask (finite after softmax), then a real log(0)."""

    def forward(self, scores, mask, log=True):
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return torch.log(probs) if log else probs  # op


def test_standardisation_of_an_all_zero_sample_names_div_and_its_line():
    model = Standardize()
    x = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]])
    loc = localize(model, lambda: model(x).sum())
    # The module: the root, whose own forward made the NaN its child received.
    assert (loc.module, loc.module_type, loc.inputs_finite) == ("", "Standardize", True)
    num, den = x - x.mean(dim=1, keepdim=True), x.std(dim=1, keepdim=True)
    assert (loc.op, loc.op_inputs_finite, loc.op_output_nonfinite) == ("div", True, _nonfinite(num / den)) == ("div", True, 3)
    _assert_location(loc, Standardize.forward)
    assert [(a["arg"], a["shape"], a["min"], a["max"], a["has_zero"], a["has_negative"], a["nonfinite"]) for a in loc.op_inputs] == [
        ("args[0]", [3, 3], float(num.min()), float(num.max()), True, True, 0),
        ("args[1]", [3, 1], float(den.min()), float(den.max()), True, False, 0),
    ]
    assert float(den.min()) == 0.0
    assert loc.summary() == (
        f"first non-finite value from div at {loc.op_location} (inputs finite: min {min(num.min(), den.min()):.3g}, "
        f"max {max(num.max(), den.max()):.3g} — 0/0?), 3 non-finite elements, inside <root> (Standardize)"
    )


def test_pow_overflow():
    model = nn.Sequential(nn.Identity(), Square())
    loc = localize(model, lambda: model(torch.tensor([1e38, -2.0, 3.0])).sum())
    assert (loc.module, loc.op, loc.op_output_nonfinite) == ("1", "pow", 1)
    _assert_location(loc, Square.forward)
    assert loc.op_inputs[0]["max"] == float(torch.tensor(1e38)) and loc.op_inputs[0]["min"] == -2.0
    assert loc.op_inputs[1] == {"arg": "args[1]", "dtype": "int", "value": 2, "nonfinite": 0, "has_zero": False, "has_negative": False}
    assert "— overflow?), 1 non-finite element, inside 1 (Square)" in loc.summary()


def test_exp_of_100():
    model = nn.Sequential(Exp())
    loc = localize(model, lambda: model(torch.tensor([100.0, 1.0])).sum())
    assert math.exp(100.0) > torch.finfo(torch.float32).max
    assert (loc.module, loc.op, loc.op_output_nonfinite, loc.op_inputs[0]["max"]) == ("0", "exp", 1, 100.0)
    _assert_location(loc, Exp.forward)


def test_in_place_op_is_checked_against_its_input_before_the_call():
    model = nn.Sequential(nn.ReLU(), InPlaceLog())
    loc = localize(model, lambda: model(torch.tensor([2.0, -1.0, 5.0])).sum())
    assert (loc.module, loc.op, loc.op_inputs_finite, loc.op_output_nonfinite) == ("1", "log_", True, 1)
    _assert_location(loc, InPlaceLog.forward)
    # The values before the call (relu's output), not the -inf written into the same tensor.
    assert loc.op_inputs == [
        {"arg": "args[0]", "shape": [3], "dtype": "float32", "min": 0.0, "max": 5.0, "nonfinite": 0, "has_zero": True, "has_negative": False}
    ]


def test_reflected_division_lists_operands_in_expression_order():
    model = nn.Sequential(Reciprocal())
    loc = localize(model, lambda: model(torch.tensor([[0.5, 0.0]])).sum())
    assert (loc.op, loc.op_output_nonfinite) == ("div", 1)
    _assert_location(loc, Reciprocal.forward)
    assert [a["arg"] for a in loc.op_inputs] == ["args[1]", "args[0]"]  # 1 / x
    assert loc.op_inputs[0]["value"] == 1 and loc.op_inputs[1]["has_zero"] is True
    assert "— division by zero?)" in loc.summary()


def test_deliberate_inf_mask_is_not_blamed():
    model = MaskedThenLog()
    scores = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[False, True, False], [False, False, False]])
    loc = localize(model, lambda: model(scores, mask).sum())
    # masked_fill wrote -inf on purpose (a non-finite input); softmax turned it into an exact 0; log(0) = -inf.
    assert (loc.module, loc.op, loc.op_output_nonfinite) == ("", "log", 1)
    _assert_location(loc, MaskedThenLog.forward)
    assert loc.op_inputs[0]["has_zero"] is True and loc.op_inputs[0]["min"] == 0.0
    # The same mask with a healthy ending: no operation is named.
    loc = localize(model, lambda: model(scores, mask, log=False).sum())
    assert loc == Localization(loss_finite=True)


def test_dirty_data_made_outside_the_modules_names_the_op():
    model = nn.Sequential(nn.Linear(2, 1))
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    loc = localize(model, lambda: model(a / b).sum())  # op
    assert (loc.module, loc.inputs_finite, loc.first_nonfinite_input) == ("", False, "")
    assert (loc.op, loc.op_inputs_finite, loc.op_output_nonfinite) == ("div", True, 1)
    _assert_location(loc, test_dirty_data_made_outside_the_modules_names_the_op, "<lambda>")
    assert loc.summary().endswith("— 0/0?), 1 non-finite element, outside every module, then reaching <root> (Sequential) as input")
    # Data that was dirty before the loss function ran: no operation to name.
    x = a / b
    loc = localize(model, lambda: model(x).sum())
    assert (loc.module, loc.inputs_finite, loc.op) == ("", False, None)


def test_the_mode_is_active_only_inside_the_loss_function():
    model = nn.Sequential(Exp())
    seen = []

    def loss_fn():
        seen.append([type(m).__module__ for m in _mode_stack()])
        return model(torch.tensor([1000.0])).sum()

    assert _mode_stack() == []
    assert localize(model, loss_fn).op == "exp"
    assert seen == [["lightning_nan.core.op_trace"]] and _mode_stack() == []

    def boom():
        model(torch.ones(1))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        localize(model, boom, backward=True)
    assert _mode_stack() == [] and torch._C._is_torch_function_mode_enabled() is False
    # A normal operation afterwards goes through no other mode: a probe mode sees nothing beneath it.
    calls = []

    class Probe(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append((func.__name__, [type(m).__name__ for m in _mode_stack()]))
            return func(*args, **(kwargs or {}))

    with Probe():
        torch.exp(torch.full((1,), 1000.0))
    assert calls == [("full", []), ("exp", [])] and _mode_stack() == []


class _InfGradient(torch.autograd.Function):
    """Identity forward; the backward, in Python torch ops, divides by zero."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / torch.zeros_like(grad)


def test_backward_localization_works_with_the_mode_and_backward_ops_are_not_traced():
    model = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1))
    x = torch.ones(4, 2)

    def loss_fn():
        return model[1](_InfGradient.apply(model[0](x))).mean()

    grads = torch.autograd.grad(loss_fn(), list(model.parameters()))
    assert [torch.isfinite(g).all().item() for g in grads] == [False, False, True, True]
    loc = localize(model, loss_fn, backward=True)
    assert (loc.module, loc.loss_finite, loc.grad_param, loc.op) == (None, True, "0.bias", None)
    assert all(p.grad is None for p in model.parameters()) and _mode_stack() == []
    # The sqrt'(0) = inf model too: forward finite, gradients not, no operation named.
    loc = localize(_double_sqrt_model(), lambda: None)
    assert loc == Localization()


def test_to_dict_with_op_is_json_safe():
    model = Standardize()
    loc = localize(model, lambda: model(torch.zeros(2, 3)).sum())
    data = json.loads(json.dumps(loc.to_dict(), allow_nan=False))
    assert data["op"] == "div" and data["op_location"] == loc.op_location and data["op_output_nonfinite"] == 6
    assert data["op_inputs"] == loc.op_inputs and data["op_inputs_finite"] is True


def test_softmax_of_a_fully_masked_row_is_named_though_its_input_is_minus_inf():
    """The module makes its own -inf (a mask fill); the softmax that turns a row of them into NaN is named."""

    class Attention(nn.Module):
        def forward(self, q, mask):
            scores = (q @ q.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
            att = torch.softmax(scores, dim=-1)
            return att @ q

    model = nn.Sequential()
    model.add_module("attn", Attention())
    q = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    loc = localize(model.attn, lambda: model.attn(q, mask).sum())
    assert loc.module is None and loc.op is None  # nothing masked fully: finite
    mask[1, 0] = False  # one query may attend to nothing
    loc = localize(model.attn, lambda: model.attn(q, mask).sum())
    line = inspect.getsourcelines(Attention.forward)[1] + 2
    assert (loc.module, loc.op, loc.op_inputs_finite) == ("", "softmax", False)
    assert loc.op_location == f"{os.path.relpath(__file__)}:{line} in forward"
    assert "a row that is all -inf (fully masked)?" in loc.summary()
