"""LRBackoffController without Lightning: hand-written loops, schedulers replayed independently, the
no-loop memory, spike detection against a float64 reference, and real two-process (gloo) agreement."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_nan.core.lr_backoff import LRBackoffController

LR = 0.1


def scheduled_lrs(make_scheduler, n: int, lr: float | torch.Tensor = LR) -> list[float]:
    """The LR a fresh optimizer + scheduler of the same kind has at each of ``n`` steps (no backoff)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


def sgd_problem(lr: float | torch.Tensor = LR):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr)  # plain SGD: w_after = w_before - lr * grad
    return w, opt


def effective_lr(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``-(w_after - w_before) / grad`` on every element with ``|grad| > 1e-3``."""
    mask = grad.abs() > 1e-3
    assert mask.any()
    return (before - after)[mask] / grad[mask]


SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=40, cycle_momentum=False),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_hand_written_loop_updates_with_schedule_times_factor(name):
    n = 30
    w, opt = sgd_problem()
    sched = SCHEDULERS[name](opt)
    backoff = LRBackoffController(patience=4)
    backoff.attach(opt)
    incidents = {3, 7, 15}
    # factor used by each step, from the documented rules: 3 -> 0.5; 3 clean steps test it, 7 -> 0.25;
    # 4 clean steps (8-11) -> 0.5 from 12; step 15 fails at a grown level -> 0.25 and ceiling 0.25 for good.
    expected = [1.0] * 4 + [0.5] * 4 + [0.25] * 4 + [0.5] * 4 + [0.25] * (n - 16)
    reference = scheduled_lrs(SCHEDULERS[name], n)
    for step in range(n):
        w.grad = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64) + 0.1 * step
        before = w.detach().clone()
        if step in incidents:
            backoff.back_off(step, "incident")
            w.grad = None  # what the guard does: the step changes nothing
        opt.step()
        if step in incidents:
            assert torch.equal(w.detach(), before)
        else:
            lrs = effective_lr(before, w.detach(), w.grad)
            torch.testing.assert_close(lrs, torch.full_like(lrs, reference[step] * expected[step]), rtol=1e-6, atol=0)
        # between steps the group holds exactly the scheduler's own value
        assert opt.param_groups[0]["lr"] == reference[step]
        backoff.observe(step, clean=step not in incidents)
        sched.step()
    assert backoff.factor_now == 0.25 and backoff.ceiling == 0.25
    assert [(h["step"], h["factor"]) for h in backoff.history] == [(3, 0.5), (7, 0.25), (11, 0.5), (15, 0.25)]
    backoff.detach()


def test_tensor_lr_is_scaled_and_restored_in_place():
    lr = torch.tensor(LR, dtype=torch.float64)
    w, opt = sgd_problem(lr)
    sched = SCHEDULERS["exponential"](opt)
    reference = scheduled_lrs(SCHEDULERS["exponential"], 6, lr=torch.tensor(LR, dtype=torch.float64))
    backoff = LRBackoffController()
    backoff.attach(opt)
    backoff.back_off(0, "incident")
    for step in range(6):
        w.grad = torch.ones(5, dtype=torch.float64)
        before = w.detach().clone()
        opt.step()
        lrs = effective_lr(before, w.detach(), w.grad)
        torch.testing.assert_close(lrs, torch.full_like(lrs, reference[step] * 0.5), rtol=1e-6, atol=0)
        assert opt.param_groups[0]["lr"] is lr  # the same tensor, back to the scheduled value
        assert float(lr) == pytest.approx(reference[step], rel=1e-12)
        sched.step()


def test_factor_one_leaves_the_lr_alone_inside_the_step():
    w, opt = sgd_problem()
    backoff = LRBackoffController()
    backoff.attach(opt)
    seen = []

    def closure():
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(5, dtype=torch.float64)
        return None

    opt.step(closure)
    backoff.back_off(1, "incident")
    opt.step(closure)
    assert seen == [LR, LR * 0.5] and opt.param_groups[0]["lr"] == LR


def test_a_step_that_raises_does_not_leave_or_compound_a_scaled_lr():
    w, opt = sgd_problem()
    backoff = LRBackoffController()
    backoff.attach(opt)
    backoff.back_off(0, "incident")

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert opt.param_groups[0]["lr"] == LR * 0.5  # the post-hook never ran
    # the next step puts the scheduled value back before scaling again: 0.5x, not 0.25x
    w.grad = torch.ones(5, dtype=torch.float64)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(effective_lr(before, w.detach(), w.grad), torch.full((5,), LR * 0.5, dtype=torch.float64))
    assert opt.param_groups[0]["lr"] == LR
    # and restore_lrs() repairs it without a step
    with pytest.raises(RuntimeError):
        opt.step(failing)
    backoff.restore_lrs()
    assert opt.param_groups[0]["lr"] == LR


def test_optimizer_state_loaded_inside_the_step_is_kept():
    """A rollback restores the optimizer inside the step (from an incident handler): its LRs stay."""
    w, opt = sgd_problem()
    sched = SCHEDULERS["exponential"](opt)
    snapshot = opt.state_dict()  # lr 0.1
    sched.step()
    backoff = LRBackoffController()
    backoff.attach(opt)
    backoff.back_off(0, "incident")

    def rollback():
        assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.8 * 0.5, rel=1e-12)
        opt.load_state_dict(snapshot)
        return None

    opt.step(rollback)
    assert opt.param_groups[0]["lr"] == LR  # the snapshot's scheduled value, neither scaled nor overwritten
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.8, rel=1e-12)


def two_group_problem(lr):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    return a, b, torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=lr)


def test_a_tensor_lr_shared_by_groups_is_scaled_and_restored_once():
    """torch puts the same default ``lr`` tensor in every group: scaling it per group would square the
    factor, and saving it after the first group's scaling would shrink it at every step."""
    lr = torch.tensor(LR, dtype=torch.float64)
    a, b, opt = two_group_problem(lr)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    backoff = LRBackoffController()
    backoff.attach(opt)
    backoff.back_off(0, "incident")
    for _ in range(3):
        a.grad, b.grad = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        before = torch.cat([a.detach(), b.detach()])
        opt.step()
        lrs = effective_lr(before, torch.cat([a.detach(), b.detach()]), torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(lrs, torch.full((5,), LR * 0.5, dtype=torch.float64), rtol=1e-12, atol=0)
        assert all(g["lr"] is lr for g in opt.param_groups) and float(lr) == LR
    # a shared tensor next to a group of its own: each scaled once
    c = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt.add_param_group({"params": [c], "lr": torch.tensor(LR / 4, dtype=torch.float64)})
    seen = []

    def closure():
        seen.append([float(g["lr"]) for g in opt.param_groups])
        return None

    opt.step(closure)
    assert seen == [[LR * 0.5, LR * 0.5, LR / 4 * 0.5]]
    assert [float(g["lr"]) for g in opt.param_groups] == [LR, LR, LR / 4]


@pytest.mark.parametrize("tensor", [False, True], ids=["float", "tensor"])
def test_an_lr_written_inside_the_step_is_used_unscaled_and_kept(tensor):
    """A closure (or Lightning's ``on_before_optimizer_step``) runs after the pre-hook: what it writes
    is the user's, used as is for that step and not overwritten by the post-hook."""
    w, opt = sgd_problem(torch.tensor(LR, dtype=torch.float64) if tensor else LR)
    backoff = LRBackoffController()
    backoff.attach(opt)
    backoff.back_off(0, "incident")
    warmup = [0.01, 0.02]

    def closure(value):
        def write():
            if tensor:
                opt.param_groups[0]["lr"].fill_(value)
            else:
                opt.param_groups[0]["lr"] = value
            w.grad = torch.ones(5, dtype=torch.float64)
            return None

        return write

    for value in warmup:
        before = w.detach().clone()
        opt.step(closure(value))
        lrs = effective_lr(before, w.detach(), w.grad)
        torch.testing.assert_close(lrs, torch.full((5,), value, dtype=torch.float64), rtol=1e-12, atol=0)
        assert float(opt.param_groups[0]["lr"]) == value
    # a step that writes nothing is scaled again, and its lr put back
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(effective_lr(before, w.detach(), w.grad), torch.full((5,), 0.02 * 0.5, dtype=torch.float64))
    assert float(opt.param_groups[0]["lr"]) == 0.02


def test_detach_removes_every_hook_and_attach_is_idempotent():
    w, opt = sgd_problem()
    backoff = LRBackoffController()
    backoff.attach([opt, opt])
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    backoff.back_off(0, "incident")
    backoff.detach()
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    w.grad = torch.ones(5, dtype=torch.float64)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(effective_lr(before, w.detach(), w.grad), torch.full((5,), LR, dtype=torch.float64))


def test_floor_and_growth_steps():
    backoff = LRBackoffController(0.5, min_factor=0.1, patience=4, growth=4.0)
    factors, step = [], 0
    for _ in range(5):
        factors.append(backoff.back_off(step, "incident"))
        for step in range(step + 1, step + 4):  # noqa: B020 (3 clean steps: the new factor is tested)
            backoff.observe(step, clean=True)
        step += 1
    assert factors == [0.5, 0.25, 0.125, 0.1, 0.1]
    assert backoff.factor_now == 0.1
    backoff.observe(step, clean=True)
    assert backoff.factor_now == 0.4  # 0.1 * 4 after 4 clean steps
    for step in range(step + 1, step + 4):  # noqa: B020
        backoff.observe(step, clean=True)
    backoff.observe(step + 1, clean=False)  # resets the count
    for step in range(step + 2, step + 5):  # noqa: B020
        backoff.observe(step, clean=True)
    assert backoff.factor_now == 0.4
    backoff.observe(step + 1, clean=True)
    assert backoff.factor_now == 1.0  # min(0.4 * 4, ceiling 1)


def test_one_back_off_per_step():
    """NaNGuard reports the incident, then CheckpointRollback calls back_off for the same step."""
    backoff = LRBackoffController(patience=10)
    assert backoff.back_off(5, "incident: param") == 0.5
    assert backoff.back_off(5, "rollback") == 0.5
    assert [h["step"] for h in backoff.history] == [5] and backoff.backoffs == 1


def test_a_failure_before_the_factor_was_tested_does_not_back_off():
    """Right after a back-off the weights are those the higher LR made: failing again says nothing
    against the new factor until 3 clean steps were taken with it."""
    backoff = LRBackoffController(patience=10)
    assert backoff.back_off(0, "incident") == 0.5
    backoff.observe(0, clean=False)
    assert backoff.back_off(1, "incident") == 0.5  # no update at 0.5 yet
    backoff.observe(1, clean=False)
    for step in (2, 3):
        backoff.observe(step, clean=True)
    assert backoff.back_off(4, "incident") == 0.5  # two clean steps are not enough
    backoff.observe(4, clean=False)
    for step in (5, 6, 7):
        backoff.observe(step, clean=True)
    assert backoff.back_off(8, "incident") == 0.25
    assert [(h["step"], h["factor"]) for h in backoff.history] == [(0, 0.5), (8, 0.25)]


def test_back_off_below_a_restored_state():
    """After a rollback to step s: one level below the highest factor used since s, unless already lower."""
    backoff = LRBackoffController(patience=4)
    for step in range(4):
        backoff.observe(step, clean=True)
    assert backoff.factor_since(2) == 1.0
    assert backoff.back_off_below(2, 4, "rollback") == 0.5  # the run left step 2 at 1.0
    assert backoff.back_off_below(2, 5, "rollback") == 0.5  # already below: nothing
    for step in range(5, 9):
        backoff.observe(step, clean=True)  # 4 clean steps: grown back to 1.0 at step 8
    assert backoff.factor_now == 1.0 and backoff.factor_since(6) == 1.0 and backoff.factor_since(9) == 1.0
    backoff.back_off(9, "incident")  # 1.0 was tested: 0.5, and 1.0 (a grown level) is the ceiling no more
    assert (backoff.factor_now, backoff.ceiling) == (0.5, 0.5)
    # a rollback to step 3, before the growth: the highest factor since then was 1.0 -> 0.5, already there
    assert backoff.back_off_below(3, 10, "rollback") == 0.5
    # untested factors do not matter to it: it always lands below the level that was left
    assert backoff.back_off_below(10, 11, "rollback") == 0.25
    assert [(h["step"], h["reason"], h["factor"]) for h in backoff.history] == [
        (4, "rollback", 0.5), (8, "grow back", 1.0), (9, "incident", 0.5), (11, "rollback", 0.25)
    ]


def grow_then(after: list[float], growth_trial: int | None = 10) -> LRBackoffController:
    """Back off at step 0, 20 clean steps with losses ~1 (grown back at step 20), then ``after``."""
    rng = random.Random(0)
    backoff = LRBackoffController(0.5, patience=20, growth_trial=growth_trial)
    backoff.back_off(0, "incident")
    backoff.observe(0, None, clean=False)
    for step in range(1, 21):
        backoff.observe(step, 1.0 + 0.1 * rng.random(), clean=True)
    assert backoff.factor_now == 1.0 and backoff.history[-1]["reason"] == "grow back"
    for step, loss in enumerate(after, start=21):
        backoff.observe(step, torch.tensor(loss), clean=True)
    return backoff


def test_a_growth_that_makes_the_loss_worse_is_undone_for_good():
    rng = random.Random(1)
    backoff = grow_then([2.0 + 0.1 * rng.random() for _ in range(11)])
    # 10 losses after the growth, the verdict read at the next step
    assert backoff.factor_now == 0.5 and backoff.ceiling == 0.5 and not backoff.grown
    assert backoff.history[-1] == {
        "step": 31, "reason": "growth of step 20 undone: the loss got worse", "factor": 0.5, "ceiling": 0.5
    }
    for step in range(32, 300):  # no loop: it never grows back to the level that made things worse
        backoff.observe(step, 1.0, clean=True)
    assert backoff.factor_now == 0.5 and backoff.growths == 1


def test_a_growth_that_keeps_the_loss_falling_is_kept():
    backoff = grow_then([0.9 - 0.01 * k for k in range(11)])
    assert backoff.factor_now == 1.0 and backoff.ceiling == 1.0
    assert [h["reason"] for h in backoff.history] == ["incident", "grow back"]


def test_without_a_trial_a_growth_is_kept():
    backoff = grow_then([2.0] * 11, growth_trial=None)
    assert backoff.factor_now == 1.0
    with pytest.raises(ValueError, match="growth_trial"):
        LRBackoffController(growth_trial=5)


def test_losses_are_kept_only_while_a_growth_can_come():
    """At the full factor there is nothing to grow back to: no loss is written anywhere (no per-step work)."""
    ctl = LRBackoffController(0.5, patience=20, growth_trial=10)
    assert not ctl.wants_losses
    for step in range(30):
        ctl.observe(step, 1.0, clean=True)
    assert ctl.state_dict()["trial_losses"] == []
    ctl.back_off(30)
    ctl.observe(30, None, clean=False)
    assert ctl.wants_losses
    ctl.observe(31, 2.0, clean=True)
    assert ctl.state_dict()["trial_losses"] == [2.0]
    assert LRBackoffController(spike_zscore=6.0).wants_losses  # spike detection needs every loss
    assert not LRBackoffController(growth_trial=None).wants_losses


def test_state_dict_mid_trial_resumes_the_trial():
    rng = random.Random(1)
    worse = [2.0 + 0.1 * rng.random() for _ in range(11)]
    a = grow_then(worse[:4])
    state = a.state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert state["trial"]["step"] == 20 and len(state["trial"]["before"]) == 10 and len(state["trial_losses"]) == 4
    b = LRBackoffController(0.5, patience=20, growth_trial=10)
    b.load_state_dict(state)
    for step, loss in enumerate(worse[4:], start=25):
        a.observe(step, loss, clean=True)
        b.observe(step, loss, clean=True)
    assert a.factor_now == b.factor_now == 0.5 and a.history == b.history


def building(threshold: float, steps_to_fail: int = 3):
    """A divergence that fails a step once ``steps_to_fail`` clean steps above ``threshold`` built it up."""
    above = {"n": 0}

    def fails(f: float, step: int) -> bool:
        above["n"] = above["n"] + 1 if f > threshold else 0
        if above["n"] > steps_to_fail:
            above["n"] = 0
            return True
        return False

    return fails


def run_toy(backoff: LRBackoffController, fails, steps: int) -> list[tuple[int, float]]:
    """Each step fails when ``fails(factor, step)``; returns (step, factor) of every incident."""
    incidents = []
    for step in range(steps):
        f = backoff.factor_now
        bad = fails(f, step)
        if bad:
            incidents.append((step, f))
            backoff.back_off(step, "incident")
        backoff.observe(step, clean=not bad)
    return incidents


@pytest.mark.parametrize("threshold, settle", [(0.25, 0.25), (0.3, 0.25), (0.1, 0.0625), (1.0, 1.0)])
def test_growing_back_into_the_same_divergence_stops(threshold, settle):
    backoff = LRBackoffController(0.5, patience=10)
    incidents = run_toy(backoff, building(threshold), 5000)
    levels_above = [level for level in (1.0, 0.5, 0.25, 0.125) if level > threshold]
    # one incident per level on the way down (3 clean steps, then the failure), one more when growing
    # back to the level above `settle` (10 clean steps, 3 more, the failure)
    expected = [(3 + 4 * i, level) for i, level in enumerate(levels_above)]
    if levels_above:
        expected.append((4 * len(levels_above) + 13, settle * 2))
    assert incidents == expected
    assert backoff.factor_now == settle and backoff.ceiling == settle


def test_delayed_random_divergence_is_bounded():
    """Divergence that needs 30 steps above 0.2 and then strikes at random: a bounded number of incidents."""
    rng = random.Random(0)
    backoff = LRBackoffController(0.5, patience=20)
    above = {"since": 0}

    def fails(f, step):
        above["since"] = above["since"] + 1 if f > 0.2 else 0
        return above["since"] > 30 and rng.random() < 0.2

    incidents = run_toy(backoff, fails, 20000)
    levels = 11  # 1, 1/2, ..., 1/1024
    assert len(incidents) <= levels * (levels + 1)
    assert incidents[-1][0] < 2000 and backoff.factor_now <= 0.2 and backoff.ceiling <= 0.2


def test_state_dict_resumes_mid_backoff_and_behaves_identically():
    a = LRBackoffController(0.5, patience=3, spike_zscore=6.0, window=10, min_history=5)
    rng = random.Random(1)
    for step in range(12):
        a.observe(step, 1.0 + 0.01 * rng.random(), clean=True)
    a.back_off(12, "incident")
    a.observe(12, 1.0, clean=False)
    a.back_off(13, "incident")  # not tested yet: no change
    a.observe(13, 1.0, clean=False)
    a.observe(14, 1.0 + 0.01 * rng.random(), clean=True)
    state = a.state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state  # primitives only
    assert state["factor_now"] == 0.5 and not state["tested"] and len(state["spike_window"]) == 10
    b = LRBackoffController(0.5, patience=3, spike_zscore=6.0, window=10, min_history=5)
    b.load_state_dict(state)
    assert b.state_dict() == state
    losses = [1.0 + 0.01 * rng.random() for _ in range(20)]
    losses[6] = 5.0  # a spike after the resume
    for step, loss in enumerate(losses, start=15):
        a.observe(step, loss, clean=True)
        b.observe(step, loss, clean=True)
        assert a.factor_now == b.factor_now
    assert a.state_dict() == b.state_dict()
    assert a.history == b.history and any(h["step"] == 21 and h["reason"] == "loss spike" for h in b.history)
    # old checkpoints without some keys still load
    c = LRBackoffController()
    c.load_state_dict({"factor_now": 0.125})
    assert c.factor_now == 0.125 and c.ceiling == 1.0


# ---------------------------------------------------------------------------- spikes
def reference_spikes(losses: list[float], threshold: float, window: int, min_history: int) -> list[tuple[int, float]]:
    """Independent float64 robust z-scores: (index, z) of every loss tested."""
    out = []
    for i, x in enumerate(losses):
        past = losses[max(0, i - window) : i]
        if len(past) < min_history:
            continue
        med = statistics.median(past)
        mad = statistics.median([abs(v - med) for v in past])
        out.append((i, (x - med) / max(1.4826 * mad, 1e-3 * abs(med))))
    return out


def spike_backoffs(backoff: LRBackoffController, losses: list[float]) -> list[int]:
    for step, loss in enumerate(losses):
        backoff.observe(step, torch.tensor(loss), clean=True)
    backoff.observe(len(losses), None, clean=True)  # settles the last step
    return [h["step"] for h in backoff.history if h["reason"] == "loss spike"]


def test_spike_decisions_match_a_float64_reference():
    rng = random.Random(3)
    losses = [2.0 + 0.05 * rng.gauss(0, 1) for _ in range(400)]
    for i in (60, 61, 150, 275):
        losses[i] += 0.5  # ~10 sigma
    losses[200] += 0.25  # ~5 sigma: below the threshold
    backoff = LRBackoffController(patience=10**6, spike_zscore=6.0, window=50, min_history=20, min_factor=1e-9)
    got = spike_backoffs(backoff, losses)
    ref = reference_spikes(losses, 6.0, 50, 20)
    assert all(abs(z - 6.0) > 0.05 for _, z in ref)  # no borderline case where float32 could differ
    spikes = [i for i, z in ref if z > 6.0]
    rising = [i for i in spikes if i - 1 not in spikes]
    assert spikes == [60, 61, 150, 275] and got == rising == [60, 150, 275]


def test_a_spike_backs_off_one_step_late():
    backoff = LRBackoffController(patience=100, spike_zscore=6.0, window=10, min_history=5)
    for step in range(8):
        backoff.observe(step, 1.0 + 0.001 * (step % 3), clean=True)
    backoff.observe(8, 10.0, clean=True)
    assert backoff.factor_now == 1.0  # the flag is read at the next observation
    backoff.observe(9, 1.0, clean=True)
    assert backoff.factor_now == 0.5 and backoff.history[-1]["step"] == 8


def test_non_finite_losses_neither_spike_nor_enter_the_window():
    backoff = LRBackoffController(patience=100, spike_zscore=6.0, window=10, min_history=5)
    losses = [1.0, 1.01, 0.99, 1.0, 1.02, float("nan"), float("inf"), 1.0, 0.98, 1.01, 1.0]
    assert spike_backoffs(backoff, losses) == []
    # the ring holds the last 10 losses; the two non-finite ones take a slot but are never used
    assert backoff.spike_window() == pytest.approx([v for v in losses[-10:] if math.isfinite(v)])


def test_a_lasting_level_shift_backs_off_once():
    rng = random.Random(5)
    losses = [1.0 + 0.01 * rng.gauss(0, 1) for _ in range(100)] + [3.0 + 0.01 * rng.gauss(0, 1) for _ in range(200)]
    backoff = LRBackoffController(patience=10**6, spike_zscore=6.0, window=50, min_history=20)
    assert spike_backoffs(backoff, losses) == [100]


def random_walk(seed: int, n: int = 1000) -> list[float]:
    """A decaying loss with random-walk drift and per-step noise, as training losses look."""
    rng = random.Random(seed)
    level, out = 0.0, []
    for step in range(n):
        level += 0.02 * rng.gauss(0, 1)
        out.append(2.0 * math.exp(-step / 400) * math.exp(level) + 0.05 * abs(rng.gauss(0, 1)))
    return out


def test_no_false_spike_on_1000_random_walk_losses():
    total = 0
    for seed in range(5):
        backoff = LRBackoffController(patience=10**6, spike_zscore=6.0)
        total += len(spike_backoffs(backoff, random_walk(seed)))
    assert total == 0  # 0 of 5 x 1000 steps


def test_a_planted_spike_in_a_random_walk_is_caught():
    losses = random_walk(0)
    losses[500] *= 3.0
    backoff = LRBackoffController(patience=10**6, spike_zscore=6.0)
    assert spike_backoffs(backoff, losses) == [500]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, "`factor` to be a number in \\(0, 1\\), got 1.0"),
        ({"factor": 0}, "`factor`"),
        ({"factor": "0.5"}, "`factor` to be a number in \\(0, 1\\), got '0.5'"),
        ({"factor": True}, "`factor`"),
        ({"patience": 2.0}, "`patience` to be an int >= 1, got 2.0"),
        ({"growth": float("inf")}, "`growth` to be None or a number > 1 \\(None: 1 / factor\\), got inf"),
        ({"min_factor": 0.0}, "`min_factor`"),
        ({"patience": 0}, "`patience`"),
        ({"growth": 1.0}, "`growth`"),
        ({"spike_zscore": -1.0}, "`spike_zscore`"),
        ({"window": 2}, "`window`"),
        ({"window": 10, "min_history": 11}, "`min_history`"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRBackoffController(**kwargs)


# ---------------------------------------------------------------------------- DDP (two real processes)
DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from lightning_nan.core.lr_backoff import LRBackoffController
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    backoff = LRBackoffController(patience=100, spike_zscore=6.0, window=10, min_history=5)
    factors = []
    for step in range(12):
        loss = 1.0 + 0.001 * (step % 3)
        if rank == 1 and step == 8:
            loss = 10.0  # only rank 1 sees the spike
        backoff.observe(step, torch.tensor(loss), clean=True)
        factors.append(backoff.factor_now)
    # a growth trial whose loss gets worse on rank 1 only: both ranks undo it
    trial = LRBackoffController(0.5, patience=20, growth_trial=10)
    trial.back_off(0)
    trial.observe(0, None, clean=False)
    for step in range(1, 32):
        worse = rank == 1 and step > 20
        trial.observe(step, torch.tensor((3.0 if worse else 1.0) + 0.01 * (step % 3)), clean=True)
    torch.save({"factors": factors, "history": backoff.history, "trial": trial.history}, out)
    dist.destroy_process_group()
    """
)


def test_ddp_ranks_agree_on_a_spike_and_a_growth_trial_seen_by_one_rank(tmp_path):
    script = tmp_path / "ddp_spike.py"
    script.write_text(DDP_SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"rank{r}.pt")], env=env)
        for r in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    expected = [1.0] * 9 + [0.5] * 3  # spike at 8, settled at 9
    assert results[0]["factors"] == results[1]["factors"] == expected
    assert results[0]["history"] == results[1]["history"] and results[0]["history"][0]["step"] == 8
    assert results[0]["trial"] == results[1]["trial"]
    assert [h["reason"] for h in results[0]["trial"]] == ["incident", "grow back", "growth of step 20 undone: the loss got worse"]
