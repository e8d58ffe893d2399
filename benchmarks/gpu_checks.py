"""The CUDA checks of BENCHMARKS.md's GPU section, in one short run (a few minutes on one GPU).

    python benchmarks/gpu_checks.py                        # on a CUDA device; prints markdown for BENCHMARKS.md
    python benchmarks/gpu_checks.py --device cpu --quick   # the same code on the CPU in seconds (the smoke test)

1. **Host synchronisations per optimizer step.** ``torch.cuda.set_sync_debug_mode("warn")`` over the
   measured steps of one fit per (variant, precision); every warning it raises is one device->host
   sync. The library's promise: at most one per optimizer step on top of the Trainer's own (the
   ``plain`` row), with ``logger=False`` (a logging step adds the transfer of what it logs). On the
   CPU there is nothing to count: the column reads ``-``.
2. **Faults under mixed precision.** ``16-mixed`` (GradScaler): an inf gradient at one step is
   GradScaler's own overflow (the guard counts it, records no incident, the weights stay as they
   were, the scale halves); a NaN loss at another is skipped by the guard (an incident, weights bit
   for bit as before). ``bf16-mixed`` (no scaler): the NaN loss is skipped. Exit code 1 if any fails.
3. **Step-time ratios**, interleaved rounds as in ``guard_overhead.py`` (the clock waits for the
   device at both ends): plain, the guard, Lightning's clipping against guard + clipping, and
   NormMonitor every step and every 50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guard_overhead import (  # noqa: E402
    BenchCNN,
    bench_trainer,
    interleaved,
    make_data,
    print_environment,
    print_ratio_table,
    quiet_lightning,
)
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_nan import GradientClipping, NaNGuard, NormMonitor, recommended  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")

SYNC_VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "Trainer(gradient_clip_val=1.0)": lambda: {"gradient_clip_val": 1.0},
    "NaNGuard": lambda: {"callbacks": [NaNGuard()]},
    "NaNGuard + GradientClipping('norm')": lambda: {"callbacks": [NaNGuard(), GradientClipping("norm", max_norm=1.0)]},
    "NaNGuard + GradientClipping('zclip') + NormMonitor(every_n_steps=1)": lambda: {
        "callbacks": [NaNGuard(), GradientClipping("zclip"), NormMonitor(every_n_steps=1)]
    },
    "recommended(norms=False)": lambda: {"callbacks": recommended(norms=False)},
}

RATIO_VARIANTS: dict[str, Callable[[], dict]] = {
    "plain": lambda: {},
    "NaNGuard": lambda: {"callbacks": [NaNGuard()]},
    "Trainer(gradient_clip_val=1.0)": lambda: {"gradient_clip_val": 1.0},
    "NaNGuard + GradientClipping('norm')": lambda: {"callbacks": [NaNGuard(), GradientClipping("norm", max_norm=1.0)]},
    # this model's gradient norms are about 0.1-0.15: at 1.0 no step clips, at 0.05 every step does
    "Trainer(gradient_clip_val=0.05)": lambda: {"gradient_clip_val": 0.05},
    "NaNGuard + GradientClipping('norm', max_norm=0.05)": lambda: {"callbacks": [NaNGuard(), GradientClipping("norm", max_norm=0.05)]},
    "NormMonitor(every_n_steps=1)": lambda: {"callbacks": [NormMonitor(every_n_steps=1)]},
    "NormMonitor(every_n_steps=50)": lambda: {"callbacks": [NormMonitor(every_n_steps=50)]},
}


class FaultyCNN(BenchCNN):
    """``faults``: optimizer step -> ``"nan_loss"`` (the loss times NaN) or ``"inf_grad"`` (one gradient
    entry set to inf after backward: with GradScaler that is before unscaling, as an fp16 overflow is)."""

    def __init__(self, faults: dict[int, str]) -> None:
        super().__init__()
        self.faults = faults

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.faults.get(self.trainer.global_step) == "nan_loss":
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.faults.get(self.trainer.global_step) == "inf_grad":
            with torch.no_grad():
                next(self.parameters()).grad.view(-1)[0] = float("inf")


class SyncCounter(pl.Callback):
    """Counts the device->host syncs from the start of step ``first`` to the start of step ``last + 1``
    (every callback's hooks of the steps in between included: the fit needs one step more)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.syncs: int | None = None
        self.sites: dict[str, int] = {}
        self._caught: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.last + 1:
            self._close()

    def on_train_end(self, trainer, pl_module):
        self._close()

    def _close(self) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
            syncs = [w for w in self._records if "synchroniz" in str(w.message)]
            self.syncs = len(syncs)
            for w in syncs:
                site = f"{os.path.relpath(w.filename)}:{w.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1


def _trainer(*, device: str, precision: str, steps: int, callbacks: list, root: str, **kwargs) -> pl.Trainer:
    if precision == "16-mixed" and device == "cpu":  # Lightning's CPU path takes no GradScaler: give it one
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        kwargs["precision"] = precision
    return bench_trainer(
        root=root, accelerator="gpu" if device == "cuda" else "cpu", max_steps=steps, max_epochs=-1, callbacks=callbacks,
        **kwargs,
    )


def count_syncs(*, device: str, warmup: int, steps: int, batch_size: int, data) -> list[tuple[str, str, float | None, dict]]:
    """``(precision, variant, syncs per step or None on the CPU, sites)`` for every pair."""
    out = []
    for precision in PRECISIONS:
        for name, make in SYNC_VARIANTS.items():
            pl.seed_everything(0, verbose=False)
            extra = make()
            counter = SyncCounter(warmup, warmup + steps - 1)
            with tempfile.TemporaryDirectory() as root:
                trainer = _trainer(
                    device=device, precision=precision, steps=warmup + steps + 1, root=root,
                    callbacks=[counter, *extra.pop("callbacks", [])], **extra,
                )
                trainer.fit(BenchCNN(), DataLoader(data, batch_size=batch_size))
            per_step = None if counter.syncs is None else counter.syncs / steps
            out.append((precision, name, per_step, counter.sites))
            print(f"syncs: {precision} / {name}: {per_step}", file=sys.stderr, flush=True)
    return out


def check_faults(*, device: str, batch_size: int, data) -> list[tuple[str, bool, str]]:
    """``(check, passed, what was seen)`` rows of section 2."""
    rows = []
    cases = [("16-mixed", {3: "inf_grad", 6: "nan_loss"}), ("bf16-mixed", {6: "nan_loss"})]
    for precision, faults in cases:
        pl.seed_everything(0, verbose=False)
        guard = NaNGuard()
        seen: dict[int, dict] = {}

        class Recorder(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step in faults:
                    seen[trainer.global_step] = {
                        "before": _weights(pl_module), "scale": _scale(trainer), "overflows": guard.guard.scaler_overflows,
                    }

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step = trainer.global_step - 1
                if step in seen:
                    seen[step].update(
                        after=_weights(pl_module), scale_after=_scale(trainer),
                        overflows=guard.guard.scaler_overflows - seen[step]["overflows"],
                    )

        model = FaultyCNN(faults)
        with tempfile.TemporaryDirectory() as root:
            trainer = _trainer(device=device, precision=precision, steps=10, root=root, callbacks=[guard, Recorder()])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the guard's NonFiniteWarning per incident
                trainer.fit(model, DataLoader(data, batch_size=batch_size))
        incidents = {i.step: i for i in guard.incidents}
        for step, fault in faults.items():
            s = seen[step]
            unchanged = all(torch.equal(s["before"][k], s["after"][k]) for k in s["before"])
            if fault == "inf_grad":
                halved = s["scale"] is not None and s["scale_after"] == s["scale"] / 2
                ok = unchanged and step not in incidents and s["overflows"] == 1 and halved
                what = (f"weights unchanged: {unchanged}; incident: {step in incidents}; scaler overflows in the step: "
                        f"{s['overflows']}; scale {s['scale']} -> {s['scale_after']}")
                rows.append((f"{precision}: an inf gradient at step {step} is GradScaler's own skip", ok, what))
            else:
                incident = incidents.get(step)
                ok = unchanged and incident is not None and incident.kind == "loss" and incident.action == "skipped"
                what = f"weights unchanged: {unchanged}; incident: {None if incident is None else (incident.kind, incident.action)}"
                rows.append((f"{precision}: a NaN loss at step {step} is skipped by the guard", ok, what))
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        rows.append((f"{precision}: the weights are finite at the end (step {trainer.global_step})", finite, ""))
    return rows


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _scale(trainer: pl.Trainer) -> float | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return None if scaler is None else float(scaler.get_scale())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the ratios (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per fit (default 10)")
    parser.add_argument("--steps", type=int, default=60, help="measured steps per fit (default 60)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--skip-ratios", action="store_true", help="sections 1 and 2 only")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu (a smoke run) or on a GPU")
    if args.quick:
        args.rounds, args.warmup, args.steps, args.batch_size = 1, 2, 3, 8
    quiet_lightning()
    started = time.perf_counter()
    data = make_data((args.warmup + args.steps + 12) * args.batch_size)
    print_environment(False)
    if args.device == "cuda":
        print(f"- GPU: {torch.cuda.get_device_name()}")
    print(f"\nSettings: device {args.device}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} measured steps per fit\n")

    print("## Host synchronisations per optimizer step (`logger=False`)\n")
    print("| precision | variant | syncs per step | over plain | where (file:line, count) |")
    print("|---|---|---:|---:|---|")
    syncs = count_syncs(device=args.device, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, data=data)
    plain = {p: n for p, name, n, _ in syncs if name == "plain"}
    for precision, name, per_step, sites in syncs:
        over = "-" if per_step is None or plain[precision] is None else f"{per_step - plain[precision]:+.2f}"
        where = ", ".join(f"{k} ({v})" for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:4]) or "-"
        print(f"| {precision} | {name} | {'-' if per_step is None else f'{per_step:.2f}'} | {over} | {where} |")

    print("\n## Faults under mixed precision\n")
    print("| check | passed | seen |")
    print("|---|---|---|")
    faults = check_faults(device=args.device, batch_size=args.batch_size, data=data)
    for check, ok, what in faults:
        print(f"| {check} | {'yes' if ok else '**NO**'} | {what} |")

    if not args.skip_ratios:
        print(f"\n## Step time, {args.rounds} interleaved rounds (`32-true`)\n")
        with tempfile.TemporaryDirectory() as root:
            res = interleaved(
                RATIO_VARIANTS, rounds=args.rounds, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size,
                data=data, root=root, accelerator="gpu" if args.device == "cuda" else "cpu", timed=lambda *a: [],
            )
        print_ratio_table(res, "plain", "-")
        base = statistics.median(res.times["plain"])
        print(f"\nPlain step: {base * 1e3:.2f} ms.")
    print(f"\n(total wall time {time.perf_counter() - started:.0f} s)")
    return 0 if all(ok for _, ok, _ in faults) else 1


if __name__ == "__main__":
    sys.exit(main())
