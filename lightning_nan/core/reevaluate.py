"""Re-evaluate a loss on (part of) a failing batch without leaving a trace.

:func:`preserved` restores everything a forward pass may change besides the weights (buffers such as
BatchNorm's running statistics, ``.grad``, train/eval flags, random number generators);
:func:`evaluate` says whether a loss (and optionally its gradients) is non-finite, computing the
gradients with :func:`torch.autograd.grad`, which neither writes ``.grad`` nor fires
DistributedDataParallel's all-reduce hooks (see :func:`evaluate`). Both run on the failure path only.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
>>> before = model[1].running_mean.clone()
>>> loss_fn = lambda x: model(x).pow(2).mean()
>>> with preserved(model):
...     evaluate(loss_fn, torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))
True
>>> torch.equal(model[1].running_mean, before), int(model[1].num_batches_tracked)
(True, 0)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_finite", "as_loss", "evaluate", "loss_is_finite", "preserved"]

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """``t`` reinterpreted as integers of the same width, so that equality is bit-for-bit (NaN, -0.0)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(_bits(a), _bits(b))


def _restore_values(live: Tensor, saved: Tensor) -> None:
    """Write ``saved`` back into ``live`` (in place, same object) when their bits differ."""
    if _same_bits(live, saved):
        return
    with torch.no_grad():
        if live.shape == saved.shape and live.dtype == saved.dtype:
            live.copy_(saved)
        else:  # resized or re-typed in place: give it back its old storage contents and shape
            live.data = saved


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    else:
        states["numpy"] = np.random.get_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])


@contextmanager
def preserved(module: torch.nn.Module, *, params: Iterable[Tensor] | None = None) -> Iterator[None]:
    """Undo, on exit (also on an exception), what running ``module`` changes besides its weights.

    Restored exactly: every buffer of ``module`` (same tensor objects, same bits, same set of buffers
    per submodule); the ``.grad`` of ``params`` (default: ``module.parameters()``), as the same
    tensor objects with the same values, or ``None``; the train/eval flag of every submodule; the
    random number generators (torch CPU, every CUDA device once CUDA is initialised, numpy's global
    generator, Python's ``random``). Parameter values are not saved: code inside must not write them.
    Buffers and existing gradients are copied on entry (memory: one copy of each).

    >>> import torch
    >>> drop = torch.nn.Dropout(0.5)
    >>> _ = torch.manual_seed(0)
    >>> with preserved(drop):
    ...     _ = drop(torch.ones(8))
    ...     drop.eval()
    Dropout(p=0.5, inplace=False)
    >>> drop.training, torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())
    (True, True)
    """
    modules = list(module.modules())
    flags = [(m, m.training) for m in modules]
    buffer_dicts = [(m, dict(m._buffers)) for m in modules]
    saved_buffers: dict[int, tuple[Tensor, Tensor]] = {}
    for _, buffers in buffer_dicts:
        for buf in buffers.values():
            if buf is not None and id(buf) not in saved_buffers:
                saved_buffers[id(buf)] = (buf, buf.detach().clone())
    params = list(module.parameters() if params is None else params)
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    rng = _rng_states()
    try:
        yield
    finally:
        _set_rng_states(rng)
        for m, training in flags:
            m.training = training
        for m, buffers in buffer_dicts:
            if m._buffers.keys() != buffers.keys() or any(m._buffers[k] is not v for k, v in buffers.items()):
                m._buffers.clear()
                m._buffers.update(buffers)
        for live, saved in saved_buffers.values():
            _restore_values(live, saved)
        for p, grad, saved_grad in grads:
            if p.grad is not grad:
                p.grad = grad
            if grad is not None and saved_grad is not None:  # (one is None exactly when the other is)
                _restore_values(grad, saved_grad)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite (exact; one host synchronisation per device).

    >>> import torch
    >>> all_finite([torch.ones(2), torch.tensor([1e38]) * 10])
    False
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def loss_is_finite(loss: Tensor | float) -> bool:
    """Whether every element of ``loss`` is finite (exact; synchronises with the device).

    >>> import torch
    >>> loss_is_finite(torch.tensor(2.0)), loss_is_finite(torch.tensor(float("inf"))), loss_is_finite(1.0)
    (True, False, True)
    """
    if isinstance(loss, Tensor):
        return all_finite([loss])
    return math.isfinite(loss)


def as_loss(out: Any) -> Tensor:
    """The loss tensor of what a loss function (or a Lightning ``training_step``) returned.

    Accepts a tensor or a mapping with a ``"loss"`` entry; ``None`` (a manual-optimization
    ``training_step``) raises ``ValueError`` saying how to fix it.

    >>> import torch
    >>> as_loss({"loss": torch.tensor(1.0), "acc": 0.5})
    tensor(1.)
    """
    if isinstance(out, Mapping) and "loss" in out:
        out = out["loss"]
    if out is None:
        raise ValueError(
            "Expected `loss_fn` to return the loss tensor, got None (a training_step under manual "
            "optimization returns nothing): pass a `loss_fn` that computes and returns the loss "
            "without stepping an optimizer, or make training_step `return loss`."
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected `loss_fn` to return a tensor or a mapping with a 'loss' tensor, got {type(out).__name__}")
    return out


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of ``loss`` w.r.t. ``params`` via ``autograd.grad`` (``.grad`` untouched); unused ones left out."""
    params = [p for p in params if p.requires_grad]
    if not params or not loss.requires_grad:
        return []
    if loss.numel() != 1:
        loss = loss.sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g for g in grads if g is not None]


def evaluate(
    loss_fn: Callable[[Any], Tensor | None],
    batch: Any,
    *,
    params: Sequence[Tensor] = (),
    backward: bool = False,
) -> bool:
    """Whether ``loss_fn(batch)`` FAILS: its loss is non-finite, or (``backward=True``) a gradient is.

    Without ``backward`` the loss is computed under :func:`torch.no_grad`. With ``backward=True`` and
    a finite loss, the gradients w.r.t. ``params`` come from ``torch.autograd.grad(loss, params,
    allow_unused=True)``: it returns them instead of accumulating into ``.grad``, and it does not run
    the parameters' ``AccumulateGrad`` nodes, whose post-hooks are where DistributedDataParallel's
    reducer starts its all-reduce (``Reducer`` registers ``grad_accumulator->add_post_hook``; the
    autograd engine skips a captured input's node and calls only its tensor pre-hooks; the DDP docs
    say it "doesn't work with torch.autograd.grad"). So one rank may call this alone without a hang,
    provided ``loss_fn`` calls the wrapped module (``ddp.module``), not the DDP wrapper, whose
    forward may broadcast buffers. ``loss_fn`` may also return a mapping with a ``"loss"`` entry.
    Wrap calls in :func:`preserved` to undo buffer and random-state changes.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    >>> loss_fn = lambda x: (w * x).clamp(min=0).sqrt().sum()  # sqrt'(0) = inf
    >>> evaluate(loss_fn, torch.ones(2)), evaluate(loss_fn, torch.ones(2), params=[w], backward=True)
    (False, True)
    >>> w.grad is None
    True
    """
    if backward:
        if len(params) == 0:
            raise ValueError(
                "Expected `params` with backward=True, got an empty sequence: pass the parameters whose "
                "gradients to check, e.g. `params=[p for p in model.parameters() if p.requires_grad]`."
            )
        with torch.enable_grad():
            loss = as_loss(loss_fn(batch))
            if not loss_is_finite(loss):
                return True
            return not all_finite(_grads(loss, params))
    with torch.no_grad():
        return not loss_is_finite(as_loss(loss_fn(batch)))
