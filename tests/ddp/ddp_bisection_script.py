"""Two-process DDP run (gloo, CPU) of the dirty-images example with BatchBisection; run by ``test_ddp_bisection.py``.

Usage::

    MASTER_PORT=<free port> python tests/ddp/ddp_bisection_script.py OUTDIR

Shuffled DistributedSampler, one loader worker per rank, BatchNorm: each culprit sits on one rank
only, so only that rank's re-evaluations find it, and rank zero writes what both ranks found to
``OUTDIR/quarantine.jsonl``. Each rank writes ``OUTDIR/rank{r}.pt`` with its incidents, its losses
by epoch, the batches' data set indices it trained on (by epoch), and its final ``state_dict``.
Rank 0 waits for rank 1 before exiting (as ``ddp_guard_script.py`` does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import dirty_data  # noqa: E402
from ddp_common import finish, write_pid  # noqa: E402

N_SAMPLES = 1024  # holds culprits 137, 911 (and 1402, 1777 are beyond it: not planted)
BATCH_SIZE = 32
EPOCHS = 2


def main(outdir: str) -> int:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, Dataset

    from lightning_nan import BatchBisection, NaNGuard

    culprits = {137: "nan", 911: "inf", 300: "huge", 612: "zero"}

    class WithIndex(Dataset):
        def __init__(self) -> None:
            self.images = dirty_data.DirtyImages(N_SAMPLES, culprits=culprits)

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int):
            x, y = self.images[i]
            return x, y, i

    class Net(dirty_data.Net):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self(x), y)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.losses: dict[int, list[float]] = {}
            self.indices: dict[int, list[int]] = {}

        def setup(self, trainer, pl_module, stage) -> None:
            write_pid(outdir, trainer.global_rank)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.indices.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))

    pl.seed_everything(1234, workers=True)
    loader = DataLoader(WithIndex(), batch_size=BATCH_SIZE, shuffle=True, num_workers=1)
    guard, recorder = NaNGuard(), Recorder()
    bisection = BatchBisection(quarantine_path=os.path.join(outdir, "quarantine.jsonl"))
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=EPOCHS, callbacks=[guard, bisection, recorder],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=outdir,
    )
    model = Net()
    trainer.fit(model, loader)
    result = {
        "culprits": culprits,
        "incidents": [i.to_dict() for i in guard.incidents],
        "losses": recorder.losses,
        "indices": recorder.indices,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "quarantined": sorted(bisection.quarantined),
    }
    return finish(outdir, result, trainer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
