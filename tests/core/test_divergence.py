"""Divergence seen when it happens, and not in a run that is only spiky."""

from __future__ import annotations

import math

import torch

from lightning_nan.core.divergence import GROWTH, GrowthDetector
from lightning_nan.core.step_guard import StepGuard


def feed(values):
    detector = GrowthDetector("loss")
    return [detector.update(v) for v in values]


def test_a_climb_is_caught_before_it_overflows_and_not_monotone_either():
    losses = [0.78, 1.37, 26.9, 2.49, 17.2, 77.6, 315.0, 103.6, 2491.0, 3399.0, 6.4e5, 3.5e4, 4e5, 3.3e5, 3.7e6]
    verdicts = feed(losses)
    first = next(i for i, v in enumerate(verdicts) if v)
    assert first <= 12 and losses[first] < 1e6 * losses[0]
    assert "its level (the median of the last 3 steps" in verdicts[first]


def test_a_saturated_classifier_spiking_between_1e_4_and_10_is_not_divergence():
    # cross-entropy of a saturated 2-class model: mostly ~1e-3, every few steps a confidently wrong batch at ~10
    losses = [1e-3 if i % 3 else 10.0 for i in range(60)]
    assert not any(feed(losses))


def test_a_converged_model_s_hard_batch_stays_under_the_floor():
    losses = [2.3, 2.2, 2.1] + [1e-4] * 40 + [5.0, 6.0, 4.0, 5.0, 7.0]  # back above 1e3x the recent median, not the start
    assert not any(feed(losses))


def test_negative_losses_switch_the_test_off_and_zero_is_ignored():
    assert not any(feed([-1.0, 1.0, 2.0, 4.0] + [10.0**k for k in range(10)]))
    assert not any(feed([0.0] * 10))


def test_state_round_trip_keeps_the_reference():
    detector = GrowthDetector("loss")
    for v in [1.0, 1.1, 0.9, 1.0, 1.2, 1.0]:
        detector.update(v)
    again = GrowthDetector("loss")
    again.load_state_dict(detector.state_dict())
    values = [GROWTH * 10] * 3
    assert [detector.update(v) for v in values] == [again.update(v) for v in values]


def _step(model, opt, guard, x, scale=1.0):
    loss = model(x).pow(2).mean() * scale
    guard.observe_loss(loss)
    opt.zero_grad()
    loss.backward()
    return guard.check(opt)


def test_the_guard_skips_the_diverged_step_bit_for_bit_and_resets():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # a too-large step size: the weights run away
    guard = StepGuard(model)
    x = torch.randn(16, 4) * 3
    kinds = []
    for _ in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        verdict = _step(model, opt, guard, x)
        opt.step()
        if verdict.incident is not None:
            kinds.append(verdict.incident.kind)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step changed nothing
            break
        if not all(math.isfinite(float(p.abs().max())) for p in model.parameters()):
            break
    assert kinds == ["divergence"], kinds
    incident = guard.incidents[0]
    assert incident.cause == "divergence" and "grew to" in incident.detail["growth"]
    assert len(guard.divergence.loss.recent) == 0  # reset: the next steps are compared with what follows


def test_detect_divergence_false_lets_finite_steps_through():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = StepGuard(model, detect_divergence=False)
    x = torch.randn(16, 4) * 3
    for _ in range(12):
        verdict = _step(model, opt, guard, x)
        opt.step()
        assert verdict.incident is None or verdict.incident.kind not in ("divergence", "jump")
