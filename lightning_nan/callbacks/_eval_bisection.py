"""BatchBisection for a validation/test incident: which samples of the batch make its values non-finite.

The batch is bisected with the module's own ``validation_step``/``test_step`` (under the state-
preserving context; ``self.log`` captures instead of logging): a sub-batch fails when what the step
returns or logs is NaN/Inf. The culprits go to the quarantine with ``split`` ("val"/"test") recorded;
data set indices are read off a loader that delivers its samples in a fixed order (a sequential
sampler, or a DistributedSampler without shuffling), else the samples are named by their position
and a content fingerprint. The batch without them goes back to NaNGuard as
``event.extra["clean_batch"]``, which runs the step again on it so the epoch's values keep the
clean samples' contribution.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torchmetrics import Metric

from lightning_nan.callbacks._trainer import log_metrics
from lightning_nan.callbacks._training_step import patched
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.batches import select
from lightning_nan.core.culprits import find_culprits
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.events import IncidentEvent
from lightning_nan.core.norms import iter_tensors
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record
from lightning_nan.core.records import BisectionRecord

if TYPE_CHECKING:
    from lightning_nan.callbacks.batch_bisection import BatchBisectionBase


def bisect_eval(bisection: BatchBisectionBase, event: IncidentEvent) -> None:
    """Fill ``event.incident`` (samples, cause, ``bisection``), quarantine, set ``clean_batch``."""
    incident = event.incident
    trainer, pl_module = event.extra["trainer"], event.extra["pl_module"]
    stage, dataloader_idx = event.extra["stage"], event.extra["dataloader_idx"]
    (batch_idx, batch), = event.batches
    local: dict[str, Any] = {"error": None, "records": [], "tests": 0, "whole_batch": False, "indices_known": True, "triggers": []}
    clean = None
    try:
        loader = _loader(trainer, stage, dataloader_idx)
        report = find_culprits(
            _eval_loss_fn(trainer, pl_module, stage, batch_idx, dataloader_idx),
            batch,
            module=pl_module,
            splitter=bisection.splitter,
            sizer=bisection.sizer,
            min_size=bisection.min_size,
            max_tests=bisection.max_tests,
        )
        indices = _fixed_order_indices(loader, batch_idx, report.size)
        local.update(tests=report.tests + report.confirm_tests, whole_batch=report.whole_batch, indices_known=indices is not None)
        local["triggers"] = [indices[p] if indices is not None else p for p in report.triggers]
        for pos, fp, dirty_input in zip(report.positions, report.fingerprints, report.input_nonfinite):
            if pos not in report.dirty:  # ordinary samples that trip the model are named, never quarantined
                continue
            local["records"].append(
                make_record(
                    index=indices[pos] if indices is not None else None,
                    position=pos,
                    epoch=incident.epoch,
                    step=incident.step,
                    batch_idx=batch_idx,
                    reason=f"non-finite {stage} values" + (" (its input holds NaN/Inf)" if dirty_input else " (finite input)"),
                    fingerprint=fp,
                    rank=world()[0],
                    kind=incident.kind,
                    split=incident.kind,
                    input_nonfinite=dirty_input,
                )
            )
        if report.positions and report.complete and not report.whole_batch:
            keep = [p for p in range(report.size) if p not in set(report.positions)]
            if keep:
                clean = bisection.splitter(batch, keep) if bisection.splitter is not None else select(batch, keep)
    except Exception as err:  # noqa: BLE001 - every rank must reach the gather below
        local["error"] = f"{type(err).__name__}: {err}"
    views = gather_objects(local)  # a collective: every rank reaches it once per incident
    records = [r for v in views for r in v["records"]]
    whole = any(v["whole_batch"] for v in views)
    known = all(v["indices_known"] for v in views)
    passes = sum(v["tests"] for v in views)
    bisection.forward_passes += passes
    errors = [f"rank {r}: {v['error']}" for r, v in enumerate(views) if v["error"]]
    summary = BisectionRecord(step=incident.step, split=incident.kind, forward_passes=passes, indices_known=known, errors=errors)
    triggers = sorted({i for v in views for i in v.get("triggers", []) if i is not None})
    if triggers:
        incident.triggers = triggers
        summary.triggers = triggers
    if whole:
        summary.note = "every sample fails on its own: a model problem, not the data (nothing quarantined)"
    elif records:
        incident.cause = "dirty_data"
        found = sorted({r["index"] for r in records if r["index"] is not None})
        incident.samples = found if known else None
        if not known:
            summary.positions = [[r["rank"], r["batch_idx"], r["position"]] for r in records]
            summary.fingerprints = [r["fingerprint"] for r in records]
        where = f"data set indices {found}" if known else "samples (by position and fingerprint)"
        incident.advice = (
            f"Dirty {stage} data: {where} of the {stage} set are quarantined with split '{incident.kind}' "
            "(`lightning-nan quarantine list`); fix or drop them."
        )
        keeper = bisection._keeper
        if keeper.quarantine is not None:  # during fit: kept with the run's records (checkpoints, unwritable files)
            keeper.add(records, leave_out=False)  # a validation index is not a training one
            summary.quarantine = keeper.path
        elif keeper.rank_zero:  # trainer.validate / test alone
            path = bisection.quarantine_path or os.path.join(trainer.default_root_dir or os.getcwd(), QUARANTINE_FILE)
            Quarantine(path).add(records)
            summary.quarantine = os.fspath(path)
    incident.bisection = summary
    bisection.reports.append({k: v for k, v in summary.to_dict().items() if k != "batches"} | {"samples": incident.samples or []})
    if not whole and clean is not None:
        event.extra["clean_batch"] = clean
    log_metrics(trainer, {"bisection/forward_passes": float(passes)}, step=incident.step)


def _loader(trainer: TrainerLike, stage: str, dataloader_idx: int) -> Any:
    loaders = trainer.val_dataloaders if stage == "validation" else trainer.test_dataloaders
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return loaders


def _fixed_order_indices(loader: Any, batch_idx: int, size: int) -> list[int] | None:
    """The data set indices of batch ``batch_idx``, when the loader's order does not change from one
    pass to the next (a sequential sampler, a DistributedSampler without shuffling); else ``None``."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    per_batch = getattr(batch_sampler, "batch_size", None)
    fixed = isinstance(sampler, torch.utils.data.SequentialSampler) or (
        isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.shuffle
    )
    if not fixed or sampler is None or not isinstance(batch_sampler, torch.utils.data.BatchSampler) or not per_batch:
        return None
    order = list(sampler)[batch_idx * per_batch : (batch_idx + 1) * per_batch]
    return order if len(order) == size else None


def _eval_loss_fn(trainer: TrainerLike, pl_module: Any, stage: str, batch_idx: int, dataloader_idx: int) -> Any:
    """``loss_fn(sub_batch)``: 0 when the evaluation step's output and logged values are finite, else NaN."""
    step = getattr(pl_module, f"{stage}_step")
    loaders = trainer.val_dataloaders if stage == "validation" else trainer.test_dataloaders
    several = isinstance(loaders, (list, tuple)) and len(loaders) > 1

    def loss_fn(sub: Any) -> torch.Tensor:
        with _capturing_log(pl_module) as logged:
            out = step(sub, batch_idx, dataloader_idx) if several else step(sub, batch_idx)
        tensors = [t for _, t in iter_tensors([out, logged])]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        return torch.tensor(0.0 if finite else float("nan"))

    return loss_fn


@contextmanager
def _capturing_log(pl_module: Any) -> Iterator[list[Any]]:
    """``self.log``/``self.log_dict`` keep the values (a logged Metric: its batch value) and log nothing."""
    logged: list[Any] = []

    def value_of(value: Any) -> Any:
        # A logged Metric's value for this batch is what its forward returned; torchmetrics keeps it only in
        # `_forward_cache` (no public accessor), which Lightning's own on-step logging of a Metric reads too.
        return value._forward_cache if isinstance(value, Metric) else value

    patches = {
        "log": lambda name, value, *args, **kwargs: logged.append(value_of(value)),
        "log_dict": lambda values, *args, **kwargs: logged.extend(value_of(v) for v in values.values()),
    }
    with patched(pl_module, patches):
        yield logged
