"""Finding the culprits: ``find_culprits`` (BatchBisection's search) vs the batch_size=1 re-scan (CPU).

A batch of ``--batch`` images (default 256) holds ``d`` poisoned samples (``d`` in 1 and 4) at random
positions, with the poisons of ``examples/dirty_data.py`` (a NaN pixel, an Inf pixel, a block of
1e38, an all-zero image; for ``d = 1`` the kind rotates with the seed, for ``d = 4`` one of each).
The models are in training mode, so BatchNorm normalises with the batch's own statistics and one
bad sample makes the whole batch's loss NaN: the batch fails, not a visible sample.

For every seed, on the same batch and the same model (weights fixed, the loss is cross entropy as in
``training_step``), two ways to name the culprits, alternating which goes first from seed to seed:

    bisection   lightning_nan.core.find_culprits(loss_fn, batch, module=model): adaptive group
                testing on sub-batches (torch.no_grad, buffers/RNG restored after each pass; a
                sub-batch of one is padded with a known-clean sample, since BatchNorm in training
                mode gets ``min_size=2``)
    re-scan     what people do today: every sample alone, in order (batch_size=1, no shuffle), the
                non-finite losses are the culprits: ``n`` forward passes. Also in training mode,
                under torch.no_grad, inside one ``preserved(model)`` (the same guarantees, paid once).
                BatchNorm2d accepts a batch of one in training mode (its statistics are then the
                sample's own, over its pixels), so no eval-mode substitute is needed; eval mode would
                normalise with the running statistics instead, which is not the failing computation.

Reported per model and ``d``: forward passes, samples pushed through the model (the sum of the
sub-batch sizes: what a compute-bound model pays for), wall time (``time.perf_counter`` around the
whole call, fingerprints included), medians and min-max over seeds; the per-seed ratio re-scan /
bisection of wall time and of forward passes; and for reference the group-testing floor
``ceil(log2 C(n, d))`` and ``d * log2 n``. Each method must name exactly the planted positions.

Models: ``net`` is ``examples/dirty_data.Net`` (1x8x8 images, one conv + BatchNorm2d: a forward
pass costs little more than its Python overhead). ``resnet`` is a small residual CNN on 3x32x32
(6 convs with BatchNorm2d, two residual blocks, the same per-sample standardisation and energy
feature as ``Net`` so the same poisons fail), where a forward pass costs real compute.

    python benchmarks/bisection.py             # default: 20 seeds, batch 256, both models
    python benchmarks/bisection.py --quick     # smoke run, a few seconds
    python benchmarks/bisection.py --threads 1 # on a shared, busy machine (2 threads oversubscribe it)
    # options: --seeds N  --batch N  --models net,resnet  --threads N
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from dirty_data import Net, plant  # noqa: E402
from guard_overhead import ForeignLoad, print_environment, print_load  # noqa: E402

from lightning_nan.core.culprits import find_culprits  # noqa: E402
from lightning_nan.core.reevaluate import preserved  # noqa: E402

KINDS = ("nan", "inf", "huge", "zero")
CULPRIT_COUNTS = (1, 4)


class ResNetish(nn.Module):
    """A small residual CNN on 3x32x32 with BatchNorm2d, standardisation and energy feature as in ``Net``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = width

        def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout))

        self.stem = nn.Sequential(conv_bn(3, w), nn.ReLU())
        self.block1 = nn.Sequential(conv_bn(w, w), nn.ReLU(), conv_bn(w, w))
        self.down = nn.Sequential(conv_bn(w, 2 * w, stride=2), nn.ReLU())
        self.block2 = nn.Sequential(conv_bn(2 * w, 2 * w), nn.ReLU(), conv_bn(2 * w, 2 * w))
        self.head = nn.Linear(2 * w + 1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        z = (x - mean) / x.std(dim=(1, 2, 3), keepdim=True)  # 0/0 for an all-zero image
        energy = torch.log1p(x.pow(2).mean(dim=(1, 2, 3)))  # (1e38)^2 overflows to inf
        h = self.stem(z)
        h = F.relu(h + self.block1(h))
        h = self.down(h)
        h = F.relu(h + self.block2(h))
        return self.head(torch.cat([h.mean(dim=(2, 3)), energy.unsqueeze(1)], dim=1))


#: name -> (model factory, image shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "net": (Net, (1, 8, 8)),
    "resnet": (ResNetish, (3, 32, 32)),
}
MODEL_LABELS = {
    "net": "dirty_data.Net (1x8x8)",
    "resnet": "ResNet-ish (3x32x32)",
}


def make_batch(n: int, d: int, seed: int, shape: tuple[int, int, int]) -> tuple[list[torch.Tensor], list[int]]:
    """``n`` images of ``shape`` (label-shifted noise, as in DirtyImages) with ``d`` planted poisons."""
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(n), d))
    kinds = [KINDS[seed % len(KINDS)]] if d == 1 else [KINDS[i % len(KINDS)] for i in range(d)]
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, *shape, generator=g) + y.view(n, 1, 1, 1).float() * 0.3
    for p, kind in zip(positions, kinds):
        plant(x[p], kind)
    return [x, y], positions


class Counting:
    """The loss ``cross_entropy(model(x), y)``, counting forward passes and samples evaluated."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.passes = 0
        self.samples = 0

    def __call__(self, batch: Any) -> torch.Tensor:
        x, y = batch
        self.passes += 1
        self.samples += len(x)
        return F.cross_entropy(self.model(x), y)


@dataclass
class Trial:
    passes: int
    samples: int
    seconds: float
    found: list[int]
    correct: bool


def run_bisection(model: nn.Module, batch: list[torch.Tensor], planted: list[int]) -> Trial:
    loss = Counting(model)
    t0 = time.perf_counter()
    report = find_culprits(loss, batch, module=model)
    seconds = time.perf_counter() - t0
    if report.tests + report.confirm_tests != loss.passes:
        raise RuntimeError(f"report.tests={report.tests} (+{report.confirm_tests} to confirm) but the loss ran {loss.passes} times")
    found = list(report.positions)
    ok = found == planted and report.groups == [[p] for p in planted] and report.reproduced and report.complete
    return Trial(report.tests, loss.samples, seconds, found, ok)


def run_rescan(model: nn.Module, batch: list[torch.Tensor], planted: list[int]) -> Trial:
    """Every sample alone, in order, training mode, no_grad, side effects undone once at the end."""
    loss = Counting(model)
    x, y = batch
    found: list[int] = []
    t0 = time.perf_counter()
    with preserved(model), torch.no_grad():
        for i in range(len(x)):
            if not bool(torch.isfinite(loss((x[i : i + 1], y[i : i + 1]))).all()):
                found.append(i)
    seconds = time.perf_counter() - t0
    return Trial(loss.passes, loss.samples, seconds, found, found == planted)


@dataclass
class Case:
    """Per-seed results for one model and one culprit count."""

    model: str
    d: int
    n: int
    bisection: list[Trial] = field(default_factory=list)
    rescan: list[Trial] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def run_case(name: str, d: int, n: int, seeds: int, log: Callable[[str], None]) -> Case:
    factory, shape = MODELS[name]
    model = factory().train()
    case = Case(name, d, n)
    warm, planted = make_batch(n, d, 10_000, shape)  # one untimed run of each first
    run_bisection(model, warm, planted)
    run_rescan(model, warm, planted)
    for seed in range(seeds):
        batch, planted = make_batch(n, d, seed, shape)
        with ForeignLoad() as load:
            if seed % 2 == 0:
                case.bisection.append(run_bisection(model, batch, planted))
                case.rescan.append(run_rescan(model, batch, planted))
            else:
                case.rescan.append(run_rescan(model, batch, planted))
                case.bisection.append(run_bisection(model, batch, planted))
        if load.value is not None:
            case.loads.append(load.value)
        b, r = case.bisection[-1], case.rescan[-1]
        log(
            f"{name} d={d} seed {seed}: bisection {b.passes} passes {b.seconds * 1e3:.1f} ms "
            f"{'ok' if b.correct else f'WRONG {b.found} != {planted}'}; re-scan {r.passes} passes "
            f"{r.seconds * 1e3:.1f} ms {'ok' if r.correct else f'WRONG {r.found}'}"
        )
    return case


def floors(n: int, d: int) -> tuple[int, float]:
    """The group-testing floor ``ceil(log2 C(n, d))`` and ``d * log2 n``."""
    return math.ceil(math.log2(math.comb(n, d))), d * math.log2(n)


def _mm(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def print_tables(cases: list[Case]) -> None:
    print("| model | d | method | forward passes, median (min-max) | samples evaluated, median | wall ms, median (min-max) | exact |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for c in cases:
        floor, dlog = floors(c.n, c.d)
        for label, trials in (("bisection", c.bisection), ("re-scan (batch_size=1)", c.rescan)):
            print(
                f"| {MODEL_LABELS[c.model]} | {c.d} | {label} | {_mm([t.passes for t in trials], '{:.0f}')} "
                f"| {statistics.median(t.samples for t in trials):.0f} | {_mm([t.seconds * 1e3 for t in trials], '{:.1f}')} "
                f"| {sum(t.correct for t in trials)}/{len(trials)} |"
            )
        print(f"| {MODEL_LABELS[c.model]} | {c.d} | floor ceil(log2 C({c.n},{c.d})) / d*log2(n) | {floor} / {dlog:.0f} | | | |")
    print("\nRatios re-scan / bisection, per seed (median, min-max):\n")
    print("| model | d | forward passes | samples evaluated | wall time |")
    print("|---|---:|---:|---:|---:|")
    for c in cases:
        pairs = list(zip(c.rescan, c.bisection))
        print(
            f"| {MODEL_LABELS[c.model]} | {c.d} | {_mm([r.passes / b.passes for r, b in pairs], '{:.1f}')} "
            f"| {_mm([r.samples / b.samples for r, b in pairs], '{:.2f}')} "
            f"| {_mm([r.seconds / b.seconds for r, b in pairs], '{:.2f}')} |"
        )


@dataclass
class Results:
    cases: list[Case]

    def case(self, model: str, d: int) -> Case:
        return next(c for c in self.cases if c.model == model and c.d == d)


def main(argv: list[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="batches (random culprit positions) per case (default 20)")
    parser.add_argument("--batch", type=int, default=256, help="samples per batch (default 256)")
    parser.add_argument("--models", default="net,resnet", help=f"comma-separated, of {', '.join(MODELS)} (default both)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, batch 64, net only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.batch, args.models = 2, 64, "net"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.seeds < 1 or args.batch < 8 or not models or any(m not in MODELS for m in models):
        parser.error(f"--seeds must be >= 1, --batch >= 8, --models a list of {', '.join(MODELS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    print_environment(args.threads is not None)
    print(f"\nSettings: {args.seeds} seeds x d in {CULPRIT_COUNTS}, batch {args.batch}, models {', '.join(models)}\n", flush=True)
    started = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    cases = [run_case(m, d, args.batch, args.seeds, log) for m in models for d in CULPRIT_COUNTS]
    print_tables(cases)
    print_load([v for c in cases for v in c.loads])
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")
    return Results(cases)


if __name__ == "__main__":
    main()
