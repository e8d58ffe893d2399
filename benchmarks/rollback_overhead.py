"""Cost of CheckpointRollback: per-step overhead on the reference CNN, and take/restore time vs model size (CPU).

The model, data, optimizer and method are those of ``benchmarks/guard_overhead.py``, whose timing
machinery this script imports (as ``clipping_overhead.py`` does): fresh Trainer and model per run,
variants interleaved in rounds with a rotating order, a steady-state timing callback (warm-up
steps and Trainer start-up excluded), each round's time divided by the same round's baseline,
the median over rounds reported, the load from other processes checked.

1. End to end (``logger=False``; default 10 warm-up + 300 measured steps, so the default
   ``every_n_steps=100`` takes its snapshots at steps 100, 200 and 300 inside the measured window
   and confirms two of them; CheckpointRollback's four per-step hooks are timed in place):

       plain                                pl.Trainer()
       NaNGuard                             pl.Trainer(callbacks=[NaNGuard()])
       NaNGuard + CheckpointRollback()      pl.Trainer(callbacks=[NaNGuard(), CheckpointRollback()])
       NaNGuard again (control)             pl.Trainer(callbacks=[NaNGuard()])

2. In isolation (hot loop, best of 5 loops): CheckpointRollback's hooks called directly on the same
   model with the trainer's step counter advanced by one per call, so a loop of 500 calls contains
   exactly 5 snapshots, 5 confirmations and 50 loss readings: the per-step cost, amortised. Then its
   parts: one snapshot, one confirmation, one reading of 10 losses, an ordinary step.

3. Take and restore time vs model size: an MLP of 1 M to 100 M parameters with Adam (its state is
   twice the weights), on CPU: the first snapshot (allocating), a later one (reusing the buffers),
   a full restore (weights, Adam moments and step counters), the weights alone, and a write to disk.

    python benchmarks/rollback_overhead.py                 # default: 10 rounds; ~3 min here
    python benchmarks/rollback_overhead.py --only sizes    # part 3 only
    python benchmarks/rollback_overhead.py --quick         # smoke run, a few seconds
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
    StepState,
    add_common_args,
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

from lightning_nan import CheckpointRollback, NaNGuard  # noqa: E402
from lightning_nan.core.known_good import state_norm  # noqa: E402
from lightning_nan.core.snapshots import SnapshotStore, save_snapshot  # noqa: E402

ROLLBACK_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")

VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "NaNGuard": lambda: {"callbacks": [NaNGuard()]},
    "NaNGuard + CheckpointRollback()": lambda: {"callbacks": [NaNGuard(), CheckpointRollback()]},
    "NaNGuard again (control)": lambda: {"callbacks": [NaNGuard()]},
}


def timed_hooks(callbacks: list, model, kwargs: dict) -> list[tuple[object, tuple[str, ...]]]:
    """CheckpointRollback's four per-step hooks (its own cost; the guard's is in guard_overhead.py)."""
    return [(cb, ROLLBACK_HOOKS) for cb in callbacks if isinstance(cb, CheckpointRollback)]


def _advance(trainer) -> None:
    """One more optimizer step, as far as ``trainer.global_step`` is concerned (benchmark only)."""
    trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed += 1


def rollback_in_isolation(st: StepState, repeats: int) -> list[tuple[str, float]]:
    """Seconds per optimizer step of CheckpointRollback's work (hot loop, real model and optimizer)."""
    trainer, model, opt, batch, loss = st.trainer, st.model, st.opt, st.batch, st.loss

    def fresh() -> CheckpointRollback:
        cb = CheckpointRollback()
        cb.setup(trainer, model, "fit")
        cb.on_train_start(trainer, model)
        return cb

    def hooks(cb: CheckpointRollback) -> Callable[[int], None]:
        def step(i: int) -> None:
            cb.on_train_batch_start(trainer, model, batch, i)
            cb.on_before_backward(trainer, model, loss)
            cb.on_before_optimizer_step(trainer, model, opt)
            _advance(trainer)
            cb.on_train_batch_end(trainer, model, None, batch, i)

        return step

    amortised = hot_loop(hooks(fresh()), repeats)
    cb = fresh()
    store = cb.store

    def take(i: int) -> None:
        cb._take(trainer, model)
        store.discard()

    def confirm(i: int) -> None:
        norm = state_norm(model)
        torch.stack([norm, norm]).tolist()

    def read_losses(i: int) -> None:
        cb._losses = [(trainer.global_step - 10 + k, loss.detach()) for k in range(10)]
        cb._flushed_step = trainer.global_step - 10
        cb._flush(trainer, model)

    def ordinary(i: int) -> None:  # not a snapshot, confirmation or reading step
        cb._flushed_step = cb._seen_step = trainer.global_step
        cb.store.pending = None
        cb._next_snapshot_step = trainer.global_step + 10**9
        hooks(cb)(i)

    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return [
        (f"CheckpointRollback(): its 4 hooks per step, amortised over {repeats} steps", amortised),
        ("part: an ordinary step (no snapshot, confirmation or loss reading)", hot_loop(ordinary, repeats)),
        (f"part: one snapshot ({nbytes / 1e6:.2f} MB of weights; SGD without momentum has no state)", hot_loop(take, repeats)),
        ("part: one confirmation (weight norm + one transfer)", hot_loop(confirm, repeats)),
        ("part: one reading of 10 losses (stack + one transfer + robust z)", hot_loop(read_losses, repeats)),
    ]


def sizes_table(sizes: list[float], root: str, disk: bool) -> list[tuple]:
    """``(params, MB, take first, take reusing, restore, restore weights, save)`` seconds, best of 3."""
    rows = []
    for millions in sizes:
        width = int(round((millions * 1e6 / 4) ** 0.5))
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(2, width)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n = sum(p.numel() for p in model.parameters())
        store = SnapshotStore()
        gc.collect()

        def best(fn: Callable[[], object], times: int = 3) -> float:
            out = float("inf")
            for _ in range(times):
                t0 = time.perf_counter()
                fn()
                out = min(out, time.perf_counter() - t0)
            return out

        def first() -> None:
            store.clear()
            store.take(0, model, [opt])

        t_first = best(first)

        def reuse() -> None:
            store.discard()
            store.take(0, model, [opt])

        t_reuse = best(reuse)
        snap = store.pending
        mb = sum(t.numel() * t.element_size() for t in snap.model.values())
        mb += sum(t.numel() * t.element_size() for s in snap.optimizers[0]["state"].values() for t in s.values())
        t_restore = best(lambda: store.restore(snap, model, [opt]))
        t_weights = best(lambda: store.restore_model(snap, model))
        t_save = best(lambda: save_snapshot(snap, os.path.join(root, "s.pt")), 1) if disk else float("nan")
        rows.append((n, mb / 1e6, t_first, t_reuse, t_restore, t_weights, t_save))
        print(f"  {n / 1e6:.1f} M params done", file=sys.stderr, flush=True)
        del model, opt, store, snap
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=300, help="measured steps per run (default 300)")
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 10, 30, 100], help="model sizes, millions of parameters"
    )
    parser.add_argument("--no-disk", action="store_true", help="skip the disk-write column")
    parser.add_argument("--only", choices=("steps", "sizes"), default=None, help="run one part only")
    parser.set_defaults(rounds=10)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.warmup, args.batch_size, args.repeats, args.steps = 2, 2, 8, 100, 100
        args.sizes = [0.1, 1]
    if min(args.rounds, args.steps, args.batch_size, args.repeats) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps, --batch-size, --repeats must be >= 1 and --warmup >= 0")

    quiet_lightning()
    print_environment(args.threads is not None)
    started = time.perf_counter()
    if args.only in (None, "steps"):
        data = make_data((args.warmup + args.steps) * args.batch_size)
        print(
            f"\nSettings: {args.rounds} rounds; {args.warmup} warm-up + {args.steps} measured steps per run; "
            f"batch {args.batch_size} of 1x28x28\n",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as root:
            res = interleaved(
                VARIANTS, rounds=args.rounds, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size,
                data=data, root=root, timed=timed_hooks,
            )
        plain_step = statistics.median(res.times["plain"])
        print("## CheckpointRollback: end to end (per optimizer step, median over rounds)\n")
        print_ratio_table(res, "plain", "inside CheckpointRollback's hooks, us/step (median)")
        guard = res.times["NaNGuard"]
        both = res.times["NaNGuard + CheckpointRollback()"]
        ratios = [b / g for b, g in zip(both, guard)]
        print(f"\nNaNGuard + CheckpointRollback vs NaNGuard, same round: median ratio {statistics.median(ratios):.3f} "
              f"(min-max {min(ratios):.3f}-{max(ratios):.3f})")
        print_load(res.loads)
        with tempfile.TemporaryDirectory() as root:
            iso = rollback_in_isolation(step_state(batch_size=args.batch_size, data=data, root=root), args.repeats)
        print("\n## CheckpointRollback's work in isolation (best of 5 loops, same model, real loss)\n")
        print_isolation(iso, plain_step)
        print(flush=True)

    if args.only in (None, "sizes"):
        with tempfile.TemporaryDirectory() as root:
            rows = sizes_table(args.sizes, root, disk=not args.no_disk)
        print("## Take and restore time vs model size (MLP + Adam, CPU, best of 3; disk: one write)\n")
        print("| parameters | state (MB) | first snapshot (s) | later snapshot, buffers reused (s) "
              "| full restore (s) | weights only (s) | write to disk (s) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, mb, first, reuse, restore, weights, save in rows:
            print(f"| {n / 1e6:.1f} M | {mb:.0f} | {first:.3f} | {reuse:.3f} | {restore:.3f} | {weights:.3f} | {save:.2f} |")
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
