"""A skipped step leaves no trace in what Lightning and torchmetrics accumulate over an epoch: each guarded
run is compared with a real run in which the skipped step's batches were never there (same seeds)."""

from __future__ import annotations

import warnings

import torch
import torchmetrics
from faulty import identical
from torch.utils.data import DataLoader, TensorDataset

N, BATCH = 32, 4  # 8 clean batches per epoch
NAN_BATCH = list(range(32, 36))  # samples 32-35 hold a NaN
EXTRA_BATCH = list(range(36, 40))  # a clean batch, the NaN batch's partner under gradient accumulation


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g)
    x[NAN_BATCH, 1] = float("nan")
    return TensorDataset(x, y)


def batches(insert: list[list[int]], at: int = 2) -> list[list[int]]:
    """Batches 0-7 in order, with ``insert`` put in at position ``at``."""
    plan = [list(range(i, i + BATCH)) for i in range(0, N, BATCH)]
    plan[at:at] = insert
    return plan


def model_class(pl, manual=False, log_kwargs=None):
    log_kwargs = log_kwargs or {}

    class Logged(pl.LightningModule):
        """``insert[epoch]``: batches put in at position ``at`` of that epoch (loaders reloaded every epoch)."""

        def __init__(self, insert, at=2):
            super().__init__()
            self.insert, self.at = insert, at
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            self.mse = torchmetrics.MeanSquaredError()  # tensor states (no NaN filtering)
            # two members with the same states: a compute group, sharing one set of state tensors
            self.more = torchmetrics.MetricCollection({"mae": torchmetrics.MeanAbsoluteError(), "mae2": torchmetrics.MeanAbsoluteError()})
            self.preds = torchmetrics.CatMetric(nan_strategy="disable")  # a list state
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            pred = self.net(x)
            loss = torch.nn.functional.mse_loss(pred, y)
            self.log("train_loss", loss, on_step=True, on_epoch=True, **log_kwargs)
            self.log_dict({"loss_max": loss, "loss_min": loss * 2}, on_epoch=True, reduce_fx="max")
            self.log("loss_least", loss, on_epoch=True, reduce_fx="min")
            self.log("loss_sum", loss, on_epoch=True, reduce_fx="sum", sync_dist=True)
            self.mse(pred, y)
            self.log("train_mse", self.mse, on_epoch=True)
            self.more.update(pred, y)
            self.preds.update(pred.detach())
            if not manual:
                return loss
            opt_a, opt_b = self.optimizers()
            opt_a.zero_grad()
            self.manual_backward(loss)
            opt_a.step()
            loss_b = torch.nn.functional.l1_loss(self.net(x), y)
            opt_b.zero_grad()
            self.manual_backward(loss_b)
            opt_b.step()
            self.log("loss_b", loss_b, on_epoch=True)  # after the steps: still the skipped batch's

        def on_train_epoch_end(self):
            self.log_dict(self.more.compute())
            preds = self.preds.compute()
            self.log_dict({"preds_seen": float(preds.numel()), "preds_sum": preds.sum()})
            self.more.reset()
            self.preds.reset()

        def train_dataloader(self):
            return DataLoader(dataset(), batch_sampler=batches(self.insert.get(self.trainer.current_epoch, []), self.at))

        def configure_optimizers(self):
            if manual:
                return torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.SGD(self.net[2].parameters(), lr=0.05)
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}

    return Logged


def memory_logger(pl):
    class Memory(pl.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        name, version = "memory", "0"

        def log_metrics(self, metrics, step=None):
            self.rows.append({k: float(v) for k, v in metrics.items()})

        def log_hyperparams(self, *args, **kwargs):
            pass

    return Memory()


def epoch_values(pl):
    class EpochValues(pl.Callback):
        """What the monitoring callbacks read at each epoch's end."""

        def __init__(self):
            self.epochs = []

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs.append({k: v.clone() for k, v in trainer.callback_metrics.items() if not k.endswith("_step")})

    return EpochValues()


def run(ns, tmp_path, insert, guard=True, manual=False, epochs=3, at=2, **trainer_kw):
    pl = ns.pl
    values, logger = epoch_values(pl), memory_logger(pl)
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", check_finite=True, patience=5)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", save_top_k=2, filename="{epoch}")
    callbacks = [values, stop, ckpt]
    if not manual:
        callbacks.append(pl.callbacks.LearningRateMonitor(logging_interval="epoch"))
    if guard:
        callbacks.insert(0, ns.NaNGuard())
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=logger, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), log_every_n_steps=1,
        reload_dataloaders_every_n_epochs=1, **trainer_kw,
    )
    model = model_class(pl, manual=manual)(insert, at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer, model, values, logger, stop, ckpt


def assert_same_epochs(ours, theirs):
    trainer, model, values, logger, stop, ckpt = ours
    r_trainer, r_model, r_values, r_logger, r_stop, r_ckpt = theirs
    assert trainer.current_epoch == r_trainer.current_epoch == 3  # neither run was stopped early
    assert len(values.epochs) == len(r_values.epochs) == 3
    for a, b in zip(values.epochs, r_values.epochs):
        assert a.keys() == b.keys() and identical(a, b), (a, b)  # bit for bit, every epoch value
        assert all(bool(torch.isfinite(v)) for v in a.values())
    assert identical(model.state_dict(), r_model.state_dict())  # weights, torchmetrics states
    assert (stop.wait_count, stop.stopped_epoch, float(stop.best_score)) == (r_stop.wait_count, r_stop.stopped_epoch, float(r_stop.best_score))
    assert float(ckpt.best_model_score) == float(r_ckpt.best_model_score)
    assert sorted((p.rsplit("/", 1)[1], float(s)) for p, s in ckpt.best_k_models.items()) == sorted(
        (p.rsplit("/", 1)[1], float(s)) for p, s in r_ckpt.best_k_models.items()
    )
    epoch_rows = [{k: v for k, v in row.items() if not k.endswith("_step")} for row in logger.rows if "train_loss_epoch" in row or "lr-SGD" in row]
    r_epoch_rows = [{k: v for k, v in row.items() if not k.endswith("_step")} for row in r_logger.rows if "train_loss_epoch" in row or "lr-SGD" in row]
    assert epoch_rows == r_epoch_rows  # what the loggers got at each epoch's end (LearningRateMonitor's lr included)


def test_epoch_metrics_and_callbacks_see_the_run_without_the_skipped_batch(ns, tmp_path):
    ours = run(ns, tmp_path / "ours", {1: [NAN_BATCH]})
    theirs = run(ns, tmp_path / "theirs", {}, guard=False)
    guard = ours[0].callbacks[0]
    assert [(i.epoch, i.batch_idx) for i in guard.incidents] == [(1, [2])]
    assert_same_epochs(ours, theirs)
    lrs = [row["lr-SGD"] for row in ours[3].rows if "lr-SGD" in row]
    assert len(set(lrs)) > 1  # ReduceLROnPlateau did act on the monitored training loss
    nan_steps = [row for row in ours[3].rows if "train_loss_step" in row and row["train_loss_step"] != row["train_loss_step"]]
    assert len(nan_steps) == 1  # the skipped step's own value is logged as it was


def test_without_the_guard_the_nan_batch_ends_the_run(tmp_path):
    """The issue's run, unguarded: a NaN epoch value and EarlyStopping ends the run (the test above is not vacuous)."""
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl)
    trainer, _, values, *_ = run(ns, tmp_path, {1: [NAN_BATCH]}, guard=False)
    assert trainer.current_epoch == 2 and torch.isnan(values.epochs[1]["train_loss"])


def test_a_skipped_first_step_of_the_run(tmp_path):
    """The very first step is skipped: every logged key is new there; the epoch starts from the next step."""
    import lightning_nan
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl, NaNGuard=lightning_nan.NaNGuard)
    ours = run(ns, tmp_path / "ours", {0: [NAN_BATCH]}, at=0)
    theirs = run(ns, tmp_path / "theirs", {}, guard=False, at=0)
    assert [(i.step, i.epoch) for i in ours[0].callbacks[0].incidents] == [(0, 0)]
    assert_same_epochs(ours, theirs)


def test_gradient_accumulation_leaves_out_every_micro_batch_of_the_skipped_step(tmp_path):
    import lightning_nan
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl, NaNGuard=lightning_nan.NaNGuard)
    # the window of micro-batches 2 and 3 is one step: its clean partner goes with the NaN batch
    ours = run(ns, tmp_path / "ours", {1: [EXTRA_BATCH, NAN_BATCH]}, accumulate_grad_batches=2)
    theirs = run(ns, tmp_path / "theirs", {}, guard=False, accumulate_grad_batches=2)
    assert [i.batch_idx for i in ours[0].callbacks[0].incidents] == [[2, 3]]
    assert_same_epochs(ours, theirs)


def test_manual_optimization_with_two_optimizers(tmp_path):
    import lightning_nan
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl, NaNGuard=lightning_nan.NaNGuard)
    ours = run(ns, tmp_path / "ours", {1: [NAN_BATCH]}, manual=True)
    theirs = run(ns, tmp_path / "theirs", {}, guard=False, manual=True)
    assert len(ours[0].callbacks[0].incidents) == 2  # both optimizers' steps were skipped
    assert_same_epochs(ours, theirs)
