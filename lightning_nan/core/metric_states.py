"""Put ``torchmetrics`` metrics back to an earlier state: a skipped step's updates leave no trace.

:class:`MetricStates` reads each metric's states through torchmetrics' own state API
(``Metric.metric_state``, the states declared with ``add_state``). :meth:`~MetricStates.save`
costs one fused copy of the tensor states (``torch._foreach_copy_`` into buffers kept from the
last save) and, for list states (``dist_reduce_fx="cat"``), only their length: updates append to
them or rebind them, and either is undone by keeping the list object and cutting it back.
:meth:`~MetricStates.restore` is the rare path.

>>> import torch
>>> from torchmetrics import MeanMetric
>>> from torchmetrics.classification import BinaryAUROC
>>> mean, auroc = MeanMetric(), BinaryAUROC()
>>> mean.update(torch.tensor([1.0, 3.0]))
>>> auroc.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
>>> states = MetricStates([mean, auroc])
>>> states.save()                        # before a step that turns out to be skipped
>>> mean.update(torch.tensor([100.0]))
>>> auroc.update(torch.tensor([0.8]), torch.tensor([0]))
>>> states.restore()
>>> float(mean.compute()), float(auroc.compute()), mean.update_count, len(auroc.preds)
(2.0, 1.0, 1, 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def find_metrics(module: torch.nn.Module) -> list[Any]:
    """The ``torchmetrics.Metric`` objects in ``module`` (those of a ``MetricCollection`` included), in
    ``modules()`` order, each once.

    >>> from torchmetrics import MeanMetric, MetricCollection, SumMetric
    >>> net = torch.nn.Module()
    >>> net.metrics = MetricCollection({"a": MeanMetric(), "b": SumMetric()})
    >>> [type(m).__name__ for m in find_metrics(net)]
    ['MeanMetric', 'SumMetric']
    """
    from torchmetrics import Metric  # here: importing the core stays light

    return [m for m in module.modules() if isinstance(m, Metric)]


class MetricStates:
    """The states of some ``torchmetrics`` metrics as of the last :meth:`save`, ready to :meth:`restore`."""

    def __init__(self, metrics: Iterable[Any]) -> None:
        self.metrics = list(metrics)
        self._tensors: list[tuple[Any, str]] = []  # (metric, state name) of the tensor states saved
        self._buffers: list[Tensor] = []
        self._lists: list[tuple[Any, str, list[Any], int]] = []  # (metric, name, the list object, its length)
        self._counts: list[int] = []
        self._saved = False

    def save(self) -> None:
        """Remember every metric's states and update count (one fused copy of the tensor states)."""
        tensors: list[tuple[Any, str]] = []
        live: list[Tensor] = []
        lists: list[tuple[Any, str, list[Any], int]] = []
        for metric in self.metrics:
            for name, value in metric.metric_state.items():
                if isinstance(value, Tensor):
                    tensors.append((metric, name))
                    live.append(value.detach())
                elif isinstance(value, list):
                    lists.append((metric, name, value, len(value)))
        buffers = self._buffers
        if len(buffers) != len(live) or any(
            b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(buffers, live)
        ):
            buffers = [t.clone() for t in live]
        elif live:
            torch._foreach_copy_(buffers, live)
        self._tensors, self._buffers, self._lists = tensors, buffers, lists
        self._counts = [metric.update_count for metric in self.metrics]
        self._saved = True

    def restore(self) -> None:
        """Put every metric back to its states at the last :meth:`save` (a no-op before any save)."""
        if not self._saved:
            return
        # Normal tensors even under `torch.inference_mode` (Lightning's evaluation loops): the metric may be
        # updated in place outside it later, which an inference tensor refuses.
        with torch.inference_mode(False), torch.no_grad():
            for (metric, name), saved in zip(self._tensors, self._buffers):
                setattr(metric, name, saved.clone())  # rebound, as torchmetrics' own forward does
        for metric, name, value, length in self._lists:
            del value[length:]
            setattr(metric, name, value)
        for metric, count in zip(self.metrics, self._counts):
            # No public setter: torchmetrics keeps the count in `_update_count` and the cached result of
            # `compute()` in `_computed` (both since 0.x); `update()` itself resets them the same way.
            metric._update_count = count
            metric._computed = None
