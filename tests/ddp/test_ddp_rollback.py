"""Real two-process DDP run (gloo, CPU): a NaN weight on rank 1 alone rolls both ranks back together.

Starts ``ddp_rollback_script.py`` (Lightning's ``ddp`` strategy re-launches it for rank 1) the way
``test_ddp_guard.py`` starts its script (with its ``launch``), and reads the per-rank
result files. One run per namespace per session, shared by the tests below.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from test_ddp_guard import TIMEOUT, _tail, launch

import ddp_rollback_script as script

SCRIPT = Path(script.__file__).resolve()
STEPS = script.MAX_EPOCHS * 8  # 32 samples, batches of 2, 2 ranks: 8 steps per epoch

_RUNS: dict[str, SimpleNamespace] = {}


def _run(tmp_path_factory, namespace: str) -> SimpleNamespace:
    """Run the script once per namespace (``launch`` kills its whole process group on a hang)."""
    if namespace not in _RUNS:
        _RUNS[namespace] = launch(tmp_path_factory, SCRIPT, f"ddp_rollback_{namespace}", [namespace, "{outdir}"])
    return _RUNS[namespace]


def _ok(run: SimpleNamespace) -> None:
    tail = _tail(run)
    assert not run.hung, f"the DDP run hung (killed after {TIMEOUT} s):\n{tail}"
    assert not run.left_alive, f"rank(s) {run.left_alive} still running after rank 0 exited:\n{tail}"
    assert run.returncode == 0, f"exit code {run.returncode}:\n{tail}"
    assert sorted(run.ranks) == [0, 1], f"result files missing:\n{tail}"
    for rank, res in run.ranks.items():
        assert res["rank"] == rank and res["world_size"] == 2 and res["error"] is None, res["error"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_weight_on_one_rank_rolls_every_rank_back_to_the_same_snapshot(tmp_path_factory):
    """(Under ``lightning.pytorch``, NaNGuard included; the guard's own DDP tests run under ``pytorch_lightning``.)"""
    run = _run(tmp_path_factory, "lightning")
    _ok(run)
    r0, r1 = run.ranks[0], run.ranks[1]
    bad, restored = script.CORRUPT_AT, script.EXPECTED_RESTORE
    for res in (r0, r1):
        assert res["history"] == [{"step": bad, "restored_step": restored, "reason": "non-finite weights"}]
        assert [(i["step"], i["kind"], i["action"], i["ranks"]) for i in res["incidents"]] == [
            (bad, "param", "recovered by CheckpointRollback", [1])
        ]
        assert res["global_step"] == STEPS
        # right after the rollback each rank holds exactly the weights of the snapshot step
        assert _equal(res["states"][bad + 1], res["states"][restored])
        assert not _equal(res["states"][bad + 2], res["states"][bad + 1])  # and training went on
        assert all(bool(torch.isfinite(t).all()) for t in res["final"].values())
    # the ranks never diverged: identical weights after every step and at the end
    assert sorted(r0["states"]) == sorted(r1["states"]) == list(range(STEPS + 1))
    for step in r0["states"]:  # (rank 1 recorded step `bad` before planting its NaN)
        assert _equal(r0["states"][step], r1["states"][step]), f"ranks differ after step {step}"
    assert _equal(r0["final"], r1["final"])
    assert r0["good"] == r1["good"] and r0["rejected"] == r1["rejected"]
