"""preserved() undoes every side effect of a re-evaluation; evaluate() flags non-finite losses and gradients.

The DDP tests use real ``DistributedDataParallel`` on gloo: one process with world size 1, and two
processes (this file run as a script, one per rank) in which rank 1 alone re-evaluates with
``backward=True`` and both ranks then meet at a barrier and take a real DDP step together.
"""

from __future__ import annotations

import gc

import os
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nan.core.reevaluate import all_finite, as_loss, evaluate, loss_is_finite, preserved


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (tells NaN payloads and -0.0 from 0.0 apart), independent of the code under test."""
    return a.dtype == b.dtype and a.shape == b.shape and a.detach().numpy().tobytes() == b.detach().numpy().tobytes()


class Counter(nn.Module):
    """A module that rebinds a buffer attribute and registers a new buffer in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("signed", torch.tensor([-0.0, float("nan"), 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1  # a new tensor object
        self.signed.copy_(torch.tensor([0.0, 2.0, 3.0]))  # in place, flips the sign bit of -0.0
        self.register_buffer("extra", torch.ones(1))
        return x


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.5), Counter(), nn.Linear(4, 1))
    model(torch.randn(8, 3))  # non-default running stats
    model[3].calls.zero_()
    model[3].signed.copy_(torch.tensor([-0.0, float("nan"), 1.0]))
    del model[3]._buffers["extra"]
    return model


def _buffer_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (buf, buf.detach().clone()) for name, buf in model.named_buffers()}


def _assert_buffers_restored(model: nn.Module, snap: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    now = dict(model.named_buffers())
    assert now.keys() == snap.keys()
    for name, (obj, value) in snap.items():
        assert now[name] is obj, name
        assert _bits_equal(now[name], value), name


# ---------------------------------------------------------------------------------------------- preserved
def test_preserved_restores_buffers_bit_for_bit():
    model = _model()
    bn, counter = model[1], model[3]
    snap = _buffer_snapshot(model)
    assert int(bn.num_batches_tracked) == 1
    with preserved(model):
        model(torch.randn(8, 3) * 5 + 2)
        model(torch.randn(8, 3))
        # The forward did change them (so the test can fail).
        assert int(bn.num_batches_tracked) == 3
        assert not torch.equal(bn.running_mean, snap["1.running_mean"][1])
        assert not torch.equal(bn.running_var, snap["1.running_var"][1])
        assert counter.calls is not snap["3.calls"][0] and int(counter.calls) == 2
        assert "3.extra" in dict(model.named_buffers())
        assert not torch.signbit(counter.signed[0])
    _assert_buffers_restored(model, snap)
    assert torch.signbit(counter.signed[0]) and torch.isnan(counter.signed[1])
    assert int(bn.num_batches_tracked) == 1 and int(counter.calls) == 0


def test_preserved_restores_grads_objects_and_values():
    model = nn.Linear(3, 2)
    extra = torch.zeros(2, requires_grad=True)  # not a parameter of model: passed explicitly
    model.bias.grad = torch.full((2,), 7.0)
    bias_grad = model.bias.grad
    assert model.weight.grad is None
    with preserved(model):
        model(torch.ones(1, 3)).sum().backward()  # creates weight.grad, adds into bias.grad in place
        assert model.weight.grad is not None
        assert torch.equal(bias_grad, torch.full((2,), 8.0))
    assert model.weight.grad is None
    assert model.bias.grad is bias_grad and torch.equal(bias_grad, torch.full((2,), 7.0))

    with preserved(model):
        model.bias.grad = None
        model.weight.grad = torch.ones(2, 3)
    assert model.bias.grad is bias_grad and model.weight.grad is None

    extra.grad = torch.ones(2)
    extra_grad = extra.grad
    with preserved(model, params=[extra]):
        (extra * 3).sum().backward()
        extra.grad = torch.zeros(2)
    assert extra.grad is extra_grad and torch.equal(extra.grad, torch.ones(2))


def _draws() -> tuple[torch.Tensor, float, float]:
    mask = nn.functional.dropout(torch.ones(64), p=0.5, training=True) != 0
    return mask, random.random(), float(np.random.rand())


def _seed() -> None:
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)


def test_preserved_restores_rng_states():
    _seed()
    expected = _draws()
    _seed()
    model = _model()  # reseeds torch itself: seed again after building
    _seed()
    with preserved(model):
        model(torch.randn(8, 3))  # dropout draws
        inside = _draws()
    after = _draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    # The draws tell states apart: the next ones differ (so a missed restoration would show).
    assert not torch.equal(_draws()[0], expected[0])
    assert not torch.equal(inside[0], expected[0]) or inside[1:] != expected[1:]


def test_preserved_restores_train_eval_flags():
    model = _model()
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    with preserved(model):
        model.eval()
        model[2].train()
    assert [m.training for m in model.modules()] == flags == [True, True, True, False, True, True]


def test_preserved_restores_everything_on_exception():
    model = _model()
    model.train()
    snap = _buffer_snapshot(model)
    _seed()
    expected = _draws()
    _seed()
    with pytest.raises(RuntimeError, match="boom"), preserved(model):
        model(torch.randn(8, 3)).sum().backward()
        model.eval()
        raise RuntimeError("boom")
    _assert_buffers_restored(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    after = _draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]


def test_preserved_does_not_write_parameters():
    model = _model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    with preserved(model):
        model(torch.randn(8, 3)).sum().backward()
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- evaluate
def test_finiteness_checks():
    assert loss_is_finite(torch.tensor(1.5)) and loss_is_finite(2.0)
    assert not loss_is_finite(torch.tensor(float("nan"))) and not loss_is_finite(float("-inf"))
    assert not loss_is_finite(torch.tensor([1.0, float("inf")]))
    assert all_finite([]) and all_finite([torch.ones(3), torch.empty(0)])
    assert not all_finite([torch.ones(3), torch.tensor([0.0, float("nan")])])
    big = torch.full((4,), 3e38)
    assert all_finite([big])  # finite elements whose 2-norm would overflow float32: still finite


def test_evaluate_flags_nonfinite_loss():
    model = nn.Linear(2, 1)
    loss_fn = lambda batch: model(batch).pow(2).mean()  # noqa: E731
    assert evaluate(loss_fn, torch.ones(3, 2)) is False
    assert evaluate(loss_fn, torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])) is True
    assert evaluate(loss_fn, torch.tensor([[1e30, 1e30]])) is True  # square overflows to inf
    assert evaluate(lambda b: {"loss": loss_fn(b), "n": 3}, torch.tensor([[float("inf"), 0.0]])) is True


def test_evaluate_without_backward_runs_under_no_grad():
    seen = []

    def loss_fn(batch):
        seen.append(torch.is_grad_enabled())
        return batch.sum()

    w = torch.ones(1, requires_grad=True)
    evaluate(loss_fn, torch.ones(2))
    with torch.no_grad():
        evaluate(lambda b: loss_fn(b) * w, torch.ones(2), params=[w], backward=True)
    assert seen == [False, True]


class InfGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies by ``scale`` (inf: an infinite gradient)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@pytest.mark.parametrize("kind", ["sqrt", "function"])
def test_evaluate_backward_only_failure(kind):
    """A finite loss with a non-finite gradient fails only with backward=True; .grad is never written."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.zero_()
    model.bias.grad = torch.full((1,), 5.0)
    bias_grad = model.bias.grad

    def loss_fn(batch):
        out = model(batch)
        out = out.clamp(min=0).sqrt() if kind == "sqrt" else InfGrad.apply(out, batch[0, 0] * float("inf"))
        return out.sum()

    bad, good = torch.tensor([[2.0, 2.0]]), torch.tensor([[3.0, 2.0]])  # sqrt'(0) = inf; 1*inf
    params = list(model.parameters())
    assert evaluate(loss_fn, bad, params=params) is False  # the loss is finite
    assert loss_is_finite(loss_fn(bad))
    assert evaluate(loss_fn, bad, params=params, backward=True) is True
    if kind == "sqrt":
        assert evaluate(loss_fn, good, params=params, backward=True) is False
        # The gradient it checked is the real one: d sqrt(w.x + b) / dw at x=good, recomputed by hand.
        x = good[0]
        z = float(model.weight[0].detach() @ x + model.bias[0].detach())
        expected = torch.cat([x / (2 * z**0.5), torch.tensor([1 / (2 * z**0.5)])])
        got = torch.autograd.grad(loss_fn(good), params)
        torch.testing.assert_close(torch.cat([g.flatten() for g in got]), expected)
    # .grad untouched: None stays None, the existing one is the same object with the same value.
    assert model.weight.grad is None
    assert model.bias.grad is bias_grad and torch.equal(bias_grad, torch.full((1,), 5.0))


def test_evaluate_backward_checks_only_given_params_and_ignores_unused():
    a = torch.tensor([0.0], requires_grad=True)
    b = torch.tensor([1.0], requires_grad=True)
    unused = torch.tensor([1.0], requires_grad=True)
    frozen = torch.tensor([1.0])  # does not require grad: skipped
    loss_fn = lambda batch: (a * batch).sqrt().sum() + (b * batch).sum()  # noqa: E731 - inf gradient for a only
    assert evaluate(loss_fn, torch.ones(1), params=[b, unused, frozen], backward=True) is False
    assert evaluate(loss_fn, torch.ones(1), params=[b, a], backward=True) is True
    # A loss that does not depend on any parameter has no gradient to fail.
    assert evaluate(lambda batch: batch.sum(), torch.ones(1), params=[a], backward=True) is False


def test_evaluate_rejects_none_and_missing_params():
    with pytest.raises(ValueError, match="got None.*return loss"):
        evaluate(lambda batch: None, torch.ones(1))
    with pytest.raises(ValueError, match="got None"):
        evaluate(lambda batch: None, torch.ones(1), params=[torch.ones(1, requires_grad=True)], backward=True)
    with pytest.raises(ValueError, match="Expected `params` with backward=True"):
        evaluate(lambda batch: batch.sum(), torch.ones(1), backward=True)
    with pytest.raises(TypeError, match="got str"):
        evaluate(lambda batch: "loss", torch.ones(1))
    assert torch.equal(as_loss({"loss": torch.tensor(2.0)}), torch.tensor(2.0))


# ---------------------------------------------------------------------------------------------- DDP
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))


def _counting_allreduce(state: list, bucket):
    """DDP comm hook: count the bucket all-reduces, then do the ordinary averaged all-reduce."""
    state.append(bucket.index())
    world = torch.distributed.get_world_size()
    fut = torch.distributed.all_reduce(bucket.buffer() / world, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def test_autograd_grad_on_ddp_module_is_harmless(tmp_path):
    """World size 1: evaluate(backward=True) on ddp.module starts no all-reduce and writes no .grad."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        ddp = nn.parallel.DistributedDataParallel(_net())
        reduces: list[int] = []
        ddp.register_comm_hook(reduces, _counting_allreduce)
        x, y = torch.randn(4, 3), torch.randn(4, 1)
        loss_fn = lambda batch: nn.functional.mse_loss(ddp.module(batch[0]), batch[1])  # noqa: E731
        params = list(ddp.module.parameters())

        assert evaluate(loss_fn, (x, y), params=params, backward=True) is False
        assert evaluate(loss_fn, (x, y * float("nan")), params=params, backward=True) is True
        assert reduces == [] and all(p.grad is None for p in params)

        # The reducer is intact: a real DDP step all-reduces and gives the plain model's gradients.
        nn.functional.mse_loss(ddp(x), y).backward()
        assert len(reduces) >= 1
        ref = _net()
        nn.functional.mse_loss(ref(x), y).backward()
        for p, q in zip(params, ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        grads = [p.grad for p in params]
        n = len(reduces)
        assert evaluate(loss_fn, (x, y), params=params, backward=True) is False
        assert len(reduces) == n and all(p.grad is g for p, g in zip(params, grads))
        nn.functional.mse_loss(ddp(x), y).backward()  # a second step still works
        assert len(reduces) > n
    finally:
        # The reducer holds the process group: free it first, or a later garbage collection destroys
        # the group's last reference after destroy_process_group and can deadlock in gloo's destructor.
        ddp = None  # (the loss function's closure reads this same variable)
        gc.collect()
        torch.distributed.destroy_process_group()


def _ddp_worker(rank: int, outdir: str) -> None:
    """One rank of the two-process run; writes ``rank{rank}.pt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{outdir}/store", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    ddp = nn.parallel.DistributedDataParallel(_net())
    reduces: list[int] = []
    ddp.register_comm_hook(reduces, _counting_allreduce)
    gen = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 1, generator=gen)
    nn.functional.mse_loss(ddp(x), y).backward()  # step 1, both ranks
    before = len(reduces)
    for p in ddp.parameters():
        p.grad = None
    results = {}
    if rank == 1:  # rank 1 alone re-evaluates, with gradients
        loss_fn = lambda batch: nn.functional.mse_loss(ddp.module(batch[0]), batch[1])  # noqa: E731
        params = list(ddp.module.parameters())
        results["clean"] = evaluate(loss_fn, (x, y), params=params, backward=True)
        inf_grad = lambda b: loss_fn(b) + (0 * ddp.module(b[0]).sum()).sqrt()  # noqa: E731 - finite loss, sqrt'(0)
        results["inf_grad"] = evaluate(inf_grad, (x, y), params=params, backward=True)
        results["nan_loss"] = evaluate(loss_fn, (x, y * float("nan")), params=params, backward=True)
    results["reduces_during_eval"] = len(reduces) - before
    results["grads_after_eval"] = [p.grad for p in ddp.parameters()]
    t0 = time.monotonic()
    dist.monitored_barrier(timeout=timedelta(seconds=10))
    results["barrier_s"] = time.monotonic() - t0
    # Step 2 on both ranks: the all-reduced gradients equal the mean of both ranks' local gradients.
    nn.functional.mse_loss(ddp(x), y).backward()
    local = _net()
    nn.functional.mse_loss(local(x), y).backward()
    results["ddp_grads"] = [p.grad.clone() for p in ddp.parameters()]
    results["local_grads"] = [p.grad.clone() for p in local.parameters()]
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, f"{outdir}/rank{rank}.pt")


def test_evaluate_on_one_rank_enters_no_collective(tmp_path):
    """Two gloo processes: rank 1 alone runs evaluate(backward=True); both then pass a barrier and a DDP step."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    deadline = time.monotonic() + 60
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank hung: " + "\n".join(p.communicate()[0][-2000:] for p in procs))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r1["clean"], r1["inf_grad"], r1["nan_loss"]) == (False, True, True)
    assert r0["reduces_during_eval"] == r1["reduces_during_eval"] == 0
    assert all(g is None for g in r0["grads_after_eval"] + r1["grads_after_eval"])
    assert r0["barrier_s"] < 10 and r1["barrier_s"] < 10
    for g0, g1, l0, l1 in zip(r0["ddp_grads"], r1["ddp_grads"], r0["local_grads"], r1["local_grads"]):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, (l0 + l1) / 2)


if __name__ == "__main__":  # one rank of test_evaluate_on_one_rank_enters_no_collective
    _ddp_worker(int(sys.argv[1]), sys.argv[2])
