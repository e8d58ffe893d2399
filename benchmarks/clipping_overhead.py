"""Per-step overhead of GradientClipping and NormMonitor (CPU, synthetic data).

The model, data, optimizer and method are those of ``benchmarks/guard_overhead.py``, whose timing
machinery this script imports: fresh Trainer and model per run, variants interleaved in rounds with
a rotating order, a steady-state timing callback (warm-up steps and Trainer start-up excluded), each
round's time divided by the same round's baseline, the median over rounds reported, the load from
other processes checked. Two comparisons, each interleaved on its own:

Clipping (``logger=False``, as in guard_overhead.py; default 10 warm-up + 60 measured steps):

    B                              pl.Trainer(gradient_clip_val=1.0)
    NaNGuard + GradientClipping    pl.Trainer(callbacks=[NaNGuard(), GradientClipping("norm", max_norm=1.0)])

NormMonitor (every variant, the baseline too, has the same logger, so the monitor really logs; default
10 warm-up + 100 measured steps, so that ``every_n_steps=50`` logs at 2 of them, steps 50 and 100:
its average rate):

    plain                          pl.Trainer(logger=L)
    NormMonitor(every_n_steps=1)   pl.Trainer(logger=L, callbacks=[NormMonitor(every_n_steps=1)])
    NormMonitor(every_n_steps=50)  pl.Trainer(logger=L, callbacks=[NormMonitor(every_n_steps=50)])

Each comparison also runs its baseline a second time as a variant of its own ("again (control)"):
its ratio to the baseline would be 1.000 without noise, so its median and spread show how much of a
difference the end-to-end numbers can resolve.

``L`` is an in-memory logger (``--logger memory``, the default: the monitor's own cost, nothing
written) or a ``TensorBoardLogger`` in a temp dir (``--logger tensorboard``: the cost a TensorBoard
user pays, event-file writing included). The wall time of the callbacks' hooks is recorded in place
(for B, Lightning's ``configure_gradient_clipping`` hook, which does its clipping).

Then the per-step work is timed in a hot loop on the same model with real gradients: Lightning's
clipping, the guard plus GradientClipping (which reuses the guard's gradient norms), NormMonitor on a
logging step and on another step, and their parts.

Paired in one fit (``--only alternating``): a ``NormMonitor(every_n_steps=1)`` runs on even
steps only, every step is timed from one ``on_train_batch_start`` to the next, and the median even
(logging) step is compared with the median odd step of the same fit, ``--runs`` fits in all.
Neighbouring steps share the machine's drift, which the interleaved rounds cannot cancel. The same
pairing for clipping (``--only clipping-alternating``): NaNGuard + GradientClipping("norm", 1.0) on even
steps, Lightning's own clipping (``configure_gradient_clipping`` -> ``clip_gradients(1.0, "norm")``, what
``gradient_clip_val=1.0`` runs) on odd steps.

Side by side (``--only side-by-side``): ``--runs`` rounds of three such paired fits, in an order rotating
from round to round: the monitor; the floor (``--floor``: a callback that logs the monitor's keys through
the same ``log_metrics`` and computes nothing, what logging them costs any callback); the control.

    python benchmarks/clipping_overhead.py                          # default: 20 rounds, ~3 min here
    python benchmarks/clipping_overhead.py --logger tensorboard --only monitor
    python benchmarks/clipping_overhead.py --only alternating     # ~1 min
    python benchmarks/clipping_overhead.py --only side-by-side --logger tensorboard  # monitor, floor, control; ~5 min
    python benchmarks/clipping_overhead.py --only clipping-alternating [--control]
    python benchmarks/clipping_overhead.py --quick                  # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guard_overhead import (  # noqa: E402  (the shared timing machinery)
    GUARD_HOOKS,
    BenchCNN,
    ForeignLoad,
    StepState,
    add_common_args,
    bench_trainer,
    guard_step,
    hot_loop,
    interleaved,
    make_data,
    print_environment,
    print_isolation,
    print_load,
    print_ratio_table,
    quiet_lightning,
    step_state,
)
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from pytorch_lightning.loggers.logger import Logger  # noqa: E402

from lightning_nan import GradientClipping, NaNGuard, NormMonitor  # noqa: E402
from lightning_nan.core.step_grads import GradsSource, StepGrads  # noqa: E402

MONITOR_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")


class MemoryLogger(Logger):
    """A logger that keeps every ``log_metrics`` call in a list: logging at no cost of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, metrics))


LOGGERS: dict[str, Callable[[str], Logger]] = {
    "memory": lambda root: MemoryLogger(),
    "tensorboard": lambda root: TensorBoardLogger(root, name="bench"),
}

def clip_variants(max_norm: float = 1.0) -> dict[str, Callable[[], dict]]:
    """Lightning's clipping, the guard + GradientClipping, and Lightning's again, all at ``max_norm``."""
    return {
        f"B: gradient_clip_val={max_norm:g}": lambda: {"gradient_clip_val": max_norm},
        f"NaNGuard + GradientClipping(norm, {max_norm:g})": lambda: {
            "callbacks": [NaNGuard(), GradientClipping("norm", max_norm=max_norm)]
        },
        "B again (control)": lambda: {"gradient_clip_val": max_norm},
    }

MONITOR_VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "NormMonitor(every_n_steps=1)": lambda: {"callbacks": [NormMonitor(every_n_steps=1)]},
    "NormMonitor(every_n_steps=50)": lambda: {"callbacks": [NormMonitor(every_n_steps=50)]},
    "plain again (control)": lambda: {},
}


def timed_hooks(callbacks: list, model, kwargs: dict) -> list[tuple[object, tuple[str, ...]]]:
    """The per-step hooks of the guard, the clipper and the monitor; Lightning's clipping hook for B."""
    out: list[tuple[object, tuple[str, ...]]] = []
    for cb in callbacks:
        if isinstance(cb, NaNGuard):
            out.append((cb, GUARD_HOOKS))
        elif isinstance(cb, GradientClipping):
            out.append((cb, ("on_before_optimizer_step",)))
        elif isinstance(cb, NormMonitor):
            out.append((cb, MONITOR_HOOKS))
    if kwargs.get("gradient_clip_val"):
        out.append((model, ("configure_gradient_clipping",)))
    return out


def clipping_in_isolation(st: StepState, repeats: int, max_norm: float = 1.0) -> list[tuple[str, float]]:
    """Seconds per optimizer step of the clipping work at ``max_norm``, hot loop, real gradients (no logger)."""
    from pytorch_lightning.utilities import GradClipAlgorithmType
    from torch.nn.utils import clip_grad_norm_

    from lightning_nan.core.norms import tensor_norms

    trainer, model, opt = st.trainer, st.model, st.opt

    def lightning_clip(i: int) -> None:  # what the Trainer runs per step with gradient_clip_val=max_norm
        trainer.precision_plugin._clip_gradients(model, opt, max_norm, GradClipAlgorithmType.NORM)

    guard, clip = NaNGuard(), GradientClipping("norm", max_norm=max_norm)
    for cb in (guard, clip):
        cb.setup(trainer, model, "fit")
    callbacks = trainer.callbacks
    trainer.callbacks = [*callbacks, guard]  # the clipper finds the guard there, as in a Trainer

    def guard_and_clip(i: int) -> None:
        guard_step(guard, st, i)  # checks the step: the clipper asks the guard for its gradient norms
        clip.on_before_optimizer_step(trainer, model, opt)

    def guard_only(i: int) -> None:
        guard_step(guard, st, i)

    def clip_reusing(i: int) -> None:  # the guard has checked the step: it hands out its norms
        clip.on_before_optimizer_step(trainer, model, opt)

    def clip_alone(i: int) -> None:  # no guard in the Trainer: it computes the norms itself
        clip._grads.clear()
        clip.on_before_optimizer_step(trainer, model, opt)

    def timed(fn: Callable[[int], object]) -> float:
        return hot_loop(fn, repeats)

    norms = tensor_norms(st.grads)
    rows = [
        ("B: Lightning's clipping (configure_gradient_clipping hook -> clip_grad_norm_)", timed(lightning_clip)),
        (f"part: torch.nn.utils.clip_grad_norm_(params, {max_norm:g})", timed(lambda i: clip_grad_norm_(st.params, max_norm))),
        ("NaNGuard's 3 hooks + GradientClipping's hook", timed(guard_and_clip)),
        ("part: NaNGuard's 3 hooks", timed(guard_only)),
    ]
    guard_step(guard, st, 0)
    rows += [
        ("part: GradientClipping's hook, reusing the guard's norms", timed(clip_reusing)),
        ("part: GradientClipper.clip_(params, norms)", timed(lambda i: clip.clipper.clip_(st.params, norms))),
    ]
    trainer.callbacks = callbacks
    rows.append(("GradientClipping alone (computes the gradient norms itself)", timed(clip_alone)))
    rows.append(("net: (guard + clipping hooks) - Lightning's clipping", rows[2][1] - rows[0][1]))
    return rows


def monitor_in_isolation(st: StepState, repeats: int, root: str) -> list[tuple[str, float]]:
    """Seconds per optimizer step of NormMonitor's work, hot loop, real gradients.

    ``st.trainer`` has a MemoryLogger; the TensorBoard rows swap in a TensorBoardLogger.
    """
    trainer, model, opt, batch = st.trainer, st.model, st.opt, st.batch
    memory = trainer.loggers
    tensorboard = TensorBoardLogger(root, name="isolation")

    def monitor(every: int) -> NormMonitor:
        m = NormMonitor(every_n_steps=every)
        m.setup(trainer, model, "fit")
        return m

    def hooks(m: NormMonitor) -> Callable[[int], None]:
        def step(i: int) -> None:
            m._grads.clear()  # a new step: the gradient norms are not computed yet
            m.on_train_batch_start(trainer, model, batch, i)
            m.on_before_optimizer_step(trainer, model, opt)
            m.on_train_batch_end(trainer, model, None, batch, i)

        return step

    every1, every50 = monitor(1), monitor(50)
    assert trainer.global_step % 50 != 0  # a non-logging step for every50

    def before_step(i: int) -> None:
        every1._grads.clear()
        every1._pending = {}
        every1.on_before_optimizer_step(trainer, model, opt)

    before_step(0)
    pending = dict(every1._pending)

    def batch_end(i: int) -> None:
        every1._pending = dict(pending)
        every1.on_train_batch_end(trainer, model, None, batch, i)

    def timed(fn: Callable[[int], object]) -> float:
        return hot_loop(fn, repeats)

    kinds = ("weight", "grad", "update_ratio")
    metrics = {f"norms/{kind}/{name}": 1.0 for kind in kinds for name in every1._names.values()}
    n = len(metrics)
    logging_memory = timed(hooks(every1))
    other = timed(hooks(every50))
    rows = [
        ("NormMonitor, a logging step: its 3 hooks (MemoryLogger)", logging_memory),
        ("part: on_before_optimizer_step (gradient norms, copy of the weights)", timed(before_step)),
        (f"part: on_train_batch_end (weight and update norms, one transfer, {n} scalars logged)", timed(batch_end)),
        (f"part: MemoryLogger.log_metrics({n} scalars)", timed(lambda i: memory[0].log_metrics(metrics, i))),
    ]
    memory[0].records.clear()
    trainer.loggers = [tensorboard]
    try:
        logging_tb = timed(hooks(every1))
        rows += [
            ("NormMonitor, a logging step: its 3 hooks (TensorBoardLogger)", logging_tb),
            (
                f"part: TensorBoardLogger.log_metrics({n} scalars), what NormMonitor calls",
                timed(lambda i: tensorboard.log_metrics(metrics, i)),
            ),
        ]
        tensorboard.experiment.flush()
    finally:
        trainer.loggers = memory
    average = "every_n_steps=50 per step on average: (1 logging + 49 other) / 50"
    rows += [
        ("NormMonitor, another step (every_n_steps=50, global_step 1): its 3 hooks", other),
        (f"{average}, MemoryLogger", (logging_memory + 49 * other) / 50),
        (f"{average}, TensorBoardLogger", (logging_tb + 49 * other) / 50),
    ]
    return rows


class EveryOtherStep(pl.Callback):
    """Runs ``callbacks`` on even optimizer steps only (their buffers are kept as at every step) and
    records the wall time of every step, from one ``on_train_batch_start`` to the next.

    The fit-level hooks reach them always; the per-step ones on even steps. A guard among them is
    found by the clipper as in a Trainer (this wrapper hands out its gradient norms), so they are shared."""

    ALWAYS = ("setup", "on_fit_start", "on_train_start", "on_train_epoch_end", "on_validation_start", "on_train_end", "teardown")

    def __init__(self, *callbacks) -> None:
        self.callbacks, self.starts = list(callbacks), []
        self.coefs: list[torch.Tensor] = []  # the clip coefficients of the even steps (read after the fit)
        for hook in self.ALWAYS:
            setattr(self, hook, self._forward(hook))

    def step_grads(self, trainer, pl_module, optimizer) -> StepGrads | None:
        """The step's gradient norms, as the wrapped guard (or clipper, or monitor) has them."""
        for cb in self.callbacks:
            if isinstance(cb, GradsSource):
                grads = cb.step_grads(trainer, pl_module, optimizer)
                if grads is not None:
                    return grads
        return None

    def _forward(self, hook):
        def call(*args, **kwargs):
            for cb in self.callbacks:
                fn = getattr(cb, hook, None)
                if fn is not None:
                    fn(*args, **kwargs)

        return call

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())
        if trainer.global_step % 2 == 0:
            self._forward("on_train_batch_start")(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step % 2 == 0:
            self._forward("on_before_backward")(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % 2 == 0:
            self._forward("on_before_optimizer_step")(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.global_step - 1) % 2 == 0:  # the step just taken was even
            self._forward("on_train_batch_end")(trainer, pl_module, outputs, batch, batch_idx)
            self.coefs += [cb.last["coef"] for cb in self.callbacks if isinstance(cb, GradientClipping) and "coef" in cb.last]


class LogOnly(pl.Callback):
    """Logs the keys NormMonitor would log (``norms/{weight,grad,update_ratio}/<parameter>``) with made-up
    values through each logger's ``log_metrics``, one call per step, and computes nothing: what logging
    those scalars costs any callback (Lightning's ``LearningRateMonitor`` logs the same way)."""

    def setup(self, trainer, pl_module, stage):
        names = [name for name, _ in pl_module.named_parameters()]
        self.keys = [f"norms/{q}/{name}" for name in names for q in ("weight", "grad", "update_ratio")]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step just taken, as NormMonitor logs it
        metrics = {key: step + i * 1e-3 for i, key in enumerate(self.keys)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class OddStepClipCNN(BenchCNN):
    """Lightning's own clipping (what ``Trainer(gradient_clip_val=max_norm)`` runs) on odd steps only;
    with ``every_step``, on every step."""

    def __init__(self, every_step: bool = False, max_norm: float = 1.0) -> None:
        super().__init__()
        self.every_step, self.max_norm = every_step, max_norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.every_step or self.trainer.global_step % 2 == 1:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_norm, gradient_clip_algorithm="norm")


def _paired_fits(make, *, runs: int, warmup: int, steps: int, batch_size: int, data, root: str, logger=None):
    """Fits of ``make() -> (module, probe)``: per fit the median time of the even and the odd steps, the
    load, and the difference of the means. ``logger``: called with each fit's folder (default none)."""
    out = []
    for r in range(runs):
        pl.seed_everything(0, verbose=False)
        model, probe = make()
        trainer = bench_trainer(
            root=root, max_steps=warmup + steps + 1, max_epochs=-1, callbacks=[probe],
            logger=False if logger is None else logger(os.path.join(root, str(r))),
        )
        gc.collect()
        with ForeignLoad() as load:
            trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0))
        times = [b - a for a, b in zip(probe.starts, probe.starts[1:])][warmup : warmup + steps]
        even = [t for i, t in enumerate(times, start=warmup) if i % 2 == 0]
        odd = [t for i, t in enumerate(times, start=warmup) if i % 2 == 1]
        out.append((statistics.median(even), statistics.median(odd), load.value, statistics.mean(even) - statistics.mean(odd)))
        print(
            f"run {r + 1}/{runs}: even steps {out[-1][0] * 1e3:.3f}, odd steps {out[-1][1] * 1e3:.3f} ms",
            file=sys.stderr, flush=True,
        )
    return out


def alternating(
    *, logger: Callable[[str], Logger], runs: int, warmup: int, steps: int, batch_size: int, data, root: str,
    control: bool = False, floor: bool = False,
):
    """Per run: the median time of the steps the monitor logs and of the steps between them, in the same
    fit (neighbouring steps, so the machine's drift cancels). Returns ``[(logging, other, load, mean
    difference), ...]``: the mean difference counts the rare slow steps (a TensorBoard writer's flush, say),
    which the medians leave out. ``control``: a callback that does nothing
    stands in for the monitor, so the result shows what the method reads when there is nothing to find.
    ``floor``: :class:`LogOnly` stands in for it: the monitor's keys logged, nothing computed (the cost of
    the logger's ``log_metrics`` alone)."""

    def make():
        stand_in = pl.Callback() if control else LogOnly() if floor else NormMonitor(every_n_steps=1)
        return BenchCNN(), EveryOtherStep(stand_in)

    return _paired_fits(make, runs=runs, warmup=warmup, steps=steps, batch_size=batch_size, data=data, root=root, logger=logger)


SIDE_BY_SIDE = ("NormMonitor(every_n_steps=1)", "floor: its keys through log_metrics, nothing computed", "control: a do-nothing callback")


def side_by_side(*, logger: Callable[[str], Logger], rounds: int, warmup: int, steps: int, batch_size: int, data, root: str):
    """``rounds`` rounds of three paired fits (:func:`alternating`, one fit each): the monitor, the floor
    (``floor=True``) and the control, in an order rotating from round to round, so that the machine's
    drift hits all three alike. Returns ``{variant: [(logging, other, load, mean difference), ...]}``."""
    out: dict[str, list] = {name: [] for name in SIDE_BY_SIDE}
    for r in range(rounds):
        for k in [(r + i) % 3 for i in range(3)]:
            out[SIDE_BY_SIDE[k]] += alternating(
                logger=logger, runs=1, warmup=warmup, steps=steps, batch_size=batch_size, data=data,
                root=os.path.join(root, f"{r}-{k}"), control=k == 2, floor=k == 1,
            )
    return out


def print_side_by_side(results: dict[str, list], logger: str) -> None:
    print(f"## Side by side, logger {logger}: each variant's steps against the plain steps between them\n")
    print("| variant | overhead per step (median over fits) | range | us per step (median) | plain step, ms (median) | fits |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fits in results.items():
        pct = sorted(100 * (log_t / other_t - 1) for log_t, other_t, _, _ in fits)
        us = statistics.median((log_t - other_t) * 1e6 for log_t, other_t, _, _ in fits)
        plain = statistics.median(other_t * 1e3 for _, other_t, _, _ in fits)
        print(f"| {name} | {statistics.median(pct):+.1f}% | {pct[0]:+.1f}% to {pct[-1]:+.1f}% | {us:.0f} | {plain:.2f} | {len(fits)} |")
    print_load([load for fits in results.values() for _, _, load, _ in fits if load is not None])


def alternating_clipping(
    *, runs: int, warmup: int, steps: int, batch_size: int, data, root: str, control: bool = False, max_norm: float = 1.0
):
    """Per run, in one fit: the median time of the steps NaNGuard + GradientClipping("norm", max_norm) take
    (even) and of those Lightning's own clipping takes (odd; ``gradient_clip_val=max_norm``'s hook),
    ``logger=False``. ``control``: Lightning's clipping on every step and nothing else (what the method
    reads for 0). Returns the fits' results and the fraction of the even steps whose gradients were clipped."""
    probes = []

    def make():
        if control:
            probes.append(EveryOtherStep())
            return OddStepClipCNN(every_step=True, max_norm=max_norm), probes[-1]
        probes.append(EveryOtherStep(NaNGuard(), GradientClipping("norm", max_norm=max_norm)))
        return OddStepClipCNN(max_norm=max_norm), probes[-1]

    results = _paired_fits(make, runs=runs, warmup=warmup, steps=steps, batch_size=batch_size, data=data, root=root)
    coefs = [float(c) for probe in probes for c in probe.coefs]
    return results, (sum(c < 1.0 for c in coefs) / len(coefs) if coefs else None)


def print_alternating(results, title: str, even: str = "logging step", odd: str = "other step") -> None:
    print(f"## {title}\n")
    print(
        f"| run | {even}, ms (median) | {odd}, ms (median) | difference, us | % of the {odd} "
        "| difference of the means, us | % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r, (log_t, other_t, _, mean_diff) in enumerate(results, start=1):
        print(
            f"| {r} | {log_t * 1e3:.3f} | {other_t * 1e3:.3f} | {(log_t - other_t) * 1e6:.0f} | {100 * (log_t / other_t - 1):.1f}% "
            f"| {mean_diff * 1e6:.0f} | {100 * mean_diff / other_t:.1f}% |"
        )
    for name, diffs in (
        ("Difference of the medians, median over runs", sorted(log_t / other_t - 1 for log_t, other_t, _, _ in results)),
        ("Difference of the means, median over runs", sorted(mean_diff / other_t for _, other_t, _, mean_diff in results)),
    ):
        print(f"\n{name}: {100 * statistics.median(diffs):.1f}% (runs: {100 * diffs[0]:.1f}% to {100 * diffs[-1]:.1f}%).")
    print_load([load for _, _, load, _ in results if load is not None])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--clip-steps", type=int, default=60, help="measured steps per clipping run (default 60)")
    parser.add_argument(
        "--monitor-steps", type=int, default=100, help="measured steps per NormMonitor run (default 100)"
    )
    parser.add_argument(
        "--logger", choices=sorted(LOGGERS), default="memory", help="the NormMonitor runs' logger (default memory)"
    )
    parser.add_argument(
        "--only", choices=("clipping", "monitor", "alternating", "side-by-side", "clipping-alternating"), default=None,
        help="run one comparison only (side-by-side: the monitor, the --floor and the --control variants of the "
        "alternating comparison in rotating rounds, --runs of them; clipping-alternating: the clipping pair in one fit; "
        "neither runs by default)"
    )
    parser.add_argument("--runs", type=int, default=10, help="fits of the alternating comparison (default 10)")
    parser.add_argument(
        "--alternating-steps", type=int, default=400, help="measured steps per alternating fit (default 400)"
    )
    parser.add_argument(
        "--control", action="store_true",
        help="alternating comparisons with nothing in the measured variant's place (what the method reads for 0)",
    )
    parser.add_argument(
        "--floor", action="store_true",
        help="alternating NormMonitor comparison with a callback that only logs the monitor's keys (log_metrics alone)",
    )
    parser.add_argument(
        "--max-norm", type=float, default=1.0,
        help="max_norm of the clipping comparisons (default 1.0; the model's gradient norms are about 0.1-0.15)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.warmup, args.batch_size, args.repeats, args.runs, args.alternating_steps = 2, 2, 8, 20, 1, 20
        args.clip_steps, args.monitor_steps = 5, 50  # steps 2-51: every_n_steps=50 logs once
    if min(args.rounds, args.clip_steps, args.monitor_steps, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--rounds, --clip-steps, --monitor-steps, --batch-size must be >= 1 and --warmup >= 0")
    logging_steps = [s for s in range(args.warmup, args.warmup + args.monitor_steps) if s % 50 == 0]

    quiet_lightning()
    data = make_data((args.warmup + max(args.clip_steps, args.monitor_steps, args.alternating_steps) + 2) * args.batch_size)
    print_environment(args.threads is not None)
    print(
        f"\nSettings: {args.rounds} rounds; {args.warmup} warm-up steps per run; batch {args.batch_size} of 1x28x28; "
        f"clipping runs {args.clip_steps} measured steps, NormMonitor runs {args.monitor_steps} "
        f"(every_n_steps=50 logs at steps {logging_steps}); NormMonitor logger: {args.logger}\n",
        flush=True,
    )
    started = time.perf_counter()
    common = dict(rounds=args.rounds, warmup=args.warmup, batch_size=args.batch_size, data=data, timed=timed_hooks)

    if args.only in (None, "clipping"):
        with tempfile.TemporaryDirectory() as root:
            variants = clip_variants(args.max_norm)
            clip = interleaved(variants, steps=args.clip_steps, root=root, **common)
        b_name = next(iter(variants))
        b_step = statistics.median(clip.times[b_name])
        print("## GradientClipping: end to end (per optimizer step, median over rounds)\n")
        print_ratio_table(clip, b_name, "inside the clipping (and guard) hooks, us/step (median)")
        print_load(clip.loads)
        with tempfile.TemporaryDirectory() as root:
            iso = clipping_in_isolation(step_state(batch_size=args.batch_size, data=data, root=root), args.repeats, args.max_norm)
        print("\n## Clipping work in isolation (best of 5 loops, same model, real gradients)\n")
        print_isolation(iso, b_step, "B")
        print(flush=True)

    if args.only in (None, "monitor"):
        with tempfile.TemporaryDirectory() as root:
            logger = LOGGERS[args.logger]
            mon = interleaved(MONITOR_VARIANTS, steps=args.monitor_steps, root=root, logger=logger, **common)
        plain_step = statistics.median(mon.times["plain"])
        print(f"## NormMonitor: end to end, logger {args.logger} (per optimizer step, median over rounds)\n")
        print_ratio_table(mon, "plain", "inside NormMonitor's hooks, us/step (median)")
        print_load(mon.loads)
        with tempfile.TemporaryDirectory() as root:
            st = step_state(batch_size=args.batch_size, data=data, root=root, logger=MemoryLogger())
            iso = monitor_in_isolation(st, args.repeats, root)
        print("\n## NormMonitor's work in isolation (best of 5 loops, same model, real gradients)\n")
        print_isolation(iso, plain_step)
    if args.only in (None, "alternating"):
        with tempfile.TemporaryDirectory() as root:
            alt = alternating(
                logger=LOGGERS[args.logger], runs=args.runs, warmup=args.warmup, steps=args.alternating_steps,
                batch_size=args.batch_size, data=data, root=root, control=args.control, floor=args.floor,
            )
        print()
        name = args.logger + (" (control: a do-nothing callback in the monitor's place)" if args.control else "")
        name += " (floor: a callback logging the monitor's keys, computing nothing)" if args.floor else ""
        print_alternating(alt, f"NormMonitor on every other step, logger {name}: logging steps against the steps between them")
    if args.only == "side-by-side":
        with tempfile.TemporaryDirectory() as root:
            sides = side_by_side(
                logger=LOGGERS[args.logger], rounds=args.runs, warmup=args.warmup, steps=args.alternating_steps,
                batch_size=args.batch_size, data=data, root=root,
            )
        print()
        print_side_by_side(sides, args.logger)
    if args.only == "clipping-alternating":
        with tempfile.TemporaryDirectory() as root:
            alt, clipped = alternating_clipping(
                runs=args.runs, warmup=args.warmup, steps=args.alternating_steps, batch_size=args.batch_size,
                data=data, root=root, control=args.control, max_norm=args.max_norm,
            )
        print()
        m = f"{args.max_norm:g}"
        if args.control:
            print_alternating(alt, f"Control: Lightning's clipping (max_norm {m}) on every step (even against odd)", "even step", "odd step")
        else:
            print_alternating(
                alt, f"NaNGuard + GradientClipping('norm', {m}) on even steps, Lightning's gradient_clip_val={m} clipping "
                "on odd steps, in the same fit", "guard + clipping step", "Lightning-clipped step",
            )
            print(f"The gradients were clipped (coefficient < 1) on {100 * clipped:.0f}% of the guard + clipping steps.")
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
