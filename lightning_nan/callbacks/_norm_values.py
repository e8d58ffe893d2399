"""What NormMonitor computes on a logging step: the fused norms on the device (:class:`Plan`), then the
logged keys and the host-side arithmetic on the one transferred vector (:class:`Keys`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_nan.core.norms import tensor_norms
from lightning_nan.core.sharding import copies_per_tensor, local_parts, norms_over_ranks

QUANTITIES = ("weight", "grad", "update_ratio")


class Plan:
    """The monitored parameters among one optimizer's parameters with gradients, and their copies before the step."""

    def __init__(self, params: list[Tensor], names: list[str], select: Tensor | None, keys: Keys) -> None:
        self.params = params
        self.names = names
        self.select = select  # positions in the step's gradient norms; None: all of them, in order
        self.keys = keys
        self.single_device = len({p.device for p in params}) <= 1
        #: sharded parameters (DTensor): how many ranks hold each one's local part; None: plain tensors
        self.copies = copies_per_tensor(params)
        self.before: list[Tensor] | None = None  # the weights before the step, then minus the update
        self.keep = False

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
        if not self.keep:
            self.before = None
        if self.single_device:
            after = torch._foreach_norm(params + before, 2.0, dtype=torch.float32)
            out = torch.cat([torch.stack(after), grad_norms.float()])
        else:
            stacked = tensor_norms(params + before)
            out = torch.cat([stacked, grad_norms.float().to(stacked.device)])
        return out if self.copies is None else norms_over_ranks(out, self.copies * 3)

    def _local(self) -> list[Tensor]:
        return self.params if self.copies is None else list(local_parts(self.params))


def ratio(num: float, den: float) -> float:
    """``num / den`` with IEEE results where Python would raise (a zero denominator).

    >>> ratio(1.0, 4.0), ratio(1.0, 0.0), ratio(0.0, 0.0)
    (0.25, inf, nan)
    """
    if den:
        return num / den
    return math.nan if num == 0 or math.isnan(num) else math.copysign(math.inf, num)


class Keys:
    """The logged keys for a list of parameter names, in ``log_metrics`` order, and how to group them.

    Built once per set of names (the monitor caches it); :meth:`metrics` then turns each step's host
    values into the dict given to ``log_metrics``.

    >>> keys = Keys(["body.weight", "body.bias", "head.weight"], by_module=True)
    >>> keys.keys[:3]
    ['norms/weight/body', 'norms/grad/body', 'norms/update_ratio/body']
    >>> keys.metrics([3.0, 4.0, 1.0], [0.0, 0.0, 2.0], [0.5, 0.0, 0.1], eps=0.0)["norms/update_ratio/body"]
    0.1
    """

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
            index = {m: k for k, m in enumerate(order)}
            self.group = [index[m] for m in modules]
            self.n_groups = len(order)
            first = order
        self.keys = [f"norms/{quantity}/{name}" for name in first for quantity in QUANTITIES]

    def rows(self, weights: list[float], grads: list[float], updates: list[float], eps: float) -> list[float]:
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
        out: list[float] = []
        for w, g, u in zip(*columns):
            out += (w, g, ratio(u, w + eps))
        return out

    def metrics(self, weights: list[float], grads: list[float], updates: list[float], eps: float) -> dict[str, float]:
        """``{key: value}`` for ``log_metrics``, in key order."""
        return dict(zip(self.keys, self.rows(weights, grads, updates, eps)))
