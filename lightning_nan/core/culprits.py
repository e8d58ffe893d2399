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
>>> found.positions, found.tests, found.dirty, found.triggers, found.confirm_tests
([11], 7, [11], [], 3)

Every group the search finds is confirmed before it is reported as a culprit: under a fresh random
seed it must fail again alone and in the company of the clean rest of the batch, and that rest
must pass without it. Dropout layers are held off (eval mode) during every re-evaluation, and each
evaluation starts from the same random state, so dropout, stochastic depth or augmentation inside
the loss cannot make a clean sample look guilty; losses that are not a per-sample sum (token-count
means, batch statistics) cannot either, since a sample that only fails alone passes in company.
A confirmed sample is ``dirty`` only when its own input is bad
(:func:`~lightning_nan.core.data_evidence.sample_evidence`); otherwise it is a ``trigger`` of an
unsafe operation, and the model is at fault.
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
from lightning_nan.core.data_evidence import SampleEvidence, sample_evidence
from lightning_nan.core.fingerprint import sample_fingerprint
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
        dirty: confirmed culprits (positions) whose own input is bad: non-finite, extreme, an outlier.
        triggers: confirmed culprits with ordinary finite inputs: they trigger an unsafe operation.
        unconfirmed: groups the search found that failed confirmation (randomness, a loss that is
            not a per-sample sum) or that fail only together: reported, never quarantined.
        evidence: for each of ``positions``, what its own input says (``SampleEvidence.reason``).
        confirm_tests: forward passes spent on confirmation (on top of ``tests``).
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
    dirty: list[int] = field(default_factory=list)
    triggers: list[int] = field(default_factory=list)
    unconfirmed: list[list[int]] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    confirm_tests: int = 0

#: torch's dropout layers (their public classes).
DROPOUT_LAYERS = (
    torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout,
)

#: The seed of the fresh random state confirmation runs under.
CONFIRM_SEED = 1234567


def dropout_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers of ``module`` that are in training mode."""
    return [m for m in module.modules() if isinstance(m, DROPOUT_LAYERS) and m.training]


def _quiet(module: torch.nn.Module, loss_fn: LossFn, hold: bool) -> LossFn:
    """``loss_fn`` with the dropout layers in eval mode (restored by the caller's ``preserved``)."""
    layers = dropout_modules(module) if hold else []
    if not layers:
        return loss_fn

    def run(sub: Any) -> Tensor | None:
        for m in layers:
            m.training = False
        return loss_fn(sub)

    return run


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
    hold_dropout: bool = True,
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
        hold_dropout: keep the dropout layers in eval mode while re-evaluating (if the batch then no
            longer fails, the search runs again with them as they were).
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
    user_loss_fn = loss_fn
    loss_fn = _quiet(module, user_loss_fn, hold_dropout)

    def fails(positions: list[int], seed: int | None = None) -> bool:
        sub = batch if len(positions) == n and positions == list(range(n)) else split(batch, positions)
        with preserved(module, params=tensors):
            if seed is not None:
                torch.manual_seed(seed)  # a fresh random state; `preserved` puts the run's back
            return evaluate(loss_fn, sub, params=tensors, backward=backward)

    result: BisectionResult = bisect(n, fails, min_size=min(min_size, n), max_tests=max_tests)
    if not result.reproduced and hold_dropout and dropout_modules(module):  # it failed only with dropout on
        loss_fn, held = user_loss_fn, result.tests
        result = bisect(n, fails, min_size=min(min_size, n), max_tests=max_tests)
        result.tests += held
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
        report.fingerprints = [_one_sample_fingerprint(split(batch, [p])) for p in report.positions]
    report.input_nonfinite = [
        any(not bool(torch.isfinite(t).all()) for _, t in iter_tensors(split(batch, [p]))) for p in report.positions
    ]
    if report.positions and len(report.positions) == n and not all(report.input_nonfinite):
        # Every sample fails on its own (a small batch, or a batch of one) and their inputs are finite:
        # nothing singles them out from the rest of the data set, so the model is the suspect.
        report.whole_batch = True
        report.positions, report.groups, report.fingerprints, report.input_nonfinite = [], [], [], []
    if report.groups:
        _confirm(report, fails, n, min_size)
        facts = sample_evidence(batch, n) if splitter is None else [_evidence_alone(split(batch, [p])) for p in range(n)]
        report.evidence = [facts[p].reason for p in report.positions]
        confirmed = [g[0] for g in report.groups if len(g) == 1 and g not in report.unconfirmed]
        report.dirty = [p for p in confirmed if facts[p].dirty]
        report.triggers = [p for p in confirmed if not facts[p].dirty]
    if locate and report.groups:
        group = [report.dirty[0]] if report.dirty else [report.triggers[0]] if report.triggers else report.groups[0]
        clean = [p for p in range(n) if p not in set(report.positions)]
        padded = sorted(group + clean[: max(0, min_size - len(group))])  # BatchNorm needs company
        sub = split(batch, padded)
        report.localization = localize(module, lambda: loss_fn(sub), backward=backward, params=named)
    elif locate and report.whole_batch:  # not the data: where in the model does it break?
        report.localization = localize(module, lambda: loss_fn(batch), backward=backward, params=named)
    report.seconds = time.perf_counter() - start
    return report


def _confirm(report: CulpritReport, fails: Callable[..., bool], n: int, min_size: int) -> None:
    """Keep only the groups that fail again, alone and among the clean rest, under a fresh random
    state, while that rest passes without them; the others go to ``report.unconfirmed``."""
    rest = [p for p in range(n) if p not in set(report.positions)]
    tests = 0

    def test(positions: list[int]) -> bool:
        nonlocal tests
        tests += 1
        return fails(sorted(positions), seed=CONFIRM_SEED)

    rest_passes = not rest or not test(rest)
    for group in report.groups:
        pads = [p for p in rest if p not in group][: max(0, min_size - len(group))]
        ok = rest_passes and len(group) == 1 and test(group + pads) and (not rest or test(rest + group))
        if not ok:
            report.unconfirmed.append(group)
    report.confirm_tests = tests


def _evidence_alone(sample: Any) -> SampleEvidence:
    """A custom splitter's one-sample batch: only its own values count (no batch to compare with)."""
    return sample_evidence(sample, whole=True)[0] if any(True for _ in iter_tensors(sample)) else SampleEvidence()


def _one_sample_fingerprint(sub: Any) -> str:
    """A custom splitter's one-sample batch: the fingerprint of its one sample, as the default splitter
    gives it, when its structure can be looked into; else of the whole object (``repr`` of opaque types)."""
    try:
        one = batch_size(sub) == 1
    except BatchSplitError:
        one = False
    return fingerprint(sub, 0, size=1) if one else sample_fingerprint(sub)
