"""The two-layer ReLU network of the vanishing/exploding-gradients story, at a learning rate that diverges.

N=64 samples, D_in=1000, H=100, D_out=10, weights drawn with ``torch.randn`` (no scaling), summed
squared error, plain SGD on the whole batch at every step. At lr 1e-6 it converges; at lr 1e-4 the
loss climbs for a few steps and is NaN by step 5. With ``recommended()`` and no other change the
lr 1e-4 run converges to a small loss within 2000 steps: skipped steps, LR backoff and a rollback
to the last good state bring the effective LR down to one that works.

    python examples/exploding_mlp.py              # plain at 1e-6, plain at 1e-4, recommended() at 1e-4
    python examples/exploding_mlp.py --steps 500  # quicker
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

import lightning_nan

N, D_IN, H, D_OUT = 64, 1000, 100, 10


class SameBatch(Dataset):
    """The tutorial's one batch ``(x, y)``, served ``steps`` times (one optimizer step each)."""

    def __init__(self, steps: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(N, D_IN, generator=g)
        self.y = torch.randn(N, D_OUT, generator=g)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class TwoLayerNet(pl.LightningModule):
    """``relu(x @ w1) @ w2`` with ``torch.randn`` weights and the summed squared error."""

    def __init__(self, lr: float, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1)
        self.w1 = torch.nn.Parameter(torch.randn(D_IN, H, generator=g))
        self.w2 = torch.nn.Parameter(torch.randn(H, D_OUT, generator=g))
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mm(self.w1).clamp(min=0).mm(self.w2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self(x) - y).pow(2).sum()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))  # here, not in training_step: BatchBisection re-runs that

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(lr: float, callbacks: list[Any] | None = None, steps: int = 2000, root: str | None = None) -> TwoLayerNet:
    """Train for ``steps`` optimizer steps; the model keeps every loss in ``losses``."""
    model = TwoLayerNet(lr)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=callbacks or [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root or tempfile.mkdtemp(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(SameBatch(steps), batch_size=None))
    return model


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def describe(model: TwoLayerNet) -> str:
    bad = next((i for i, v in enumerate(model.losses) if not math.isfinite(v)), None)
    last = model.losses[-1]
    return f"first non-finite loss at step {bad}; last loss {last:.4g}; weights finite: {weights_finite(model)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    print(f"plain, lr 1e-6:          {describe(run(1e-6, steps=args.steps))}")
    print(f"plain, lr 1e-4:          {describe(run(1e-4, steps=args.steps))}")
    callbacks = lightning_nan.recommended()
    model = run(1e-4, callbacks, steps=args.steps)
    guard, backoff, rollback = (next(cb for cb in callbacks if type(cb).__name__ == n) for n in ("NaNGuard", "LRBackoff", "CheckpointRollback"))
    print(f"recommended(), lr 1e-4:  {describe(model)}")
    print(
        f"  {guard.skipped_steps} steps skipped, {len(rollback.history)} rollbacks, "
        f"LR factor now {backoff.factor_now:g} (effective LR {1e-4 * backoff.factor_now:.3g})"
    )


if __name__ == "__main__":
    main()
