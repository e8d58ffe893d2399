"""Per-step overhead of NaNGuard vs a plain Trainer vs ``detect_anomaly=True`` (CPU, synthetic data).

Trains a small CNN (5 conv layers, 2 hidden FC layers; default PyTorch init, normalised random
inputs, so nothing goes NaN) with SGD lr 0.01, once per variant per round:

    plain            pl.Trainer()
    guard            pl.Trainer(callbacks=[NaNGuard()])
    guard+inputs     pl.Trainer(callbacks=[NaNGuard(check_inputs=True)])
    anomaly          pl.Trainer(detect_anomaly=True)

The variants are interleaved: every round runs each of them once, the order rotating from round to
round, so drift of the machine (thermal, other processes) hits all of them alike. A timing callback,
first in the callbacks list, takes ``time.perf_counter()`` at ``on_train_batch_start`` of step
``warmup`` and at ``on_train_batch_end`` of the last step; Trainer start-up and the warm-up steps
are excluded. Each round's time is divided by the same round's plain time; the table reports the
median over rounds (and the min-max of the per-round ratio).

It then times the guard's own work in isolation (the three hooks, called directly on the same model
with real gradients, many times in a loop), which resolves overheads far below the run-to-run noise
of the end-to-end numbers.

    python benchmarks/guard_overhead.py             # default: 8 rounds x (10 warm-up + 60 measured steps)
    python benchmarks/guard_overhead.py --quick     # smoke run, a few seconds
    make bench                                      # the same as the first line, in the project venv
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan import NaNGuard

NUM_CLASSES = 10


class BenchCNN(pl.LightningModule):
    """PatchCNN's shape (examples/exploding_cnn.py) with default init and a stable cross-entropy."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        chans = [1, 16, 16, 32, 32, 32]
        convs: list[nn.Module] = []
        for i in range(5):
            convs += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i in (1, 3):
                convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n: int, seed: int = 0) -> TensorDataset:
    """``n`` normalised random 1x28x28 images with random labels (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch, per step."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.t0: float | None = None
        self.t1: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            self.t1 = time.perf_counter()

    def per_step(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed steps did not all run")
        return (self.t1 - self.t0) / (self.last - self.warmup + 1)


VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "guard": lambda: {"callbacks": [NaNGuard()]},
    "guard (check_inputs=True)": lambda: {"callbacks": [NaNGuard(check_inputs=True)]},
    "detect_anomaly=True": lambda: {"detect_anomaly": True},
}


def run_once(variant: str, *, warmup: int, steps: int, batch_size: int, data: TensorDataset, root: str) -> float:
    """One short fit; seconds per step over the measured steps."""
    pl.seed_everything(0, verbose=False)
    model = BenchCNN()
    extra = VARIANTS[variant]()
    timer = StepTimer(warmup, warmup + steps - 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        max_epochs=-1,
        callbacks=[timer, *extra.pop("callbacks", [])],  # the timer first
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **extra,
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    gc.collect()
    trainer.fit(model, loader)
    return timer.per_step()


def guard_in_isolation(*, batch_size: int, data: TensorDataset, repeats: int) -> dict[str, float]:
    """Seconds per call of the guard's per-step work, on the benchmark model with real gradients."""
    from lightning_nan.core.norms import tensor_norms
    from lightning_nan.core.step_guard import StepGuard

    torch.manual_seed(0)
    model = BenchCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data.tensors[0][:batch_size], data.tensors[1][:batch_size]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    batch = [x, y]

    def timeit(fn: Callable[[int], object]) -> float:
        for i in range(min(50, repeats)):
            fn(i)
        best = math.inf
        for _ in range(5):  # best of 5 blocks: the least disturbed estimate
            t0 = time.perf_counter()
            for i in range(repeats):
                fn(i)
            best = min(best, (time.perf_counter() - t0) / repeats)
        return best

    guard = StepGuard(model)

    def full(i: int, check_inputs: bool = False) -> None:
        guard.observe_batch(batch, i, check_inputs=check_inputs)
        guard.observe_loss(loss)
        guard.check(opt, step=i)

    out = {
        "StepGuard: observe_batch + observe_loss + check": timeit(full),
        "  same, check_inputs=True": timeit(lambda i: full(i, True)),
        "  same, check_params_every_n_steps=0": 0.0,
        "  _foreach_norm(grads) + stack": timeit(lambda i: tensor_norms(grads)),
        "  _foreach_norm(params, inf) + stack": timeit(lambda i: tensor_norms(params, math.inf)),
        "  observe_loss alone": 0.0,
    }
    no_params = StepGuard(model, check_params_every_n_steps=0)

    def full_no_params(i: int) -> None:
        no_params.observe_batch(batch, i, check_inputs=False)
        no_params.observe_loss(loss)
        no_params.check(opt, step=i)

    out["  same, check_params_every_n_steps=0"] = timeit(full_no_params)
    lone = StepGuard(model)

    def loss_only(i: int) -> None:
        lone.observe_loss(loss)
        lone._loss_flags.clear()
        lone._loss_where.clear()

    out["  observe_loss alone"] = timeit(loss_only)
    return out


def quiet_lightning() -> None:
    """Silence Lightning's per-fit info lines and its "few workers" / anomaly-mode warnings."""
    import logging

    warnings.filterwarnings("ignore")
    try:
        import lightning  # noqa: F401  (its import resets the level of the "lightning.pytorch" logger)
    except ImportError:
        pass
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lightning_version() -> str:
    try:
        import lightning
    except ImportError:
        return "not installed"
    return lightning.__version__


def environment() -> list[tuple[str, str]]:

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("pytorch_lightning", pl.__version__),
        ("lightning", lightning_version()),
        ("CPU", cpu),
        ("CPU cores (os.cpu_count)", str(os.cpu_count())),
        ("torch threads (intra-op, default)", str(torch.get_num_threads())),
        ("CUDA available", str(torch.cuda.is_available())),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--repeats", type=int, default=500, help="loop length of the isolated guard timing")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch_size, args.repeats = 2, 5, 2, 8, 20
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--rounds, --steps, --batch-size must be >= 1 and --warmup >= 0")

    quiet_lightning()

    import tempfile

    data = make_data((args.warmup + args.steps) * args.batch_size)
    names = list(VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    print("## Environment\n")
    for key, value in environment():
        print(f"- {key}: {value}")
    print(
        f"\nSettings: {args.rounds} rounds x {len(names)} variants; per run {args.warmup} warm-up + "
        f"{args.steps} measured steps, batch {args.batch_size} of 1x28x28\n",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(
                    run_once(name, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, data=data, root=root)
                )
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {times[n][-1] * 1e3:.2f}" for n in names)
                + " ms/step",
                file=sys.stderr,
                flush=True,
            )

    plain = times["plain"]
    print("## End to end (ms per optimizer step, median over rounds)\n")
    print("| variant | ms/step (median) | ratio vs plain (median) | ratio min-max over rounds |")
    print("|---|---:|---:|---:|")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], plain)]
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | {statistics.median(ratios):.3f} "
            f"| {min(ratios):.3f}-{max(ratios):.3f} |"
        )
    plain_step = statistics.median(plain)

    iso = guard_in_isolation(batch_size=args.batch_size, data=data, repeats=args.repeats)
    print("\n## The guard's own work in isolation (best of 5 loops, same model, real gradients)\n")
    print("| work per optimizer step | us/call | % of plain step |")
    print("|---|---:|---:|")
    for name, sec in iso.items():
        print(f"| {name.strip() if not name.startswith('  ') else '&nbsp;&nbsp;' + name.strip()} "
              f"| {sec * 1e6:.1f} | {100 * sec / plain_step:.2f}% |")
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
