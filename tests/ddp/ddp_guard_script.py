"""Two-process DDP run (gloo, CPU) with a fault planted on rank 1 only; run by ``test_ddp_guard.py``.

Usage::

    MASTER_PORT=<free port> python tests/ddp/ddp_guard_script.py NAMESPACE OUTDIR SCENARIO [--reraise]

``NAMESPACE`` is ``pytorch_lightning`` or ``lightning``; ``SCENARIO`` one of :data:`SCENARIOS`.
Lightning's ``ddp`` strategy starts rank 1 by running this same command line again.

Each rank writes ``OUTDIR/rank{r}.pt`` (``torch.save``) with its final ``state_dict``, the weights
after every batch (``snapshots[batch_idx]``; ``initial``: before the first batch), the guard's
incidents as dicts, ``skipped_steps``, and whether (and with which message) NonFiniteError was raised.
A NonFiniteError is caught around ``trainer.fit`` on every rank, so that neither rank dies with a
non-zero exit code (Lightning's process observer would SIGKILL rank 0 if rank 1 did). Rank 0 waits
for its child process before exiting and exits with the child's non-zero code, if any, so the
caller's ``subprocess.run`` returns only once both ranks are done. With ``--reraise`` each rank
re-raises the NonFiniteError after writing its file (what a user's script does); the caller then
checks the processes whose ids the ranks wrote to ``OUTDIR/pid{r}``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from ddp_common import finish, load_namespace, write_pid

SCENARIOS = ("loss", "grad", "grad_hook", "escalate", "clip", "norm_ours", "norm_lightning", "metrics", "metrics_ref")
# metrics: "loss" with values logged (sync_dist); metrics_ref: no guard, no fault, the fault step's batches never there
CLIP_NORM = 1.0  # norm_*: the guard with GradientClipping("norm") or with gradient_clip_val; some steps clip, some not
FAULT_BATCH = 3
ESCALATE_FROM = 2
ESCALATE_MAX_CONSECUTIVE = 3
N_SAMPLES = 32  # 16 batches of 2 -> 8 per rank
BATCH_SIZE = 2
LR = 0.05
MOMENTUM = 0.9


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The data set: ``N_SAMPLES`` deterministic ``(x, y)`` pairs (the same in every process)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(N_SAMPLES, 1, generator=gen)
    return x, y


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("namespace", choices=("pytorch_lightning", "lightning"))
    parser.add_argument("outdir")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--reraise", action="store_true", help="re-raise NonFiniteError after writing the result")
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader, TensorDataset

    pl, lib = load_namespace(args.namespace)
    NaNGuard = lib.NaNGuard
    NonFiniteError = lib.NonFiniteError
    scenario = args.scenario

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()
            self.current_batch_idx = -1
            if scenario == "grad_hook":
                # A tensor hook runs before DDP's all-reduce: rank 1's inf reaches every rank's gradient.
                self.net[0].weight.register_hook(self._poison_grad)

        def _poison_grad(self, grad):
            if self.global_rank == 1 and self.current_batch_idx == FAULT_BATCH:
                grad = grad.clone()
                grad[0, 0] = float("inf")
            return grad

        def training_step(self, batch, batch_idx):
            self.current_batch_idx = batch_idx
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if self.global_rank == 1:
                if scenario in ("loss", "clip", "metrics") and batch_idx == FAULT_BATCH:
                    loss = loss * float("nan")
                if scenario == "escalate" and batch_idx >= ESCALATE_FROM:
                    loss = loss * float("nan")
            if scenario.startswith("metrics"):
                self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
                self.log("loss_max", loss, on_epoch=True, reduce_fx="max", sync_dist=True)
                self.log("loss_sum", loss, on_epoch=True, reduce_fx="sum", sync_dist=True)
            return loss

        def on_after_backward(self) -> None:
            # After backward DDP has already all-reduced the gradients: only rank 1 sees this inf.
            if scenario == "grad" and self.global_rank == 1 and self.current_batch_idx == FAULT_BATCH:
                with torch.no_grad():
                    self.net[0].weight.grad[0, 0] = float("inf")

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    def weights(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.initial: dict[str, torch.Tensor] | None = None
            self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
            self.batch_idx_seen: list[int] = []
            self.batches: dict[int, list[torch.Tensor]] = {}
            self.coefs: list[float] = []

        def setup(self, trainer, pl_module, stage) -> None:
            write_pid(args.outdir, trainer.global_rank)

        def on_train_start(self, trainer, pl_module) -> None:
            self.initial = weights(pl_module)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if extra and "coef" in extra[0].last:  # the clipper ran before this callback
                self.coefs.append(float(extra[0].last["coef"]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batch_idx_seen.append(batch_idx)
            self.batches[batch_idx] = [t.detach().clone() for t in batch]
            self.snapshots[batch_idx] = weights(pl_module)

    pl.seed_everything(1234, workers=True)
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)
    if scenario.startswith("metrics"):  # each rank's batches written out (Lightning's sampler would shuffle)
        rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for rank 1
        steps = [k for k in range(N_SAMPLES // 4) if scenario == "metrics" or k != FAULT_BATCH]
        loader = DataLoader(TensorDataset(x, y), batch_sampler=[[4 * k + rank, 4 * k + 2 + rank] for k in steps])

    guard = NaNGuard(max_consecutive=ESCALATE_MAX_CONSECUTIVE) if scenario == "escalate" else NaNGuard()
    recorder = Recorder()
    extra = []
    if scenario == "clip":  # the clipper (ZClip with a tight cap, so it clips) and the monitor beside the guard
        clip = lib.GradientClipping("zclip", warmup=2, max_norm=0.05)
        extra = [clip, lib.NormMonitor(every_n_steps=2)]
    scale_calls = []
    if scenario == "norm_ours":
        extra = [lib.GradientClipping("norm", max_norm=CLIP_NORM)]
        import lightning_nan.core.clipping as clipping  # count the multiplications: skipped where the coefficient is 1

        scale = clipping.scale_grads_
        clipping.scale_grads_ = lambda grads, coef: (scale_calls.append(1), scale(grads, coef))[1]
    trainer = pl.Trainer(
        gradient_clip_val=CLIP_NORM if scenario == "norm_lightning" else None,
        use_distributed_sampler=not scenario.startswith("metrics"),
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        callbacks=[*extra, guard, recorder] if scenario != "metrics_ref" else [recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=args.outdir,
    )
    model = Model()
    error: BaseException | None = None
    try:
        trainer.fit(model, loader)
    except NonFiniteError as exc:
        error = exc

    rank = trainer.global_rank
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "scenario": scenario,
        "namespace": args.namespace,
        "global_step": trainer.global_step,
        "state_dict": weights(model),
        "initial": recorder.initial,
        "snapshots": recorder.snapshots,
        "batch_idx_seen": recorder.batch_idx_seen,
        "batches": recorder.batches,
        "incidents": [i.to_dict() for i in guard.incidents],
        "skipped_steps": guard.skipped_steps,
        "clip_state": extra[0].state_dict() if extra else None,
        "clip_last": {k: v.tolist() for k, v in extra[0].last.items()} if extra else None,
        "clip_coefs": recorder.coefs,
        "scale_calls": len(scale_calls),
        "epoch_metrics": {k: v.clone() for k, v in trainer.callback_metrics.items()},
        "raised": error is not None,
        "error_type": type(error).__name__ if error is not None else None,
        "error_message": str(error) if error is not None else None,
    }
    return finish(args.outdir, result, trainer, reraise=error if args.reraise else None)


if __name__ == "__main__":
    sys.exit(main())
