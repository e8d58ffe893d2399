"""Cross-rank agreement with plain ``torch.distributed`` (no Lightning), a no-op when not distributed.

>>> import torch
>>> all_reduce_max(torch.tensor([0.0, 1.0]))  # single process: unchanged
tensor([0., 1.])
>>> world()
(0, 1)
>>> gather_objects({"rank": 0})
[{'rank': 0}]
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


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank (a collective: call it on every rank)."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out
