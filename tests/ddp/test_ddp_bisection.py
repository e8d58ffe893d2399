"""BatchBisection under real two-process DDP (gloo, CPU): the culprit's rank finds it, every rank agrees, no hang."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from test_ddp_guard import _tail, launch

import ddp_bisection_script as script
from lightning_nan.core.quarantine import Quarantine

SCRIPT = Path(script.__file__).resolve()


def test_dirty_images_under_ddp(tmp_path_factory):
    run = launch(tmp_path_factory, SCRIPT, "ddp_bisection", ["{outdir}"])
    assert not run.hung and not run.left_alive, _tail(run)
    assert run.returncode == 0, _tail(run)
    r0, r1 = run.ranks[0], run.ranks[1]
    planted = sorted(i for i, kind in r0["culprits"].items() if kind != "zero")  # NaN, Inf, 1e38: dirty
    zero = [i for i, kind in r0["culprits"].items() if kind == "zero"]  # ordinary data the model's 0/0 trips on

    # every dirty index, and nothing else, is in the quarantine file rank zero wrote
    assert sorted(Quarantine(run.outdir / "quarantine.jsonl").indices()) == planted
    # the ranks agree on every incident; each names the culprits of one step, found on the rank that had them
    assert r0["incidents"] == [dict(i, time=r0["incidents"][n]["time"]) for n, i in enumerate(r1["incidents"])]
    assert sorted(i for inc in r0["incidents"] for i in inc["samples"] or []) == planted
    for inc in r0["incidents"]:
        named = (inc["samples"] or []) + (inc["triggers"] or [])
        owners = {rank for rank, res in ((0, r0), (1, r1)) for i in named if i in res["indices"][0]}
        assert set(inc["ranks"]) == owners
    # the all-zero image is named as the trigger of an unsafe operation, and stays in the data set
    assert {i for inc in r0["incidents"] for i in inc["triggers"] or []} == set(zero)
    # (its cause is unsafe_op, unless the same step also had a dirty sample, on the other rank, say)
    assert all(inc["cause"] == "unsafe_op" or inc["samples"] for inc in r0["incidents"] if inc["triggers"])
    assert r0["quarantined"] == r1["quarantined"] == planted

    # the next epoch leaves the dirty samples out on both ranks; only the batch holding the zero image fails
    size = script.BATCH_SIZE
    for res in (r0, r1):
        assert not set(res["indices"][1]) & set(planted)
        batches = [res["indices"][1][k : k + size] for k in range(0, len(res["indices"][1]), size)]
        for batch, loss in zip(batches, res["losses"][1]):
            assert math.isfinite(loss) or set(batch) & set(zero)
    assert len(r0["indices"][1]) == len(r1["indices"][1]) == len(r0["indices"][0])  # same number of steps
    # identical weights on both ranks (BatchNorm running stats are per rank in DDP: finite, not compared)
    for name, value in r0["state_dict"].items():
        if "running" in name or "num_batches" in name:
            assert torch.isfinite(value.float()).all() and torch.isfinite(r1["state_dict"][name].float()).all()
        else:
            assert torch.equal(value, r1["state_dict"][name]), name
