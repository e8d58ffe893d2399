"""Two-process DDP run (gloo, CPU) where rank 1 alone gets a NaN weight; run by ``test_ddp_rollback.py``.

Usage::

    MASTER_PORT=<free port> python tests/ddp/ddp_rollback_script.py NAMESPACE OUTDIR

Lightning's ``ddp`` strategy starts rank 1 by running the same command line again. The model, data
and optimizer are those of ``ddp_guard_script.py``. Right after the optimizer step that makes
``global_step`` :data:`CORRUPT_AT`, rank 1 sets one weight to NaN; NaNGuard's weight check at the
next step escalates on both ranks, and CheckpointRollback restores the snapshot of step
:data:`EXPECTED_RESTORE` on both.

Each rank writes ``OUTDIR/rank{r}.pt`` (``torch.save``) with its weights after every step (keyed
by ``global_step``), the rollback history, the guard's incidents, the good snapshots' steps and
its final weights; and its process id to ``OUTDIR/pid{r}``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ddp_common import finish, load_namespace, write_pid
from ddp_guard_script import BATCH_SIZE, make_data, make_net, make_optimizer

EVERY_N_STEPS = 4
CONFIRM_STEPS = 1
CORRUPT_AT = 10  # snapshots 0, 4, 8 are good by then (8 confirmed at step 9)
EXPECTED_RESTORE = 8
MAX_EPOCHS = 3  # 8 steps per epoch per rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("namespace", choices=("pytorch_lightning", "lightning"))
    parser.add_argument("outdir")
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader, TensorDataset

    pl, lib = load_namespace(args.namespace)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    def weights(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.states: dict[int, dict[str, torch.Tensor]] = {}

        def setup(self, trainer, pl_module, stage) -> None:
            write_pid(args.outdir, trainer.global_rank)

        def on_train_start(self, trainer, pl_module) -> None:
            self.states[trainer.global_step] = weights(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.states[trainer.global_step] = weights(pl_module)
            if trainer.global_step == CORRUPT_AT and trainer.global_rank == 1:
                with torch.no_grad():
                    pl_module.net[2].weight[0, 1] = float("nan")

    pl.seed_everything(1234, workers=True)
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)
    guard = lib.NaNGuard()
    rollback = lib.CheckpointRollback(every_n_steps=EVERY_N_STEPS, confirm_steps=CONFIRM_STEPS, spike_patience=3)
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=MAX_EPOCHS,
        callbacks=[guard, rollback, recorder],
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
    except Exception as exc:  # noqa: BLE001 - reported through the result file
        error = exc

    rank = trainer.global_rank
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "states": recorder.states,
        "final": weights(model),
        "history": rollback.history,
        "good": [s.step for s in rollback.store.good],
        "rejected": list(rollback.rejected),
        "incidents": [i.to_dict() for i in guard.incidents],
        "error": None if error is None else f"{type(error).__name__}: {error}",
    }
    return finish(args.outdir, result, trainer)


if __name__ == "__main__":
    sys.exit(main())
