"""NormMonitor: per-layer weight norms, gradient norms and update ratios, for TensorBoard and any logger."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._shared_grads import step_grads
from lightning_nan.callbacks._trainer import strategy_is
from lightning_nan.core.norms import tensor_norms
from lightning_nan.core.sharding import copies_per_tensor, local_parts, norms_over_ranks
from lightning_nan.core.step_grads import HeldGrads, StepGrads
from lightning_nan.core.validate import boolean, choice, integer, number, regex

#: The TensorBoard custom-scalars page: one multi-line chart per quantity, one line per layer.
LAYOUT = {
    "lightning_nan": {
        "weight norm ||w||": ["Multiline", [r"norms/weight/.*"]],
        "gradient norm ||g|| (before clipping)": ["Multiline", [r"norms/grad/.*"]],
        "update ratio ||dw|| / ||w||": ["Multiline", [r"norms/update_ratio/.*"]],
        "guard: skipped steps and incidents": ["Multiline", [r"nan_guard/.*"]],
        "clipping: total norm, threshold, coefficient": ["Multiline", [r"grad_clip/.*"]],
    }
}

_QUANTITIES = ("weight", "grad", "update_ratio")
_MAX_CACHED = 8  # plans / key layouts kept; more means the parameters with gradients keep changing


class NormMonitorBase:
    """Log, every ``every_n_steps`` optimizer steps, for each parameter or module: the weight norm,
    the gradient norm (before clipping) and the update-to-weight ratio ``||w_after - w_before|| / ||w_after||``.

    The gradient norms are those the guard (or the clipper) computed for the step, when one is
    present. On logging steps only, and on rank zero only: one fused copy of the weights before the
    step, the updates formed in place in the copy after it, one fused norm pass over the weights and
    the updates, and one transfer of all values to the host; the ratios and module sums are then
    computed on the host. The gradients are not read again. With ``every_n_steps=1`` the copy lives
    in buffers kept between steps (one extra copy of the monitored weights); otherwise it is freed
    after each logging step. Nothing runs on other steps. With sharded parameters (FSDP2's
    ``fully_shard``: ``DTensor``) every rank does this for the parts it holds and one ``all_reduce``
    per optimizer and logging step adds the norms up, so the values are those of the whole tensors
    (``histograms=True`` gathers each tensor whole, one at a time). Under FSDP1 (``FSDPStrategy``)
    the parameters are plain tensors holding each rank's flat shard: the norms are rank zero's parts
    (a warning says so). Each of the trainer's loggers gets the step's scalars in one ``log_metrics``
    call (as Lightning's ``LearningRateMonitor`` logs), on rank zero.

    Args:
        every_n_steps: log at optimizer steps that are multiples of this.
        group_by: ``"parameter"`` (one line per parameter tensor) or ``"module"`` (parameters of the
            same module combined: ``sqrt(sum of squares)``).
        include: log only names matching this regex (``re.search``).
        exclude: skip names matching this regex.
        histograms: also write weight and gradient histograms to TensorBoard loggers.
        eps: added to ``||w||`` in the update ratio.

    Logged keys (``<name>``: the parameter name, or the module path with ``group_by="module"``):

    ===================================  =========================================
    key                                  value
    ===================================  =========================================
    ``norms/weight/<name>``              ``||w||`` after the step
    ``norms/grad/<name>``                ``||g||`` before clipping
    ``norms/update_ratio/<name>``        ``||dw|| / ||w||`` of the step
    ``weights/<name>``, ``grads/<name>``  histograms (``histograms=True``, TensorBoard)
    ===================================  =========================================

    With a TensorBoard logger it also writes a custom-scalars layout (the "CUSTOM SCALARS" tab): one
    chart per quantity with a line per layer, plus the guard's and the clipper's scalars.

    >>> monitor = NormMonitorBase(every_n_steps=10, group_by="module", exclude=r"\\.bias$")
    >>> monitor.every_n_steps, monitor.group_by
    (10, 'module')
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        group_by: str = "parameter",
        include: str | None = None,
        exclude: str | None = None,
        histograms: bool = False,
        eps: float = 1e-12,
    ) -> None:
        integer("every_n_steps", every_n_steps, low=1)
        number("eps", eps, low=0)
        choice("group_by", group_by, ("parameter", "module"))
        boolean("histograms", histograms)
        regex("include", include, optional=True)
        regex("exclude", exclude, optional=True)
        super().__init__()
        self.every_n_steps = every_n_steps
        self.group_by = group_by
        self.include = include
        self.exclude = exclude
        self.histograms = histograms
        self.eps = eps
        self._grads = HeldGrads()  # the gradient norms, when this callback computed them (no guard)
        self._reset()

    def _reset(self) -> None:
        self._names: dict[int, str] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}  # by the ids of an optimizer's parameters with gradients
        self._keys: dict[tuple[str, ...], _Keys] = {}  # by the names of the parameters logged together
        self._pending: dict[_Plan, Tensor] = {}  # plan -> its gradient norms, for the current batch
        self._step = 0  # the optimizer step the pending values belong to

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        self._reset()
        self._name_parameters(pl_module)
        if strategy_is(trainer, "FSDPStrategy") and trainer.is_global_zero:
            warnings.warn(
                f"NormMonitor under {type(trainer.strategy).__name__} (FSDP1) sees each rank's flat shards as plain "
                "tensors: it logs the norms of rank zero's parts, not of the whole parameters. Shard with FSDP2 "
                "(`fully_shard` under ModelParallelStrategy) for whole-tensor norms.",
                stacklevel=2,
            )

    def _name_parameters(self, pl_module: Any) -> None:
        self._names = {}
        for name, p in pl_module.named_parameters():
            if self.include is not None and not re.search(self.include, name):
                continue
            if self.exclude is not None and re.search(self.exclude, name):
                continue
            self._names[id(p)] = name

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._name_parameters(pl_module)  # again: a strategy may have replaced them (FSDP2's ``fully_shard``)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                writer: Any = getattr(logger, "experiment", None)
                if hasattr(writer, "add_custom_scalars"):
                    writer.add_custom_scalars(LAYOUT)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._pending = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0:
            return
        grads = step_grads(trainer, pl_module, optimizer, self._grads)  # on every rank: it may run the guard's check
        if grads.norms is None:
            return
        plan = self._plan(grads)
        if not plan.params or (plan.copies is None and not trainer.is_global_zero):  # sharded: every rank's part
            return
        if not self._pending:
            self._step = step
        with torch.no_grad():
            plan.snapshot(keep=self.every_n_steps == 1)
        self._pending[plan] = grads.norms if plan.select is None else grads.norms.index_select(0, plan.select)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        with torch.no_grad():
            columns = [plan.norms(grad_norms) for plan, grad_norms in pending.items()]
            flat = columns[0] if len(columns) == 1 else torch.cat([c.to(columns[0].device) for c in columns])
            if not trainer.is_global_zero:  # sharded parameters: this rank's parts are in the sums, rank zero logs
                if self.histograms:
                    self._histograms(trainer, pending)
                return
            values = flat.tolist()  # the one transfer
        weights: list[float] = []
        updates: list[float] = []
        grads: list[float] = []
        at = 0
        for plan in pending:  # each plan's block: weight, update, grad (n values each)
            n = len(plan.params)
            for out in (weights, updates, grads):
                out += values[at : at + n]
                at += n
        keys = next(iter(pending)).keys if len(pending) == 1 else self._cached_keys([n for p in pending for n in p.names])
        self._log(trainer, keys, keys.rows(weights, grads, updates, self.eps))
        if self.histograms:
            self._histograms(trainer, pending)

    def _plan(self, grads: StepGrads) -> _Plan:
        key = tuple(map(id, grads.params))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_CACHED:
                self._plans.clear()
            monitored = [i for i, p in enumerate(grads.params) if id(p) in self._names]
            names = [self._names[id(grads.params[i])] for i in monitored]
            select = None
            if len(monitored) < len(grads.params) and grads.norms is not None:
                select = torch.tensor(monitored, dtype=torch.long, device=grads.norms.device)
            plan = self._plans[key] = _Plan([grads.params[i] for i in monitored], names, select)
            plan.keys = self._cached_keys(names)
        return plan

    def _cached_keys(self, names: list[str]) -> _Keys:
        key = tuple(names)
        keys = self._keys.get(key)
        if keys is None:
            if len(self._keys) >= _MAX_CACHED:
                self._keys.clear()
            keys = self._keys[key] = _Keys(names, self.group_by == "module")
        return keys

    def _log(self, trainer: Any, keys: _Keys, values: list[float]) -> None:
        metrics = dict(zip(keys.keys, values))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)

    def _histograms(self, trainer: Any, pending: dict[_Plan, Tensor]) -> None:
        """Weight and gradient histograms, one tensor at a time; a sharded one is gathered whole on every
        rank (a collective), rank zero writes."""
        writers: list[Any] = []
        if trainer.is_global_zero:
            writers = [w for w in (getattr(lg, "experiment", None) for lg in trainer.loggers) if hasattr(w, "add_histogram")]
        if not writers and all(plan.copies is None for plan in pending):
            return
        named = dict(zip((name for plan in pending for name in plan.names), (p for plan in pending for p in plan.params)))
        for name, p in named.items():
            for tag, t in ((f"weights/{name}", p), (f"grads/{name}", p.grad)):
                if t is None:
                    continue
                full = getattr(t, "full_tensor", None)
                whole = (t if full is None else full()).detach()
                if writers:
                    whole = whole.float().cpu()
                    for writer in writers:
                        writer.add_histogram(tag, whole, self._step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._plans, self._keys, self._pending = {}, {}, {}  # let go of parameters and buffers
        self._grads.clear()

    def step_grads(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> StepGrads | None:
        """The step's gradient norms if this callback computed them (no guard in the Trainer), else ``None``."""
        return self._grads.get(optimizer, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {}

    @property
    def state_key(self) -> str:
        """Two monitors (say, module norms every step and parameter histograms every 500) may share a Trainer."""
        args = {"every_n_steps": self.every_n_steps, "group_by": self.group_by, "include": self.include, "exclude": self.exclude, "histograms": self.histograms}
        return f"{type(self).__qualname__}{args!r}"  # the form of Lightning's Callback._generate_state_key

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_names={}, _plans={}, _keys={}, _pending={})
        return state


class _Plan:
    """The monitored parameters among one optimizer's parameters with gradients, and their copies before the step."""

    def __init__(self, params: list[Tensor], names: list[str], select: Tensor | None) -> None:
        self.params = params
        self.names = names
        self.select = select  # positions in the step's gradient norms; None: all of them, in order
        self.single_device = len({p.device for p in params}) <= 1
        #: sharded parameters (DTensor): how many ranks hold each one's local part; None: plain tensors
        self.copies = copies_per_tensor(params)
        self.before: list[Tensor] | None = None  # the weights before the step, then minus the update
        self.keep = False
        self.keys: _Keys

    def snapshot(self, keep: bool) -> None:
        """Copy the weights before the step (into the buffers of the last step when ``keep``); under ``no_grad``."""
        self.keep = keep
        params = self._local()
        if keep and self.before is not None:
            torch._foreach_copy_(self.before, params)
        else:
            self.before = [p.detach().clone() for p in params]

    def norms(self, grad_norms: Tensor) -> Tensor:
        """``[||w_after||..., ||w_after - w_before||..., ||g||...]``: one vector on the device; under ``no_grad``.

        The update is formed in place in the copies (``w_before - w_after``: the same norm), then one
        fused norm pass over the weights and the updates; the copies are dropped unless kept for the
        next step. Sharded parameters: norms of this rank's parts, then one ``all_reduce`` adds them up
        (a collective: every rank calls this).
        """
        before = self.before
        assert before is not None
        params = self._local()
        torch._foreach_sub_(before, params)
        after = self._norms(params + before)
        if not self.keep:
            self.before = None
        if self.single_device:
            out = torch.cat([torch.stack(after), grad_norms.float()])
        else:
            device = after[0].device
            out = torch.cat([torch.stack([t.to(device) for t in after]), grad_norms.float().to(device)])
        return out if self.copies is None else norms_over_ranks(out, self.copies * 3)

    def _local(self) -> list[Tensor]:
        return self.params if self.copies is None else list(local_parts(self.params))

    def _norms(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.single_device:
            return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
        return list(tensor_norms(tensors).unbind())


def _ratio(num: float, den: float) -> float:
    """``num / den`` with IEEE results where Python would raise (a zero denominator)."""
    if den:
        return num / den
    return math.nan if num == 0 or math.isnan(num) else math.copysign(math.inf, num)


class _Keys:
    """The logged keys for a list of parameter names, in ``log_metrics`` order, and how to group them."""

    def __init__(self, names: list[str], by_module: bool) -> None:
        first = list(dict.fromkeys(names))
        self.last: list[int] | None = None  # picks one entry per name when a name appears twice
        if len(first) < len(names):
            last = {name: i for i, name in enumerate(names)}
            self.last = [last[name] for name in first]
        self.group: list[int] | None = None  # the module of each name
        self.n_groups = 0
        if by_module:
            modules = [name.rsplit(".", 1)[0] if "." in name else name for name in first]
            order = list(dict.fromkeys(modules))
            self.group = [order.index(m) for m in modules]
            self.n_groups = len(order)
            first = order
        self.keys = [f"norms/{quantity}/{name}" for name in first for quantity in _QUANTITIES]

    def rows(
        self, weights: list[float], grads: list[float], updates: list[float], eps: float
    ) -> list[float]:
        """The logged values in key order, from the per-parameter norms (on the host)."""
        columns = [weights, grads, updates]
        if self.last is not None:  # a parameter stepped twice: its last values, at its first place
            columns = [[c[i] for i in self.last] for c in columns]
        if self.group is not None:  # per module: sqrt of the sum of squares
            sums = [[0.0] * self.n_groups for _ in columns]
            for c, s in zip(columns, sums):
                for value, k in zip(c, self.group):
                    s[k] += value * value
            columns = [[math.sqrt(v) for v in s] for s in sums]
        weights, grads, updates = columns
        out: list[float] = []
        for w, g, u in zip(weights, grads, updates):
            out += (w, g, _ratio(u, w + eps))
        return out
