"""BatchBisection at a training incident: search each rank's batches, then merge what every rank found.

:func:`search_local` bisects the batches this rank trained on (``find_culprits`` with the module's
sandboxed ``training_step``) and makes the quarantine records of its dirty samples;
:func:`merge` (after the gather, the same on every rank) fills ``incident.bisection``,
``incident.localization``, ``samples``, ``triggers`` and ``module``, quarantines, and logs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lightning_nan.callbacks._bisection_dump import dump_failing
from lightning_nan.callbacks._trainer import log_metrics, shards_parameters
from lightning_nan.callbacks._training_step import loss_fn_factory
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.batches import BatchSplitError, batch_size
from lightning_nan.core.culprits import CulpritReport, find_culprits
from lightning_nan.core.distributed import world
from lightning_nan.core.errors import NonFiniteWarning
from lightning_nan.core.events import IncidentEvent
from lightning_nan.core.incident import Incident
from lightning_nan.core.quarantine import make_record
from lightning_nan.core.records import BatchRecord, BisectionRecord, LocalizationRecord
from lightning_nan.core.sharding import is_sharded

if TYPE_CHECKING:
    from lightning_nan.callbacks.batch_bisection import BatchBisectionBase

__all__ = ["RankFindings", "merge", "search_local"]

_UNKNOWN_INDICES = (
    "data set indices are unknown (iterable data set or custom loader): samples are identified by their "
    "position in the batch and a content fingerprint"
)
_WHOLE_BATCH = "every sample fails on its own: a model problem (weights, learning rate, an unsafe op), not the data"
_UNCONFIRMED = (
    "samples that fail only together, or that failed only once (not again under a fresh random state, "
    "or not among the clean rest of the batch), are reported here and not quarantined"
)


@dataclass
class RankFindings:
    """What one rank found (gathered from every rank)."""

    error: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)
    localization: LocalizationRecord | None = None


def search_local(bisection: BatchBisectionBase, trainer: TrainerLike, pl_module: Any, event: IncidentEvent, locate: bool) -> RankFindings:
    """Bisect this rank's batches of ``event``; raises when this rank cannot re-evaluate alone."""
    incident = event.incident
    rank = world()[0]
    if world()[1] > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
        raise RuntimeError(
            "SyncBatchNorm communicates in its forward pass, so sub-batches cannot be re-evaluated on one rank "
            "alone; BatchBisection is off for models with SyncBatchNorm under DDP."
        )
    if world()[1] > 1 and (shards_parameters(trainer) or is_sharded(list(pl_module.parameters()))):
        raise RuntimeError(
            f"{type(trainer.strategy).__name__} shards the parameters, so every forward pass gathers them from "
            "every rank and sub-batches cannot be re-evaluated on one rank alone; BatchBisection is off there."
        )
    backward = incident.kind == "grad"
    manual = not pl_module.automatic_optimization
    loss_fn_for = loss_fn_factory(trainer, pl_module, manual)
    found = RankFindings()
    for batch_idx, batch in event.batches:
        indices = bisection.batch_indices(batch_idx)
        if indices is not None and bisection.splitter is None and batch_size(batch) != len(indices):
            raise BatchSplitError(
                f"Cannot split a batch of type {type(batch).__qualname__}: its first tensor has {batch_size(batch)} rows "
                f"but the loader put {len(indices)} samples in it. Pass `splitter=` (a function (batch, positions) -> "
                "sub_batch) and `sizer=` (batch -> number of samples) to BatchBisection."
            )
        report: CulpritReport = find_culprits(
            loss_fn_for(batch_idx),
            batch,
            module=pl_module,
            backward=backward,
            splitter=bisection.splitter,
            sizer=bisection.sizer,
            min_size=bisection.min_size,
            max_tests=bisection.max_tests,
            locate=locate and found.localization is None,
        )
        known, index_of = indices is not None, indices or []  # position in the batch -> data set index
        name = (lambda p: index_of[p]) if known else (lambda p: p)  # noqa: E731, B023 (used in this iteration)
        facts = dict(zip(report.positions, report.evidence))
        for pos, fp, dirty_input in zip(report.positions, report.fingerprints, report.input_nonfinite):
            if pos not in report.dirty:  # triggers and unconfirmed groups are reported, never quarantined
                continue
            if known and any(r["index"] == index_of[pos] for r in found.records):
                continue  # a sample a batch repeats (to fill a quarantined one's place): one record
            reason = f"non-finite {'gradient' if backward else 'loss'}: {facts.get(pos) or 'its input is bad'}"
            found.records.append(
                make_record(
                    index=index_of[pos] if known else None, position=pos, epoch=incident.epoch,
                    step=incident.step, batch_idx=batch_idx, reason=reason, fingerprint=fp, rank=rank,
                    kind=incident.kind, input_nonfinite=dirty_input,
                )
            )
        if report.localization is not None:
            loc = report.localization
            found.localization = LocalizationRecord.from_dict(dict(loc.to_dict(), summary=loc.summary(), model=type(pl_module).__name__))
        found.batches.append(
            BatchRecord(
                batch_idx=batch_idx,
                rank=rank,
                size=report.size,
                forward_passes=report.tests + report.confirm_tests,
                reproduced=report.reproduced,
                whole_batch=report.whole_batch,
                complete=report.complete,
                indices_known=known,
                groups=[[name(p) for p in g] for g in report.groups],
                dirty=[name(p) for p in report.dirty],
                triggers=[name(p) for p in report.triggers],
                unconfirmed=[[name(p) for p in g] for g in report.unconfirmed],
                evidence={str(name(p)): e for p, e in zip(report.positions, report.evidence) if e},
                confirm_passes=report.confirm_tests,
                seconds=round(report.seconds, 4),
            )
        )
        if bisection.dump_dir is not None and not bisection._dumped and report.groups:
            try:
                dump_failing(
                    bisection.dump_dir, pl_module, batch, batch_idx, report, incident, backward=backward, manual=manual,
                    indices=indices, loss_fn=loss_fn_for(batch_idx), splitter=bisection.splitter,
                )
                bisection._dumped = True
            except Exception as err:  # noqa: BLE001 - a dump is a bonus: never lose the search for it
                incident.detail["dump_error"] = (
                    f"{type(err).__name__}: {err}. A dump pickles the model (its class must be importable) and "
                    "exports its loss with torch.export."
                )
    return found


def merge(bisection: BatchBisectionBase, trainer: TrainerLike, incident: Incident, views: list[RankFindings], locate: bool) -> None:
    """Put what every rank found on ``incident``, quarantine its dirty samples, log (the same on every rank)."""
    errors = [f"rank {r}: {v.error}" for r, v in enumerate(views) if v.error]
    records = [r for v in views for r in v.records]
    batches = [b for v in views for b in v.batches]
    localization = next((v.localization for v in views if v.localization), None)
    passes = sum(b.forward_passes for b in batches)
    bisection.forward_passes += passes
    indices_known = all(b.indices_known for b in batches) if batches else True
    found = sorted({r["index"] for r in records if r["index"] is not None})
    triggers = sorted({i for b in batches for i in b.triggers if i is not None})
    unconfirmed = [g for b in batches for g in b.unconfirmed]
    positions = [[r["rank"], r["batch_idx"], r["position"]] for r in records]
    summary = BisectionRecord(
        step=incident.step,
        forward_passes=passes,
        reproduced=any(b.reproduced for b in batches),
        whole_batch=any(b.whole_batch for b in batches),
        indices_known=indices_known,
        batches=batches,
        errors=errors,
        quarantined=found if indices_known else positions,
        triggers=triggers,
        confirm_passes=sum(b.confirm_passes for b in batches),
        unconfirmed=unconfirmed,
    )
    if not indices_known:
        summary.note = _UNKNOWN_INDICES
    if summary.whole_batch:
        summary.note = _WHOLE_BATCH
    if unconfirmed:
        summary.note = _UNCONFIRMED
    incident.bisection = summary
    if triggers and indices_known:
        incident.triggers = triggers
    if records:
        incident.samples = found if indices_known else None
        if not indices_known:
            summary.positions = positions
            summary.fingerprints = [r["fingerprint"] for r in records]
    if localization is not None:
        bisection._localized = True
        incident.localization = localization
        incident.module = localization.module_name()
    elif locate and summary.reproduced:
        bisection._localized = True
    bisection._keeper.add(records)
    bisection.reports.append({k: v for k, v in summary.to_dict().items() if k != "batches"} | {"samples": found})
    log_metrics(
        trainer,
        {"bisection/forward_passes": float(passes), "bisection/quarantined": float(len(bisection._keeper.excluded))},
        step=incident.step,
    )
    if errors and bisection._keeper.rank_zero:
        warnings.warn(f"BatchBisection could not search step {incident.step}: {'; '.join(errors)}", NonFiniteWarning, stacklevel=2)
