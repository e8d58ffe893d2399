"""The examples do what the README says they do."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import exploding_cnn  # noqa: E402


def test_exploding_cnn_plain_dies_in_the_first_epoch_and_guarded_finishes(tmp_path):
    steps_per_epoch = len(exploding_cnn.make_patches())
    assert steps_per_epoch == 66
    x, _ = exploding_cnn.make_patches().tensors
    assert x.shape[1:] == (1, 28, 28) and x.min() >= 0 and x.max() > 200  # unnormalised 0-255

    plain, _ = exploding_cnn.run(guarded=False, epochs=1, root=str(tmp_path / "plain"))
    first = exploding_cnn.first_nan(plain.losses)
    assert first is not None and first < steps_per_epoch
    assert math.isnan(plain.losses[-1]) and not exploding_cnn.weights_finite(plain)

    guarded, guard = exploding_cnn.run(guarded=True, epochs=20, root=str(tmp_path / "guarded"))
    assert len(guarded.losses) == 20 * steps_per_epoch  # all 20 epochs ran
    assert exploding_cnn.weights_finite(guarded)
    assert guard.incidents and guard.incidents[0].step == first  # the same first failure, now skipped
    assert all(i.action == "skipped" for i in guard.incidents)
    assert all(bool(torch.isfinite(p).all()) for p in guarded.parameters())


def test_readme_hand_written_loop_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- loop -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its hand-written loop example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 14
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    guard, model = namespace["guard"], namespace["model"]
    assert [i.kind for i in guard.incidents] == ["loss"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def last_epoch_mean(losses: list[float], steps_per_epoch: int) -> float:
    last = losses[-steps_per_epoch:]
    return sum(last) / len(last)


@pytest.fixture
def one_thread():
    """These runs balance on the edge of a blow-up: the order of float sums (which the thread count
    decides) changes their trajectories. One thread makes them the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exploding_cnn_with_recommended_reaches_a_loss_near_zero(tmp_path, one_thread):
    """The user's run, recommended() and no other change: 20 epochs, finite weights, last-epoch mean
    loss near zero (chance level is ln 2 = 0.69; the plain run is NaN in its first epoch)."""
    from lightning_nan import recommended

    steps_per_epoch = len(exploding_cnn.make_patches())
    model, guard = exploding_cnn.run(guarded=True, epochs=20, root=str(tmp_path), callbacks=recommended())
    assert len(model.losses) == 20 * steps_per_epoch
    assert exploding_cnn.weights_finite(model)
    assert all(math.isfinite(v) for v in model.losses)
    assert last_epoch_mean(model.losses, steps_per_epoch) < 0.02


def test_exploding_cnn_recovers_when_clipping_is_not_enough(tmp_path, one_thread):
    """Another start of the same run (seed 2) blows up in its first steps, before clipping has a
    history: the steps are skipped, the start is restored, the LR backed off, and the loss still
    ends near zero."""
    from lightning_nan import recommended

    steps_per_epoch = len(exploding_cnn.make_patches())
    callbacks = recommended()
    model, guard = exploding_cnn.run(guarded=True, epochs=20, seed=2, root=str(tmp_path), callbacks=callbacks)
    backoff, rollback = callbacks[3], callbacks[4]
    assert guard is not None and guard.incidents and guard.incidents[0].step < 10
    assert rollback.history and rollback.history[0]["restored_step"] == 0
    assert backoff.factor_now < 1.0
    assert exploding_cnn.weights_finite(model)
    assert all(math.isfinite(v) for v in model.losses[-10 * steps_per_epoch :])
    assert last_epoch_mean(model.losses, steps_per_epoch) < 0.05


def test_exploding_mlp_plain_diverges_and_recommended_converges(tmp_path):
    import exploding_mlp

    slow = exploding_mlp.run(1e-6, steps=300, root=str(tmp_path / "slow"))
    assert all(math.isfinite(v) for v in slow.losses) and slow.losses[-1] < 1e-2 * slow.losses[0]
    fast = exploding_mlp.run(1e-4, steps=10, root=str(tmp_path / "fast"))
    first_nan = next(i for i, v in enumerate(fast.losses) if not math.isfinite(v))
    assert first_nan <= 5 and fast.losses[1] > fast.losses[0]  # climbs, then NaN by step 5
    assert not exploding_mlp.weights_finite(fast)

    from lightning_nan import recommended

    callbacks = recommended()
    model = exploding_mlp.run(1e-4, callbacks, steps=2000, root=str(tmp_path / "recommended"))
    assert exploding_mlp.weights_finite(model) and len(model.losses) == 2000
    assert model.losses[-1] < 1e-2  # from 2.9e7: converged to a small loss
    guard = callbacks[0]
    assert guard.skipped_steps > 0 and guard.incidents[0].step <= 5  # it did diverge first


def test_readme_quickstart_runs_and_prints_what_the_readme_shows(tmp_path, monkeypatch):
    """The README's recommended() quickstart, run as written: sample 10 is named, quarantined and left out."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README lost its quickstart example"
    monkeypatch.chdir(tmp_path)  # the snippet logs to ./lightning_logs
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    guard = next(cb for cb in namespace["trainer"].callbacks if type(cb).__name__ == "NaNGuard")
    assert [(i.step, i.kind, i.cause, i.samples) for i in guard.incidents] == [(7, "loss", "dirty_data", [10])]
    assert "7     0      loss  dirty_data  layer   [10]     skipped" in readme
    from lightning_nan.core import Quarantine

    assert Quarantine(tmp_path / "lightning_logs" / "version_0" / "quarantine.jsonl").indices() == {10}
