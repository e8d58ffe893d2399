"""A NaN/Inf validation or test value is an incident (kind 'val'/'test'), kept out of the epoch's values:
compared with real runs whose loaders never held the dirty sample (or the dirty batch)."""

from __future__ import annotations

import json
import warnings

import torch
import torchmetrics
from faulty import identical
from torch.utils.data import DataLoader, TensorDataset

DIRTY = 6  # validation sample 6: batch 1, position 2


def data(n, seed, dirty=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    if dirty is not None:
        x[dirty, 3] = float("nan")
    return TensorDataset(x, y)


def model_class(pl):
    class Evaluated(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            self.val_mse = torchmetrics.MeanSquaredError()
            self.test_mse = torchmetrics.MeanSquaredError()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def _eval(self, batch, prefix, metric):
            x, y = batch
            pred = self.net(x)
            loss = torch.nn.functional.mse_loss(pred, y)
            self.log(f"{prefix}_loss", loss)
            self.log(f"{prefix}_worst", (pred - y).abs().max(), reduce_fx="max")
            metric(pred, y)
            self.log(f"{prefix}_mse", metric)
            return loss

        def validation_step(self, batch, batch_idx):
            return self._eval(batch, "val", self.val_mse)

        def test_step(self, batch, batch_idx):
            return self._eval(batch, "test", self.test_mse)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Evaluated


def fixed_batches(dataset, batches):
    return DataLoader(dataset, batch_sampler=batches)


def run(ns, tmp_path, val_loader, callbacks=(), test_loader=None):
    pl = ns.pl
    seen = []

    class Seen(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(None)

        def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
            seen[-1] = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val")}

    stop = pl.callbacks.EarlyStopping(monitor="val_loss", check_finite=True, patience=5)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
        callbacks=[*callbacks, Seen(), stop],
    )
    model = model_class(pl)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data(32, 0), batch_size=8), val_loader)
        tested = trainer.test(model, test_loader, verbose=False) if test_loader is not None else None
    return trainer, model, seen, stop, tested


def assert_same(ours, theirs):
    trainer, model, seen, stop, tested = ours
    r_trainer, r_model, r_seen, r_stop, r_tested = theirs
    assert trainer.current_epoch == r_trainer.current_epoch == 3 and len(seen) == 3
    for a, b in zip(seen, r_seen):
        assert identical(a, b), (a, b)
        assert all(bool(torch.isfinite(v)) for v in a.values())
    assert identical(model.state_dict(), r_model.state_dict())
    assert (stop.wait_count, float(stop.best_score)) == (r_stop.wait_count, float(r_stop.best_score))
    assert tested == r_tested


def test_dirty_validation_sample_is_left_out_of_the_epoch(ns, tmp_path):
    """With BatchBisection: the sample is named, quarantined with split 'val', and only it is left out."""
    val = data(16, 1, dirty=DIRTY)
    guard, bisection = ns.NaNGuard(), ns.lib.BatchBisection()
    ours = run(ns, tmp_path / "ours", DataLoader(val, batch_size=4), [guard, bisection])
    without_it = [[0, 1, 2, 3], [4, 5, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    theirs = run(ns, tmp_path / "theirs", fixed_batches(val, without_it))
    assert_same(ours, theirs)
    assert [(i.kind, i.epoch, i.batch_idx, i.samples, i.cause, i.action) for i in guard.incidents] == [
        ("val", e, [1], [DIRTY], "dirty_data", "left out 1 of 4 samples") for e in range(3)
    ]
    assert guard.skipped_steps == 0  # nothing in training was touched
    records = [json.loads(line) for line in open(bisection.quarantine_file)]
    assert [(r["index"], r["split"]) for r in records] == [(DIRTY, "val")]
    assert bisection.quarantined == set()  # a validation index never leaves a training sample out
    assert "self.log('val_loss')" in guard.incidents[0].detail["nonfinite"]


def test_without_bisection_the_dirty_batch_is_left_out(tmp_path):
    import lightning_nan
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl, NaNGuard=lightning_nan.NaNGuard)
    val, test = data(16, 1, dirty=DIRTY), data(12, 2, dirty=5)
    guard = ns.NaNGuard()
    ours = run(ns, tmp_path / "ours", DataLoader(val, batch_size=4), [guard], test_loader=DataLoader(test, batch_size=4))
    theirs = run(
        ns, tmp_path / "theirs", fixed_batches(val, [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15]]),
        test_loader=fixed_batches(test, [[0, 1, 2, 3], [8, 9, 10, 11]]),
    )
    assert_same(ours, theirs)
    assert [(i.kind, i.batch_idx, i.action) for i in guard.incidents] == [("val", [1], "left out the batch")] * 3 + [
        ("test", [1], "left out the batch")
    ]
    assert "BatchBisection" in guard.incidents[0].detail["metrics"]


def test_clean_runs_keep_their_numbers(tmp_path):
    import lightning_nan
    import pytorch_lightning as pl
    from types import SimpleNamespace

    ns = SimpleNamespace(pl=pl, NaNGuard=lightning_nan.NaNGuard)
    val, test = data(16, 1), data(12, 2)
    guard = ns.NaNGuard()
    ours = run(ns, tmp_path / "ours", DataLoader(val, batch_size=4), [guard, lightning_nan.BatchBisection()], DataLoader(test, batch_size=4))
    theirs = run(ns, tmp_path / "theirs", DataLoader(val, batch_size=4), test_loader=DataLoader(test, batch_size=4))
    assert_same(ours, theirs)
    assert guard.incidents == []


def test_unguarded_the_dirty_sample_stops_the_run(tmp_path):
    """The same dirty sample without the guard: a NaN/Inf val_loss and EarlyStopping ends the run at once."""
    import pytorch_lightning as pl
    from types import SimpleNamespace

    trainer, _, seen, stop, _ = run(SimpleNamespace(pl=pl), tmp_path, DataLoader(data(16, 1, dirty=DIRTY), batch_size=4))
    assert stop.stopped_epoch == 0 and len(seen) == 1 and not bool(torch.isfinite(seen[0]["val_loss"]))
