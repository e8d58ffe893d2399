"""StepGuard in a hand-written PyTorch loop: skips are exact, escalation and events work, one host sync."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_nan.core import Incident, NonFiniteError, StepGuard
from lightning_nan.core.events import Phase
from lightning_nan.core.records import LocalizationRecord

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"params": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()["state"])}


def identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    return a == b


def train(guard: StepGuard, model, opt, steps: int, faults: dict[int, str]):
    """Run `steps` steps; `faults[i]` plants 'loss' (NaN loss), 'grad' (one Inf gradient element) or 'param'."""
    g = torch.Generator().manual_seed(123)
    snaps = [snapshot(model, opt)]
    verdicts = []
    for i in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        if faults.get(i) == "param":
            with torch.no_grad():
                model[2].weight[0, 3] = float("nan")
        guard.observe_batch((x, y), i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if faults.get(i) == "loss":
            loss = loss * float("nan")
        guard.observe_loss(loss)
        loss.backward()
        if faults.get(i) == "grad":
            model[0].weight.grad[2, 1] = float("inf")
        verdicts.append(guard.check(opt, step=i))
        opt.step()
        opt.zero_grad()
        snaps.append(snapshot(model, opt))
    return snaps, verdicts


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_skipped_steps_leave_weights_and_optimizer_state_bit_identical(opt_name):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    guard = StepGuard(model)
    snaps, verdicts = train(guard, model, opt, steps=7, faults={2: "loss", 4: "grad"})
    assert [v.skipped for v in verdicts] == [False, False, True, False, True, False, False]
    for i in range(7):
        same = identical(snaps[i], snaps[i + 1])
        assert same == (i in (2, 4)), f"step {i}: unchanged={same}"
    if opt_name != "sgd_momentum":  # Adam's per-parameter step counter did not move on skipped steps
        assert all(s["step"].item() == 5 for s in opt.state.values())
    assert [(inc.step, inc.kind) for inc in guard.incidents] == [(2, "loss"), (4, "grad")]
    assert guard.incidents[1].params == ["0.weight"]
    assert guard.incidents[0].batch_idx == [2]
    assert guard.skipped_steps == 2 and guard.consecutive_skips == 0


def test_nan_weight_raises_with_parameter_name_step_and_advice():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    records: list[Incident] = []
    guard = StepGuard(model, on_record=records.append)
    with pytest.raises(NonFiniteError) as info:
        train(guard, model, opt, steps=5, faults={3: "param"})
    err = info.value
    assert err.incident.kind == "param" and err.incident.step == 3
    assert err.incident.params == ["2.weight"]
    assert err.incident.action == "raised"
    msg = str(err)
    assert "param at step 3" in msg and "2.weight" in msg and "skipping the step cannot help" in msg
    assert "learning rate" in msg  # what to try
    assert records == [err.incident]  # recorded before raising


def test_param_check_interval():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard = StepGuard(model, check_params_every_n_steps=0)
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    guard.check(opt, step=0)  # no gradients and weights unchecked: nothing to see
    assert guard.incidents == []
    with pytest.raises(NonFiniteError, match="0.bias"):
        guard.check_parameters(model.parameters(), step=9)


class Recovering:
    """An escalation handler that 'restores' a finite state by zeroing the NaN weights."""

    def __init__(self):
        self.events = []

    def on_nan_escalation(self, event):
        self.events.append(event)
        return True


class Listener:
    def __init__(self):
        self.events = []

    def on_nan_incident(self, event):
        self.events.append(event)
        event.incident.samples = [41]  # what bisection will do


def test_consecutive_skips_escalate_to_handlers_then_raise():
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters())
    listener, handler = Listener(), Recovering()
    recorded = []
    guard = StepGuard(model, max_consecutive=3, listeners=[listener, handler], on_record=recorded.append)
    train(guard, model, opt, steps=4, faults={0: "loss", 1: "loss", 2: "loss"})
    assert [i.action for i in guard.incidents] == ["skipped", "skipped", "recovered by Recovering"]
    assert guard.consecutive_skips == 0 and len(handler.events) == 1
    assert "3 steps in a row" in guard.incidents[2].detail["escalation"]
    # listeners ran first, and what they filled in was recorded
    assert [e.incident.step for e in listener.events] == [0, 1, 2]
    assert all(r.samples == [41] for r in recorded)
    event = listener.events[0]
    assert event.optimizer is opt and event.batches[0][0] == 0 and event.guard is guard
    assert event.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]

    guard.listeners = []  # nobody to recover now
    with pytest.raises(NonFiniteError, match="3 steps in a row") as info:
        train(guard, model, opt, steps=3, faults={0: "loss", 1: "loss", 2: "loss"})
    assert len(info.value.history) == 5


def test_gradient_accumulation_skips_the_whole_window():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard = StepGuard(model)
    before = snapshot(model, opt)
    for i in range(3):  # three micro-batches, the second one poisoned
        x = torch.randn(4, 4)
        guard.observe_batch(x, i)
        loss = model(x).sum() * (float("nan") if i == 1 else 1.0)
        guard.observe_loss(loss)
        loss.backward()
    verdict = guard.check(opt, step=0)
    opt.step()
    assert verdict.skipped and identical(before, snapshot(model, opt))
    assert verdict.incident.batch_idx == [0, 1, 2]
    assert verdict.incident.detail["loss_batches"] == [1]


def test_input_check_names_the_field():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard = StepGuard(model)
    x = torch.randn(4, 4)
    x[2, 0] = float("inf")
    guard.observe_batch({"x": x, "y": torch.zeros(4, 1)}, 5)
    loss = model(x).sum()
    guard.observe_loss(loss)
    loss.backward()
    incident = guard.check(opt, step=0).incident
    assert incident.kind == "input" and incident.detail["input_fields"] == ["batch 5['x']"]


class HostSyncCounter(TorchFunctionMode):
    """Counts the tensor methods that copy a value to the host (each is a device sync on GPU)."""

    SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_healthy_step_costs_exactly_one_host_transfer():
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters())
    guard = StepGuard(model)
    for i in range(2):  # two micro-batches with input checks
        x = torch.randn(4, 4)
        guard.observe_batch(x, i)
        loss = model(x).sum()
        guard.observe_loss(loss)
        loss.backward()
    with HostSyncCounter() as counter:
        verdict = guard.check(opt, step=0)
    assert not verdict.skipped
    assert counter.count == 1


def test_fp16_grad_scaler_overflow_is_not_a_failure_but_nan_loss_and_collapsed_scale_are():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    guard = StepGuard(model, min_loss_scale=1.0)

    def step(fault):
        x = torch.randn(8, 4)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        if fault == "loss":
            loss = loss * float("nan")
        scaled = scaler.scale(loss)
        guard.observe_loss(scaled)
        scaled.backward()
        if fault == "grad":  # an fp16 overflow, as GradScaler sees it in unscale_
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        if fault == "late":  # a fault after unscale_ that the scaler cannot see
            model[0].weight.grad[0, 0] = float("inf")
        before = snapshot(model, opt)["params"]
        verdict = guard.check(opt, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return verdict, identical(before, model.state_dict())

    verdict, unchanged = step("grad")  # the scaler's own overflow skip
    assert verdict.scaler_overflow and not verdict.skipped and unchanged
    assert guard.incidents == [] and guard.scaler_overflows == 1 and scaler.get_scale() == 8.0
    verdict, unchanged = step(None)
    assert not verdict.skipped and not unchanged
    verdict, unchanged = step("late")
    assert verdict.scaler_overflow and unchanged and scaler.get_scale() == 8.0  # no overflow seen by the scaler
    verdict, unchanged = step("loss")
    assert verdict.skipped and unchanged and verdict.incident.kind == "loss"
    assert scaler.get_scale() == 4.0  # the NaN loss overflowed too
    for _ in range(3):  # 4 -> 2 -> 1 -> 0.5
        step("grad")
    verdict, _ = step(None)
    assert verdict.incident is not None and verdict.incident.kind == "scale"
    assert verdict.incident.detail["loss_scale"] == 0.5


def test_state_dict_round_trip():
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard = StepGuard(model)
    train(guard, model, opt, steps=3, faults={1: "loss", 2: "grad"})
    fresh = StepGuard(model)
    fresh.load_state_dict(guard.state_dict())
    assert fresh.state_dict() == guard.state_dict()
    assert fresh.consecutive_skips == 2 and fresh.skipped_steps == 2
    assert [i.kind for i in fresh.incidents] == ["loss", "grad"]
    fresh.load_state_dict({})  # old or empty checkpoints load
    assert fresh.skipped_steps == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"max_consecutive": 2.5}, "max_consecutive"),
        ({"check_params_every_n_steps": -1}, "check_params_every_n_steps"),
        ({"min_loss_scale": 0}, "min_loss_scale"),
        ({"min_loss_scale": math.nan}, "min_loss_scale"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepGuard(**kwargs)


def test_incident_kind_is_validated():
    with pytest.raises(ValueError, match="kind"):
        Incident(step=0, kind="weights")


def test_finite_but_huge_weights_and_inputs_are_not_faults():
    """A 2-norm overflows past ~1.8e19; the exact re-check keeps such finite values from counting."""
    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard = StepGuard(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 1e20  # finite, but its 2-norm is inf in float32
    x = torch.randn(4, 4)
    guard.observe_batch({"x": x, "unused": torch.full((3,), 1e38)}, 0)
    loss = model(x).pow(2).mean()
    guard.observe_loss(loss)
    loss.backward()
    for p in model.parameters():  # finite gradients
        p.grad = torch.ones_like(p)
    verdict = guard.check(opt, step=0)
    assert not verdict.skipped and guard.incidents == [] and guard.consecutive_skips == 0
    assert guard.check_parameters(model.parameters()) is None


def test_a_hand_written_loop_can_share_the_guards_norms_with_the_clipper():
    from lightning_nan.core import GradientClipper

    model = make_model()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    guard, clipper = StepGuard(model), GradientClipper("norm", max_norm=0.1)
    reference = make_model()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for m in (model, reference):
        torch.nn.functional.mse_loss(m(x), y).mul(100).backward()
    guard.check(opt, step=0)
    stats = clipper.clip_(guard.last_grad_params, guard.last_grad_norms)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    assert torch.equal(stats.total_norm, total)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters()))


def test_the_host_norm_bound_is_the_total_gradient_norm_and_none_after_a_fault():
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters())
    guard = StepGuard(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    guard.check(opt, step=0)
    total = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()]))
    assert guard.last_grad_norm_bound == pytest.approx(float(total), rel=1e-6)
    model[0].weight.grad[0, 0] = float("inf")
    assert guard.check(opt, step=1).skipped and guard.last_grad_norm_bound is None


# ------------------------------------------------------------------------------------ diagnosis-driven actions


def _fail_once(guard: StepGuard, model, opt, batch, loss_fn, step: int):
    guard.observe_batch(batch, step)
    loss = loss_fn(model, batch)
    guard.observe_loss(loss)
    opt.zero_grad()
    loss.backward()
    return guard.check(opt, step=step)


def test_a_broken_pipeline_stops_at_the_second_batch_naming_the_columns():
    """Every sample NaN in the same columns (standardised by a zero std upstream): the first such batch is
    skipped (it could be one bad shard), the second raises NonFiniteError, whatever max_consecutive, with
    the fields and columns in the message."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model, max_consecutive=1000)
    x = torch.randn(16, 4)
    x[:, [1, 3]] = float("nan")
    first = _fail_once(guard, model, opt, (x,), lambda m, b: m(b[0]).pow(2).mean(), 0).incident
    assert (first.cause, first.action) == ("broken_pipeline", "skipped") and "stops at the next batch" in first.advice
    again = _fail_once(guard, model, opt, (x,), lambda m, b: m(b[0]).pow(2).mean(), 1).incident
    assert again.action == "skipped"  # the same batch again (a second optimizer, say) counts once
    x2 = torch.randn(16, 4)
    x2[:, [1, 3]] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\[0\] columns 1, 3 are NaN in all 16 samples") as err:
        _fail_once(guard, model, opt, (x2,), lambda m, b: m(b[0]).pow(2).mean(), 2)
    assert err.value.incident.cause == "broken_pipeline" and err.value.incident.action == "raised"
    x[0] = 1.0  # one clean sample: the dirty ones can be singled out, no pipeline verdict
    guard = StepGuard(model, max_consecutive=1000)
    verdict = _fail_once(guard, model, opt, (x,), lambda m, b: m(b[0]).pow(2).mean(), 0)
    assert verdict.skipped and verdict.incident.cause != "broken_pipeline"


class _Diagnosed:
    """Stands in for BatchBisection: localizes every incident at the same op and line."""

    incident_phase = Phase.EVIDENCE

    def on_nan_incident(self, event):
        event.incident.localization = LocalizationRecord(op="log", op_location="model.py:7 in forward", module="head",
                                                         inputs_finite=True, op_inputs=[{"has_zero": True}])


def test_the_same_unsafe_op_three_times_raises_with_its_line_and_fix():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model, listeners=[_Diagnosed()], max_consecutive=1000)
    nan_loss = lambda m, b: m(b[0]).pow(2).mean() * float("nan")  # noqa: E731
    for step in range(2):
        assert _fail_once(guard, model, opt, (torch.randn(8, 4),), nan_loss, step).incident.cause == "unsafe_op"
    with pytest.raises(NonFiniteError, match=r"log at model.py:7 in forward failed on 3 steps \(0, 1, 2\)") as err:
        _fail_once(guard, model, opt, (torch.randn(8, 4),), nan_loss, 2)
    assert "log_softmax" in str(err.value)  # the fix
    guard = StepGuard(model, listeners=[_Diagnosed()], max_consecutive=1000, unsafe_op_repeats=0)
    for step in range(4):  # 0: never raise
        assert _fail_once(guard, model, opt, (torch.randn(8, 4),), nan_loss, step).skipped


def test_a_cause_carries_over_only_to_the_same_samples():
    class DecideOnce:
        incident_phase = Phase.EVIDENCE
        seen = 0

        def on_nan_incident(self, event):
            if not self.seen:
                event.incident.cause, event.incident.advice = "divergence", "lower the LR"
            self.seen += 1

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(model, listeners=[DecideOnce()], max_consecutive=1000)
    nan_loss = lambda m, b: m(b[0]).pow(2).mean() * float("nan")  # noqa: E731
    same = (torch.randn(8, 4),)
    _fail_once(guard, model, opt, same, nan_loss, 0)
    again = _fail_once(guard, model, opt, same, nan_loss, 1).incident  # the very same samples
    other = _fail_once(guard, model, opt, (torch.randn(8, 4),), nan_loss, 2).incident  # another batch
    assert again.cause == "divergence" and "the same samples failed at step 0" in again.detail["evidence"][0]
    assert other.cause == "unknown"
    # and it never asks for a callback that is there
    assert any("add BatchBisection" in m for m in other.detail["missing_evidence"])


def test_across_ranks_the_screen_takes_the_worst_of_each_value_and_the_lowest_loss_scale():
    """What the ranks agree on, with the all-reduce played by an element-wise max against another rank's
    vector: any rank's non-finite value or collapsed loss scale is everyone's fault."""
    from lightning_nan.core.step_screen import screen

    def ranks(other: dict):
        theirs = {}

        def reduce(mine):
            if not theirs:  # the other rank's totals, built the same way
                theirs["v"] = screen_vector(**other)
            return torch.maximum(mine, theirs["v"])

        return reduce

    def screen_vector(norms, losses, scale):
        captured = {}
        screen(norms, grads=len(norms), weights=0, losses=losses, inputs=[], scale=scale, min_loss_scale=1.0,
               reduce=lambda t: captured.setdefault("v", t))
        return captured["v"]

    mine = dict(norms=torch.tensor([3.0, 4.0]), losses=[torch.tensor(0.5)], scale=torch.tensor(1024.0))
    low_scale = dict(norms=torch.tensor([3.0, 4.0]), losses=[torch.tensor(0.5)], scale=torch.tensor(0.5))
    nan_grad = dict(norms=torch.tensor([float("nan"), 4.0]), losses=[torch.tensor(0.5)], scale=torch.tensor(1024.0))
    healthy = screen(**mine, grads=2, weights=0, inputs=[], min_loss_scale=1.0, reduce=ranks(mine))
    assert not any(healthy.faults.values()) and healthy.bound == 5.0 and healthy.loss == 0.5
    assert screen(**mine, grads=2, weights=0, inputs=[], min_loss_scale=1.0, reduce=ranks(low_scale)).faults["scale"]
    bad = screen(**mine, grads=2, weights=0, inputs=[], min_loss_scale=1.0, reduce=ranks(nan_grad))
    assert bad.faults["grad"] and not bad.faults["scale"]
