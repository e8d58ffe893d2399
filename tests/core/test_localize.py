"""localize() names the first module (and parameter gradient) where a NaN/Inf appears, and leaves no trace."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_nan.core.localize import Localization, localize


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class SqrtMinusOne(nn.Module):
    def forward(self, x):
        return torch.sqrt(x - 1)


class Log(nn.Module):
    def forward(self, x):
        return {"log": torch.log(x), "aux": (x.clone(),)}


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
    assert loc.summary().startswith(f"first non-finite output in encoder.1 (Exp) from finite inputs in [{lo:.3g}, {hi:.3g}]")


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


def test_log_of_zero_with_nested_outputs():
    model = nn.Sequential(nn.ReLU(), nn.Identity(), Log())
    x = torch.tensor([2.0, -1.0, 0.0, 3.0])  # relu -> [2, 0, 0, 3]: log(0) = -inf twice
    loc = localize(model, lambda: model(x)["log"].sum())
    assert (loc.module, loc.module_type, loc.inputs_finite) == ("2", "Log", True)
    assert loc.output_nonfinite == 2 and loc.input_range == (0.0, 3.0)


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
    assert loc.summary() == "first non-finite output in 0 (Embedding) from finite inputs, 2 non-finite output elements"


def test_all_finite():
    model = Net(nn.Tanh())
    loc = localize(model, lambda: model(torch.randn(4, 2)).sum(), backward=True)
    assert loc == Localization(loss_finite=True)
    assert loc.summary() == "forward finite"
    loc = localize(model, lambda: None)  # manual optimization: nothing returned
    assert loc == Localization() and loc.summary() == "forward finite (no loss returned)"


def test_nonfinite_loss_outside_the_modules():
    model = nn.Linear(2, 1)
    loc = localize(model, lambda: nn.functional.mse_loss(model(torch.ones(3, 2)), torch.full((3, 1), float("inf"))))
    assert loc.module is None and loc.loss_finite is False
    assert "loss was not" in loc.summary()


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
    assert loc.summary() == "forward finite; first non-finite gradient in 2.weight"
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
