"""Scaling each param group's learning rate for one optimizer step only: ``scheduled lr x factor``.

:class:`LRScaler` puts torch step hooks on optimizers: the pre-hook remembers each group's ``lr``
(whatever the scheduler set) and writes ``lr * factor``; the post-hook writes the remembered value
back once the update is done. Schedulers and checkpoints only ever see their own values. *When* to
change the factor is the business of its subclass
:class:`~lightning_nan.core.lr_backoff.LRBackoffController`.

>>> import torch
>>> w = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> scaler = LRScaler(0.5)
>>> scaler.attach(opt)
>>> w.grad = torch.ones(1)
>>> opt.step()
>>> w.item(), opt.param_groups[0]["lr"]  # updated with 0.05; the scheduled 0.1 is back
(-0.05000000074505806, 0.1)
>>> scaler.detach()
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

_UNSCALED = object()  # the pre-hook's mark of a group without a numeric lr (left alone)

# per step in progress: (factor, [(group, scheduled lr, float written)], [[tensor lr, scheduled, written]])
_Step = tuple[float, list[tuple[dict, Any, Any]] | None, list[list[Any]] | None]


class LRScaler:
    """Step hooks that scale every param group's ``lr`` by :attr:`factor_now` during ``optimizer.step()`` only.

    At each step the pre-hook saves every group's ``lr``, then scales it (a tensor ``lr`` shared by
    several groups, as torch makes for ``lr=torch.tensor(...)``, is scaled and restored once); the
    post-hook puts the saved value back only where the ``lr`` still holds what the pre-hook wrote. An
    ``lr`` written *inside* ``optimizer.step()`` (by the closure, by Lightning's
    ``on_before_optimizer_step``, or by a rollback's ``optimizer.load_state_dict``) is used as written
    for that step and kept. A group without a numeric ``lr`` is left alone (:func:`has_numeric_lr`).

    Cost: while the factor is 1 the hooks only record it; otherwise two rescales of each group's
    ``lr`` per step (a float, or an in-place op on a tensor ``lr``: no host sync).

    Args:
        factor: the factor (a subclass changes ``_factor`` between steps).
    """

    def __init__(self, factor: float = 1.0) -> None:
        self._factor = float(factor)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._inside: dict[int, _Step] = {}  # id(optimizer) -> its step in progress

    @property
    def factor_now(self) -> float:
        """The factor the next optimizer step will be taken with."""
        return self._factor

    def attach(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> None:
        """Scale the learning rate of every step of these optimizers (once each; Lightning wrappers are unwrapped)."""
        if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
            optimizers = [cast(torch.optim.Optimizer, optimizers)]
        for opt in cast(Iterable[torch.optim.Optimizer], optimizers):
            opt = unwrap_optimizer(opt)
            if any(o is opt for o in self._optimizers):
                continue
            self._optimizers.append(opt)
            self._handles.append(opt.register_step_pre_hook(self._pre_step))
            self._handles.append(opt.register_step_post_hook(self._post_step))

    def detach(self) -> None:
        """Remove the hooks, putting back any ``lr`` a failed step left scaled."""
        self.restore_lrs()
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizers = [], []

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers the hooks are on."""
        return list(self._optimizers)

    def restore_lrs(self) -> None:
        """Put back the scheduled ``lr`` wherever a step raised between the hooks (its post-hook never ran)."""
        for opt in self._optimizers:
            self._restore(opt)

    def step_factor(self, optimizer: torch.optim.Optimizer) -> float:
        """The factor of ``optimizer``'s step in progress (inside ``step()``), else :attr:`factor_now`."""
        entry = self._inside.get(id(unwrap_optimizer(optimizer)))
        return self._factor if entry is None else entry[0]

    def effective_lrs(self, optimizer: torch.optim.Optimizer) -> list[float | None]:
        """Each group's ``scheduled lr x factor`` for the step in progress or, outside a step, the next one
        (``None`` for a group without a numeric ``lr``, which is left alone).

        Reads tensor learning rates back to the host: call it on logging steps only.
        """
        optimizer = unwrap_optimizer(optimizer)
        entry = self._inside.get(id(optimizer))
        if entry is not None and entry[1] is not None:
            return [None if written is _UNSCALED else float(lr) * entry[0] for _, lr, written in entry[1]]
        f = self._factor if entry is None else entry[0]
        return [float(group["lr"]) * f if has_numeric_lr(group) else None for group in optimizer.param_groups]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._inside:  # the previous step raised: its lr is still scaled
            self._restore(optimizer)
        f = self._factor
        if f == 1.0:
            self._inside[id(optimizer)] = (1.0, None, None)
            return
        # Save every group's value before scaling any: torch puts one `lr` tensor object in every group
        # when `lr=torch.tensor(...)` is the default, and that tensor must be scaled (and saved) once.
        groups: list[tuple[dict, Any, Any]] = []  # (group, its scheduled lr, the float written; None: tensor)
        tensors: dict[int, list[Any]] = {}  # id -> [tensor lr, its scheduled value, the value written]
        for group in optimizer.param_groups:
            lr: Any = group.get("lr")
            if not has_numeric_lr(group):  # no learning rate to scale (an optimizer that sets its own step size)
                groups.append((group, lr, _UNSCALED))
            elif isinstance(lr, Tensor):
                entry = tensors.get(id(lr))
                if entry is None:
                    entry = tensors[id(lr)] = [lr, lr.clone(), None]
                groups.append((group, entry[1], None))
            else:
                groups.append((group, lr, lr * f))
        for group, _, written in groups:
            if written is not None and written is not _UNSCALED:
                group["lr"] = written
        for entry in tensors.values():
            entry[0].mul_(f)
            entry[2] = entry[0].clone()
        self._inside[id(optimizer)] = (f, groups, list(tensors.values()))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(optimizer)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the scheduled lr of each group that still holds exactly the value the pre-hook wrote.

        Anything else was written since (inside the step: the closure, ``on_before_optimizer_step``, a
        scheduler; or ``optimizer.load_state_dict`` by a rollback) and is kept.
        """
        _, groups, tensors = self._inside.pop(id(optimizer), (1.0, None, None))
        if groups is None:
            return
        held: set[int] = set()  # the tensor lrs still in the groups that were scaled
        for group, (scaled, lr, written) in zip(optimizer.param_groups, groups):
            if group is not scaled:  # `optimizer.load_state_dict` ran inside the step (a rollback): keep its values
                continue
            current = group.get("lr")
            if written is _UNSCALED:
                continue
            if written is None:
                if isinstance(current, Tensor):
                    held.add(id(current))
            elif not isinstance(current, Tensor) and current == written:
                group["lr"] = lr
        for tensor, lr, written in tensors or ():
            if id(tensor) in held:  # once per tensor object; a value written in place since is kept (no host sync)
                tensor.copy_(torch.where(tensor == written, lr, tensor))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the hooks and the optimizers: they are runtime links."""
        state = self.__dict__.copy()
        state.update(_optimizers=[], _handles=[], _inside={})
        return state


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper such as Lightning's ``LightningOptimizer`` (its public ``optimizer``).

    >>> import torch
    >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> class Wrapper:  # as LightningOptimizer exposes the optimizer it wraps
    ...     optimizer = sgd
    >>> unwrap_optimizer(Wrapper()) is sgd, unwrap_optimizer(sgd) is sgd
    (True, True)
    """
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def has_numeric_lr(group: dict[str, Any]) -> bool:
    """Whether a param group has an ``lr`` the backoff can scale: a number (not a bool) or a tensor.

    >>> has_numeric_lr({"lr": 0.1}), has_numeric_lr({"lr": None}), has_numeric_lr({"step_size": 0.1})
    (True, False, False)
    """
    lr = group.get("lr")
    return isinstance(lr, Tensor) or (isinstance(lr, numbers.Real) and not isinstance(lr, bool))
