"""BatchBisection's dump: the first failing samples and the model, for ``lightning-nan replay FILE``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from lightning_nan.core.batches import select
from lightning_nan.core.culprits import CulpritReport
from lightning_nan.core.distributed import world
from lightning_nan.core.incident import Incident

__all__ = ["dump_failing"]


def dump_failing(
    dump_dir: str | os.PathLike[str],
    pl_module: Any,
    batch: Any,
    batch_idx: int,
    report: CulpritReport,
    incident: Incident,
    *,
    backward: bool,
    manual: bool,
    indices: list[int] | None,
    loss_fn: Callable[[Any], Any],
    splitter: Callable[[Any, Sequence[int]], Any] | None = None,
) -> str:
    """Write the first failing group of ``batch`` with the model to ``<dump_dir>/nan_dump_step<step>_rank<r>.pt``
    (see :func:`~lightning_nan.core.dump.write_dump`); note the path in ``incident.detail["dump"]`` and return it."""
    from lightning_nan.core.dump import write_dump

    positions = report.groups[0]
    sub = splitter(batch, positions) if splitter is not None else select(batch, positions)
    path = os.path.join(dump_dir, f"nan_dump_step{incident.step}_rank{world()[0]}.pt")
    write_dump(
        path,
        module=pl_module,
        batch=sub,
        batch_idx=batch_idx,
        backward=backward,
        manual=manual,
        positions=positions,
        indices=[indices[p] for p in positions] if indices is not None else None,
        incident=incident.to_dict(),
        loss_fn=loss_fn,
    )
    incident.detail["dump"] = path
    return path
