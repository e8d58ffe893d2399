"""BatchBisection in real Trainers: the exact data set indices, quarantined, left out, without side effects."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
from faulty import trainer_kwargs
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_nan.core import read_jsonl
from lightning_nan.core.quarantine import Quarantine

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import dirty_data  # noqa: E402


class Indexed(Dataset):
    """Sample i is ``(x_i, y_i, i)``: the batch itself tells which indices it holds."""

    def __init__(self, n: int = 96, poison: dict[int, str] | None = None, features: int = 4):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, features, generator=g)
        self.y = torch.randn(n, 1, generator=g)
        for i, what in (poison or {}).items():
            self.x[i, 1] = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[what]
            if what == "zero":
                self.x[i] = 0.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def module_class(pl, *, batchnorm: bool = False, sqrt_grad: bool = False, pair: bool = False, manual: bool = False):
    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            layers = [torch.nn.Linear(4, 8)] + ([torch.nn.BatchNorm1d(8)] if batchnorm else []) + [torch.nn.Tanh(), torch.nn.Linear(8, 1)]
            self.net = torch.nn.Sequential(*layers)
            self.automatic_optimization = not manual
            self.seen: list[list[int]] = []  # the batches of the real training steps (from on_train_batch_start)

        def on_train_batch_start(self, batch, batch_idx):
            self.seen.append(batch[2].tolist())

        def loss(self, batch):
            x, y, idx = batch
            out = self.net(x)
            loss = torch.nn.functional.mse_loss(out, y)
            if sqrt_grad:  # finite loss, infinite gradient where a sample's first feature is exactly 0
                loss = loss + torch.sqrt(x[:, :1].abs() * self.net[0].weight[0, 0].abs()).mean()
            if pair:  # log(2 - count of flagged samples): -inf only when both flagged samples are present
                flagged = (x[:, 3] > 50).float().sum()
                loss = loss + 1e-3 * torch.log(2.0 - flagged)
            return loss

        def training_step(self, batch, batch_idx):
            self.log("calls", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")  # muted during bisection
            loss = self.loss(batch)
            if not manual:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Model


def fit(ns, tmp_path, model, data, *, callbacks=(), epochs=2, batch_size=16, workers=0, shuffle=True, **kwargs):
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "quarantine.jsonl", **kwargs)
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=torch.Generator().manual_seed(3))
    trainer = ns.pl.Trainer(callbacks=[guard, bisection, *callbacks], **trainer_kwargs(tmp_path, max_epochs=epochs))
    trainer.fit(model, loader)
    return guard, bisection, trainer


def test_exact_indices_under_shuffle_quarantined_and_left_out_of_the_next_epoch(ns, tmp_path):
    poison = {7: "nan", 50: "inf", 81: "nan"}
    model = module_class(ns.pl)()
    guard, bisection, _ = fit(ns, tmp_path, model, Indexed(poison=poison))
    found = sorted(i for inc in guard.incidents for i in inc.samples)
    assert found == sorted(poison)
    for inc in guard.incidents:  # each incident names exactly the culprits of its own batch
        batch = model.seen[inc.batch_idx[0]]
        assert sorted(inc.samples) == sorted(set(batch) & set(poison))
        assert inc.epoch == 0
        assert inc.bisection.forward_passes >= 1
    records = read_jsonl(tmp_path / "quarantine.jsonl")
    assert sorted(r["index"] for r in records) == sorted(poison)
    for r in records:
        assert {"index", "epoch", "step", "batch_idx", "reason", "fingerprint"} <= set(r)
        assert "input holds NaN/Inf" in r["reason"]
    epoch1 = model.seen[len(model.seen) // 2 :]
    assert not set().union(*map(set, epoch1)) & set(poison)  # left out of epoch 1
    assert [len(b) for b in epoch1] == [len(b) for b in model.seen[: len(model.seen) // 2]]  # same batch sizes
    assert bisection.quarantined == set(poison)


def test_the_reevaluation_leaves_no_trace(ns, tmp_path):
    """Same weights and optimizer as a run whose bad batch was skipped without bisection, same logging count,
    same progress counters, and the data order of a run without the callback."""
    poison = {20: "nan"}
    with_bisection = module_class(ns.pl, batchnorm=True)()
    guard, bisection, trainer = fit(ns, tmp_path / "a", with_bisection, Indexed(poison=poison), epochs=1)
    assert guard.incidents[0].samples == [20]

    plain = module_class(ns.pl, batchnorm=True)()
    guard2 = ns.NaNGuard()
    loader = DataLoader(Indexed(poison=poison), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    trainer2 = ns.pl.Trainer(callbacks=[guard2], **trainer_kwargs(tmp_path / "b", max_epochs=1))
    trainer2.fit(plain, loader)
    assert with_bisection.seen == plain.seen  # the data order is untouched
    for (name, a), (_, b) in zip(with_bisection.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers bit for bit
    # self.log in the re-evaluations was muted (and the skipped step's own call is left out of the epoch's sum)
    assert float(trainer.callback_metrics["calls"]) == len(plain.seen) - 1
    assert float(trainer2.callback_metrics["calls"]) == len(plain.seen) - 1
    assert trainer.global_step == trainer2.global_step
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == len(plain.seen)


def test_dirty_images_all_four_kinds(tmp_path):
    """All four poisons among 2048 images, shuffled, two workers, BatchNorm: the three with bad pixels
    are quarantined; the all-zero image, ordinary data the model's 0/0 trips on, is named, not removed."""
    result = dirty_data.train(True, str(tmp_path), n=2048, epochs=2, batch_size=64, workers=2)
    found = sorted(i for inc in result.guard.incidents for i in (inc.samples or []))
    dirty = sorted(i for i, kind in dirty_data.CULPRITS.items() if kind != "zero")
    assert found == dirty == [137, 911, 1402]
    assert sorted(Quarantine(result.bisection.quarantine_file).indices()) == dirty
    triggers = sorted(i for inc in result.guard.incidents for i in (inc.triggers or []))
    assert 1777 in triggers
    reasons = {r["index"]: r["reason"] for r in Quarantine(result.bisection.quarantine_file).records()}
    assert "input holds NaN/Inf" in reasons[137] and "input holds NaN/Inf" in reasons[911]
    assert "near the float32 limit" in reasons[1402]  # finite, but 1e38
    zero = next(inc for inc in result.guard.incidents if 1777 in (inc.triggers or []))
    assert zero.cause == "unsafe_op" and zero.samples in (None, [])
    first = result.guard.incidents[0]
    assert first.module is not None and first.localization is not None


def test_gradient_only_fault_is_bisected_with_backward(ns, tmp_path):
    data = Indexed(poison={33: "zero"})
    model = module_class(ns.pl, sqrt_grad=True)()
    guard, _, _ = fit(ns, tmp_path, model, data, epochs=1)
    assert [i.kind for i in guard.incidents] == ["grad"]
    (incident,) = guard.incidents
    # An all-zero sample is ordinary data that trips sqrt'(0): named as the trigger, never quarantined.
    assert (incident.samples, incident.triggers, incident.cause) == (None, [33], "unsafe_op")
    assert incident.localization.backward_op == "SqrtBackward0"
    assert not (tmp_path / "quarantine.jsonl").exists() or read_jsonl(tmp_path / "quarantine.jsonl") == []


def test_pair_that_fails_only_together_is_reported_as_a_minimal_group(ns, tmp_path):
    data = Indexed(n=32)
    data.x[[5, 12], 3] = 100.0  # the flagged pair, in the same batch (no shuffle, batch of 16)
    model = module_class(ns.pl, pair=True)()
    guard, _, _ = fit(ns, tmp_path, model, data, epochs=1, shuffle=False)
    (incident,) = guard.incidents
    # Found and reported as a minimal group, but a pair that fails only together is not quarantined.
    assert incident.samples is None and incident.triggers is None
    assert incident.bisection.batches[0].groups == [[5, 12]]
    assert incident.bisection.unconfirmed == [[5, 12]]
    assert not (tmp_path / "quarantine.jsonl").exists() or read_jsonl(tmp_path / "quarantine.jsonl") == []


def test_a_model_fault_is_not_blamed_on_the_data(ns, tmp_path):
    from faulty import model_class

    class Triples(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path))
    trainer.fit(model_class(ns.pl)(faults={2: "loss"}), DataLoader(Triples(), batch_size=8))
    (incident,) = guard.incidents
    summary = incident.bisection
    assert summary.whole_batch and "model problem" in summary.note
    assert incident.samples is None
    assert not (tmp_path / "q.jsonl").exists()  # nothing quarantined


def test_iterable_dataset_reports_positions_and_fingerprints(ns, tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            data = Indexed(n=48, poison={19: "nan"})
            for i in range(48):
                yield data[i]

    model = module_class(ns.pl)()
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path))
    trainer.fit(model, DataLoader(Stream(), batch_size=16))
    (incident,) = guard.incidents
    assert incident.samples is None
    summary = incident.bisection
    assert "indices are unknown" in summary.note
    assert summary.positions == [[0, 1, 3]]  # rank 0, batch 1, position 3: sample 19
    (record,) = read_jsonl(tmp_path / "q.jsonl")
    assert record["index"] is None and record["position"] == 3
    from lightning_nan.core.batches import fingerprint

    x, y, i = Indexed(n=48, poison={19: "nan"})[19]
    one = (x.unsqueeze(0), y.unsqueeze(0), torch.tensor([i]))
    assert record["fingerprint"] == fingerprint(one, 0)


def test_an_index_less_sample_found_at_two_incidents_gets_one_record_under_its_own_fingerprint(ns, tmp_path):
    from lightning_nan.core.quarantine import sample_fingerprint

    data = Indexed(n=48, poison={19: "nan"})

    class Rotating(IterableDataset):  # each epoch starts 5 samples later: sample 19 sits at another position
        epochs = 0

        def __iter__(self):
            start, Rotating.epochs = 5 * Rotating.epochs, Rotating.epochs + 1
            for i in range(48):
                yield data[(start + i) % 48]

    model = module_class(ns.pl)()
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, DataLoader(Rotating(), batch_size=16))
    first, second = guard.incidents  # no index: nothing can leave the sample out, so it fails again
    assert first.bisection.positions == [[0, 1, 3]] and second.bisection.positions == [[0, 0, 14]]
    assert first.bisection.fingerprints == second.bisection.fingerprints == [sample_fingerprint(data[19])]
    (record,) = read_jsonl(tmp_path / "q.jsonl")  # one sample, one record
    assert record["index"] is None and record["fingerprint"] == sample_fingerprint(data[19])
    assert len(bisection.quarantine_records) == 1


def test_resumed_run_with_the_same_quarantine_file_leaves_the_samples_out(ns, tmp_path):
    poison = {3: "nan", 60: "inf"}
    guard, _, _ = fit(ns, tmp_path, module_class(ns.pl)(), Indexed(poison=poison), epochs=1)
    assert sorted(i for inc in guard.incidents for i in inc.samples) == [3, 60]
    again = module_class(ns.pl)()
    guard2, _, _ = fit(ns, tmp_path, again, Indexed(poison=poison), epochs=1, workers=2)
    assert guard2.incidents == []
    assert not set().union(*map(set, again.seen)) & set(poison)
    assert len(again.seen) == math.ceil(96 / 16)


def test_manual_optimization(ns, tmp_path):
    model = module_class(ns.pl, manual=True)()
    guard, _, _ = fit(ns, tmp_path, model, Indexed(poison={44: "nan"}), epochs=1)
    assert [i.samples for i in guard.incidents] == [[44]]


def test_gradient_accumulation_bisects_every_micro_batch(ns, tmp_path):
    model = module_class(ns.pl)()
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path, accumulate_grad_batches=2))
    trainer.fit(model, DataLoader(Indexed(n=64, poison={21: "nan"}), batch_size=8))
    (incident,) = guard.incidents
    assert incident.samples == [21] and incident.batch_idx == [2, 3]
    assert [b.batch_idx for b in incident.bisection.batches] == [2, 3]
    assert [b.reproduced for b in incident.bisection.batches] == [True, False]


@dataclasses.dataclass
class Graphs:
    """A batch type the built-in splitter cannot split: node features of several graphs in one tensor."""

    nodes: torch.Tensor
    sizes: list[int]


def graph_collate(items):
    return Graphs(torch.cat([x for x, _ in items]), [len(x) for x, _ in items])


class GraphData(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randn(2 + i % 3, 4, generator=g) for i in range(24)]
        self.items[13][0, 2] = float("nan")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], i


def graph_model(pl):
    class GraphModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch.nodes).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return GraphModel


def split_graphs(batch: Graphs, positions):
    starts = [0]
    for s in batch.sizes:
        starts.append(starts[-1] + s)
    return Graphs(torch.cat([batch.nodes[starts[p] : starts[p + 1]] for p in positions]), [batch.sizes[p] for p in positions])


def test_custom_splitter_for_graph_batches_and_a_clear_error_without_it(ns, tmp_path):
    loader = DataLoader(GraphData(), batch_size=8, collate_fn=graph_collate)
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl", splitter=split_graphs, sizer=lambda b: len(b.sizes))
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path))
    trainer.fit(graph_model(ns.pl)(), loader)
    assert [i.samples for i in guard.incidents] == [[13]]

    guard = ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[guard, ns.lib.BatchBisection(quarantine_path=tmp_path / "r.jsonl")], **trainer_kwargs(tmp_path / "x"))
    with pytest.warns(UserWarning, match=r"Graphs.*splitter="):
        trainer.fit(graph_model(ns.pl)(), DataLoader(GraphData(), batch_size=8, collate_fn=graph_collate))
    (incident,) = guard.incidents
    assert incident.action == "skipped" and "splitter=" in incident.bisection.errors[0]


def importable(cls: type, name: str) -> type:
    """Make a class built in a function picklable by reference (dumps pickle the model)."""
    cls.__qualname__ = cls.__name__ = name
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def test_first_incident_is_localized_and_the_dump_replays(ns, tmp_path, capsys):
    from lightning_nan.cli import main

    model = importable(module_class(ns.pl), f"DumpModel_{ns.name}")()
    guard, _, _ = fit(ns, tmp_path, model, Indexed(poison={70: "nan", 10: "nan"}), epochs=1, dump_dir=tmp_path / "dumps")
    first, second = guard.incidents
    assert first.localization.first_nonfinite_input is not None  # the data: NaN already in the input
    assert second.localization.first_nonfinite_input is not None  # each incident speaks for itself
    dump = first.detail["dump"]
    assert Path(dump).is_file()
    assert main(["replay", dump]) == 0
    out = capsys.readouterr().out
    assert "reproduced: yes" in out and str(first.samples) in out
    assert "non-finite input" in out  # the localization: the NaN was in the data

    # A class defined in a function cannot be pickled: the dump replays with the exported program (issue 16).
    local = module_class(ns.pl)()
    guard, _, _ = fit(ns, tmp_path / "local", local, Indexed(poison={70: "nan"}), epochs=1, dump_dir=tmp_path / "d2")
    (incident,) = guard.incidents
    assert incident.samples == [70] and "dump_error" not in incident.detail
    assert main(["replay", incident.detail["dump"]]) == 0
    out = capsys.readouterr().out
    assert "reproduced: yes, with the exported program" in out and "[70]" in out and "non-finite input" in out


def test_needs_a_guard_and_validates_arguments(ns, tmp_path):
    trainer = ns.pl.Trainer(callbacks=[ns.lib.BatchBisection()], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="NaNGuard"):
        trainer.fit(module_class(ns.pl)(), DataLoader(Indexed(), batch_size=8))
    with pytest.raises(ValueError, match="localize"):
        ns.lib.BatchBisection(localize="sometimes")
    with pytest.raises(ValueError, match="max_tests"):
        ns.lib.BatchBisection(max_tests=0)
    with pytest.raises(ValueError, match="splitter"):
        ns.lib.BatchBisection(splitter="split")


def test_tensor_dataset_indices(ns, tmp_path):
    """A plain TensorDataset (no index in the batch): indices come from the sampler."""
    x = torch.randn(40, 4)
    x[29, 0] = float("nan")

    class Plain(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    guard = ns.NaNGuard()
    trainer = ns.pl.Trainer(callbacks=[guard, ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")], **trainer_kwargs(tmp_path))
    trainer.fit(Plain(), DataLoader(TensorDataset(x), batch_size=8, shuffle=True))
    assert [i.samples for i in guard.incidents] == [[29]]


def test_bisection_is_told_first_so_lr_backoff_knows_it_was_the_data(ns, tmp_path):
    backoff = ns.lib.LRBackoff()
    guard = ns.NaNGuard()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[backoff, guard, bisection], **trainer_kwargs(tmp_path))  # LRBackoff listed first
    trainer.fit(module_class(ns.pl)(), DataLoader(Indexed(poison={9: "nan"}), batch_size=16))
    assert [i.samples for i in guard.incidents] == [[9]]
    assert backoff.factor_now == 1.0 and backoff.history == []  # dirty data: the learning rate is not to blame


def test_batch_of_one_blames_a_sample_only_when_its_input_is_not_finite(ns, tmp_path):
    """With one sample per batch every failure 'isolates' it: only a non-finite input singles it out."""
    guard, _, _ = fit(ns, tmp_path / "nan", module_class(ns.pl)(), Indexed(n=12, poison={5: "nan"}), epochs=1, batch_size=1, shuffle=False)
    assert [i.samples for i in guard.incidents] == [[5]] and guard.incidents[0].cause == "dirty_data"

    data = Indexed(n=12, poison={5: "zero"})  # finite input, infinite gradient (sqrt at 0)
    guard, _, _ = fit(ns, tmp_path / "zero", module_class(ns.pl, sqrt_grad=True)(), data, epochs=1, batch_size=1, shuffle=False)
    (incident,) = guard.incidents
    assert incident.samples is None and incident.bisection.whole_batch  # not quarantined
    assert not (tmp_path / "zero" / "quarantine.jsonl").exists()

def test_a_fit_that_raises_gives_the_strategy_and_the_loader_back(ns, tmp_path):
    """Lightning calls `on_exception`, not `teardown`, when fit raises: nothing may stay patched."""
    from faulty import loader as faulty_loader
    from faulty import model_class

    from lightning_nan.core.errors import NonFiniteError

    loader = faulty_loader(n=32, batch_size=4, nan_sample=1)  # step 0: dirty data, quarantined
    inner = loader.batch_sampler
    model = model_class(ns.pl)(faults={b: "loss" for b in range(2, 8)})  # then the model fails for good
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[ns.NaNGuard(max_consecutive=2), bisection], **trainer_kwargs(tmp_path))
    with pytest.raises(NonFiniteError):
        trainer.fit(model, loader)
    assert bisection.quarantined == {1}
    assert "process_dataloader" not in trainer.strategy.__dict__
    assert loader.batch_sampler is inner
    rows = torch.cat([x for x, _ in loader])
    assert rows.shape == (32, 4) and torch.equal(rows.isnan().nonzero(), torch.tensor([[1, 1]]))  # sample 1 is back


def test_a_strategy_with_its_own_process_dataloader_keeps_it(ns, tmp_path):
    """A strategy instance whose `process_dataloader` the user shadowed: bisection tracks what it returns,
    and after fit the instance has the user's function again, not the class's method."""
    seen = []

    def own(dataloader):
        seen.append(dataloader)
        return dataloader

    strategy = ns.pl.strategies.SingleDeviceStrategy(device="cpu")
    strategy.process_dataloader = own
    guard, bisection = ns.NaNGuard(), ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    kwargs = {**trainer_kwargs(tmp_path, max_epochs=2), "strategy": strategy}
    kwargs.pop("accelerator", None)
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **kwargs)
    trainer.fit(module_class(ns.pl)(), DataLoader(Indexed(n=16, poison={5: "nan"}), batch_size=4))
    assert seen and bisection.quarantined == {5}  # the user's function ran, and the tracker saw the indices
    assert vars(trainer.strategy)["process_dataloader"] is own


def test_the_users_loader_is_given_back_after_fit_and_tracked_again_by_the_next(ns, tmp_path):
    class Model(module_class(ns.pl)):
        def validation_step(self, batch, batch_idx):
            self.validated = getattr(self, "validated", []) + batch[2].tolist()

    loader = DataLoader(Indexed(n=16, poison={3: "nan"}), batch_size=4)
    inner = loader.batch_sampler
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    model = Model()
    ns.pl.Trainer(callbacks=[ns.NaNGuard(), bisection], **trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader)
    assert model.seen[4:] == [[0, 1, 2, 0], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # epoch 1: 3 left out
    assert loader.batch_sampler is inner
    ns.pl.Trainer(**trainer_kwargs(tmp_path / "v")).validate(model, loader)
    assert model.validated == list(range(16))  # every sample, once: no quarantine outside fit

    guard = ns.NaNGuard()
    again = Model()
    ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path / "again")).fit(again, loader)  # same callback
    assert again.seen == [[0, 1, 2, 0], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # from the file, from epoch 0
    assert guard.incidents == [] and loader.batch_sampler is inner


def test_grouped_batches_stay_grouped_after_a_quarantine(ns, tmp_path):
    """A batch sampler that groups equal shapes: a quarantined sample's place is taken within its batch."""

    class Shaped(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = torch.full((2 if i < 8 else 3,), 0.1 * (i + 1))
            if i == 2:
                x[0] = float("nan")
            return x, i

    class Buckets(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([[0, 1, 2, 3], [8, 9, 10, 11], [4, 5, 6, 7], [12, 13, 14, 15]])

        def __len__(self):
            return 4

    class Model(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, idx = batch
            self.seen.append(idx.tolist())
            return (self.w * x.sum(1)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    guard, model = ns.NaNGuard(), Model()
    bisection = ns.lib.BatchBisection(quarantine_path=tmp_path / "q.jsonl")
    trainer = ns.pl.Trainer(callbacks=[guard, bisection], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, DataLoader(Shaped(), batch_sampler=Buckets()))
    assert [i.samples for i in guard.incidents] == [[2]] and trainer.current_epoch == 2
    epoch1 = model.seen[-4:]  # the real steps (bisection's re-evaluations come before, in epoch 0)
    assert epoch1 == [[0, 1, 3, 0], [8, 9, 10, 11], [4, 5, 6, 7], [12, 13, 14, 15]]


def test_a_repeated_culprit_is_recorded_once(ns, tmp_path):
    """Samples 1 and 3 are quarantined already: batch 0 becomes [0, 2, 0, 2], and 2 fails twice."""
    from lightning_nan.core.quarantine import make_record

    path = tmp_path / "q.jsonl"
    Quarantine(path).add(
        [make_record(index=i, position=i, epoch=0, step=0, batch_idx=0, reason="earlier run", fingerprint="") for i in (1, 3)]
    )
    guard, model = ns.NaNGuard(), module_class(ns.pl)()
    trainer = ns.pl.Trainer(callbacks=[guard, ns.lib.BatchBisection(quarantine_path=path)], **trainer_kwargs(tmp_path))
    trainer.fit(model, DataLoader(Indexed(n=16, poison={2: "nan"}), batch_size=4))
    assert model.seen[-4] == [0, 2, 0, 2] and [i.samples for i in guard.incidents] == [[2]]
    assert [r["index"] for r in Quarantine(path).records()] == [1, 3, 2]


DDP_OPT_OUT_SCRIPT = '''
import os, sys
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset
from lightning_nan import BatchBisection, NaNGuard

outdir = sys.argv[1]


class Data(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.full((4,), 0.1 * i)
        if i == 4:  # one rank's shard only
            x[1] = float("nan")
        return x, i


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.batches = []

    def training_step(self, batch, batch_idx):
        x, idx = batch
        self.all_gather(idx)  # a collective in training_step: a rank-local re-evaluation would break pairing
        self.batches.append(idx.tolist())
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


guard, model = NaNGuard(), Model()
bisection = BatchBisection(quarantine_path=os.path.join(outdir, "q.jsonl"), ddp=False)
trainer = pl.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, callbacks=[guard, bisection], logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=outdir,
)
trainer.fit(model, DataLoader(Data(), batch_size=4))
result = {
    "incidents": [i.to_dict() for i in guard.incidents],
    "batches": model.batches,
    "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
}
torch.save(result, os.path.join(outdir, f"rank{trainer.global_rank}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
    sys.exit(proc.wait(timeout=120))
'''


def test_ddp_false_skips_bisection_on_every_rank(tmp_path):
    import os
    import signal
    import socket
    import subprocess

    import pytorch_lightning as pl

    from lightning_nan import BatchBisection, NaNGuard

    with pytest.raises(ValueError, match="ddp"):
        BatchBisection(ddp="no")
    # one process: world size 1, bisection runs as usual
    guard = NaNGuard()
    trainer = pl.Trainer(callbacks=[guard, BatchBisection(quarantine_path=tmp_path / "one.jsonl", ddp=False)], **trainer_kwargs(tmp_path))
    trainer.fit(module_class(pl)(), DataLoader(Indexed(n=16, poison={6: "nan"}), batch_size=8))
    assert [i.samples for i in guard.incidents] == [[6]]

    script = tmp_path / "ddp_opt_out.py"
    script.write_text(DDP_OPT_OUT_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run hung:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    (owner,) = [r for r, res in enumerate((r0, r1)) if any(4 in b for b in res["batches"])]
    (step,) = [k for k, b in enumerate((r0, r1)[owner]["batches"]) if 4 in b]
    for res in (r0, r1):
        (incident,) = res["incidents"]
        assert incident["step"] == step and incident["ranks"] == [owner] and incident["samples"] is None
        assert "ddp=False" in incident["bisection"]["skipped"]
        assert len(res["batches"]) == 4  # the real steps only: no re-evaluation ran training_step
    assert not (tmp_path / "q.jsonl").exists()
    for name, value in r0["state_dict"].items():
        assert torch.equal(value, r1["state_dict"][name]), name
