"""NaNGuard, GradientClipping and NormMonitor together, written to TensorBoard.

A small MLP (modules ``encoder``, ``hidden1``, ``hidden2``, ``head``) learns a synthetic 4-class
problem with Adam for a few hundred steps. A few batches are corrupted on purpose: at the planted
steps (a run of three in a row, then one more) the inputs are replaced by NaN, so the loss is NaN
and ``NaNGuard`` skips the step. ``GradientClipping("autoclip")`` clips the gradients of each step
to the 10th percentile of the total gradient norms seen so far (so most steps are clipped), and
``NormMonitor(every_n_steps=5, group_by="module")`` logs three norms per module every 5 steps.

    python examples/tensorboard_norms.py                  # 300 steps, logs in ./lightning_logs_norms
    python examples/tensorboard_norms.py --steps 100 --logdir /tmp/norms
    tensorboard --logdir lightning_logs_norms             # then open http://localhost:6006

In TensorBoard, the CUSTOM SCALARS tab shows the layout NormMonitor writes: one multi-line chart
per quantity, with a line per module for the three norms:

- ``weight norm ||w||``: ``norms/weight/<module>``, the weight norm after the step;
- ``gradient norm ||g|| (before clipping)``: ``norms/grad/<module>`` (NaN at the planted steps
  that fall on a logging step, steps 50 and 150 with the default 300 steps: those gradients were
  NaN and the steps were skipped);
- ``update ratio ||dw|| / ||w||``: ``norms/update_ratio/<module>``, how far the step moved the
  weights relative to their size (0 at a skipped step);
- ``guard: skipped steps and incidents``: ``nan_guard/skipped_steps`` and ``nan_guard/incidents``
  climb at each planted fault, ``nan_guard/consecutive_skips`` rises to 3 and falls back to 0,
  ``nan_guard/scaler_overflows`` stays 0 (no fp16 here);
- ``clipping: total norm, threshold, coefficient``: ``grad_clip/total_norm`` (before clipping),
  ``grad_clip/threshold`` (AutoClip's percentile) and ``grad_clip/coef`` (the factor applied to the
  gradients, 1 when a step was not clipped).

The SCALARS tab has the same tags one chart each, plus ``train_loss`` and ``epoch``.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan import GradientClipping, NaNGuard, NormMonitor

MODULES = ("encoder", "hidden1", "hidden2", "head")


def make_data(n: int = 1024, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """``n`` Gaussian points; the label is which of ``classes`` random directions they point along most."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    directions = torch.randn(features, classes, generator=g)
    y = (x @ directions).argmax(dim=1)
    return TensorDataset(x, y)


def planted_steps(steps: int) -> tuple[int, ...]:
    """The optimizer steps whose batch is corrupted: three in a row at 1/6 of the run, one at 1/2."""
    start = max(1, steps // 6)
    return tuple(sorted({start, start + 1, start + 2, max(start + 4, steps // 2)} & set(range(steps))))


class MLP(pl.LightningModule):
    def __init__(self, nan_steps: tuple[int, ...] = (), features: int = 16, width: int = 64, classes: int = 4,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.nan_steps = set(nan_steps)
        self.lr = lr
        self.encoder = nn.Linear(features, width)
        self.hidden1 = nn.Linear(width, width)
        self.hidden2 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder(x))
        x = F.relu(self.hidden1(x))
        x = F.relu(self.hidden2(x))
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step in self.nan_steps:  # a corrupted batch: NaN inputs, so a NaN loss and NaN gradients
            x = torch.full_like(x, float("nan"))
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclass
class Result:
    log_dir: str  # the run's folder: <logdir>/norms_demo/version_<n>
    nan_steps: tuple[int, ...]
    guard: NaNGuard
    clip: GradientClipping
    model: MLP


def run(logdir: str = "lightning_logs_norms", steps: int = 300, seed: int = 0) -> Result:
    """Train for ``steps`` optimizer steps with the three callbacks and a TensorBoard logger."""
    pl.seed_everything(seed, verbose=False)
    nan_steps = planted_steps(steps)
    model = MLP(nan_steps)
    guard, clip = NaNGuard(), GradientClipping("autoclip")
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        callbacks=[guard, clip, NormMonitor(every_n_steps=5, group_by="module")],
        logger=TensorBoardLogger(logdir, name="norms_demo"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(make_data(seed=seed), batch_size=32, shuffle=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", "NaNGuard: ")  # the incidents are printed below
        trainer.fit(model, loader)
    return Result(trainer.logger.log_dir, nan_steps, guard, clip, model)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="lightning_logs_norms", help="TensorBoard root (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    args = parser.parse_args(argv)
    result = run(args.logdir, args.steps)
    print(f"planted NaN batches at steps {list(result.nan_steps)}")
    print(
        f"NaNGuard skipped {result.guard.skipped_steps} of {args.steps} steps "
        f"({', '.join(f'step {i.step}: {i.kind}' for i in result.guard.incidents) or 'none'}); weights finite: "
        f"{all(bool(torch.isfinite(p).all()) for p in result.model.parameters())}"
    )
    print(f"logs: {os.path.abspath(result.log_dir)}")
    print(f"open them with:  tensorboard --logdir {args.logdir}   (then the CUSTOM SCALARS tab)")
    return result


if __name__ == "__main__":
    main()
