"""A tiny LightningModule whose faults are planted at known batches, for either Lightning namespace."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nan.core.events import Phase

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "lbfgs": lambda p: torch.optim.LBFGS(p),
}


def loader(n: int = 32, batch_size: int = 4, nan_sample: int | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    if nan_sample is not None:
        x[nan_sample, 1] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def model_class(pl: Any) -> type:
    """Build the module class against ``pl.LightningModule`` of the given namespace."""

    class Faulty(pl.LightningModule):
        """``faults[batch_idx]`` is 'loss' (NaN loss), 'grad' (one Inf gradient element) or 'param' (NaN weight);
        with ``manual=True`` two optimizers step in turn and 'loss2' poisons the second one's loss."""

        def __init__(self, faults: dict[int, str] | None = None, optimizer: str = "sgd", manual: bool = False):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
            self.head = torch.nn.Linear(8, 1)
            self.faults = faults or {}
            self.optimizer_name = optimizer
            self.automatic_optimization = not manual
            self.current_batch = -1

        def forward(self, x):
            return self.head(self.body(x))

        def _loss(self, batch, batch_idx):
            self.current_batch = batch_idx
            x, y = batch
            if self.faults.get(batch_idx) == "param":
                with torch.no_grad():
                    self.head.weight[0, 5] = float("nan")
            loss = torch.nn.functional.mse_loss(self(x).float(), y)
            if self.faults.get(batch_idx) == "loss":
                loss = loss * float("nan")
            return loss

        def training_step(self, batch, batch_idx):
            loss = self._loss(batch, batch_idx)
            if self.automatic_optimization:
                return loss
            opt_body, opt_head = self.optimizers()
            opt_body.zero_grad()
            self.manual_backward(loss)
            opt_body.step()
            loss2 = self._loss(batch, batch_idx)
            if self.faults.get(batch_idx) == "loss2":
                loss2 = loss2 * float("nan")
            opt_head.zero_grad()
            self.manual_backward(loss2)
            opt_head.step()

        def on_after_backward(self):
            if self.faults.get(self.current_batch) == "grad":
                self.body[0].weight.grad[1, 2] = float("inf")

        def configure_optimizers(self):
            make = OPTIMIZERS[self.optimizer_name]
            if self.automatic_optimization:
                return make(self.parameters())
            return make(self.body.parameters()), make(self.head.parameters())

    return Faulty


def recorder_class(pl: Any) -> type:
    class Recorder(pl.Callback):
        """Snapshots weights and optimizer state before training and after every batch."""

        def __init__(self):
            self.snaps: list[dict] = []

        def _snap(self, trainer, pl_module):
            self.snaps.append(
                {
                    "params": copy.deepcopy(pl_module.state_dict()),
                    "opt": [copy.deepcopy(o.state_dict()["state"]) for o in trainer.optimizers],
                }
            )

        def on_train_start(self, trainer, pl_module):
            self._snap(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._snap(trainer, pl_module)

    return Recorder


def identical(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested tensors, dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def unchanged_batches(snaps: list[dict], key: str = "params") -> list[int]:
    """Indices of the batches after which ``key`` was bit-identical to before them."""
    return [i for i in range(len(snaps) - 1) if identical(snaps[i][key], snaps[i + 1][key])]


def trainer_kwargs(tmp_path, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    kwargs.update(overrides)
    return kwargs


def cause_class(pl: Any) -> type:
    """A callback that states the cause of every incident, as a diagnosis would: the planted faults of
    these tests then stand for a real blow-up (``"divergence"``), so the tests exercise what the actors
    do for that cause. It runs before the guard's own diagnosis (``incident_phase = Phase.EVIDENCE``)."""

    class CauseIs(pl.Callback):
        incident_phase = Phase.EVIDENCE

        def __init__(self, cause: str = "divergence"):
            self.cause = cause

        def on_nan_incident(self, event: Any) -> None:
            event.incident.cause = self.cause

    return CauseIs
