"""Two-process FSDP2 run (gloo, CPU): parameters sharded with ``fully_shard`` under ``ModelParallelStrategy``.

Run by ``test_fsdp.py``::

    MASTER_PORT=<free port> python tests/ddp/fsdp_script.py NAMESPACE OUTDIR SCENARIO

``SCENARIO``:

- ``lightning``: ``Trainer(gradient_clip_val=MAX_NORM)``, Lightning's own clipping (the reference);
- ``ours``: ``NaNGuard``, ``GradientClipping("norm", max_norm=MAX_NORM)`` and ``NormMonitor(every_n_steps=1, histograms=True)``
  with a ``TensorBoardLogger`` in ``OUTDIR/tb``;
- ``fault``: as ``ours``, and rank 1's loss is NaN at batch ``FAULT_BATCH``;
- ``agc``: ``GradientClipping("agc")``, which must refuse sharded parameters;
- ``bisection``: ``NaNGuard`` and ``BatchBisection`` with rank 1's fault: bisection must stand down, not hang;
- ``rollback``: ``CheckpointRollback()`` (snapshots in memory), which must refuse the strategy;
- ``rollback_checkpoint``: ``NaNGuard``, ``CheckpointRollback(source="checkpoint")`` and ``LRBackoff``
  beside a ``ModelCheckpoint`` saving every step (distributed checkpoints: one folder per save) and an
  ``ExponentialLR`` stepped every step; rank 1 writes a NaN into its part of ``net.0.weight`` before
  batch ``FAULT_BATCH``: the weights are non-finite, so the guard escalates. The newest save (of
  step ``FAULT_BATCH``) is written with NaN weights on purpose: the run must go back to the one before;
- ``rollback_checkpoint_file``: the same with ``save_distributed_checkpoint=False`` (one file of full states per save).

Each rank writes ``OUTDIR/rank{r}.pt`` with the whole (gathered) weights before and after every batch,
the whole gradients' norms before clipping, the local shapes of its parts, the guard's incidents and
any error. (FSDP1, ``FSDPStrategy``, needs a GPU; FSDP2 runs on the CPU with gloo. Lightning refuses
``ModelParallelStrategy`` on the CPU by no check, so this is the same code path as on GPUs.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from ddp_common import finish, load_namespace, write_pid

SCENARIOS = ("lightning", "ours", "fault", "agc", "bisection", "rollback", "rollback_checkpoint", "rollback_checkpoint_file")
FAULT_BATCH = 2
MAX_NORM = 0.05  # small enough that every step clips
N_SAMPLES = 48  # 12 batches of 4: 6 steps per rank
BATCH_SIZE = 4
LR = 0.1


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 5, generator=gen)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(N_SAMPLES, 1, generator=gen)
    return x, y


def make_net() -> torch.nn.Module:
    """Uneven shards on purpose: ``2.weight`` (1x6) and ``2.bias`` (1) leave rank 1 an empty part."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def whole(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective: every rank calls it)."""
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def sharding_checks() -> dict:
    """``lightning_nan.core.sharding`` on one tensor placed three ways (a collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from lightning_nan.core.norms import tensor_norms
    from lightning_nan.core.sharding import copies_per_tensor, norms_over_ranks, total_over_ranks

    mesh = init_device_mesh("cpu", (2,))
    t = torch.arange(15.0).reshape(5, 3) - 7.0  # 5 rows over 2 ranks: parts of 3 and 2 rows
    placed = [distribute_tensor(t, mesh, [Shard(0)]), distribute_tensor(t, mesh, [Replicate()]), t]
    copies = copies_per_tensor(placed)
    local = tensor_norms(placed)
    row = distribute_tensor(torch.tensor([[1.0, -2.0, 0.5]]), mesh, [Shard(0)])  # rank 1's part is empty
    row_inf = norms_over_ranks(tensor_norms([row], math.inf), copies_per_tensor([row]), math.inf)
    # A slice of a 1x2 mesh (as FSDP2's data-parallel sub-mesh beside tensor parallelism): the other rank holds a copy.
    grid = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    sliced = distribute_tensor(t, grid["dp"], [Shard(0)])
    sliced_copies = copies_per_tensor([sliced])
    try:
        copies_per_tensor([DTensor.from_local(t, mesh, [Partial()])])
        partial_error = None
    except ValueError as exc:
        partial_error = str(exc)
    return {
        "whole": float(torch.linalg.vector_norm(t)),
        "copies": copies,
        "local": local.tolist(),
        "over_ranks": norms_over_ranks(local, copies).tolist(),
        "total_of_shards": float(total_over_ranks(local[:1])),
        "partial_error": partial_error,
        "row_local_shape": tuple(row.to_local().shape),
        "row_inf": row_inf.tolist(),
        "sliced_copies": sliced_copies,
        "sliced": norms_over_ranks(tensor_norms([sliced]), sliced_copies).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("namespace", choices=("pytorch_lightning", "lightning"))
    parser.add_argument("outdir")
    parser.add_argument("scenario", choices=SCENARIOS)
    args = parser.parse_args(argv)

    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    pl, lib = load_namespace(args.namespace)
    strategies = sys.modules[pl.__name__ + ".strategies"]
    scenario = args.scenario

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            if scenario in ("fault", "bisection") and self.global_rank == 1 and batch_idx == FAULT_BATCH:
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
            if not scenario.startswith("rollback_checkpoint"):
                return opt
            schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint) -> None:
            if scenario.startswith("rollback_checkpoint") and self.trainer.global_step == FAULT_BATCH:  # a bad save
                checkpoint["state_dict"] = {k: v * float("nan") for k, v in checkpoint["state_dict"].items()}

    class Recorder(pl.Callback):
        """Whole weights before and after each step, and the whole gradients' norms before any clipping."""

        def __init__(self) -> None:
            self.before: dict[int, dict[str, torch.Tensor]] = {}
            self.after: dict[int, dict[str, torch.Tensor]] = {}
            self.grad_norms: dict[int, dict[str, float]] = {}
            self.local_shapes: dict[str, tuple[int, ...]] = {}
            self.lr_factors: list[float] = []  # after each batch
            self.lrs: list[tuple[float, float]] = []  # before each batch

        def setup(self, trainer, pl_module, stage) -> None:
            write_pid(args.outdir, trainer.global_rank)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before[trainer.global_step] = whole(pl_module)
            if trainer.lr_scheduler_configs:  # the optimizer's lr and the scheduler's
                lr = (trainer.optimizers[0].param_groups[0]["lr"], trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])
                self.lrs.append(lr)
            if scenario.startswith("rollback_checkpoint") and batch_idx == FAULT_BATCH and trainer.global_rank == 1:
                with torch.no_grad():
                    pl_module.net[0].weight.to_local()[0, 0] = float("nan")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # first in the list
            step = trainer.global_step
            self.grad_norms[step] = {
                name: float(torch.linalg.vector_norm(p.grad.full_tensor())) for name, p in pl_module.named_parameters()
            }
            self.local_shapes = {name: tuple(p.to_local().shape) for name, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.after[trainer.global_step - 1] = whole(pl_module)
            backoff = next((cb for cb in trainer.callbacks if hasattr(cb, "back_off")), None)
            if backoff is not None:  # LRBackoff's factor on the schedule's learning rate
                self.lr_factors.append(backoff.controller.factor_now)

    pl.seed_everything(1234, workers=True)
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)
    recorder = Recorder()
    guard = lib.NaNGuard()
    callbacks: list = [recorder]
    kwargs: dict = {"logger": False}
    if scenario == "lightning":
        kwargs["gradient_clip_val"] = MAX_NORM
    elif scenario == "agc":
        callbacks.append(lib.GradientClipping("agc"))
    elif scenario == "bisection":
        callbacks += [guard, lib.BatchBisection()]
    elif scenario == "rollback":
        callbacks += [guard, lib.CheckpointRollback()]
    elif scenario.startswith("rollback_checkpoint"):
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.outdir, "ckpt"), every_n_train_steps=1, save_top_k=-1)
        rollback, backoff = lib.CheckpointRollback(source="checkpoint"), lib.LRBackoff()
        callbacks += [guard, rollback, backoff, checkpoints]
        kwargs["enable_checkpointing"] = True
    else:
        callbacks += [guard, lib.GradientClipping("norm", max_norm=MAX_NORM, log_every_n_steps=1), lib.NormMonitor(every_n_steps=1, histograms=True)]
        kwargs["logger"] = pl.loggers.TensorBoardLogger(os.path.join(args.outdir, "tb"), name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategies.ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=scenario != "rollback_checkpoint_file"
        ),
        max_epochs=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        log_every_n_steps=1,
        default_root_dir=args.outdir,
        **kwargs,
    )
    error: BaseException | None = None
    try:
        trainer.fit(Model(), loader)
    except (ValueError, lib.NonFiniteError) as exc:
        error = exc
    result = {
        "sharding": sharding_checks() if scenario == "ours" else None,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "before": recorder.before,
        "after": recorder.after,
        "grad_norms": recorder.grad_norms,
        "local_shapes": recorder.local_shapes,
        "incidents": [i.to_dict() for i in guard.incidents],
        "skipped_steps": guard.skipped_steps,
        "error": None if error is None else str(error),
        "rollbacks": rollback.history if scenario.startswith("rollback_checkpoint") else None,
        "lr_factors": recorder.lr_factors,
        "lrs": recorder.lrs,
    }
    return finish(args.outdir, result, trainer)


if __name__ == "__main__":
    sys.exit(main())
