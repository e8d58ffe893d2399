"""What the fault-matrix tests share: a data set whose samples say their index, a tiny model, a Trainer.

Run the matrix alone with ``python -m pytest tests/reliability -q`` (about 10 s on one core).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import lightning_nan

#: Two dirty samples: one in the first batch of 8 and one in the fourth.
POISON = (5, 30)


class Indexed(Dataset):
    """48 samples; sample i is ``(x_i, y_i, i)`` and holds a NaN when i is in ``poison``."""

    def __init__(self, poison: tuple[int, ...] = POISON, n: int = 48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 1, generator=g)
        for i in poison:
            self.x[i, 1] = float("nan")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Model(pl.LightningModule):
    """A two-layer regression; ``seen`` lists the data set indices of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(batch[2].tolist())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(poison: tuple[int, ...] = POISON) -> DataLoader:
    """Sequential batches of 8: the data order does not depend on how many epochs ran before."""
    return DataLoader(Indexed(poison), batch_size=8)


def trainer(root: Any, *, callbacks: list[Any] | None = None, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer in ``root`` with NaNGuard and BatchBisection (default files: in the log dir)."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    if callbacks is None:
        callbacks = [lightning_nan.NaNGuard(), lightning_nan.BatchBisection()]
    return pl.Trainer(callbacks=callbacks, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def bisection_of(t: pl.Trainer) -> Any:
    return next(cb for cb in t.callbacks if isinstance(cb, lightning_nan.BatchBisection))


def guard_of(t: pl.Trainer) -> Any:
    return next(cb for cb in t.callbacks if isinstance(cb, lightning_nan.NaNGuard))
