"""Is the data to blame? Evidence about the samples themselves, never about what the model did with them.

A sample is *dirty* only when its own input says so: it holds NaN/Inf, a value near its dtype's
largest (``1e38`` in float32), or it is a gross outlier against the other samples of its batch (its
largest magnitude :data:`OUTLIER_RATIO` times the batch's median sample's, and a robust z-score of
the log-magnitudes above :data:`OUTLIER_Z`). A sample with ordinary finite inputs that makes the
model fail is the *trigger* of an unsafe operation: the model is at fault, not the sample.

When every sample of a batch holds NaN/Inf the data pipeline is broken (a division by a zero
standard deviation, a bad join): :func:`broken_pipeline` says which fields and feature positions
are non-finite in every sample.

>>> import torch
>>> x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
>>> x[3, 1], x[9, 0] = float("nan"), 1e38
>>> x[12] *= 1e6
>>> [(i, e.reason) for i, e in enumerate(sample_evidence(x)) if e.dirty]
[(3, 'its input holds NaN/Inf'), (9, 'its input holds 1e+38, near the float32 limit 3.4e+38'), (12, 'its input is a gross outlier: largest |value| 1.06e+06, 6.43e+05x the batch median 1.64 (robust z 24.5)')]
>>> y = torch.randn(8, 40)
>>> y[:, [0, 32, 39]] = float("nan")  # standardised by a zero std upstream
>>> print(broken_pipeline([(0, (y,))]))
every one of the 8 samples holds NaN/Inf: batch 0 [0] columns 0, 32, 39 are NaN in all 8 samples (a division by a zero standard deviation upstream?)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_nan.core.batches import BatchSplitError, batch_size
from lightning_nan.core.norms import iter_tensors

__all__ = ["SampleEvidence", "broken_pipeline", "sample_evidence"]

#: |x| beyond this fraction of the dtype's largest value is "near the limit".
NEAR_LIMIT = 1e-3
#: A sample whose largest |value| is this many times the batch median's may be a gross outlier ...
OUTLIER_RATIO = 1e3
#: ... when the robust z-score of its log-magnitude against the batch is above this too.
OUTLIER_Z = 10.0
#: Batches smaller than this are never called a broken pipeline (one dirty sample alone fills a small batch).
PIPELINE_MIN_SAMPLES = 4
#: Columns named in a message, at most.
SHOWN = 8


@dataclass
class SampleEvidence:
    """What one sample's own input says: ``nonfinite``, ``extreme`` (near the dtype limit), ``outlier``."""

    nonfinite: bool = False
    extreme: bool = False
    outlier: bool = False
    largest: float = 0.0
    reason: str = ""
    #: Every value of the sample is the same (an all-zero image, say): worth saying, but ordinary data
    #: for a model to cope with (an epsilon), so not dirty.
    degenerate: bool = False

    @property
    def dirty(self) -> bool:
        """The input itself is bad: the sample may be quarantined."""
        return self.nonfinite or self.extreme or self.outlier


def _per_sample(batch: Any, n: int, whole: bool = False) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor reshaped to (n, -1))`` for every floating-point per-sample field of ``batch``
    (``whole``: every floating-point tensor, as the values of one sample)."""
    return [
        (path, t.detach().reshape(n, -1))
        for path, t in iter_tensors(batch)
        if not t.is_complex() and (whole or (t.dim() >= 1 and t.shape[0] == n))
    ]


def sample_evidence(batch: Any, size: int | None = None, *, whole: bool = False) -> list[SampleEvidence]:
    """The evidence about each sample's own input in ``batch`` (one entry per position).

    ``whole``: ``batch`` is one sample made by a custom splitter (graph batches, say): every
    floating-point tensor in it is that sample's (no outlier test: there is nothing to compare with).
    """
    n = 1 if whole else batch_size(batch) if size is None else size
    fields = _per_sample(batch, n, whole)
    if n == 0:
        return []
    nonfinite = torch.zeros(n, dtype=torch.bool)
    constant = torch.ones(n, dtype=torch.bool)
    largest = torch.zeros(n, dtype=torch.float64)
    limit = torch.zeros(n, dtype=torch.float64)  # the dtype limit of the field holding each sample's largest value
    for _, t in fields:
        finite = torch.isfinite(t)
        nonfinite |= (~finite).any(dim=1).cpu()
        constant &= (t == t[:, :1]).all(dim=1).cpu()
        mags = torch.where(finite, t.abs(), torch.zeros((), dtype=t.dtype, device=t.device)).amax(dim=1).double().cpu()
        bigger = mags > largest
        largest = torch.where(bigger, mags, largest)
        limit = torch.where(bigger, torch.full_like(limit, torch.finfo(t.dtype).max), limit)
    values = largest.tolist()
    median = statistics.median(values)
    logs = [math.log10(v) if v > 0 else -math.inf for v in values]
    finite_logs = [v for v in logs if math.isfinite(v)]
    centre = statistics.median(finite_logs) if finite_logs else 0.0
    mad = statistics.median(abs(v - centre) for v in finite_logs) if finite_logs else 0.0
    out = []
    for i in range(n):
        e = SampleEvidence(largest=values[i])
        if bool(nonfinite[i]):
            e.nonfinite, e.reason = True, "its input holds NaN/Inf"
        elif values[i] > NEAR_LIMIT * float(limit[i]) > 0:
            dtype = next((str(t.dtype).replace("torch.", "") for _, t in fields if torch.finfo(t.dtype).max == float(limit[i])), "float")
            e.extreme, e.reason = True, f"its input holds {values[i]:.3g}, near the {dtype} limit {float(limit[i]):.3g}"
        elif median > 0 and values[i] >= OUTLIER_RATIO * median:
            z = math.inf if mad == 0 else (logs[i] - centre) / (1.4826 * mad)
            if z > OUTLIER_Z:
                e.outlier = True
                e.reason = (
                    f"its input is a gross outlier: largest |value| {values[i]:.3g}, {values[i] / median:.3g}x the batch "
                    f"median {median:.3g} (robust z {z:.3g})"
                )
        if not e.dirty and bool(constant[i]):
            e.degenerate, e.reason = True, f"its input is constant (every value {values[i]:.3g} in magnitude)"
        out.append(e)
    return out


def broken_pipeline(batches: Sequence[tuple[int, Any]]) -> str | None:
    """A description when every sample of every batch holds NaN/Inf (at least
    :data:`PIPELINE_MIN_SAMPLES` samples in all), else ``None``: the fields and feature positions
    that are non-finite in every sample say where the pipeline broke."""
    total, parts = 0, []
    for idx, batch in batches:
        try:
            n = batch_size(batch)
        except BatchSplitError:
            return None
        fields = _per_sample(batch, n)
        if n == 0 or not fields:
            return None
        bad = torch.zeros(n, dtype=torch.bool)
        for path, t in fields:
            mask = ~torch.isfinite(t)
            bad |= mask.any(dim=1).cpu()
            everywhere = mask.all(dim=0).nonzero().flatten().tolist()
            if everywhere:
                nan = bool(torch.isnan(t[:, everywhere]).all())
                shown = ", ".join(map(str, everywhere[:SHOWN])) + (f" (+{len(everywhere) - SHOWN} more)" if len(everywhere) > SHOWN else "")
                what = "column" if len(everywhere) == 1 else "columns"
                parts.append(f"batch {idx} {path or '<batch>'} {what} {shown} {'is' if len(everywhere) == 1 else 'are'} {'NaN' if nan else 'NaN/Inf'} in all {n} samples")
        if not bool(bad.all()):
            return None
        total += n
    if total < PIPELINE_MIN_SAMPLES:
        return None
    where = "; ".join(parts) if parts else "in different positions in each sample"
    hint = " (a division by a zero standard deviation upstream?)" if parts else " (missing values filled with NaN, a bad join or cast?)"
    return f"every one of the {total} samples holds NaN/Inf: {where}{hint}"
