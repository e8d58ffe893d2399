"""FSDP2 in two real processes (gloo, CPU): ``fully_shard`` parameters under ``ModelParallelStrategy``.

Each rank holds a part of every parameter (rank 1's part of the last layer is empty). The clipper
must clip by the norm of the whole gradients, as Lightning's own ``gradient_clip_val`` does; the
monitor must log the norms of the whole tensors; the guard must skip a step on every rank; AGC,
whose units are split, and in-memory rollback snapshots are refused (rollback from distributed
checkpoints works); batch bisection stands down. One run per (namespace, scenario), shared by the tests.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fsdp_script as script
from test_ddp_guard import _ok, launch

STEPS = script.N_SAMPLES // (2 * script.BATCH_SIZE)
_RUNS: dict[tuple[str, str], SimpleNamespace] = {}


def _run(tmp_path_factory, scenario: str, namespace: str = "pytorch_lightning") -> SimpleNamespace:
    key = (namespace, scenario)
    if key not in _RUNS:
        _RUNS[key] = launch(tmp_path_factory, script.__file__, f"fsdp_{namespace}_{scenario}", [namespace, "{outdir}", scenario])
    return _RUNS[key]


def _scalars(run: SimpleNamespace) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run.outdir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def test_the_parameters_are_sharded(tmp_path_factory):
    run = _run(tmp_path_factory, "ours")
    _ok(run)
    shapes = {rank: run.ranks[rank]["local_shapes"] for rank in (0, 1)}
    assert shapes[0]["net.0.weight"] == (3, 5) and shapes[1]["net.0.weight"] == (3, 5)
    assert shapes[0]["net.2.weight"] == (1, 6) and shapes[1]["net.2.weight"] == (0, 6)


def test_norm_clipping_matches_lightnings_gradient_clip_val(tmp_path_factory):
    ours, lightning = _run(tmp_path_factory, "ours"), _run(tmp_path_factory, "lightning")
    _ok(ours)
    _ok(lightning)
    for rank in (0, 1):
        a, b = ours.ranks[rank], lightning.ranks[rank]
        assert a["global_step"] == b["global_step"] == STEPS
        for step in range(STEPS):
            # The whole gradients were above the cap: every step clipped.
            total = math.sqrt(sum(v * v for v in a["grad_norms"][step].values()))
            assert total > 2 * script.MAX_NORM
            for name in a["after"][step]:
                assert torch.equal(a["after"][step][name], b["after"][step][name]), (rank, step, name)
    assert ours.ranks[0]["incidents"] == []  # no step was skipped: all six were clipped and taken


def test_clipper_logs_the_norm_of_the_whole_gradients(tmp_path_factory):
    run = _run(tmp_path_factory, "ours")
    _ok(run)
    logged = _scalars(run)
    grads = run.ranks[0]["grad_norms"]
    for step in range(STEPS):
        total = math.sqrt(sum(v * v for v in grads[step].values()))
        assert _close(logged["grad_clip/total_norm"][step], total), step
        assert _close(logged["grad_clip/coef"][step], script.MAX_NORM / (total + 1e-6)), step


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning"])
def test_monitor_logs_the_norms_of_the_whole_tensors(tmp_path_factory, namespace):
    run = _run(tmp_path_factory, "ours", namespace)
    _ok(run)
    logged = _scalars(run)
    res = run.ranks[0]
    names = list(res["after"][0])
    assert {f"norms/{q}/{n}" for q in ("weight", "grad", "update_ratio") for n in names} <= set(logged)
    for step in range(STEPS):
        for name in names:
            after, before = res["after"][step][name], res["before"][step][name]
            weight = float(torch.linalg.vector_norm(after))
            assert _close(logged[f"norms/weight/{name}"][step], weight), (step, name)
            assert _close(logged[f"norms/grad/{name}"][step], res["grad_norms"][step][name]), (step, name)
            ratio = float(torch.linalg.vector_norm(after - before)) / (weight + 1e-12)
            assert _close(logged[f"norms/update_ratio/{name}"][step], ratio), (step, name)


def test_monitor_histograms_are_of_the_whole_tensors(tmp_path_factory):
    run = _run(tmp_path_factory, "ours")
    _ok(run)
    acc = EventAccumulator(str(run.outdir / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    res = run.ranks[0]
    for name in ("net.0.weight", "net.2.weight", "net.2.bias"):  # net.2's part on rank 1 is empty
        logged = {e.step: e.histogram_value for e in acc.Histograms(f"weights/{name}")}
        assert sorted(logged) == list(range(STEPS))
        for step, hist in logged.items():
            whole = res["after"][step][name]
            assert hist.num == whole.numel()
            assert _close(hist.sum, float(whole.sum())) and _close(hist.max, float(whole.max()))
        assert len(acc.Histograms(f"grads/{name}")) == STEPS


def test_guard_skips_the_step_on_every_rank(tmp_path_factory):
    run = _run(tmp_path_factory, "fault")
    _ok(run)
    for rank in (0, 1):
        res = run.ranks[rank]
        assert [(i["step"], i["kind"], i["action"], i["ranks"]) for i in res["incidents"]] == [(script.FAULT_BATCH, "loss", "skipped", [1])]
        assert res["skipped_steps"] == 1
        for step in range(STEPS):
            before, after = res["before"][step], res["after"][step]
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            assert unchanged == (step == script.FAULT_BATCH), step
            assert all(bool(torch.isfinite(t).all()) for t in after.values())
    # The monitor logged the skipped step's gradients as they were (non-finite), and finite norms after it.
    logged = _scalars(run)
    assert not math.isfinite(logged["norms/grad/net.0.weight"][script.FAULT_BATCH])
    assert math.isfinite(logged["norms/grad/net.0.weight"][script.FAULT_BATCH + 1])


def test_agc_is_refused_with_sharded_parameters(tmp_path_factory):
    run = _run(tmp_path_factory, "agc")
    _ok(run)
    for rank in (0, 1):
        error = run.ranks[rank]["error"]
        assert error is not None and "GradientClipping('agc')" in error and "ModelParallelStrategy" in error
        assert run.ranks[rank]["global_step"] == 0


def test_norms_over_ranks_count_each_part_once(tmp_path_factory):
    """A sharded, a replicated and a plain tensor (the same values): each norm over ranks is the whole one."""
    run = _run(tmp_path_factory, "ours")
    _ok(run)
    for rank in (0, 1):
        checks = run.ranks[rank]["sharding"]
        whole = checks["whole"]
        assert checks["copies"] == [1, 2, 2]
        assert not _close(checks["local"][0], whole)  # this rank's rows only
        assert [_close(v, whole) for v in checks["local"][1:]] == [True, True]
        assert all(_close(v, whole) for v in checks["over_ranks"]), checks
        assert _close(checks["total_of_shards"], whole)
        assert "Partial" in checks["partial_error"]
        # The inf-norm of a tensor whose part on rank 1 is empty (torch refuses the max of nothing).
        assert checks["row_local_shape"] == ((1, 3) if rank == 0 else (0, 3))
        assert checks["row_inf"] == [2.0]
        # A tensor on a one-rank slice of the world's mesh: the other rank holds a copy of it.
        assert checks["sliced_copies"] == [2] and _close(checks["sliced"][0], whole)


def test_bisection_stands_down_on_every_rank_without_a_hang(tmp_path_factory):
    """Re-running sub-batches on one rank would wait forever for the others' parameter shards."""
    run = _run(tmp_path_factory, "bisection")
    _ok(run)
    for rank in (0, 1):
        (incident,) = run.ranks[rank]["incidents"]
        assert (incident["step"], incident["kind"], incident["action"]) == (script.FAULT_BATCH, "loss", "skipped")
        errors = incident["bisection"]["errors"]
        assert [e.split(":")[0] for e in errors] == ["rank 0", "rank 1"]
        assert all("ModelParallelStrategy shards the parameters" in e for e in errors)
        assert run.ranks[rank]["global_step"] == STEPS


def test_in_memory_rollback_is_refused(tmp_path_factory):
    run = _run(tmp_path_factory, "rollback")
    _ok(run)
    for rank in (0, 1):
        error = run.ranks[rank]["error"]
        assert error is not None and "CheckpointRollback(source='memory')" in error and "ModelParallelStrategy" in error


@pytest.mark.parametrize("scenario, folders", [("rollback_checkpoint", True), ("rollback_checkpoint_file", False)])
def test_rollback_from_a_checkpoint_restores_every_ranks_part(tmp_path_factory, scenario, folders):
    """CheckpointRollback(source="checkpoint") under FSDP2: ModelCheckpoint saves folders of shards (or, with
    save_distributed_checkpoint=False, files of full states), which the strategy loads in place. Rank 1's
    NaN weight escalates; the newest save is bad, so every rank goes back to the one before (its weights
    bit for bit), the optimizer's learning rate agrees with the restored scheduler again, and LRBackoff
    halves it."""
    run = _run(tmp_path_factory, scenario)
    _ok(run)
    saves = list((run.outdir / "ckpt").iterdir())
    assert saves and all(save.is_dir() == folders for save in saves)
    fault = script.FAULT_BATCH
    for rank in (0, 1):
        r = run.ranks[rank]
        assert r["error"] is None and r["global_step"] == STEPS
        assert [(i["kind"], i["action"]) for i in r["incidents"]] == [("param", "recovered by CheckpointRollback")]
        assert [(h["step"], h["restored_step"]) for h in r["rollbacks"]] == [(fault, fault - 1)]  # not the bad save
        for name, weight in r["after"][fault].items():  # the save of step fault - 1
            assert torch.equal(weight, r["before"][fault - 1][name]), (rank, name)
        assert all(bool(torch.isfinite(w).all()) for w in r["after"][STEPS - 1].values())
        assert all(opt_lr == sched_lr for opt_lr, sched_lr in r["lrs"]), r["lrs"]
        assert r["lrs"][fault + 1][1] == r["lrs"][fault - 1][1]  # the schedule is back where the save left it
        assert r["lr_factors"][fault - 1] == 1.0 and r["lr_factors"][fault] == 0.5
