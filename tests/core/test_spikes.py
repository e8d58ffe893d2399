"""The one robust z-score (core/spikes.py) against float64 recomputations, and its two callers agreeing."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from lightning_nan.core.spikes import LossRing, LossSpikeDetector, SpikeTest, nan_median, robust_zscore


@pytest.mark.parametrize("n", [1, 2, 5, 6, 17, 50])
def test_nan_median_is_the_median_of_the_finite_values(n):
    rng = random.Random(n)
    values = [rng.gauss(0, 1) for _ in range(n)]
    holes = values + [math.nan] * rng.randint(0, 4)
    rng.shuffle(holes)
    got = nan_median(torch.tensor(holes, dtype=torch.float64))
    assert got.item() == pytest.approx(statistics.median(values), rel=1e-12)


def test_nan_median_of_an_empty_window_is_nan():
    assert math.isnan(nan_median(torch.full((4,), math.nan)).item())


def test_robust_zscore_matches_a_float64_recomputation_with_its_floors():
    rng = random.Random(7)
    for window in ([rng.gauss(3.0, 0.2) for _ in range(9)], [2.0] * 8, [0.0] * 6, [1.0, 1.0, 1.0, 5.0]):
        med = statistics.median(window)
        mad = statistics.median([abs(v - med) for v in window])
        for x in (med + 0.3, med - 1.0, 10.0):
            ref = (x - med) / max(1.4826 * mad, 1e-3 * abs(med), 1e-12)
            got = robust_zscore(torch.tensor(x, dtype=torch.float64), torch.tensor(window + [math.nan], dtype=torch.float64))
            assert got.item() == pytest.approx(ref, rel=1e-12)


def test_both_callers_find_the_same_spikes():
    """CheckpointRollback's host detector and LRBackoff's device test: one formula, one window rule."""
    rng = random.Random(11)
    losses = [2.0 + 0.05 * rng.gauss(0, 1) for _ in range(200)]
    for i in (40, 41, 120, 170):
        losses[i] += 0.6  # ~12 sigma
    det = LossSpikeDetector(window=30, threshold=6.0, min_history=10)
    host = [i for i, z in enumerate(det.update(losses)) if det.is_spike(z)]
    test = SpikeTest(window=30, min_history=10)
    flags = [test.test(torch.tensor(v), 6.0, reduce=lambda t: t) for v in losses]
    device = [i for i, f in enumerate(flags) if f is not None and f.get()]
    assert host == device == [40, 41, 120, 170]
    assert test.ring.tolist() == pytest.approx(det.history, rel=1e-6) and test.seen == 200


def test_a_loss_ring_reloads_its_last_values():
    ring = LossRing(4, dtype=torch.float64)
    ring.load([1.0, 2.0, 3.0, 4.0, 5.0])
    ring.push(torch.tensor(math.inf, dtype=torch.float64))  # takes a slot, as NaN
    assert ring.tolist() == [3.0, 4.0, 5.0] and ring.count == 5 and ring.filled == 4
    ring.clear()
    assert ring.tolist() == [] and ring.filled == 0


def _robust_z(value: float, history: list[float]) -> float:
    """Independent recomputation: median and MAD by sorting."""

    def median(xs):
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

    m = median(history)
    mad = median([abs(x - m) for x in history])
    return (value - m) / (1.4826 * mad)


def test_spike_detector_scores_against_the_window_before_each_value():
    g = torch.Generator().manual_seed(0)
    values = (1.0 + 0.1 * torch.randn(40, generator=g)).tolist()
    values[30] = float("nan")  # skipped: neither scored nor kept
    values[35] = 9.0
    det = LossSpikeDetector(window=16, threshold=6.0)
    assert det.min_history == 5
    z = det.update(values)
    kept: list[float] = []
    for i, v in enumerate(values):
        if math.isnan(v):
            assert math.isnan(z[i])
            continue
        if len(kept) < 5:
            assert math.isnan(z[i])
        else:
            assert z[i] == pytest.approx(_robust_z(v, kept[-16:]), rel=1e-9)
        kept.append(v)
    assert [i for i, v in enumerate(z) if det.is_spike(v)] == [35]
    assert list(det.history) == kept[-16:]
    clone = LossSpikeDetector(window=16, threshold=6.0)
    clone.load_state_dict(det.state_dict())
    assert clone.zscore(1.3) == det.zscore(1.3)


def test_constant_losses_do_not_divide_by_zero():
    det = LossSpikeDetector(window=10)
    det.update([2.0] * 10)
    assert det.zscore(2.0) == 0.0
    assert det.is_spike(det.zscore(2.1))  # 0.1 over a loss that never moved: 50 times the floor 1e-3 * 2
    assert not det.is_spike(det.zscore(2.01))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"window": 3}, "window"), ({"threshold": 0}, "threshold"), ({"window": 10, "min_history": 11}, "min_history")],
)
def test_detector_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossSpikeDetector(**kwargs)


