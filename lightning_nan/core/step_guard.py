"""StepGuard: skip an optimizer step whose loss, inputs, gradients or weights are not finite.

Pure PyTorch; the Lightning callback :class:`~lightning_nan.NaNGuard` is a thin wrapper around it.
Per optimizer step it runs one fused norm pass over the gradients (and, every
``check_params_every_n_steps`` steps, one over the weights), agrees with the other ranks, and reads
the result back with a single device-to-host transfer. On a fault it sets every gradient of the
optimizer to ``None``, so the following ``optimizer.step()`` changes nothing: no weight, no momentum
or Adam moment, no per-parameter step counter.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> guard = StepGuard(model)
>>> before = [p.detach().clone() for p in model.parameters()]
>>> loss = model(torch.tensor([[1.0, float("nan")]])).sum()
>>> guard.observe_loss(loss)
>>> loss.backward()
>>> verdict = guard.check(opt)
>>> verdict.skipped, verdict.incident.kind
(True, 'loss')
>>> opt.step()  # a no-op: the gradients are gone
>>> all(torch.equal(a, b) for a, b in zip(before, model.parameters())), opt.state == {}
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from collections import deque

from lightning_nan.core.data_evidence import broken_pipeline
from lightning_nan.core.diagnosis import StepRecord, diagnose
from lightning_nan.core.divergence import DivergenceWatch
from lightning_nan.core.distributed import all_reduce_max, gather_objects, world
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.events import IncidentEvent, Phase, escalate, notify, phase_of
from lightning_nan.core.incident import Incident
from lightning_nan.core.losses import loss_scale, scalar_loss
from lightning_nan.core.norms import iter_tensors, tensor_norms, total_norm
from lightning_nan.core.recurrence import UNSAFE_OP_REPEATS, Recurrence, batch_key, joined_key
from lightning_nan.core.sharding import local_part
from lightning_nan.core.validate import integer, number

#: Default for ``max_consecutive``. While steps are skipped the weights do not change, so a run of
#: skips is either a run of bad batches or a model that fails on every batch. If even half of all
#: batches were bad, 20 bad batches in a row would come up by chance about once in a million
#: steps (0.5**20); 20 skips in a row therefore means the model, not the data, is broken.
DEFAULT_MAX_CONSECUTIVE = 20

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
#: Steps of history kept for the diagnosis.
HISTORY = 32
_FLAGS = ("input", "loss", "grad", "param", "scale")  # the order of the screened values


@dataclass
class StepVerdict:
    """The outcome of :meth:`StepGuard.check`.

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


class StepGuard:
    """Detects non-finite values around each optimizer step and skips that step.

    Args:
        named_parameters: a module, or ``(name, parameter)`` pairs, used to name offending parameters.
        max_consecutive: escalate after this many skipped steps in a row (see
            :data:`DEFAULT_MAX_CONSECUTIVE` for why 20).
        check_params_every_n_steps: check the weights at every n-th step (0: never). The weights checked
            at step n are those the previous step produced.
        min_loss_scale: with an fp16 GradScaler, a loss scale below this counts as a failure
            (1.0 by default, as DeepSpeed's ``min_loss_scale``).
        listeners: objects with ``on_nan_incident`` / ``on_nan_escalation`` (see :mod:`~lightning_nan.core.events`).
        reduce: in-place element-wise max over ranks; the default uses ``torch.distributed`` when initialised.
        on_record: called with each incident once listeners have filled it in (to log or write it).
        detect_divergence: also skip a step whose finite loss or gradient norm grew by orders of
            magnitude (:class:`~lightning_nan.core.divergence.GrowthDetector`), or whose finite weights
            jumped far beyond the steps before: incidents of kind ``"divergence"`` and ``"jump"``, caught
            before the first NaN. Host arithmetic on the values of the one transfer: no device work.
        unsafe_op_repeats: raise once the same unsafe operation (op and source line) has failed on this
            many steps (0: never): skipping would hide a model bug.

    Call :meth:`observe_batch` and :meth:`observe_loss` for every micro-batch, then :meth:`check`
    right before ``optimizer.step()`` (after ``scaler.unscale_(optimizer)`` under fp16 AMP, before
    any clipping).
    """

    def __init__(
        self,
        named_parameters: torch.nn.Module | Iterable[tuple[str, Tensor]] | None = None,
        *,
        max_consecutive: int = DEFAULT_MAX_CONSECUTIVE,
        check_params_every_n_steps: int = 1,
        min_loss_scale: float = 1.0,
        listeners: Sequence[Any] = (),
        reduce: Callable[[Tensor], Tensor] = all_reduce_max,
        on_record: Callable[[Incident], None] | None = None,
        detect_divergence: bool = True,
        unsafe_op_repeats: int = UNSAFE_OP_REPEATS,
    ) -> None:
        self.max_consecutive = integer("max_consecutive", max_consecutive, low=1)
        self.check_params_every_n_steps = integer(
            "check_params_every_n_steps", check_params_every_n_steps, low=0, hint="0 disables it"
        )
        self.min_loss_scale = number("min_loss_scale", min_loss_scale, low=0, low_open=True)
        self.listeners: list[Any] = list(listeners)
        self.reduce = reduce
        self.on_record = on_record
        self.detect_divergence = bool(detect_divergence)
        self.recurrence = Recurrence(unsafe_op_repeats)
        self.divergence = DivergenceWatch()
        self._names: dict[int, str] = {}
        if named_parameters is not None:
            self.set_parameter_names(named_parameters)

        self.checks = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.scaler_overflows = 0
        self.incidents: list[Incident] = []
        #: Per-parameter gradient 2-norms of the last check (float32, on the device), in the order of
        #: :attr:`last_grad_names`, so that clipping and monitoring can reuse them instead of a second pass.
        self.last_grad_norms: Tensor | None = None
        #: The 2-norm of all those gradients together, on the host from the check's one transfer (under
        #: DDP the largest rank's, so the same on every rank); ``None`` when not finite or there were none.
        #: ``GradientClipper.clip_`` uses it to skip a multiplication by exactly 1 without a device read.
        self.last_grad_norm_bound: float | None = None
        self._last_with_grad: list[Tensor] = []
        #: The last steps' loss, gradient norm and weight norm (host values of the one transfer per step).
        self.history: deque[StepRecord] = deque(maxlen=HISTORY)

        self._losses: list[Tensor] = []
        self._loss_where: list[int | None] = []
        self._input_sums: list[Tensor] = []
        self._window: list[tuple[int, Any]] = []
        self._recent: list[tuple[int, Any]] = []

    @property
    def last_grad_params(self) -> list[Tensor]:
        """The parameters behind :attr:`last_grad_norms`: pass both to ``GradientClipper.clip_``."""
        return list(self._last_with_grad)

    @property
    def last_grad_names(self) -> list[str]:
        """Names of the parameters behind :attr:`last_grad_norms` (built on demand)."""
        return [self._name(p, i) for i, p in enumerate(self._last_with_grad)]

    # ------------------------------------------------------------------ observation
    def set_parameter_names(self, named_parameters: torch.nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        """(Re)build the parameter-name table used in messages."""
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        self._names = {id(p): name for name, p in named_parameters}

    def observe_batch(self, batch: Any, batch_idx: int | None = None, *, check_inputs: bool = True) -> None:
        """Note the batch about to be fed forward; with ``check_inputs``, flag NaN/Inf in its float tensors."""
        if batch_idx is None:
            batch_idx = (self._window[-1][0] + 1) if self._window else 0
        self._window.append((batch_idx, batch))
        if check_inputs:
            tensors = [t for _, t in iter_tensors(batch)]
            if tensors:
                self._input_sums.append(tensor_norms(tensors).sum())

    def observe_loss(self, loss: Tensor, batch_idx: int | None = None) -> None:
        """Keep the loss for the step's check (call once per backward; no host synchronisation)."""
        self._losses.append(loss.detach())
        self._loss_where.append(batch_idx if batch_idx is not None else (self._window[-1][0] if self._window else None))

    # ------------------------------------------------------------------ the check
    def check(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int | None = None,
        epoch: int | None = None,
        scaler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> StepVerdict:
        """Decide whether the coming ``optimizer.step()`` is safe; if not, clear its gradients.

        Every rank must call this at the same step. Raises
        :class:`~lightning_nan.core.errors.NonFiniteError` when skipping cannot help and no
        escalation handler recovered.
        """
        step = self.checks if step is None else step
        self.checks += 1
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        check_params = bool(params) and self.check_params_every_n_steps > 0 and step % self.check_params_every_n_steps == 0
        # The one fused pass: gradient and weight 2-norms in a single foreach call.
        norms = tensor_norms(grads + params if check_params else grads)
        device = norms.device if norms.numel() else (params[0].device if params else torch.device("cpu"))
        grad_norms = norms[: len(grads)] if grads else None
        self.last_grad_norms, self._last_with_grad = grad_norms, with_grad
        scale = loss_scale(scaler)
        losses, loss_where, inputs = self._losses, self._loss_where, self._input_sums
        batches = self._window or self._recent
        self._recent = self._window[-1:] or self._recent
        self._window, self._losses, self._loss_where, self._input_sums = [], [], [], []

        if world()[1] > 1:  # agree: a fault on one rank is every rank's fault
            zero = torch.zeros((), device=device)
            values = torch.stack(
                [
                    torch.stack([v.to(device, non_blocking=True) for v in inputs]).sum() if inputs else zero,
                    torch.stack([scalar_loss(v).to(device, non_blocking=True) for v in losses]).sum() if losses else zero,
                    grad_norms.sum() if grad_norms is not None else zero,
                    norms[len(grads) :].sum() if check_params else zero,
                    scale.to(device, non_blocking=True) if scale is not None else zero + self.min_loss_scale,
                ]
            )
            faults = torch.cat([~torch.isfinite(values[:4]), values[4:] < self.min_loss_scale]).float()
            grad_total = total_norm(grad_norms).reshape(1) if grad_norms is not None else zero.reshape(1)  # for a clipper
            stats = torch.nan_to_num(torch.cat([values[1:4].float().abs(), grad_total]), nan=math.inf)  # the largest rank's
            reduced = self.reduce(torch.cat([faults, stats])).tolist()  # the one host transfer of a healthy step
            host, numbers, bound = [v > 0 for v in reduced[:5]], reduced[5:8], reduced[8]
        else:  # every number to the host in one transfer, summed there: one device op instead of a dozen
            tail = [scalar_loss(v) for v in losses] + inputs + ([scale.float()] if scale is not None else [])
            parts = [norms.reshape(-1).to(device), *(t.reshape(1).to(device, non_blocking=True) for t in tail)]
            flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()  # the one transfer
            at = len(norms)
            loss = sum(flat[at : at + len(losses)])
            at += len(losses)
            input_sum = sum(flat[at : at + len(inputs)])
            numbers = [loss, sum(flat[: len(grads)]), sum(flat[len(grads) : len(norms)])]
            bound = math.hypot(*flat[: len(grads)])  # the 2-norm, in float64
            host = [not math.isfinite(v) for v in (input_sum, *numbers)]
            host.append(scale is not None and flat[-1] < self.min_loss_scale)
        self.history.append(
            StepRecord(
                step,
                loss=numbers[0] if losses else None,
                grad_norm=numbers[1] if grads else None,  # the sum of the per-tensor norms: its trend is what counts
                weight_norm=numbers[2] if check_params else None,
            )
        )
        self.last_grad_norm_bound = bound if grads and math.isfinite(bound) else None
        growth = None
        if not any(host) and self.detect_divergence:
            growth = self._watch(step, numbers, bool(losses), bool(grads))
        if not any(host) and growth is None:
            self.consecutive_skips = 0
            return StepVerdict()
        if growth is not None:  # finite, but exploded: skip it before it turns into NaN
            return self._grew(growth, step, epoch, optimizer, params, grad_norms, batches, extra, device)

        # ---- failure path (rare): exact per-tensor checks, several syncs allowed, agreed again
        screened = dict(zip(_FLAGS, host))
        local = {
            "input": screened["input"] and any(not _finite(t) for _, b in batches for _, t in iter_tensors(b)),
            "loss": screened["loss"] and any(not _finite(v) for v in losses),
            "grad": screened["grad"] and grad_norms is not None and not _finite(grad_norms),  # a 2-norm that overflows counts, as in torch
            "param": screened["param"] and any(not _finite(p) for p in params),
            "scale": screened["scale"] and scale is not None and float(scale) < self.min_loss_scale,
        }
        views = gather_objects(local)
        flags = {k: any(v[k] for v in views) for k in _FLAGS}
        if not any(flags.values()):  # finite, only large enough for a 2-norm to overflow
            growth = self._watch(step, numbers, bool(losses), bool(grads)) if self.detect_divergence else None
            if growth is not None:  # e.g. a weight that jumped to 1e30: its norm overflows, its value is finite
                return self._grew(growth, step, epoch, optimizer, params, grad_norms, batches, extra, device)
            self.consecutive_skips = 0
            return StepVerdict()
        for p in params:  # harmless where GradScaler skips anyway; safe if it missed a late fault
            p.grad = None
        if scaler is not None and flags["grad"] and not (flags["loss"] or flags["input"] or flags["param"] or flags["scale"]):
            # GradScaler saw the same overflow in unscale_: it skips the step and lowers its scale itself.
            self.scaler_overflows += 1
            return StepVerdict(scaler_overflow=True)

        self.skipped_steps += 1
        self.consecutive_skips += 1
        kind = next(k for k in _FLAG_KINDS if flags[k])
        bad_loss_at = [w for w, v in zip(loss_where, losses) if not _finite(v)]
        ranks, offenders, detail = _merge_ranks(
            local[kind],
            self._offenders(kind, with_grad, grad_norms, params),
            self._details(kind, grad_norms, scale, bad_loss_at, batches),
        )
        incident = Incident(
            step=step,
            kind=kind,
            advice=ADVICE[kind],
            epoch=epoch,
            batch_idx=sorted({i for i, _ in batches}) or None,
            ranks=ranks,
            params=offenders,
            detail=detail,
        )
        event = IncidentEvent(
            incident=incident,
            optimizer=optimizer,
            batches=list(batches),
            grad_norms=grad_norms,
            param_names=self.last_grad_names,
            guard=self,
            extra=dict(extra or {}),
        )
        self._dispatch(event, device)
        return StepVerdict(skipped=True, incident=incident)

    def _watch(self, step: int, numbers: list[float], loss: bool, grads: bool) -> tuple[str, str] | None:
        """``(kind, evidence)`` when this finite step's values exploded (host arithmetic only)."""
        return self.divergence.check(self.history, step, numbers[0] if loss else None, numbers[1] if grads else None)

    def _grew(
        self, growth: tuple[str, str], step: int, epoch: int | None, optimizer: torch.optim.Optimizer, params: list[Tensor],
        grad_norms: Tensor | None, batches: list[Any], extra: dict[str, Any] | None, device: torch.device,
    ) -> StepVerdict:
        """The failure path of a finite step that diverged or whose weights jumped (the same on every rank)."""
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive_skips += 1
        kind, evidence = growth
        record = self.history[-1]
        detail: dict[str, Any] = {"consecutive_skips": self.consecutive_skips, "growth": evidence}
        for key, value in (("loss", record.loss), ("grad_norm", record.grad_norm), ("weight_norm", record.weight_norm)):
            if value is not None:
                detail[key] = _number(value)
        incident = Incident(
            step=step, kind=kind, advice=ADVICE[kind], epoch=epoch, batch_idx=sorted({i for i, _ in batches}) or None,
            ranks=list(range(world()[1])), detail=detail,
        )
        event = IncidentEvent(
            incident=incident, optimizer=optimizer, batches=list(batches), grad_norms=grad_norms,
            param_names=self.last_grad_names, guard=self, extra=dict(extra or {}),
        )
        self.divergence.reset()
        self._dispatch(event, device)
        return StepVerdict(skipped=True, incident=incident)

    def recovered(self) -> None:
        """A listener restored a finite state (a rollback) while acting on an incident: the run of skipped
        steps ends here. Call it on every rank (the decision to restore is agreed)."""
        self.consecutive_skips = 0

    def check_parameters(
        self, params: Iterable[Tensor], *, step: int | None = None, epoch: int | None = None, extra: dict[str, Any] | None = None
    ) -> Incident | None:
        """Check weights outside a step (e.g. once training ended); escalate if any is non-finite.

        A collective under DDP: call it on every rank.
        """
        params = list(params)
        if not params:
            return None
        device = params[0].device
        screened = not _finite(self.reduce(tensor_norms(params).sum().reshape(1)))
        saw = screened and any(not _finite(p) for p in params)  # exact, past a 2-norm overflow
        if not any(gather_objects(saw)):
            return None
        ranks, offenders, detail = _merge_ranks(saw, self._offenders("param", [], None, params), {})
        incident = Incident(
            step=self.checks if step is None else step,
            kind="param",
            advice=ADVICE["param"],
            epoch=epoch,
            ranks=ranks,
            params=offenders,
            detail=detail,
            action="found after training",
        )
        self._dispatch(IncidentEvent(incident=incident, guard=self, extra=dict(extra or {})), device)
        return incident

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
        notify([li for li, p in zip(self.listeners, phases) if p < Phase.DIAGNOSIS], event)  # evidence first (bisection)
        self._diagnose(incident)
        if incident.cause == "dirty_data" and incident.samples and self.consecutive_skips > 0:
            self.consecutive_skips -= 1  # quarantined: those samples are left out from the next epoch on
        notify([li for li, p in zip(self.listeners, phases) if p > Phase.DIAGNOSIS], event)
        raise_error = False
        stop = self.recurrence.stop(incident)
        if stop is not None:  # skipping stopped being the answer: no handler can cure a model bug or the data
            incident.detail["escalation"] = stop
            incident.action, raise_error = "raised", True
        elif incident.kind in ("param", "divergence", "jump") or incident.cause == "corruption" or self.consecutive_skips >= self.max_consecutive:
            optional = incident.kind in ("divergence", "jump") and incident.cause != "corruption"  # finite: skipping is enough
            incident.detail["escalation"] = (
                "The weights are non-finite, so skipping the step cannot help."
                if incident.kind == "param"
                else "The weights changed without an update to explain it; skipping cannot undo that."
                if incident.cause == "corruption"
                else "The loss diverged: the weights that produced it are the problem."
                if optional
                else f"{self.consecutive_skips} steps in a row were skipped (max_consecutive={self.max_consecutive}); "
                "the weights no longer change, so the next batches will fail the same way."
            )
            recovered_by = self._agreed(escalate(self.listeners, event), device)
            if recovered_by:
                incident.action = f"recovered by {recovered_by}"
                self.consecutive_skips = 0
            elif not optional:
                incident.action = "raised"
                raise_error = True
        if self.history and self.history[-1].step == incident.step:
            self.history[-1].cause = incident.cause
        self.incidents.append(incident)
        if self.on_record is not None:
            self.on_record(incident)
        if raise_error:
            raise NonFiniteError(incident, self.incidents[:-1])

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        """Pickle configuration and counters only: runtime links (listeners, recorder, batches) are dropped."""
        state = self.__dict__.copy()
        state.update(listeners=[], on_record=None, reduce=all_reduce_max, last_grad_norms=None, last_grad_norm_bound=None)
        state.update(_last_with_grad=[], _losses=[], _loss_where=[], _input_sums=[], _window=[], _recent=[])
        return state

    def state_dict(self) -> dict[str, Any]:
        """Counters and incidents, as primitives."""
        return {
            "checks": self.checks,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "scaler_overflows": self.scaler_overflows,
            "incidents": [i.to_dict() for i in self.incidents],
            "divergence": self.divergence.state_dict(),
            "recurrence": self.recurrence.state_dict(),
        }

    def reset(self) -> None:
        """Forget the run: counters, incidents, history, the divergence detectors' levels (a new run)."""
        self.checks = self.skipped_steps = self.consecutive_skips = self.scaler_overflows = 0
        self.incidents = []
        self.history.clear()
        self.divergence = DivergenceWatch()
        self.recurrence.reset()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys keep their defaults."""
        self.checks = int(state.get("checks", self.checks))
        self.skipped_steps = int(state.get("skipped_steps", self.skipped_steps))
        self.consecutive_skips = int(state.get("consecutive_skips", self.consecutive_skips))
        self.scaler_overflows = int(state.get("scaler_overflows", self.scaler_overflows))
        self.incidents = [Incident.from_dict(d) for d in state.get("incidents", [])]
        self.divergence.load_state_dict(state.get("divergence", {}))
        self.recurrence.load_state_dict(state.get("recurrence", {}))

    # ------------------------------------------------------------------ failure path (rare: syncs allowed)
    def _name(self, p: Tensor, i: int) -> str:
        return self._names.get(id(p), f"param[{i}]")

    def _offenders(self, kind: str, with_grad: list[Tensor], grad_norms: Tensor | None, params: list[Tensor]) -> list[str]:
        if kind == "param":
            return [self._name(p, i) for i, p in enumerate(params) if not _finite(p)]
        if kind == "grad" and grad_norms is not None:  # after a bad loss or input every gradient is NaN: no clue
            return [self._name(p, i) for i, (p, v) in enumerate(zip(with_grad, grad_norms.tolist())) if not math.isfinite(v)]
        return []

    def _details(
        self, kind: str, grad_norms: Tensor | None, scale: Tensor | None, bad_loss_at: list[Any], batches: list[Any]
    ) -> dict[str, Any]:
        detail: dict[str, Any] = {"consecutive_skips": self.consecutive_skips}
        if grad_norms is not None:
            detail["grad_norm"] = _number(float(total_norm(grad_norms)))
        if bad_loss_at:
            detail["loss_batches"] = bad_loss_at
        if scale is not None:
            detail["loss_scale"] = _number(float(scale))
        if kind == "input":
            detail["input_fields"] = sorted(
                {f"batch {idx}{path}" for idx, batch in batches for path, t in iter_tensors(batch) if not _finite(t)}
            )
        return detail

    def _diagnose(self, incident: Incident) -> None:
        """Fill ``cause``, ``advice`` and ``detail["evidence"]`` from the incident and the history."""
        if incident.cause != "unknown":  # a listener already decided
            return
        present = {type(listener).__name__ for listener in self.listeners}
        found = diagnose(incident, list(self.history), present=present)
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


def _merge_ranks(saw: bool, params: list[str], detail: dict[str, Any]) -> tuple[list[int], list[str], dict[str, Any]]:
    """Combine every rank's view of an agreed fault (a collective on the failure path only).

    Returns the ranks that saw it, the offending parameter names of those ranks (in rank order, no
    repeats), and the details of the first of them, with every such rank's details under
    ``per_rank`` when there are several; so rank zero records what the faulty ranks saw.
    """
    views = gather_objects((saw, params, detail))
    ranks = [r for r, (s, _, _) in enumerate(views) if s]
    chosen = ranks or [0]
    names = list(dict.fromkeys(n for r in chosen for n in views[r][1]))
    merged = dict(views[chosen[0]][2])
    if len(ranks) > 1 and any(views[r][2] != views[chosen[0]][2] for r in ranks):
        merged["per_rank"] = {str(r): views[r][2] for r in ranks}
    return ranks, names, merged


def _finite(t: Tensor) -> bool:
    """Exact check, with a host sync: for the failure path only (of this rank's part of a sharded tensor)."""
    return bool(torch.isfinite(local_part(t)).all())



def _number(x: float) -> float | str:
    """Keep JSON strict: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    return x if math.isfinite(x) else str(x)
