"""An unsafe operation: a Gaussian likelihood with a learned variance, fed straight to ``log``.

The model predicts a mean and learns one variance ``var`` (not its logarithm), with the loss
``0.5 * log(var) + (y - mean)^2 / (2 * var)``. Once the fit is good the gradient pushes ``var`` down,
one SGD step takes it below zero, and ``log(var)`` is NaN for every sample at once: no sample is to
blame and the loss was steady before, so the diagnosis names the operation and its line, and
advises the stable form (learn ``log_var``, or ``softplus(raw) + eps``).

    python examples/unsafe_op.py
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan import BatchBisection, NaNGuard, NonFiniteError


class GaussianRegressor(pl.LightningModule):
    def __init__(self, lr: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mean = torch.nn.Linear(4, 1)
        self.var = torch.nn.Parameter(torch.tensor(1.0))  # unsafe: nothing keeps it positive
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        residual = (y - self.mean(x)).pow(2).mean()
        return 0.5 * torch.log(self.var) + residual / (2 * self.var)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 512) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[0.5], [-1.0], [0.3], [0.0]]) + 0.05 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def run(root: str | None = None, epochs: int = 1) -> NaNGuard:
    guard = NaNGuard(max_consecutive=1000)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=[guard, BatchBisection()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root or tempfile.mkdtemp(prefix="unsafe_op_"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(GaussianRegressor(), DataLoader(data(), batch_size=32, shuffle=True))
        except NonFiniteError as err:  # the same unsafe op failed on 3 steps: a bug to fix, not batches to skip
            print(f"stopped: {err}")
    return guard


def main() -> None:
    guard = run()
    first = guard.incidents[0]
    print(first.summary())
    for fact in first.detail.get("evidence", []):
        print(f"  evidence: {fact}")


if __name__ == "__main__":
    main()
