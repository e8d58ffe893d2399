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
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.diagnosis import StepRecord
from lightning_nan.core.distributed import all_reduce_max, gather_objects, world
from lightning_nan.core.divergence import DivergenceWatch
from lightning_nan.core.events import IncidentEvent
from lightning_nan.core.incident import Incident, IncidentAction
from lightning_nan.core.losses import loss_scale
from lightning_nan.core.norms import iter_tensors, tensor_norms
from lightning_nan.core.recurrence import UNSAFE_OP_REPEATS, Recurrence
from lightning_nan.core.step_faults import finite, merge_ranks
from lightning_nan.core.step_incidents import ADVICE, CheckedStep, StepIncidents, StepVerdict
from lightning_nan.core.step_screen import screen
from lightning_nan.core.validate import integer, number

__all__ = ["ADVICE", "DEFAULT_MAX_CONSECUTIVE", "HISTORY", "StepGuard", "StepVerdict"]

#: Default for ``max_consecutive``. While steps are skipped the weights do not change, so a run of
#: skips is either a run of bad batches or a model that fails on every batch. If even half of all
#: batches were bad, 20 bad batches in a row would come up by chance about once in a million
#: steps (0.5**20); 20 skips in a row therefore means the model, not the data, is broken.
DEFAULT_MAX_CONSECUTIVE = 20
#: Steps of history kept for the diagnosis.
HISTORY = 32


class StepGuard(StepIncidents):
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
        every = self.check_params_every_n_steps
        weights = params if every > 0 and step % every == 0 else []
        norms = tensor_norms([p.grad for p in with_grad] + weights)  # the one fused pass
        grad_norms = norms[: len(with_grad)] if with_grad else None
        self.last_grad_norms, self._last_with_grad = grad_norms, with_grad
        device = norms.device if norms.numel() else (params[0].device if params else torch.device("cpu"))
        scale, losses, loss_where, inputs = loss_scale(scaler), self._losses, self._loss_where, self._input_sums
        batches, self._recent = self._window or self._recent, self._window[-1:] or self._recent
        self._window, self._losses, self._loss_where, self._input_sums = [], [], [], []
        seen = screen(
            norms, grads=len(with_grad), weights=len(weights), losses=losses, inputs=inputs, scale=scale,
            min_loss_scale=self.min_loss_scale, device=device,
            reduce=self.reduce if world()[1] > 1 else None,  # under DDP: a fault on one rank is every rank's
        )
        self.history.append(
            StepRecord(
                step,
                loss=seen.loss if losses else None,
                grad_norm=seen.grad_norm if with_grad else None,  # the sum of the per-tensor norms: its trend is what counts
                weight_norm=seen.weight_norm if weights else None,
            )
        )
        self.last_grad_norm_bound = seen.bound if with_grad and math.isfinite(seen.bound) else None
        growth = None if seen.failed else self._watch(step, seen, bool(losses), bool(with_grad))
        if not seen.failed and growth is None:
            self.consecutive_skips = 0
            return StepVerdict()
        at = CheckedStep(
            step, epoch, optimizer, params, with_grad, grad_norms, batches, losses, loss_where, scale, scaler, device, dict(extra or {})
        )
        if growth is not None:  # finite, but exploded: skip it before it turns into NaN
            return self._grew(growth, at)
        return self._failed(seen, at)  # rare: exact per-tensor checks, several syncs allowed, agreed again

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
        screened = not finite(self.reduce(tensor_norms(params).sum().reshape(1)))
        saw = screened and any(not finite(p) for p in params)  # exact, past a 2-norm overflow
        if not any(gather_objects(saw)):
            return None
        offenders = [self._name(p, i) for i, p in enumerate(params) if not finite(p)]
        ranks, offenders, detail = merge_ranks(saw, offenders, {})
        incident = Incident(
            step=self.checks if step is None else step,
            kind="param",
            advice=ADVICE["param"],
            epoch=epoch,
            ranks=ranks,
            params=offenders,
            detail=detail,
            action=IncidentAction.FOUND_AFTER_TRAINING,
        )
        self._dispatch(IncidentEvent(incident=incident, guard=self, extra=dict(extra or {})), params[0].device)
        return incident

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
