"""Dirty data: four poisoned images among 2048, found by bisection and quarantined.

The data set hides four culprits of different kinds: a NaN pixel, an Inf pixel, a block of 1e38
values (finite, but its energy overflows float32 inside the model) and an all-zero image (the
model's per-sample standardisation divides 0 by 0). The model has BatchNorm, so one bad sample
turns the whole batch's loss NaN. Shuffled, two loader workers.

- Plain: the loss turns NaN at the first poisoned batch, the weights follow, and the run is lost.
- ``NaNGuard() + BatchBisection()``: each poisoned step is skipped, bisection names the exact data
  set index in a handful of forward passes and quarantines it; from the second epoch on, the
  quarantined samples are left out and not a single loss is non-finite.

Run ``python examples/dirty_data.py`` (about half a minute on a laptop CPU), then
``lightning-nan quarantine list <the printed path>``, and ``lightning-nan replay <the printed dump>``
to reproduce the first failure offline, from any folder (``Net`` is defined in this script: the dump
holds the failing loss exported with ``torch.export``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_nan import BatchBisection, NaNGuard
from lightning_nan.core import NonFiniteWarning

#: how an image can be poisoned
POISONS: dict[str, str] = {
    "nan": "a NaN pixel",
    "inf": "an Inf pixel",
    "huge": "a 4x4 block of 1e38 (finite; its energy overflows inside the model)",
    "zero": "an all-zero image (the per-sample standardisation divides 0 by 0)",
}
#: index -> poison
CULPRITS: dict[int, str] = {137: "nan", 911: "inf", 1402: "huge", 1777: "zero"}


class DirtyImages(Dataset):
    """``n`` random 1x8x8 images with 10 labels, and the :data:`CULPRITS` planted at their indices."""

    def __init__(self, n: int = 2048, culprits: dict[int, str] | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        # a learnable signal: the label shifts the image's mean, noise on top
        self.images = torch.randn(n, 1, 8, 8, generator=g) + self.labels.view(n, 1, 1, 1).float() * 0.3
        for index, poison in (CULPRITS if culprits is None else culprits).items():
            plant(self.images[index], poison)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def plant(image: torch.Tensor, poison: str) -> None:
    """Poison ``image`` in place (see :data:`POISONS`)."""
    if poison == "nan":
        image[0, 3, 4] = float("nan")
    elif poison == "inf":
        image[0, 5, 1] = float("inf")
    elif poison == "huge":
        image[0, 2:6, 2:6] = 1e38
    elif poison == "zero":
        image.zero_()
    else:
        raise ValueError(f"Expected a poison in {sorted(POISONS)}, got {poison!r}")


class Net(pl.LightningModule):
    """Per-sample standardisation (no epsilon), an energy feature, conv + BatchNorm, a classifier."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2)
        )
        self.head = torch.nn.Linear(8 * 4 + 1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        z = (x - mean) / std  # 0/0 for an all-zero image
        energy = torch.log1p(x.pow(2).mean(dim=(1, 2, 3)))  # (1e38)^2 overflows to inf
        return self.head(torch.cat([self.conv(z).flatten(1), energy.unsqueeze(1)], dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LossRecorder(pl.Callback):
    """Every training loss, by epoch."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.setdefault(trainer.current_epoch, []).append(float(loss))


@dataclass
class Result:
    losses: dict[int, list[float]]
    weights_finite: bool
    guard: NaNGuard | None = None
    bisection: BatchBisection | None = None
    seconds: float = 0.0
    first_nan_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def loader(n: int, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        DirtyImages(n), batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(1),
    )


def train(
    guarded: bool, root: str, *, n: int = 2048, epochs: int = 2, batch_size: int = 64, workers: int = 2, dump_dir: str | None = None
) -> Result:
    import time

    recorder = LossRecorder()
    guard = NaNGuard() if guarded else None
    bisection = BatchBisection(quarantine_path=os.path.join(root, "quarantine.jsonl"), dump_dir=dump_dir) if guarded else None
    callbacks = [recorder] + ([guard, bisection] if guarded else [])
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, accelerator="cpu", deterministic=True,
    )
    model = Net()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        trainer.fit(model, loader(n, batch_size, workers))
    flat = [v for e in sorted(recorder.losses) for v in recorder.losses[e]]
    first_nan = next((i for i, v in enumerate(flat) if not math.isfinite(v)), None)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return Result(recorder.losses, finite, guard, bisection, time.perf_counter() - start, first_nan)


def main(argv: list[str] | None = None) -> tuple[Result, Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder for the quarantine file (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="dirty_data_")
    print(f"planted culprits: {', '.join(f'{i} ({POISONS[p]})' for i, p in CULPRITS.items())}\n")

    plain = train(False, os.path.join(root, "plain"), workers=args.workers)
    nonfinite = sum(not math.isfinite(v) for e in plain.losses.values() for v in e)
    print(f"plain: first non-finite loss at step {plain.first_nan_step}; {nonfinite} of "
          f"{sum(map(len, plain.losses.values()))} losses non-finite; weights finite: {plain.weights_finite}")

    guarded = train(True, os.path.join(root, "guarded"), workers=args.workers, dump_dir=os.path.join(root, "guarded", "dumps"))
    assert guarded.guard is not None and guarded.bisection is not None
    print("\nNaNGuard + BatchBisection:")
    for inc in guarded.guard.incidents:
        passes = inc.bisection.forward_passes if inc.bisection is not None else None
        found = f"dirty samples {inc.samples} quarantined" if inc.samples else f"ordinary samples {inc.triggers} trigger it"
        print(f"  epoch {inc.epoch} step {inc.step}: non-finite {inc.kind}, cause {inc.cause}; {found} "
              f"({passes} forward passes)")
    first = guarded.guard.incidents[0] if guarded.guard.incidents else None
    if first is not None and first.localization is not None:
        print(f"  localization of the first: module {first.module!r}: {first.localization.summary}")
    for epoch, losses in sorted(guarded.losses.items()):
        bad = sum(not math.isfinite(v) for v in losses)
        print(f"  epoch {epoch}: {bad} non-finite losses of {len(losses)}; mean loss {sum(v for v in losses if math.isfinite(v)) / max(1, len(losses) - bad):.3f}")
    print(f"  quarantine: {guarded.bisection.quarantine_file} -> {sorted(guarded.bisection.quarantined)}")
    print(f"  weights finite: {guarded.weights_finite}")
    print(f"\nlightning-nan quarantine list {guarded.bisection.quarantine_file}")
    if first is not None and "dump" in first.detail:
        print(f"lightning-nan replay {first.detail['dump']}")
    return plain, guarded


if __name__ == "__main__":
    main()
