"""Validation and test batches whose loss or logged values are NaN/Inf: an incident, kept out of the epoch.

Per evaluation batch: the logged values' accumulators and the module's torchmetrics are saved at
its start (references, and one fused copy of the metrics' tensor states), and at its end what it
returned and what it logged is checked in one fused pass and one device-to-host transfer (under
DDP the ranks agree with one more collective). A clean batch is left exactly as it was. A dirty one
becomes an incident (kind ``val`` or ``test``): its contribution to the epoch's values is taken
back out; when BatchBisection has named the samples that cause it and handed back the batch
without them (``event.extra["clean_batch"]``), the evaluation step runs again on those clean
samples with logging live, so the epoch's values leave out exactly the dirty samples. Otherwise
the whole batch is left out, and the incident says which.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_nan.callbacks._step_traces import LoggedValues, result_collection
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.batches import batch_size
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.events import IncidentEvent, notify_eval
from lightning_nan.core.incident import Incident, IncidentAction
from lightning_nan.core.metric_states import MetricStates, find_metrics
from lightning_nan.core.norms import iter_tensors, tensor_norms

ADVICE = (
    "A {split} batch produced a non-finite loss or logged value: look for dirty samples (BatchBisection names "
    "and quarantines them) or an operation unsafe on some inputs (log(0), 0/0, a saturated softmax)."
)


class EvalGuard:
    """Saves before each evaluation batch, checks after it; on a fault, takes it back out."""

    def __init__(self) -> None:
        self.metrics = MetricStates([])
        self.logged = LoggedValues()

    def start(self, pl_module: Any) -> None:
        """At the start of a validation or test loop."""
        self.metrics = MetricStates(find_metrics(pl_module))
        self.logged = LoggedValues()

    def save(self, trainer: TrainerLike) -> None:
        self.logged.save(result_collection(trainer))
        self.metrics.save()

    def check(
        self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int, stage: str,
        listeners: list[Any], reduce: Any,
    ) -> Incident | None:
        """Check the batch just evaluated; on a fault return the incident, with the epoch's values cleaned."""
        results = result_collection(trainer)
        values = dict(iter_tensors(outputs, "output"))
        values.update(self._logged_now(results))
        device = values[next(iter(values))].device if values else torch.device("cpu")
        flag = torch.zeros(1, device=device)
        if values:
            flag = (~torch.isfinite(tensor_norms(list(values.values())).sum())).float().reshape(1)
        if world()[1] > 1:  # every rank takes part in what follows (the bisection gathers what the ranks found)
            flag = reduce(flag.to(pl_module.device))
        if not flag.item():  # the one transfer of a clean batch
            return None
        mine = sorted(name for name, t in values.items() if not bool(torch.isfinite(t).all()))
        views = gather_objects(mine)  # the failure path: a collective allowed
        ranks = [r for r, names in enumerate(views) if names]
        split = "val" if stage == "validation" else "test"
        incident = Incident(
            step=trainer.global_step,
            kind=split,
            advice=ADVICE.format(split="validation" if split == "val" else split),
            epoch=trainer.current_epoch,
            batch_idx=[batch_idx],
            ranks=ranks or [0],
            detail={"nonfinite": sorted({n for names in views for n in names}), "dataloader_idx": dataloader_idx, "stage": stage},
            action=f"{IncidentAction.LEFT_OUT} the batch",
        )
        if trainer.sanity_checking:
            incident.detail["sanity_check"] = True
        event = IncidentEvent(
            incident=incident,
            batches=[(batch_idx, batch)],
            extra={"trainer": trainer, "pl_module": pl_module, "stage": stage, "dataloader_idx": dataloader_idx},
        )
        notify_eval(listeners, event)  # on every rank (bisection gathers what the ranks found)
        n = _size(batch)
        incident.detail["metrics"] = f"batch {batch_idx} ({n} samples) is left out of the epoch's {stage} values" + (
            f" on rank {', '.join(map(str, ranks))}" if world()[1] > 1 else ""
        )
        if not mine:  # this rank's batch was clean: its values stay
            return incident
        self._take_back(results)
        # One process: the step runs again on the samples bisection found clean. Under DDP the ranks
        # would have to re-run together (a logged value with sync_dist is a collective): the batch stays out.
        clean = event.extra.get("clean_batch") if world()[1] == 1 else None
        if clean is None:
            if incident.bisection is None:
                incident.detail["metrics"] += "; add BatchBisection to leave out only the dirty samples"
            return incident
        kept = _size(clean)
        if self._rerun(trainer, pl_module, clean, batch_idx, dataloader_idx, stage, results):
            incident.action = IncidentAction.LEFT_OUT.samples(n - kept, n)
            incident.detail["metrics"] = (
                f"the {stage} step ran again on the {kept} clean samples of batch {batch_idx}: the epoch's values "
                f"leave out only the {n - kept} dirty sample{'s' if n - kept != 1 else ''}"
            )
        else:
            self._take_back(results)
        return incident

    def _take_back(self, results: dict[str, Any] | None) -> None:
        self.logged.restore(results)  # the batch's contribution out (and the bisection's passes with it)
        self.logged.flush()
        self.metrics.restore()

    def _logged_now(self, results: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """The values logged since :meth:`save` (the batch's own value where Lightning keeps it)."""
        found = {}
        for key, entry in (results or {}).items():
            if entry.has_reset or not self.logged.updated(key, entry):
                continue
            value = entry._forward_cache if (entry.meta.on_step or not entry.is_tensor) else entry.value
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                found[f"self.log({entry.meta.name!r})"] = value.detach()
        return found

    def _rerun(
        self, trainer: TrainerLike, pl_module: Any, clean: Any, batch_idx: int, dataloader_idx: int, stage: str,
        results: Any,
    ) -> bool:
        """The evaluation step once more on ``clean``, logging live; whether all it gave was finite."""
        if results is None:
            return False
        step = getattr(trainer.strategy, f"{stage}_step")
        args: tuple[Any, ...] = (clean, batch_idx)
        loaders = trainer.val_dataloaders if stage == "validation" else trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)) and len(loaders) > 1:
            args += (dataloader_idx,)
        # Private, for want of a public way: `self.log` files values under the hook Lightning is running
        # (`_current_fx_name`, now this hook) and weighs them by the batch it was handed (`results.batch`).
        previous = (pl_module._current_fx_name, results.batch, results.batch_size)
        pl_module._current_fx_name, results.batch, results.batch_size = f"{stage}_step", clean, None
        try:
            outputs = step(*args)
        finally:
            pl_module._current_fx_name, results.batch, results.batch_size = previous
        values = list(dict(iter_tensors(outputs)).values()) + list(self._logged_now(results).values())
        return all(bool(torch.isfinite(t).all()) for t in values)


def _size(batch: Any) -> int:
    try:
        return batch_size(batch)
    except Exception:  # noqa: BLE001 - only for the message
        return math.nan  # type: ignore[return-value]
