"""NormMonitor: per-layer weight norms, gradient norms and update ratios, for TensorBoard and any logger."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from lightning_nan.callbacks._shared_grads import step_grads
from lightning_nan.callbacks._trainer import log_metrics
from lightning_nan.core.norms import tensor_norms

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


class NormMonitorBase:
    """Log, every ``every_n_steps`` optimizer steps, for each parameter or module: the weight norm,
    the gradient norm (before clipping) and the update-to-weight ratio ``||w_after - w_before|| / ||w_before||``.

    The gradient norms are those the guard (or the clipper) computed for the step, when one is
    present; the weight and update norms take one fused pass on logging steps only, and all values
    reach the host in one transfer per logging step. Nothing runs on other steps.

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
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"Expected `every_n_steps` to be an int >= 1, got {every_n_steps!r}")
        if group_by not in ("parameter", "module"):
            raise ValueError(f"Expected `group_by` in ('parameter', 'module'), got {group_by!r}")
        for arg, pattern in (("include", include), ("exclude", exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"`{arg}`={pattern!r} is not a valid regular expression: {err}") from None
        super().__init__()
        self.every_n_steps = every_n_steps
        self.group_by = group_by
        self.include = include
        self.exclude = exclude
        self.histograms = histograms
        self.eps = eps
        self._names: dict[int, str] = {}
        self._pending: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id -> (param, weight before, grad norm)
        self._step = 0  # the optimizer step the pending values belong to

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._names = {}
        for name, p in pl_module.named_parameters():
            if self.include is not None and not re.search(self.include, name):
                continue
            if self.exclude is not None and re.search(self.exclude, name):
                continue
            self._names[id(p)] = name

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                writer = getattr(logger, "experiment", None)
                if hasattr(writer, "add_custom_scalars"):
                    writer.add_custom_scalars(LAYOUT)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._pending = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if trainer.global_step % self.every_n_steps != 0:
            return
        grads = step_grads(trainer, pl_module, optimizer)
        if grads.norms is None:
            return
        if not self._pending:
            self._step = trainer.global_step
        for p, g in zip(grads.params, grads.norms.unbind()):
            if id(p) in self._names:
                self._pending[id(p)] = (p, p.detach().clone(), g)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            return
        pending, self._pending = list(self._pending.values()), {}
        params = [p.detach() for p, _, _ in pending]
        befores = [before for _, before, _ in pending]
        n = len(params)
        fused = tensor_norms(params + list(torch._foreach_sub(params, befores)) + befores)  # one pass
        weights, updates, weights_before = fused[:n], fused[n : 2 * n], fused[2 * n :]
        grad_norms = torch.stack([g.to(weights.device) for _, _, g in pending])
        names = [self._names[id(p)] for p, _, _ in pending]
        if self.group_by == "module":
            names, (weights, updates, grad_norms, weights_before) = _group_by_module(
                names, [weights, updates, grad_norms, weights_before]
            )
        ratios = updates / (weights_before + self.eps)
        values = torch.cat([weights, grad_norms, ratios]).tolist()  # the one transfer of a logging step
        n = len(names)
        metrics = {}
        for i, name in enumerate(names):
            metrics[f"norms/weight/{name}"] = values[i]
            metrics[f"norms/grad/{name}"] = values[n + i]
            metrics[f"norms/update_ratio/{name}"] = values[2 * n + i]
        log_metrics(trainer, metrics, step=self._step)
        if self.histograms and trainer.is_global_zero:
            self._histograms(trainer, [(self._names[id(p)], p) for p, _, _ in pending])

    def _histograms(self, trainer: Any, named: list[tuple[str, Tensor]]) -> None:
        for logger in trainer.loggers:
            writer = getattr(logger, "experiment", None)
            if not hasattr(writer, "add_histogram"):
                continue
            for name, p in named:
                writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), self._step)
                if p.grad is not None:
                    writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), self._step)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_names={}, _pending={})
        return state


def _group_by_module(names: list[str], columns: list[Tensor]) -> tuple[list[str], list[Tensor]]:
    """Combine per-parameter 2-norms into per-module ones: ``sqrt(sum of squares)`` on the device."""
    modules = [n.rsplit(".", 1)[0] if "." in n else n for n in names]
    order = list(dict.fromkeys(modules))
    index = torch.tensor([order.index(m) for m in modules], device=columns[0].device)
    grouped = []
    for col in columns:
        sums = torch.zeros(len(order), device=col.device, dtype=col.dtype).index_add_(0, index, col.pow(2))
        grouped.append(sums.sqrt())
    return order, grouped
