"""Real two-process DDP runs (gloo, CPU): a fault on rank 1 alone skips the same step on every rank.

Each run starts ``ddp_guard_script.py`` (which Lightning's ``ddp`` strategy re-launches for rank 1)
and reads the per-rank result files it writes. A run takes ~10 s, so each (namespace, scenario) runs
once per session and its result is shared by the tests below.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ddp_guard_script as script

SCRIPT = Path(script.__file__).resolve()
TIMEOUT = 180
FAULT = script.FAULT_BATCH
STEPS_PER_RANK = script.N_SAMPLES // (2 * script.BATCH_SIZE)
# Incident fields every rank must agree on (``time``, ``params`` and ``detail`` are local facts).
AGREED_FIELDS = ("step", "kind", "cause", "epoch", "batch_idx", "ranks", "action", "advice")

_RUNS: dict[tuple[str, str, bool], SimpleNamespace] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _run(tmp_path_factory, namespace: str, scenario: str, reraise: bool = False) -> SimpleNamespace:
    """Run the script once per (namespace, scenario, reraise); kill its whole process group on a hang."""
    key = (namespace, scenario, reraise)
    if key not in _RUNS:
        name = f"ddp_{namespace}_{scenario}{'_reraise' if reraise else ''}"
        _RUNS[key] = launch(tmp_path_factory, SCRIPT, name, [namespace, "{outdir}", scenario] + (["--reraise"] if reraise else []))
    return _RUNS[key]


def launch(tmp_path_factory, script: Path, name: str, args: list[str]) -> SimpleNamespace:
    """Run a two-rank DDP ``script`` (``"{outdir}"`` in ``args`` becomes its output folder) and read back
    ``rank{r}.pt`` of each rank; kill the whole process group on a hang, and note ranks left alive."""
    outdir = tmp_path_factory.mktemp(name)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(script)] + [a.replace("{outdir}", str(outdir)) for a in args]
    start = time.monotonic()
    # A new session, so that rank 1 (started by rank 0) shares a process group we can kill as a whole.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    hung = False
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    # Every rank process must end too, not only rank 0 (the one we started).
    pids = {int(p.name[3:]): int(p.read_text()) for p in outdir.glob("pid*")}
    deadline = time.monotonic() + max(10.0, TIMEOUT - (time.monotonic() - start))
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_alive = sorted(rank for rank, pid in pids.items() if _alive(pid))
    if left_alive:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ranks = {}
    for rank in (0, 1):
        path = outdir / f"rank{rank}.pt"
        if path.exists():
            ranks[rank] = torch.load(path, weights_only=False)
    run = SimpleNamespace(
        returncode=proc.returncode,
        hung=hung,
        left_alive=left_alive,
        pids=pids,
        seconds=time.monotonic() - start,
        output=output,
        ranks=ranks,
        outdir=outdir,
    )
    return run


def _tail(run: SimpleNamespace, n: int = 4000) -> str:
    return run.output[-n:]


def _ok(run: SimpleNamespace) -> None:
    """The run ended by itself with code 0 and both ranks wrote their results."""
    assert not run.hung, f"the DDP run hung (killed after {TIMEOUT} s):\n{_tail(run)}"
    assert not run.left_alive, f"rank(s) {run.left_alive} still running after rank 0 exited:\n{_tail(run)}"
    assert run.returncode == 0, f"exit code {run.returncode}:\n{_tail(run)}"
    assert sorted(run.ranks) == [0, 1], f"result files missing (got ranks {sorted(run.ranks)}):\n{_tail(run)}"
    for rank, res in run.ranks.items():
        assert res["rank"] == rank and res["world_size"] == 2


def _agreed(incident: dict) -> dict:
    return {k: incident[k] for k in AGREED_FIELDS} | {"consecutive_skips": incident["detail"]["consecutive_skips"]}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_single_skip(run: SimpleNamespace, kind: str) -> None:
    """One incident of ``kind`` at step FAULT on both ranks; that step alone left the weights as they were."""
    _ok(run)
    r0, r1 = run.ranks[0], run.ranks[1]
    # The same decision on both ranks.
    assert [_agreed(i) for i in r0["incidents"]] == [_agreed(i) for i in r1["incidents"]]
    for res in (r0, r1):
        assert [(i["step"], i["kind"], i["action"], i["batch_idx"]) for i in res["incidents"]] == [(FAULT, kind, "skipped", [FAULT])]
        assert res["skipped_steps"] == 1
        assert not res["raised"]
        assert res["batch_idx_seen"] == list(range(STEPS_PER_RANK))
        assert res["global_step"] == STEPS_PER_RANK  # the skipped step still counts, as GradScaler's skips do
        snaps = res["snapshots"]
        before = [res["initial"]] + [snaps[i] for i in range(STEPS_PER_RANK - 1)]
        changed = [not _equal(b, snaps[i]) for i, b in enumerate(before)]
        # The faulty step changed nothing; the steps around it (all others, in fact) did.
        assert changed == [i != FAULT for i in range(STEPS_PER_RANK)], changed
        for snap in [res["initial"], *snaps.values(), res["state_dict"]]:
            assert all(bool(torch.isfinite(t).all()) for t in snap.values())
        assert _equal(res["state_dict"], snaps[STEPS_PER_RANK - 1])
    # The ranks never diverged: bit-identical weights after every batch and at the end.
    assert _equal(r0["initial"], r1["initial"])
    for i in range(STEPS_PER_RANK):
        assert _equal(r0["snapshots"][i], r1["snapshots"][i]), f"ranks differ after batch {i}"
    assert _equal(r0["state_dict"], r1["state_dict"])


def _replay(run: SimpleNamespace, skip: int | None, zero_grad_instead: bool = False) -> dict:
    """Single-process replay of the DDP run from the batches each rank saw; step ``skip`` is skipped.

    Each step applies the mean of both ranks' gradients (what DDP's all-reduce gives); with
    ``zero_grad_instead`` the skipped step gets zero gradients instead of none (momentum still moves).
    """
    net = torch.nn.Module()
    net.net = script.make_net()
    net.load_state_dict(run.ranks[0]["initial"])
    opt = script.make_optimizer(net.parameters())
    for i in range(STEPS_PER_RANK):
        grads = []
        for r in (0, 1):
            net.zero_grad(set_to_none=True)
            x, y = run.ranks[r]["batches"][i]
            torch.nn.functional.mse_loss(net.net(x), y).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        if i == skip:
            for p in net.parameters():
                p.grad = torch.zeros_like(p) if zero_grad_instead else None
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------- tests
def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path_factory):
    """(Under ``pytorch_lightning``; the rollback test runs the guard under DDP in ``lightning.pytorch``.)"""
    run = _run(tmp_path_factory, "pytorch_lightning", "loss")
    _check_single_skip(run, "loss")
    # Only rank 1 saw the non-finite loss itself.
    assert run.ranks[1]["incidents"][0]["detail"]["loss_batches"] == [FAULT]
    # Rank 0 wrote the incidents file.
    assert (run.outdir / "nan_incidents.jsonl").read_text().count("\n") == 1


def test_skip_under_ddp_leaves_momentum_untouched(tmp_path_factory):
    """The final weights match a replay in which step FAULT never happened (momentum buffer included)."""
    run = _run(tmp_path_factory, "pytorch_lightning", "loss")
    _ok(run)
    # The distributed sampler gave the ranks disjoint batches covering the data set once.
    x, _ = script.make_data()
    seen = torch.cat([b[0] for res in run.ranks.values() for b in res["batches"].values()])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, x.tolist()))
    res = run.ranks[0]
    expected = _replay(run, skip=FAULT)
    for k in expected:
        torch.testing.assert_close(res["state_dict"][k], expected[k], rtol=1e-5, atol=1e-6)
    # The replay can tell: a step with zero gradients would still move the weights through momentum.
    wrong = _replay(run, skip=FAULT, zero_grad_instead=True)
    assert any(not torch.allclose(res["state_dict"][k], wrong[k], rtol=1e-5, atol=1e-6) for k in wrong)


def test_inf_grad_on_one_rank_after_allreduce_skips_the_step_on_every_rank(tmp_path_factory):
    """The inf is written in ``on_after_backward``, after DDP's all-reduce: rank 1 alone sees it."""
    run = _run(tmp_path_factory, "pytorch_lightning", "grad")
    _check_single_skip(run, "grad")
    for res in run.ranks.values():
        assert res["incidents"][0]["ranks"] == [1]
    assert run.ranks[1]["incidents"][0]["params"] == ["net.0.weight"]


def test_inf_grad_before_allreduce_skips_the_step_on_every_rank(tmp_path_factory):
    """The inf is written by a gradient hook on rank 1, before DDP's all-reduce: it reaches both ranks."""
    run = _run(tmp_path_factory, "pytorch_lightning", "grad_hook")
    _check_single_skip(run, "grad")
    for res in run.ranks.values():
        assert res["incidents"][0]["params"] == ["net.0.weight"]
        assert res["incidents"][0]["ranks"] == [0, 1]


def test_escalation_ends_both_ranks_without_a_hang(tmp_path_factory):
    run = _run(tmp_path_factory, "pytorch_lightning", "escalate")
    _ok(run)
    first, last = script.ESCALATE_FROM, script.ESCALATE_FROM + script.ESCALATE_MAX_CONSECUTIVE - 1
    r0, r1 = run.ranks[0], run.ranks[1]
    assert [_agreed(i) for i in r0["incidents"]] == [_agreed(i) for i in r1["incidents"]]
    for res in (r0, r1):
        assert res["raised"] and res["error_type"] == "NonFiniteError"
        assert f"at step {last}" in res["error_message"]
        assert f"max_consecutive={script.ESCALATE_MAX_CONSECUTIVE}" in res["error_message"]
        assert [(i["step"], i["kind"], i["action"]) for i in res["incidents"]] == [
            (s, "loss", "raised" if s == last else "skipped") for s in range(first, last + 1)
        ]
        assert res["skipped_steps"] == script.ESCALATE_MAX_CONSECUTIVE
        assert res["batch_idx_seen"] == list(range(last))  # the escalating batch never ended
        assert _equal(res["snapshots"][first - 1], res["state_dict"])  # no step after the first fault
        assert all(bool(torch.isfinite(t).all()) for t in res["state_dict"].values())
    assert _equal(r0["state_dict"], r1["state_dict"])


def test_escalation_reraised_ends_both_ranks_without_a_hang(tmp_path_factory):
    """What a user's script does: NonFiniteError propagates out of ``fit`` on both ranks."""
    run = _run(tmp_path_factory, "pytorch_lightning", "escalate", reraise=True)
    assert not run.hung, f"the DDP run hung (killed after {TIMEOUT} s):\n{_tail(run)}"
    assert sorted(run.pids) == [0, 1], _tail(run)
    assert not run.left_alive, f"rank(s) {run.left_alive} still running:\n{_tail(run)}"
    assert run.returncode != 0
    assert "NonFiniteError" in run.output
    last = script.ESCALATE_FROM + script.ESCALATE_MAX_CONSECUTIVE - 1
    assert run.ranks, f"no rank wrote its result:\n{_tail(run)}"
    # Lightning may SIGKILL a rank once the other exits with an error: check every rank that got to write.
    for res in run.ranks.values():
        assert res["raised"] and f"at step {last}" in res["error_message"]


# ------------------------------------------------------------- what rank zero records
def test_nan_loss_incident_names_only_the_faulty_rank(tmp_path_factory):
    run = _run(tmp_path_factory, "pytorch_lightning", "loss")
    _ok(run)
    for res in run.ranks.values():
        assert res["incidents"][0]["ranks"] == [1]


@pytest.mark.parametrize("scenario", ["loss", "grad"])
def test_incident_is_the_same_on_every_rank(tmp_path_factory, scenario):
    """Every rank (so rank zero, which writes the file) records what the faulty rank saw."""
    run = _run(tmp_path_factory, "pytorch_lightning", scenario)
    _ok(run)
    strip = lambda i: {k: v for k, v in i.items() if k != "time"}  # noqa: E731
    assert [strip(i) for i in run.ranks[0]["incidents"]] == [strip(i) for i in run.ranks[1]["incidents"]]


def test_clipping_and_monitor_beside_the_guard_keep_ranks_identical(tmp_path_factory):
    """ZClip runs after the guard's agreed skip, on all-reduced gradients: every rank clips alike."""
    run = _run(tmp_path_factory, "pytorch_lightning", "clip")
    _check_single_skip(run, "loss")
    r0, r1 = run.ranks[0], run.ranks[1]
    assert r0["clip_state"] == r1["clip_state"] and r0["clip_last"] == r1["clip_last"]
    assert r0["clip_state"]["rule"]["seen"] == STEPS_PER_RANK - 1  # the skipped step stayed out of the statistics
    assert r0["clip_last"]["coef"] < 1.0  # it did clip


def test_norm_clipping_beside_the_guard_matches_lightnings_gradient_clip_val(tmp_path_factory):
    """Beside the guard, GradientClipping("norm") skips multiplying by exactly 1 on the steps whose agreed
    norm is under max_norm, and clips the others: every rank's weights stay bit for bit those of
    ``gradient_clip_val`` (with the guard too) after every step."""
    ours, theirs = _run(tmp_path_factory, "pytorch_lightning", "norm_ours"), _run(tmp_path_factory, "pytorch_lightning", "norm_lightning")
    _ok(ours)
    _ok(theirs)
    for rank in (0, 1):
        a, b = ours.ranks[rank], theirs.ranks[rank]
        assert a["snapshots"].keys() == b["snapshots"].keys() and len(a["snapshots"]) == STEPS_PER_RANK
        for i in a["snapshots"]:
            assert all(torch.equal(a["snapshots"][i][k], b["snapshots"][i][k]) for k in a["snapshots"][i])
    coefs = ours.ranks[0]["clip_coefs"]
    assert coefs == ours.ranks[1]["clip_coefs"] and len(coefs) == STEPS_PER_RANK
    clipped = sum(c < 1.0 for c in coefs)
    assert 0 < clipped < STEPS_PER_RANK  # both kinds of step happened
    assert clipped <= ours.ranks[0]["scale_calls"] < STEPS_PER_RANK  # and a multiplication by 1 was skipped


def test_epoch_metrics_with_sync_dist_are_those_of_the_run_without_the_step(tmp_path_factory):
    """A NaN loss on rank 1 at one step: the epoch's mean, max and sum over both ranks (sync_dist=True) are bit
    for bit those of a DDP run whose loader never held that step's batches on either rank, and so are the weights."""
    ours, theirs = _run(tmp_path_factory, "pytorch_lightning", "metrics"), _run(tmp_path_factory, "pytorch_lightning", "metrics_ref")
    _ok(ours)
    _ok(theirs)
    for rank in (0, 1):
        a, b = ours.ranks[rank], theirs.ranks[rank]
        assert [i["step"] for i in a["incidents"]] == [FAULT] and b["incidents"] == []
        epoch = {k: v for k, v in a["epoch_metrics"].items() if not k.endswith("_step")}
        reference = {k: v for k, v in b["epoch_metrics"].items() if not k.endswith("_step")}
        assert {"loss_max", "loss_sum", "train_loss"} <= epoch.keys()
        assert epoch.keys() == reference.keys() and all(torch.equal(epoch[k], reference[k]) for k in epoch), (epoch, reference)
        assert _equal(a["state_dict"], b["state_dict"])
