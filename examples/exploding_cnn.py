"""The run from the user's story: a small CNN on unnormalised 0-255 patches whose loss goes NaN.

5 conv layers, 2 hidden layers, softmax, cost ``-mean(log(softmax)[y])``, SGD lr 0.01, 66 patches
of 28x28 cut from one unnormalised 0-255 image, batch size 1, 20 epochs.

    python examples/exploding_cnn.py            # the plain run, then the guarded run
    python examples/exploding_cnn.py --epochs 2 # quicker

Plain, the loss turns NaN in the first epoch and the weights follow. With ``NaNGuard`` the bad steps
are skipped and the run finishes with finite weights, but the guard alone does not cure the
divergence: half the steps still fail. With ``lightning_nan.recommended()`` (clipping, LR backoff,
rollback, ...) and no other change the run trains to a last-epoch mean loss near zero.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan import NaNGuard, NonFiniteError, recommended

PATCH, ROWS, COLS = 28, 6, 11  # 6 x 11 = 66 patches


def make_patches(seed: int = 0) -> TensorDataset:
    """66 unnormalised 0-255 patches of one synthetic image; label: is the patch brighter than the median?"""
    g = torch.Generator().manual_seed(seed)
    h, w = ROWS * PATCH, COLS * PATCH
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = 128 + 90 * torch.sin(6 * xx + 3 * yy) * torch.cos(4 * yy)  # smooth shading
    image += 30 * torch.randn(h, w, generator=g)  # texture
    image = image.clamp(0, 255).round()
    patches = image.unfold(0, PATCH, PATCH).unfold(1, PATCH, PATCH).reshape(-1, 1, PATCH, PATCH)
    means = patches.mean(dim=(1, 2, 3))
    labels = (means > means.median()).long()
    return TensorDataset(patches, labels)


class PatchCNN(pl.LightningModule):
    """5 conv layers, 2 hidden layers, softmax; trained with ``-mean(log(softmax)[y])``."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        chans = [1, 16, 16, 32, 32, 32]
        convs = []
        for i in range(5):
            convs += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i in (1, 3):
                convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)
        )
        self.losses: list[float] = []
        for m in self.modules():  # the tutorial's initialisation: truncated normal, std 0.1; bias 0.1
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(m.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.features(x)), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        probs = self(x)
        return -torch.log(probs[torch.arange(len(y)), y]).mean()  # the unsafe form from the story

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # here, not in training_step: BatchBisection re-runs that

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(
    guarded: bool, epochs: int = 20, seed: int = 0, root: str | None = None, callbacks: list | None = None
) -> tuple[PatchCNN, NaNGuard | None]:
    """Train once; returns the model (its ``losses`` per step) and the guard, if any.

    ``callbacks`` (e.g. ``lightning_nan.recommended()``) replaces the lone ``NaNGuard`` of ``guarded``.
    """
    pl.seed_everything(seed, verbose=False)
    model = PatchCNN()
    if callbacks is None:
        callbacks = [NaNGuard()] if guarded else []
    guard = next((cb for cb in callbacks if isinstance(cb, NaNGuard)), None)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root or tempfile.mkdtemp(prefix="exploding_cnn_"),  # incident/quarantine files go there
    )
    loader = DataLoader(make_patches(seed), batch_size=1, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return model, guard


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def first_nan(losses: list[float]) -> int | None:
    return next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    steps_per_epoch = len(make_patches())

    model, _ = run(guarded=False, epochs=args.epochs)
    bad = first_nan(model.losses)
    where = "never" if bad is None else f"at step {bad} (epoch {bad // steps_per_epoch})"
    print(f"plain:   loss first non-finite {where}; last loss {model.losses[-1]}; weights finite: {weights_finite(model)}")

    try:
        model, guard = run(guarded=True, epochs=args.epochs)
    except NonFiniteError as err:
        print(f"guarded: stopped with NonFiniteError: {err}")
        raise SystemExit(1) from None
    assert guard is not None
    last_finite = [v for v in model.losses[-steps_per_epoch:] if math.isfinite(v)]
    print(
        f"guarded: finished {args.epochs} epochs; {guard.skipped_steps} of {len(model.losses)} steps skipped "
        f"({len(guard.incidents)} incidents, first at step {guard.incidents[0].step if guard.incidents else '-'}); "
        f"weights finite: {weights_finite(model)}; last epoch: {steps_per_epoch - len(last_finite)} of "
        f"{steps_per_epoch} losses non-finite, the others average {sum(last_finite) / max(1, len(last_finite)):.3f}"
    )
    model, guard = run(guarded=True, epochs=args.epochs, callbacks=recommended())
    assert guard is not None
    last = model.losses[-steps_per_epoch:]
    print(
        f"recommended(): finished {args.epochs} epochs; {guard.skipped_steps} steps skipped; weights finite: "
        f"{weights_finite(model)}; mean loss of the last epoch {sum(last) / len(last):.4f}"
    )


if __name__ == "__main__":
    main()
