"""What the guard does once a step looks bad: confirm it, build the incident, diagnose, escalate, record.

:class:`StepIncidents` is the part of :class:`~lightning_nan.core.step_guard.StepGuard` that runs on
the failure path only (host syncs and collectives allowed: every rank is here, the screen agreed).
Listeners hear of the incident in the order of their :class:`~lightning_nan.core.events.Phase`:
fact finders, then the guard's diagnosis, then those that act; when skipping cannot help, escalation
handlers may restore a finite state, otherwise :class:`~lightning_nan.core.errors.NonFiniteError`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.data_evidence import broken_pipeline
from lightning_nan.core.diagnosis import StepRecord, diagnose
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.divergence import DivergenceWatch
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.events import Evidence, IncidentEvent, Phase, escalate, evidence_of, notify, phase_of
from lightning_nan.core.incident import Incident, IncidentAction
from lightning_nan.core.norms import total_norm
from lightning_nan.core.recurrence import Recurrence, batch_key, joined_key
from lightning_nan.core.step_faults import bad_input_fields, exact_faults, finite, json_number, merge_ranks
from lightning_nan.core.step_screen import FLAGS, Screen

ADVICE = {
    "loss": (
        "The loss was NaN/Inf: look for log(0), 0/0, exp overflow or a saturated softmax "
        "(use log_softmax, an epsilon, clamping); if it recurs, lower the learning rate or clip gradients."
    ),
    "grad": (
        "The gradients were NaN/Inf with a finite loss: clip gradients (GradientClipping) or lower the "
        "learning rate; check ops with unbounded derivatives (sqrt or pow near 0, division)."
    ),
    "param": (
        "The weights are NaN/Inf, so skipping steps cannot help: restore a good state (CheckpointRollback or "
        "your last checkpoint), then lower the learning rate and clip gradients."
    ),
    "input": (
        "The input batch holds NaN/Inf: clean the data set, or let BatchBisection find and quarantine the samples."
    ),
    "scale": (
        "The fp16 loss scale collapsed: nearly every step overflows. Use precision='bf16-mixed', lower the "
        "learning rate, or normalise the inputs."
    ),
    "divergence": (
        "The loss (or gradient norm) grew by orders of magnitude: lower the learning rate, clip gradients; "
        "CheckpointRollback restores the state before the blow-up."
    ),
    "jump": (
        "The weights moved far more in one step than an update can: restore a good state (CheckpointRollback) "
        "and check for in-place writes to parameters or faulty hardware."
    ),
}

# Which agreed flag names the incident when several are set (under a GradScaler a gradient overflow
# alone is not a failure, so a collapsed scale outranks it).
_FLAG_KINDS = ("param", "input", "loss", "scale", "grad")


@dataclass
class StepVerdict:
    """The outcome of :meth:`~lightning_nan.core.step_guard.StepGuard.check`.

    Attributes:
        skipped: a failed step: the gradients were cleared, ``optimizer.step()`` will change nothing.
        incident: the recorded incident, when there was one.
        scaler_overflow: only the gradients were non-finite and a GradScaler is active: the scaler
            skips this step and lowers its scale by itself, which is not counted as a failure (the
            gradients are cleared all the same, in case the fault came after ``unscale_``).
    """

    skipped: bool = False
    incident: Incident | None = None
    scaler_overflow: bool = False


@dataclass
class CheckedStep:
    """The live objects of the step being checked, for the failure path."""

    step: int
    epoch: int | None
    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    with_grad: list[Tensor]
    grad_norms: Tensor | None
    batches: list[tuple[int, Any]]
    losses: list[Tensor]
    loss_where: list[int | None]
    scale: Tensor | None
    scaler: Any
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


class StepIncidents:
    """The failure path of :class:`~lightning_nan.core.step_guard.StepGuard` (its state is the guard's)."""

    max_consecutive: int
    min_loss_scale: float
    detect_divergence: bool
    listeners: list[Any]
    reduce: Callable[[Tensor], Tensor]
    on_record: Callable[[Incident], None] | None
    recurrence: Recurrence
    divergence: DivergenceWatch
    history: deque[StepRecord]
    incidents: list[Incident]
    skipped_steps: int
    consecutive_skips: int
    scaler_overflows: int
    _names: dict[int, str]

    def _name(self, p: Tensor, i: int) -> str:
        return self._names.get(id(p), f"param[{i}]")

    def _watch(self, step: int, seen: Screen, losses: bool, grads: bool) -> tuple[str, str] | None:
        """``(kind, evidence)`` when this finite step's values exploded (host arithmetic only)."""
        if not self.detect_divergence:
            return None
        return self.divergence.check(self.history, step, seen.loss if losses else None, seen.grad_norm if grads else None)

    def _failed(self, seen: Screen, at: CheckedStep) -> StepVerdict:
        """A step the screen flagged: check exactly, agree, then skip it (or let GradScaler skip it)."""
        local = exact_faults(
            seen.faults, batches=at.batches, losses=at.losses, grad_norms=at.grad_norms, params=at.params,
            scale=at.scale, min_loss_scale=self.min_loss_scale,
        )
        views = gather_objects(local)
        flags = {k: any(v[k] for v in views) for k in FLAGS}
        if not any(flags.values()):  # finite, only large enough for a 2-norm to overflow
            growth = self._watch(at.step, seen, bool(at.losses), bool(at.with_grad))
            if growth is not None:  # e.g. a weight that jumped to 1e30: its norm overflows, its value is finite
                return self._grew(growth, at)
            self.consecutive_skips = 0
            return StepVerdict()
        for p in at.params:  # harmless where GradScaler skips anyway; safe if it missed a late fault
            p.grad = None
        if at.scaler is not None and flags["grad"] and not (flags["loss"] or flags["input"] or flags["param"] or flags["scale"]):
            # GradScaler saw the same overflow in unscale_: it skips the step and lowers its scale itself.
            self.scaler_overflows += 1
            return StepVerdict(scaler_overflow=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        kind = next(k for k in _FLAG_KINDS if flags[k])
        bad_loss_at = [w for w, v in zip(at.loss_where, at.losses) if not finite(v)]
        ranks, offenders, detail = merge_ranks(local[kind], self._offenders(kind, at), self._details(kind, at, bad_loss_at))
        incident = Incident(
            step=at.step, kind=kind, advice=ADVICE[kind], epoch=at.epoch, batch_idx=sorted({i for i, _ in at.batches}) or None,
            ranks=ranks, params=offenders, detail=detail,
        )
        self._dispatch(self._event(incident, at), at.device)
        return StepVerdict(skipped=True, incident=incident)

    def _grew(self, growth: tuple[str, str], at: CheckedStep) -> StepVerdict:
        """The failure path of a finite step that diverged or whose weights jumped (the same on every rank)."""
        for p in at.params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        kind, evidence = growth
        record = self.history[-1]
        detail: dict[str, Any] = {"consecutive_skips": self.consecutive_skips, "growth": evidence}
        for key, value in (("loss", record.loss), ("grad_norm", record.grad_norm), ("weight_norm", record.weight_norm)):
            if value is not None:
                detail[key] = json_number(value)
        incident = Incident(
            step=at.step, kind=kind, advice=ADVICE[kind], epoch=at.epoch, batch_idx=sorted({i for i, _ in at.batches}) or None,
            ranks=list(range(world()[1])), detail=detail,
        )
        self.divergence.reset()
        self._dispatch(self._event(incident, at), at.device)
        return StepVerdict(skipped=True, incident=incident)

    def _event(self, incident: Incident, at: CheckedStep) -> IncidentEvent:
        return IncidentEvent(
            incident=incident, optimizer=at.optimizer, batches=list(at.batches), grad_norms=at.grad_norms,
            param_names=[self._name(p, i) for i, p in enumerate(at.with_grad)], guard=self, extra=dict(at.extra),
        )

    def _offenders(self, kind: str, at: CheckedStep) -> list[str]:
        if kind == "param":
            return [self._name(p, i) for i, p in enumerate(at.params) if not finite(p)]
        if kind == "grad" and at.grad_norms is not None:  # after a bad loss or input every gradient is NaN: no clue
            return [self._name(p, i) for i, (p, v) in enumerate(zip(at.with_grad, at.grad_norms.tolist())) if not math.isfinite(v)]
        return []

    def _details(self, kind: str, at: CheckedStep, bad_loss_at: list[Any]) -> dict[str, Any]:
        detail: dict[str, Any] = {"consecutive_skips": self.consecutive_skips}
        if at.grad_norms is not None:
            detail["grad_norm"] = json_number(float(total_norm(at.grad_norms)))
        if bad_loss_at:
            detail["loss_batches"] = bad_loss_at
        if at.scale is not None:
            detail["loss_scale"] = json_number(float(at.scale))
        if kind == "input":
            detail["input_fields"] = bad_input_fields(at.batches)
        return detail

    def _dispatch(self, event: IncidentEvent, device: torch.device) -> None:
        """Tell listeners, escalate when skipping cannot help, record; raise if nobody recovered."""
        incident = event.incident
        # Facts from each rank's own batches, agreed (a collective on the failure path: every rank is here).
        pipeline = broken_pipeline(event.batches) if incident.kind in ("input", "loss", "grad") else None
        views = gather_objects((pipeline, batch_key(event.batches)))
        broken = [f"rank {r}: {p}" if len(views) > 1 else p for r, (p, _) in enumerate(views) if p]
        if broken:  # every sample non-finite: the pipeline, not a sample
            incident.detail["pipeline"] = "; ".join(broken)
        incident.detail["batch_key"] = views[0][1] if len(views) == 1 else joined_key(k for _, k in views)
        phases = [phase_of(listener) for listener in self.listeners]
        finders = evidence_of(self.listeners)  # what they set out to establish, before they try
        notify([li for li, p in zip(self.listeners, phases) if p < Phase.DIAGNOSIS], event)  # evidence first (bisection)
        self._diagnose(incident, finders)
        if incident.cause == "dirty_data" and incident.samples and self.consecutive_skips > 0:
            self.consecutive_skips -= 1  # quarantined: those samples are left out from the next epoch on
        notify([li for li, p in zip(self.listeners, phases) if p > Phase.DIAGNOSIS], event)
        raise_error = self._escalate(event, device)
        if self.history and self.history[-1].step == incident.step:
            self.history[-1].cause = incident.cause
        self.incidents.append(incident)
        if self.on_record is not None:
            self.on_record(incident)
        if raise_error:
            raise NonFiniteError(incident, self.incidents[:-1])

    def _escalate(self, event: IncidentEvent, device: torch.device) -> bool:
        """Ask the escalation handlers when skipping cannot help; whether to raise (nobody recovered)."""
        incident = event.incident
        stop = self.recurrence.stop(incident)
        if stop is not None:  # skipping stopped being the answer: no handler can cure a model bug or the data
            incident.detail["escalation"] = stop
            incident.action = IncidentAction.RAISED
            return True
        corrupt = incident.cause == "corruption"
        if not (incident.kind in ("param", "divergence", "jump") or corrupt or self.consecutive_skips >= self.max_consecutive):
            return False
        optional = incident.kind in ("divergence", "jump") and not corrupt  # finite: skipping is enough
        incident.detail["escalation"] = (
            "The weights are non-finite, so skipping the step cannot help."
            if incident.kind == "param"
            else "The weights changed without an update to explain it; skipping cannot undo that."
            if corrupt
            else "The loss diverged: the weights that produced it are the problem."
            if optional
            else f"{self.consecutive_skips} steps in a row were skipped (max_consecutive={self.max_consecutive}); "
            "the weights no longer change, so the next batches will fail the same way."
        )
        recovered_by = self._agreed(escalate(self.listeners, event), device)
        if recovered_by:
            incident.action = IncidentAction.RECOVERED.by(recovered_by)
            self.consecutive_skips = 0
            return False
        if optional:
            return False
        incident.action = IncidentAction.RAISED
        return True

    def _diagnose(self, incident: Incident, finders: frozenset[Evidence] = frozenset()) -> None:
        """Fill ``cause``, ``advice`` and ``detail["evidence"]`` from the incident and the history."""
        if incident.cause != "unknown":  # a listener already decided
            return
        found = diagnose(incident, list(self.history), finders=finders)
        previous = self.incidents[-1] if self.incidents else None
        if (
            found.cause == "unknown"
            and previous is not None
            and previous.cause != "unknown"
            and incident.detail.get("batch_key") is not None
            and previous.detail.get("batch_key") == incident.detail.get("batch_key")
        ):  # the very same samples again, from the same weights: the same failure
            found.cause, found.advice = previous.cause, previous.advice
            found.evidence = [f"the same samples failed at step {previous.step}, with the same diagnosis"]
            found.missing = []
        incident.cause = found.cause
        if found.advice:
            incident.advice = found.advice
        incident.detail["evidence"] = found.evidence
        if found.missing:
            incident.detail["missing_evidence"] = found.missing

    def _agreed(self, recovered_by: str | None, device: torch.device) -> str | None:
        """Make sure all ranks agree on whether a handler recovered."""
        if world()[1] == 1:
            return recovered_by
        flags = self.reduce(torch.tensor([float(recovered_by is not None), float(recovered_by is None)], device=device)).tolist()
        if flags[0] > 0 and flags[1] > 0:
            raise RuntimeError(
                "Escalation handlers disagreed across ranks (some recovered, some did not); every handler must "
                "return the same answer on all ranks."
            )
        return recovered_by

