"""Find the samples that make a batch fail: bisection over sub-batches, without side effects.

:func:`find_culprits` re-evaluates sub-batches of a failing batch from the current state of the
model (weights as they are, buffers, gradients and RNG restored after every evaluation, no
optimizer step) and narrows the failure down to the samples, or groups of samples, that cause it,
in about ``d * log2(n)`` forward passes for ``d`` culprits among ``n`` samples. Pure PyTorch: a
hand-written loop uses it directly; :class:`~lightning_nan.BatchBisection` calls it on every
incident NaNGuard reports.

>>> import torch
>>> model = torch.nn.Linear(3, 1)
>>> x = torch.randn(16, 3)
>>> x[11, 2] = float("nan")
>>> found = find_culprits(lambda b: model(b).pow(2).mean(), x, module=model)
>>> found.positions, found.tests
([11], 7)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.batches import BatchSplitError, batch_size, fingerprint, select
from lightning_nan.core.bisection import BisectionResult, bisect
from lightning_nan.core.localize import Localization, localize
from lightning_nan.core.norms import iter_tensors
from lightning_nan.core.reevaluate import evaluate, preserved

LossFn = Callable[[Any], "Tensor | None"]


@dataclass
class CulpritReport:
    """What :func:`find_culprits` found in one batch.

    Attributes:
        positions: positions (in the batch) of the samples that make it fail, sorted.
        groups: minimal failing groups of positions (``[[p]]`` for a sample that fails alone).
        tests: forward passes used (the first one re-evaluates the whole batch).
        reproduced: the whole batch failed again; ``False`` means a transient fault, nothing found.
        whole_batch: (nearly) every sample fails alone (with finite inputs, in a small batch): a
            model problem, not dirty data.
        complete: the search ran to the end (``max_tests`` not reached).
        fingerprints: a content hash of each culprit, in the order of ``positions``.
        input_nonfinite: for each culprit, whether its own input tensors hold NaN/Inf.
        localization: where the NaN first appears, for the first group (when asked for).
        seconds: wall time of the search.
        size: the number of samples in the batch.
    """

    positions: list[int]
    groups: list[list[int]]
    tests: int
    reproduced: bool
    whole_batch: bool = False
    complete: bool = True
    fingerprints: list[str] = field(default_factory=list)
    input_nonfinite: list[bool] = field(default_factory=list)
    localization: Localization | None = None
    seconds: float = 0.0
    size: int = 0


def default_min_size(module: torch.nn.Module) -> int:
    """2 when a BatchNorm layer is in training mode (it rejects a batch of one), else 1."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    return 2 if any(isinstance(m, bn) and m.training for m in module.modules()) else 1


def find_culprits(
    loss_fn: LossFn,
    batch: Any,
    *,
    module: torch.nn.Module,
    backward: bool = False,
    params: Iterable[tuple[str, Tensor]] | None = None,
    splitter: Callable[[Any, Sequence[int]], Any] | None = None,
    sizer: Callable[[Any], int] | None = None,
    min_size: int | None = None,
    max_tests: int | None = None,
    locate: bool = False,
) -> CulpritReport:
    """Bisect ``batch`` down to the samples that make ``loss_fn`` (or, with ``backward``, its gradients) non-finite.

    Args:
        loss_fn: ``loss_fn(sub_batch) -> loss``; called once per test, under the state-preserving
            context, with ``torch.no_grad`` unless ``backward``.
        batch: the failing batch (any nesting of tensors, lists, dicts, dataclasses).
        module: the model; its buffers, gradients, train/eval flags and the RNG are restored after
            every evaluation.
        backward: the loss was finite but the gradients were not: also differentiate (with
            ``torch.autograd.grad``, so ``.grad`` and DDP's reducer are left alone).
        params: ``(name, parameter)`` pairs to differentiate; default ``module.named_parameters()``.
        splitter: ``splitter(batch, positions) -> sub_batch`` for batches :func:`select` cannot split.
        sizer: ``sizer(batch) -> number of samples``, with ``splitter``.
        min_size: smallest sub-batch the model accepts (padded with known-clean samples); default
            :func:`default_min_size`.
        max_tests: stop after this many forward passes.
        locate: also localize the first failing group (forward hooks; once more per call).
    """
    start = time.perf_counter()
    named = list(params) if params is not None else [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    tensors = [p for _, p in named]
    if splitter is None:
        n = batch_size(batch) if sizer is None else sizer(batch)
        split: Callable[[Any, Sequence[int]], Any] = lambda b, pos: select(b, pos, size=n)  # noqa: E731
    else:
        if sizer is None:
            try:
                n = batch_size(batch)
            except BatchSplitError:
                raise BatchSplitError(
                    f"A custom `splitter` was given but the size of a batch of type {type(batch).__qualname__} is unknown: "
                    "also pass `sizer` (a function batch -> number of samples)."
                ) from None
        else:
            n = sizer(batch)
        split = splitter
    if min_size is None:
        min_size = default_min_size(module)

    def fails(positions: list[int]) -> bool:
        sub = batch if len(positions) == n and positions == list(range(n)) else split(batch, positions)
        with preserved(module, params=tensors):
            return evaluate(loss_fn, sub, params=tensors, backward=backward)

    result: BisectionResult = bisect(n, fails, min_size=min(min_size, n), max_tests=max_tests)
    report = CulpritReport(
        positions=list(result.culprits),
        groups=[list(g) for g in result.groups],
        tests=result.tests,
        reproduced=result.reproduced,
        whole_batch=result.whole_batch,
        complete=result.complete,
        size=n,
    )
    if splitter is None:
        report.fingerprints = [fingerprint(batch, p, size=n) for p in report.positions]
    else:
        report.fingerprints = [_fingerprint_any(split(batch, [p])) for p in report.positions]
    report.input_nonfinite = [
        any(not bool(torch.isfinite(t).all()) for _, t in iter_tensors(split(batch, [p]))) for p in report.positions
    ]
    if report.positions and len(report.positions) == n and not all(report.input_nonfinite):
        # Every sample fails on its own (a small batch, or a batch of one) and their inputs are finite:
        # nothing singles them out from the rest of the data set, so the model is the suspect.
        report.whole_batch = True
        report.positions, report.groups, report.fingerprints, report.input_nonfinite = [], [], [], []
    if locate and report.groups:
        group = report.groups[0]
        clean = [p for p in range(n) if p not in set(report.positions)]
        padded = sorted(group + clean[: max(0, min_size - len(group))])  # BatchNorm needs company
        sub = split(batch, padded)
        report.localization = localize(module, lambda: loss_fn(sub), backward=backward, params=named)
    elif locate and report.whole_batch:  # not the data: where in the model does it break?
        report.localization = localize(module, lambda: loss_fn(batch), backward=backward, params=named)
    report.seconds = time.perf_counter() - start
    return report


def _fingerprint_any(sample: Any) -> str:
    """A content hash of a one-sample batch of any type (for custom splitters)."""
    import hashlib

    h = hashlib.sha256()
    for path, t in iter_tensors(sample):
        h.update(path.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().cpu().numpy().tobytes())
    if not any(True for _ in iter_tensors(sample)):
        h.update(repr(sample).encode())
    return h.hexdigest()[:16]
