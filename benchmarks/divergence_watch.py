"""Host cost of NaNGuard's divergence watch on a healthy step (no device work is involved).

The watch runs on the host values the guard's one transfer per step brings back (loss, gradient
norm, weight norm): two robust level tests and a weight-jump test. This times ``DivergenceWatch.check``
on a healthy, noisy history, the common case, and on a history that keeps its levels near the
threshold (the slower path: both medians computed every step).

    python benchmarks/divergence_watch.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import random
import time

from lightning_nan.core.diagnosis import StepRecord
from lightning_nan.core.divergence import DivergenceWatch


def per_step_us(steps: int, level: float) -> float:
    rng = random.Random(0)
    watch, history = DivergenceWatch(), []
    start = None
    for s in range(steps + 100):
        if s == 100:
            start = time.perf_counter()
        loss = (1.0 if s < 3 else level) * (1.0 + 0.1 * rng.random())
        history.append(StepRecord(s, loss=loss, grad_norm=2.0 + rng.random(), weight_norm=50.0 + 1e-3 * s))
        del history[:-32]  # the guard keeps 32 records
        watch.check(history, s, history[-1].loss, history[-1].grad_norm)
    assert start is not None
    return (time.perf_counter() - start) / steps * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args(argv)
    print("| history | us per step |\n|---|---:|")
    print(f"| healthy (loss at its starting level) | {per_step_us(args.steps, 1.0):.1f} |")
    print(f"| loss level 100x the start (both medians every step) | {per_step_us(args.steps, 100.0):.1f} |")


if __name__ == "__main__":
    main()
