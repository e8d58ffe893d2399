"""NormMonitor's TensorBoard extras: the custom-scalars layout and the weight and gradient histograms,
both through the public ``SummaryWriter`` of each TensorBoardLogger (its ``experiment``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from lightning_nan.callbacks._trainer import tensorboard_writers

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


def add_layout(loggers: Iterable[Any]) -> None:
    """Write :data:`LAYOUT` to every logger with a TensorBoard ``SummaryWriter`` (the "CUSTOM SCALARS" tab)."""
    for writer in tensorboard_writers(loggers):
        writer.add_custom_scalars(LAYOUT)


def add_histograms(named: Mapping[str, Tensor], hist_writers: list[Any], step: int) -> None:
    """``weights/<name>`` and ``grads/<name>`` histograms, one tensor at a time.

    A sharded tensor (``DTensor``) is gathered whole (``full_tensor``, a collective: every rank calls
    this, with ``hist_writers`` empty off rank zero); only the ranks with writers copy it to the host.
    """
    for name, p in named.items():
        for tag, t in ((f"weights/{name}", p), (f"grads/{name}", p.grad)):
            if t is None:
                continue
            full = getattr(t, "full_tensor", None)
            whole = (t if full is None else full()).detach()
            if hist_writers:
                whole = whole.float().cpu()
                for writer in hist_writers:
                    writer.add_histogram(tag, whole, step)
