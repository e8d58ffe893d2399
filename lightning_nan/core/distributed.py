"""Cross-rank agreement with plain ``torch.distributed`` (no Lightning), a no-op when not distributed.

>>> import torch
>>> all_reduce_max(torch.tensor([0.0, 1.0]))  # single process: unchanged
tensor([0., 1.])
>>> world()
(0, 1)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_max(tensor: Tensor, group: Any = None) -> Tensor:
    """Element-wise maximum over all ranks, in place; every rank must call it at the same point.

    Use it on 0/1 flags so that a fault seen by one rank becomes every rank's decision. It launches a
    collective but does not synchronise the host with the device.
    """
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
    return tensor


def ranks_where(flag: bool, reduce: Any = all_reduce_max, device: torch.device | None = None) -> list[int]:
    """The ranks on which ``flag`` is true (a collective: call it on every rank)."""
    rank, size = world()
    if size == 1:
        return [0] if flag else []
    vec = torch.zeros(size, device=device)
    vec[rank] = float(flag)
    return [i for i, v in enumerate(reduce(vec).tolist()) if v > 0]
