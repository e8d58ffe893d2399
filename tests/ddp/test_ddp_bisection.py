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
    planted = sorted(r0["culprits"])

    # every planted index, and nothing else, is in the quarantine file rank zero wrote
    assert sorted(Quarantine(run.outdir / "quarantine.jsonl").indices()) == planted
    # the ranks agree on every incident; each names the culprits of one step, found on the rank that had them
    assert r0["incidents"] == [dict(i, time=r0["incidents"][n]["time"]) for n, i in enumerate(r1["incidents"])]
    assert sorted(i for inc in r0["incidents"] for i in inc["samples"]) == planted
    for inc in r0["incidents"]:
        owners = {rank for rank, res in ((0, r0), (1, r1)) for i in inc["samples"] if i in res["indices"][0]}
        assert set(inc["ranks"]) == owners
    assert r0["quarantined"] == r1["quarantined"] == planted

    # the next epoch leaves them out on both ranks and trains without a non-finite loss
    for res in (r0, r1):
        assert not set(res["indices"][1]) & set(planted)
        assert all(math.isfinite(v) for v in res["losses"][1])
    assert len(r0["indices"][1]) == len(r1["indices"][1]) == len(r0["indices"][0])  # same number of steps
    # identical weights on both ranks (BatchNorm running stats are per rank in DDP: finite, not compared)
    for name, value in r0["state_dict"].items():
        if "running" in name or "num_batches" in name:
            assert torch.isfinite(value.float()).all() and torch.isfinite(r1["state_dict"][name].float()).all()
        else:
            assert torch.equal(value, r1["state_dict"][name]), name
