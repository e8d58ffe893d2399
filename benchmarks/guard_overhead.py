"""Per-step overhead of NaNGuard vs a plain Trainer vs ``detect_anomaly=True`` (CPU, synthetic data).

Trains a small CNN (5 conv layers, 2 hidden FC layers; default PyTorch init, normalised random
inputs, so nothing goes NaN) with SGD lr 0.01, once per variant per round:

    plain            pl.Trainer()
    guard            pl.Trainer(callbacks=[NaNGuard()])
    guard+inputs     pl.Trainer(callbacks=[NaNGuard(check_inputs=True)])
    anomaly          pl.Trainer(detect_anomaly=True)

The variants are interleaved: every round runs each of them once, the order rotating from round to
round, so drift of the machine (thermal, other processes) hits all of them alike. A timing callback
takes ``time.perf_counter()`` at ``on_train_batch_start`` of step ``warmup`` (it is first in the
callbacks list) and at ``on_train_batch_end`` of the last step (its stop half is last in the list, so
every other callback's work of the measured steps is inside); Trainer start-up and the warm-up steps
are excluded. Each round's time is divided by the same round's plain time; the table reports the
median over rounds (and the min-max of the per-round ratio). In the guarded runs the wall time of
each call of NaNGuard's three per-step hooks is recorded too (the last column: the guard's cost in
place, caches as cold as they really are). The script also reports how busy the machine was with
other processes, and warns when it was not idle.

It then times the guard's own work in isolation (the three hooks, called directly on the same model
with real gradients, many times in a loop), which resolves overheads below the run-to-run noise
of the end-to-end numbers, and breaks it down.

    python benchmarks/guard_overhead.py             # default: 20 rounds x (10 warm-up + 60 measured steps)
    python benchmarks/guard_overhead.py --quick     # smoke run, a few seconds
    make bench                                      # the same as the first line, in the project venv

The timing machinery (``run_once``, ``interleaved``, ``hot_loop``, the tables, the load check) is
reused by ``benchmarks/clipping_overhead.py``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

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
    """Wall time from the start of batch ``warmup`` to the end of the last batch, per step.

    Put the timer first in the callbacks list and ``timer.stop`` last: the clock starts before every
    other callback's ``on_train_batch_start`` and stops after every other callback's ``on_train_batch_end``.
    """

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.t0: float | None = None
        self.t1: float | None = None
        self.stop = _StopTimer(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _synchronize(pl_module)
            self.t0 = time.perf_counter()

    def per_step(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed steps did not all run")
        return (self.t1 - self.t0) / (self.last - self.warmup + 1)


class _StopTimer(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.timer.last:
            _synchronize(pl_module)
            self.timer.t1 = time.perf_counter()


def _synchronize(pl_module: pl.LightningModule) -> None:
    """On a GPU, wait for the queued work, so that the clock sees the steps' whole time."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "guard": lambda: {"callbacks": [NaNGuard()]},
    "guard (check_inputs=True)": lambda: {"callbacks": [NaNGuard(check_inputs=True)]},
    "detect_anomaly=True": lambda: {"detect_anomaly": True},
}


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes have spent since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None


class ForeignLoad:
    """Average number of cores that other processes kept busy while the block ran (None off Linux)."""

    def __enter__(self) -> ForeignLoad:
        self.value: float | None = None
        self._busy, self._own, self._wall = _system_busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _system_busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            self.value = max(0.0, (busy - self._busy - (_own_seconds() - self._own)) / wall)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


GUARD_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step")

#: Which hooks to time in place: ``(callbacks, model, trainer kwargs) -> [(object, hook names), ...]``.
TimedHooks = Callable[[list, pl.LightningModule, dict], list[tuple[object, tuple[str, ...]]]]


def guard_hooks(callbacks: list, model: pl.LightningModule, kwargs: dict) -> list[tuple[object, tuple[str, ...]]]:
    """NaNGuard's three per-step hooks, for every NaNGuard in ``callbacks``."""
    return [(cb, GUARD_HOOKS) for cb in callbacks if isinstance(cb, NaNGuard)]


def time_hooks(obj: object, names: tuple[str, ...] = GUARD_HOOKS) -> dict[str, list[float]]:
    """Wrap ``obj``'s hooks ``names`` (on the instance) to record each call's wall time."""
    record: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        hook, out = getattr(obj, name), record[name]

        def timed(*args, _hook=hook, _out=out, **kwargs):
            t0 = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                _out.append(time.perf_counter() - t0)

        setattr(obj, name, timed)
    return record


@dataclass
class RunResult:
    per_step: float  #: seconds per measured step
    hooks_per_step: float | None  #: seconds per measured step spent inside the timed hooks
    foreign_load: float | None  #: cores other processes kept busy meanwhile


def bench_trainer(*, root: str, accelerator: str = "cpu", logger: object = False, **kwargs) -> pl.Trainer:
    """A one-device Trainer with nothing of its own that costs time: no checkpointing, progress bar or
    model summary; ``logger=False`` unless given; ``kwargs`` go to ``pl.Trainer`` (steps, callbacks, ...)."""
    return pl.Trainer(
        accelerator=accelerator, devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, **kwargs,
    )


def run_once(
    variant: str | Callable[[], dict],
    *,
    warmup: int,
    steps: int,
    batch_size: int,
    data: TensorDataset,
    root: str,
    logger: Callable[[str], object] | None = None,
    timed: TimedHooks = guard_hooks,
    accelerator: str = "cpu",
) -> RunResult:
    """One short fit of ``variant`` (a name in :data:`VARIANTS`, or a factory of extra Trainer kwargs).

    ``logger``: called with ``root`` to make the Trainer's logger (default: ``logger=False``).
    ``timed``: the hooks whose wall time is recorded in place (each must run once per step).
    ``accelerator``: the Trainer's (``"gpu"``: the clock waits for the device at both ends).
    """
    pl.seed_everything(0, verbose=False)
    model = BenchCNN()
    extra = (VARIANTS[variant] if isinstance(variant, str) else variant)()
    callbacks = extra.pop("callbacks", [])
    records = [time_hooks(obj, names) for obj, names in timed(callbacks, model, extra)]
    timer = StepTimer(warmup, warmup + steps - 1)
    trainer = bench_trainer(
        root=root,
        accelerator=accelerator,
        max_steps=warmup + steps,
        max_epochs=-1,
        callbacks=[timer, *callbacks, timer.stop],  # the timer first, its stop half last
        logger=False if logger is None else logger(root),
        **extra,
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    gc.collect()
    with ForeignLoad() as load:
        trainer.fit(model, loader)
    hooks = None
    if records:  # one call of each hook per step; skip the warm-up steps' calls
        hooks = sum(sum(calls[warmup : warmup + steps]) for rec in records for calls in rec.values()) / steps
    return RunResult(timer.per_step(), hooks, load.value)


@dataclass
class Interleaved:
    """Per-variant results of :func:`interleaved`, one entry per round."""

    times: dict[str, list[float]]  #: seconds per step
    hooks: dict[str, list[float]]  #: seconds per step inside the timed hooks (empty: none timed)
    loads: list[float]  #: cores other processes kept busy, per run


def interleaved(variants: dict[str, Callable[[], dict]], *, rounds: int, **run_kwargs) -> Interleaved:
    """Run every variant once per round, the order rotating from round to round (see the module doc).

    ``run_kwargs`` go to :func:`run_once`. Prints one progress line per round to stderr.
    """
    names = list(variants)
    res = Interleaved({n: [] for n in names}, {n: [] for n in names}, [])
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        round_loads = []
        for name in order:
            run = run_once(variants[name], **run_kwargs)
            res.times[name].append(run.per_step)
            if run.hooks_per_step is not None:
                res.hooks[name].append(run.hooks_per_step)
            if run.foreign_load is not None:
                round_loads.append(run.foreign_load)
        res.loads += round_loads
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {res.times[n][-1] * 1e3:.2f}" for n in names)
            + " ms/step"
            + (f"; other processes: {max(round_loads):.2f} cores" if round_loads else ""),
            file=sys.stderr,
            flush=True,
        )
    return res


def print_ratio_table(res: Interleaved, baseline: str, hooks_header: str) -> None:
    """The end-to-end table: medians over rounds, each round's time divided by the same round's ``baseline``."""
    base = res.times[baseline]
    base_step = statistics.median(base)
    print(f"| variant | ms/step (median) | ratio vs {baseline} (median) | ratio min-max over rounds | {hooks_header} |")
    print("|---|---:|---:|---:|---:|")
    for name, times in res.times.items():
        ratios = [t / p for t, p in zip(times, base)]
        hooks = res.hooks[name]
        inside = (
            f"{statistics.median(hooks) * 1e6:.0f} ({100 * statistics.median(hooks) / base_step:.1f}% of {baseline})"
            if hooks
            else "-"
        )
        print(
            f"| {name} | {statistics.median(times) * 1e3:.2f} | {statistics.median(ratios):.3f} "
            f"| {min(ratios):.3f}-{max(ratios):.3f} | {inside} |"
        )


def print_load(loads: list[float]) -> None:
    """How busy other processes kept the machine, with a warning when it was not idle."""
    if not loads:
        return
    print(
        f"\nOther processes kept {statistics.median(loads):.2f} cores busy during the median run "
        f"({max(loads):.2f} at most)."
    )
    if max(loads) > 0.25:
        print(
            f"**Warning: the machine was not idle (up to {max(loads):.2f} of {os.cpu_count()} cores used by other "
            "processes); with torch's default thread count this inflates and scatters the times. Re-run on an idle machine.**"
        )


def hot_loop(fn: Callable[[int], object], repeats: int) -> float:
    """Seconds per call of ``fn(i)``: best of 5 loops of ``repeats`` calls, after a short warm-up."""
    for i in range(min(50, repeats)):
        fn(i)
    best = math.inf
    for _ in range(5):  # best of 5 loops: the least disturbed estimate
        t0 = time.perf_counter()
        for i in range(repeats):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


@dataclass
class StepState:
    """A finished one-step fit and the tensors of one more step, for hot-loop timing of hooks."""

    trainer: pl.Trainer
    model: BenchCNN
    opt: torch.optim.Optimizer
    batch: list[torch.Tensor]
    loss: torch.Tensor
    params: list[torch.Tensor]
    grads: list[torch.Tensor]


def step_state(*, batch_size: int, data: TensorDataset, root: str, logger: object = False, **trainer_kwargs) -> StepState:
    """Fit the benchmark model for one step, then run one more forward/backward (real gradients)."""
    pl.seed_everything(0, verbose=False)
    model = BenchCNN()
    trainer = bench_trainer(root=root, max_steps=1, logger=logger, **trainer_kwargs)
    trainer.fit(model, DataLoader(data, batch_size=batch_size))
    x, y = data.tensors[0][:batch_size], data.tensors[1][:batch_size]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = list(model.parameters())
    return StepState(trainer, model, trainer.optimizers[0], [x, y], loss, params, [p.grad for p in params])


def print_isolation(rows: list[tuple[str, float]], base_step: float, base_name: str = "plain") -> None:
    print(f"(% of the median {base_name} step, {base_step * 1e3:.2f} ms)\n")
    print(f"| work per optimizer step | us | % of {base_name} step |")
    print("|---|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec * 1e6:.1f} | {100 * sec / base_step:.2f}% |")


def guard_in_isolation(*, batch_size: int, data: TensorDataset, repeats: int, root: str) -> list[tuple[str, float]]:
    """Seconds per optimizer step of the guard's own work, on the benchmark model with real gradients.

    The NaNGuard rows call the callback's three per-step hooks directly, with the Trainer of a finished
    one-step fit (so Lightning's property look-ups are included, its hook dispatch is not). Each call
    starts a new step for the guard (its once-per-step cache is cleared), so the check runs every time.
    The "alternative" rows time other ways to check the weights, for comparison; the library uses none of them.
    """
    from lightning_nan.core.norms import any_nonfinite, tensor_norms

    st = step_state(batch_size=batch_size, data=data, root=root)
    trainer, model, loss, params, grads = st.trainer, st.model, st.loss, st.params, st.grads

    def hooks(cb: NaNGuard) -> Callable[[int], None]:
        cb.setup(trainer, model, "fit")
        return lambda i: guard_step(cb, st, i)

    def loss_only(cb: NaNGuard) -> Callable[[int], None]:
        def step(i: int) -> None:
            cb.on_before_backward(trainer, model, loss)
            cb.guard._losses.clear()
            cb.guard._loss_where.clear()

        return step

    return [
        ("NaNGuard(): its 3 hooks per step", hot_loop(hooks(NaNGuard()), repeats)),
        ("NaNGuard(check_inputs=True)", hot_loop(hooks(NaNGuard(check_inputs=True)), repeats)),
        ("NaNGuard(check_params_every_n_steps=0)", hot_loop(hooks(NaNGuard(check_params_every_n_steps=0)), repeats)),
        ("part: on_before_backward (keeps the loss)", hot_loop(loss_only(NaNGuard()), repeats)),
        ("part: fused _foreach_norm(grads + params, 2) + stack", hot_loop(lambda i: tensor_norms(grads + params), repeats)),
        ("part: _foreach_norm(grads, 2) + stack", hot_loop(lambda i: tensor_norms(grads), repeats)),
        (
            "former weight check: _foreach_norm(params, inf) + stack + isfinite",
            hot_loop(lambda i: any_nonfinite(tensor_norms(params, math.inf)), repeats),
        ),
    ]


def guard_step(cb: NaNGuard, st: StepState, i: int) -> None:
    """NaNGuard's three per-step hooks, as a new step (the guard's once-per-step cache cleared first)."""
    cb._grads.clear()
    cb.on_train_batch_start(st.trainer, st.model, st.batch, i)
    cb.on_before_backward(st.trainer, st.model, st.loss)
    cb.on_before_optimizer_step(st.trainer, st.model, st.opt)


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


def environment(threads_from_cli: bool = False) -> list[tuple[str, str]]:

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
        (
            "torch threads (intra-op)",
            f"{torch.get_num_threads()} ({'set by --threads' if threads_from_cli else 'torch default, not changed'})",
        ),
        ("CUDA available", str(torch.cuda.is_available())),
    ]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--repeats", type=int, default=500, help="loop length of the isolated timings")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: leave torch's default)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")


def print_environment(threads_from_cli: bool) -> None:
    print("## Environment\n")
    for key, value in environment(threads_from_cli):
        print(f"- {key}: {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (default 60)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch_size, args.repeats = 2, 5, 2, 8, 20
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--rounds, --steps, --batch-size must be >= 1 and --warmup >= 0")

    quiet_lightning()

    data = make_data((args.warmup + args.steps) * args.batch_size)
    print_environment(args.threads is not None)
    print(
        f"\nSettings: {args.rounds} rounds x {len(VARIANTS)} variants; per run {args.warmup} warm-up + "
        f"{args.steps} measured steps, batch {args.batch_size} of 1x28x28\n",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        res = interleaved(
            VARIANTS,
            rounds=args.rounds, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, data=data, root=root,
        )

    plain_step = statistics.median(res.times["plain"])
    print("## End to end (per optimizer step, median over rounds)\n")
    print_ratio_table(res, "plain", "inside NaNGuard's hooks, us/step (median)")
    print_load(res.loads)

    with tempfile.TemporaryDirectory() as root:
        iso = guard_in_isolation(batch_size=args.batch_size, data=data, repeats=args.repeats, root=root)
    print("\n## The guard's own work in isolation (best of 5 loops, same model, real gradients)\n")
    print_isolation(iso, plain_step)
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
