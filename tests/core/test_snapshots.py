"""SnapshotStore and the known-good test, on plain tensors and modules."""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "callbacks"))
from faulty import identical  # noqa: E402

from lightning_nan.core.known_good import check_known_good, state_norm
from lightning_nan.core.snapshots import (
    Snapshot,
    SnapshotStore,
    load_snapshot,
    save_snapshot,
)




class Setup:
    """A model with parameters and buffers (BatchNorm), SGD with momentum, Adam, two schedulers, a disabled GradScaler."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        self.sgd = torch.optim.SGD(self.model[0].parameters(), lr=0.1, momentum=0.9)
        self.adam = torch.optim.Adam([*self.model[1].parameters(), *self.model[3].parameters()], lr=0.01)
        self.step_lr = torch.optim.lr_scheduler.StepLR(self.sgd, step_size=2, gamma=0.5)
        self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(self.adam, T_max=10)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.gen = torch.Generator().manual_seed(seed + 1)

    @property
    def optimizers(self):
        return [self.sgd, self.adam]

    @property
    def schedulers(self):
        return [self.step_lr, self.cosine]

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(8, 4, generator=self.gen)
            loss = self.model(x).pow(2).mean()
            for opt in self.optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in self.optimizers:
                opt.step()
            for sched in self.schedulers:
                sched.step()

    def record(self) -> dict:
        """An independent deep copy of everything a snapshot must bring back."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "lrs": [[g["lr"] for g in o.param_groups] for o in self.optimizers],
                "scaler": self.scaler.state_dict(),
            }
        )

    def take(self, store: SnapshotStore, step: int, extra=None) -> Snapshot:
        return store.take(step, self.model, self.optimizers, self.schedulers, self.scaler, extra)

    def restore(self, store: SnapshotStore, snap: Snapshot) -> dict:
        return store.restore(snap, self.model, self.optimizers, self.schedulers, self.scaler)


def test_round_trip_is_bit_identical_and_keeps_the_parameter_objects():
    s = Setup()
    s.train(3)
    recorded = s.record()
    assert "momentum_buffer" in recorded["optimizers"][0]["state"][0]
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(recorded["optimizers"][1]["state"][0])
    store = SnapshotStore()
    snap = s.take(store, 3, extra={"clip": {"seen": 3, "ema": torch.tensor([1.5])}})
    params = [id(p) for p in s.model.parameters()]
    s.train(4)  # everything moves on: weights, BN statistics, moments, Adam's step, scheduler epochs, LRs
    assert not identical(s.record()["model"], recorded["model"])
    assert s.record()["lrs"] != recorded["lrs"]

    extra = s.restore(store, snap)
    after = s.record()
    for key in ("model", "optimizers", "schedulers", "lrs", "scaler"):
        assert identical(after[key], recorded[key]), key
    assert [id(p) for p in s.model.parameters()] == params  # restored in place
    assert identical(extra, {"clip": {"seen": 3, "ema": torch.tensor([1.5])}})
    assert after["model"]["1.num_batches_tracked"] == 3


def test_training_after_a_restore_retraces_the_original_run():
    """Restore, train k steps: the same weights as the original run after those k steps (same data)."""
    s = Setup()
    s.train(2)
    store = SnapshotStore()
    snap = s.take(store, 2)
    gen_state = s.gen.get_state()
    s.train(5)
    reference = s.record()
    s.restore(store, snap)
    s.gen.set_state(gen_state)
    s.train(5)
    assert identical(s.record(), reference)


def test_snapshot_is_unaffected_by_later_in_place_updates_and_restores_twice():
    s = Setup()
    s.train(2)
    recorded = s.record()
    store = SnapshotStore()
    snap = s.take(store, 2)
    with torch.no_grad():
        for p in s.model.parameters():
            p.add_(1.0)
    s.train(3)
    s.sgd.state_dict()["state"][0]["momentum_buffer"].mul_(7)  # in place, into the live state
    assert identical(snap.model, recorded["model"])
    assert identical(snap.optimizers, recorded["optimizers"])
    s.restore(store, snap)
    s.train(3)  # in-place optimizer updates after a restore must not reach the snapshot
    s.restore(store, snap)
    assert identical(s.record()["model"], recorded["model"])
    assert identical(s.record()["optimizers"], recorded["optimizers"])
    assert snap.restores == 2


def test_pending_promote_discard_and_the_newest_k_are_kept():
    s = Setup()
    store = SnapshotStore(max_snapshots=2)
    with pytest.raises(ValueError, match="No pending snapshot"):
        store.promote()
    for step in range(4):
        s.take(store, step)
        assert store.pending is not None and store.pending.step == step
        store.promote()
        assert store.pending is None
        s.train(1)
    assert [snap.step for snap in store.good] == [2, 3] and store.newest.step == 3
    s.take(store, 4)
    store.discard()  # the pending one goes, the good ones stay
    assert store.pending is None and [snap.step for snap in store.good] == [2, 3]
    store.discard(store.newest)
    assert [snap.step for snap in store.good] == [2]
    # a new pending snapshot replaces an older pending one
    s.take(store, 5)
    s.take(store, 6)
    assert store.pending.step == 6 and [snap.step for snap in store.good] == [2]


def test_buffers_are_reused_without_touching_kept_snapshots():
    s = Setup()
    store = SnapshotStore(max_snapshots=1)
    s.take(store, 0)
    store.promote()
    kept = s.record()
    s.train(1)
    s.take(store, 1)
    store.discard()  # its buffers become the spare
    s.train(1)
    later = s.record()
    snap = s.take(store, 2)  # written into the spare buffers
    assert identical(snap.model, later["model"]) and identical(store.newest.model, kept["model"])


def test_mismatched_objects_are_refused():
    s = Setup()
    store = SnapshotStore()
    snap = s.take(store, 0)
    with pytest.raises(ValueError, match="holds 2 optimizer"):
        store.restore(snap, s.model, [s.sgd], s.schedulers, s.scaler)


def test_disk_snapshots_are_atomic_and_keep_the_newest_k(tmp_path):
    s = Setup()
    store = SnapshotStore(max_snapshots=2, dirpath=tmp_path)
    records = {}
    for step in (10, 20, 30):
        records[step] = s.record()
        s.take(store, step)
        store.promote()
        s.train(2)
    assert sorted(os.listdir(tmp_path)) == ["snapshot-step0000000020.pt", "snapshot-step0000000030.pt"]
    # a fresh store (a restarted process) finds them and restores bit for bit
    other = Setup(seed=5)
    fresh = SnapshotStore(max_snapshots=2, dirpath=tmp_path)
    assert fresh.reload([10, 20, 30]) == [20, 30]
    assert not fresh.newest.loaded
    other.restore(fresh, fresh.newest)
    assert identical(other.record()["model"], records[30]["model"])
    assert identical(other.record()["optimizers"], records[30]["optimizers"])
    assert identical(other.record()["schedulers"], records[30]["schedulers"])


class _Boom:
    """Copies fine, but cannot be written: torch.save dies after it has created the file."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_crash_while_writing_leaves_the_previous_snapshot_loadable(tmp_path):
    s = Setup()
    store = SnapshotStore(max_snapshots=1, dirpath=tmp_path)
    recorded = s.record()
    s.take(store, 1)
    store.promote()
    s.train(2)
    s.take(store, 2, extra={"boom": _Boom()})
    with pytest.raises(RuntimeError, match="disk full"):
        store.promote()
    # the only good snapshot was not deleted, and no torn file was left under the real name
    assert os.listdir(tmp_path) == ["snapshot-step0000000001.pt"]
    assert [snap.step for snap in store.good] == [1]
    # a process killed mid-write leaves a partial temporary file: it is ignored
    (tmp_path / "snapshot-step0000000002.pt.tmp4242").write_bytes(b"PK\x03\x04 partial")
    assert [os.path.basename(p) for p in store.files()] == ["snapshot-step0000000001.pt"]
    fresh = SnapshotStore(dirpath=tmp_path)
    assert fresh.reload([1, 2]) == [1]
    s.restore(fresh, fresh.newest)
    assert identical(s.record()["model"], recorded["model"])


def test_save_and_load_one_file(tmp_path):
    s = Setup()
    s.train(1)
    snap = s.take(SnapshotStore(), 7)
    path = save_snapshot(snap, tmp_path / "sub" / "one.pt")
    loaded = load_snapshot(path)
    assert loaded.step == 7 and identical(loaded.model, snap.model) and identical(loaded.optimizers, snap.optimizers)
    assert loaded.norm == pytest.approx(snap.norm)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a snapshot"):
        load_snapshot(tmp_path / "other.pt")


def test_state_norm_matches_a_float64_recomputation():
    s = Setup()
    s.train(2)
    state = s.model.state_dict()
    floats = [t.double().flatten() for t in state.values() if t.is_floating_point()]
    expected = torch.linalg.vector_norm(torch.cat(floats)).item()
    assert state_norm(s.model).item() == pytest.approx(expected, rel=1e-6)
    assert state_norm(state).item() == pytest.approx(expected, rel=1e-6)
    state["0.bias"][0] = float("inf")
    assert not math.isfinite(state_norm(s.model).item())


def test_known_good_rules():
    assert check_known_good(10.0, 12.0) is None
    assert check_known_good(10.0, 12.0, incident=True) == "a NaN/Inf incident happened near it"
    assert check_known_good(10.0, 12.0, spike=True) == "the loss spiked near it"
    assert check_known_good(float("inf"), 1.0) == "the weights are not finite"
    assert check_known_good(1.0, float("nan")) == "the weights are not finite"
    # without a reference: at most 2x growth while pending
    assert check_known_good(10.0, 20.0) is None and check_known_good(10.0, 20.5) is not None
    # against the newest good snapshot: 2x per interval, at least one factor
    assert check_known_good(15.0, 19.0, reference_norm=10.0, intervals=1) is None
    assert check_known_good(21.0, 19.0, reference_norm=10.0, intervals=1) is not None
    assert check_known_good(39.0, 39.5, reference_norm=10.0, intervals=2) is None
    assert check_known_good(39.0, 41.0, reference_norm=10.0, intervals=2) is not None
    assert check_known_good(19.0, 19.0, reference_norm=10.0, intervals=0.5) is None
    assert check_known_good(30.0, 30.0, reference_norm=10.0, intervals=1, max_norm_growth=3.0) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_snapshots": 0}, "max_snapshots"),
        ({"max_snapshots": True}, "max_snapshots"),
    ],
)
def test_store_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapshotStore(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_is_copied_asynchronously_into_pinned_memory_and_back():
    s = Setup()
    s.model.cuda()
    opt = torch.optim.Adam(s.model.parameters(), lr=0.01)
    x = torch.randn(8, 4, device="cuda")
    for _ in range(2):
        opt.zero_grad()
        s.model(x).pow(2).mean().backward()
        opt.step()
    recorded = copy.deepcopy({"model": s.model.state_dict(), "opt": opt.state_dict()})
    store = SnapshotStore()
    snap = store.take(2, s.model, [opt])
    for _ in range(3):  # queued right behind the copies: must not reach them
        opt.zero_grad()
        s.model(x).pow(2).mean().backward()
        opt.step()
    snap.wait()
    assert all(t.device.type == "cpu" and t.is_pinned() for t in snap.model.values())
    store.restore(snap, s.model, [opt])
    assert all(t.device.type == "cuda" for t in s.model.state_dict().values())
    assert identical(s.model.state_dict(), recorded["model"]) and identical(opt.state_dict(), recorded["opt"])
