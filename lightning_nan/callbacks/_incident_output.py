"""What NaNGuard shows of its incidents: the console table, the TensorBoard TEXT entry; and the buffers it keeps.

>>> from lightning_nan.core.incident import Incident
>>> print(incident_markdown(Incident(step=3, kind="loss", cause="unsafe_op", advice="Use log_softmax.")))
**step 3: non-finite loss, cause unsafe_op** (skipped)
<BLANKLINE>
Use log_softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_nan.callbacks._trainer import tensorboard_writers
from lightning_nan.callbacks._types import TrainerLike, callbacks_of
from lightning_nan.core.incident import Incident

#: The end-of-run console table shows the first and last incidents, this many in all.
SUMMARY_ROWS = 12


def print_summary(trainer: TrainerLike, incidents: Sequence[Incident]) -> None:
    """The incidents as a table on the console, with BatchBisection's quarantine when one is in the Trainer."""
    from lightning_nan.callbacks.batch_bisection import BatchBisectionBase  # it imports NaNGuard's module
    from lightning_nan.core.summary import summary_table

    bisection = next((cb for cb in callbacks_of(trainer) if isinstance(cb, BatchBisectionBase)), None)
    path = None if bisection is None else bisection.quarantine_file
    records = [] if bisection is None else bisection.quarantine_records  # written or not (an unwritable file)
    print(summary_table(list(incidents), records, quarantine_path=path, max_rows=SUMMARY_ROWS))


def log_incident_text(trainer: TrainerLike, incident: Incident) -> None:
    """Add the incident to the TEXT tab of every TensorBoardLogger of the trainer (either namespace)."""
    for writer in tensorboard_writers(trainer.loggers):
        writer.add_text("nan_guard/incidents", incident_markdown(incident), incident.step)


def incident_markdown(incident: Incident) -> str:
    """The incident as a few lines of Markdown, for TensorBoard's TEXT tab."""
    lines = [f"**step {incident.step}: non-finite {incident.kind}, cause {incident.cause}** ({incident.action})", ""]
    where = incident.where()
    if where:
        lines.append(f"- where: {where}")
    for fact in incident.detail.get("evidence", []):
        lines.append(f"- {fact}")
    if incident.advice:
        lines += ["", incident.advice]
    return "\n".join(lines)


def norm_running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of the normalisation layers in ``module`` (BatchNorm, InstanceNorm, and
    any layer that tracks running statistics the same way: ``track_running_stats`` with ``running_mean``).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.InstanceNorm1d(2))
    >>> [tuple(t.shape) for t in norm_running_stats(model)]
    [(2,), (2,), ()]
    """
    return [
        buf
        for m in module.modules()
        if getattr(m, "track_running_stats", False) is True and isinstance(getattr(m, "running_mean", None), torch.Tensor)
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if isinstance(buf, torch.Tensor)
    ]
