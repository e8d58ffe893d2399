"""NormMonitor: per-layer weight norms, gradient norms and update ratios, for TensorBoard and any logger."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._norm_tensorboard import LAYOUT as LAYOUT
from lightning_nan.callbacks._norm_tensorboard import add_histograms, add_layout
from lightning_nan.callbacks._norm_values import Keys, Plan
from lightning_nan.callbacks._shared_grads import step_grads
from lightning_nan.callbacks._trainer import strategy_is, tensorboard_writers
from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.step_grads import HeldGrads, StepGrads
from lightning_nan.core.validate import boolean, choice, integer, number, regex

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
        self._plans: dict[tuple[int, ...], Plan] = {}  # by the ids of an optimizer's parameters with gradients
        self._keys: dict[tuple[str, ...], Keys] = {}  # by the names of the parameters logged together
        self._pending: dict[Plan, Tensor] = {}  # plan -> its gradient norms, for the current batch
        self._step = 0  # the optimizer step the pending values belong to

    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
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

    def on_fit_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._name_parameters(pl_module)  # again: a strategy may have replaced them (FSDP2's ``fully_shard``)
        if trainer.is_global_zero:
            add_layout(trainer.loggers)

    def on_train_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._pending = {}

    def on_before_optimizer_step(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
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

    def on_train_batch_end(self, trainer: TrainerLike, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        with torch.no_grad():
            columns = [plan.norms(grad_norms) for plan, grad_norms in pending.items()]
            if not trainer.is_global_zero:  # sharded parameters: this rank's parts are in the sums, rank zero logs
                if self.histograms:
                    self._histograms(trainer, pending)
                return
            flat = columns[0] if len(columns) == 1 else torch.cat([c.to(columns[0].device) for c in columns])
            values = flat.tolist()  # the one transfer
        if len(pending) == 1:  # one optimizer: its block is [weights, updates, grads], n values each
            (plan,) = pending
            n = len(plan.params)
            weights, updates, grads, keys = values[:n], values[n : 2 * n], values[2 * n :], plan.keys
        else:
            weights, updates, grads = [], [], []
            at = 0
            for plan in pending:  # each plan's block: weight, update, grad (n values each)
                n = len(plan.params)
                for out in (weights, updates, grads):
                    out += values[at : at + n]
                    at += n
            keys = self._cached_keys([name for p in pending for name in p.names])
        metrics = keys.metrics(weights, grads, updates, self.eps)  # one dict for every logger
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)
        if self.histograms:
            self._histograms(trainer, pending)

    def _plan(self, grads: StepGrads) -> Plan:
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
            params = [grads.params[i] for i in monitored]
            plan = self._plans[key] = Plan(params, names, select, self._cached_keys(names))
        return plan

    def _cached_keys(self, names: list[str]) -> Keys:
        key = tuple(names)
        keys = self._keys.get(key)
        if keys is None:
            if len(self._keys) >= _MAX_CACHED:
                self._keys.clear()
            keys = self._keys[key] = Keys(names, self.group_by == "module")
        return keys

    def _histograms(self, trainer: TrainerLike, pending: dict[Plan, Tensor]) -> None:
        """Weight and gradient histograms; a sharded tensor is gathered whole on every rank, rank zero writes."""
        hist_writers = tensorboard_writers(trainer.loggers) if trainer.is_global_zero else []
        if not hist_writers and all(plan.copies is None for plan in pending):
            return
        named = {name: p for plan in pending for name, p in zip(plan.names, plan.params)}
        add_histograms(named, hist_writers, self._step)

    def teardown(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        self._plans, self._keys, self._pending = {}, {}, {}  # let go of parameters and buffers
        self._grads.clear()

    def step_grads(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> StepGrads | None:
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
