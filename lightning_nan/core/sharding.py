"""Sharded tensors (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism): local parts and norms over all ranks.

Each rank takes norms of the parts it holds: no gather, no collective. :func:`norms_over_ranks`
(``DTensor``) and :func:`total_over_ranks` (FSDP1's flat shards) then add those up across ranks in
one ``all_reduce``. A part held by several
ranks (a ``Replicate`` placement, or a plain tensor beside sharded ones) counts once: its share is
divided by the number of ranks holding it. Without ``DTensor``s everything here is a no-op.

>>> import torch
>>> t = [torch.tensor([3.0, 4.0])]
>>> local_parts(t) is t, copies_per_tensor(t)  # plain tensors, not distributed
(True, None)
>>> norms_over_ranks(torch.tensor([5.0]), None)  # one process: nothing to add
tensor([5.])
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.distributed import world


def _dtensor_class() -> Any:
    """``DTensor``, if its module was imported (no DTensor can exist otherwise), else ``None``."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):  # public from torch 2.5; private in 2.4
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if cls is not None:
            return cls
    return None


def _any_of(cls: type, tensors: Sequence[Tensor]) -> bool:
    """``any(isinstance(t, cls) ...)``, by the distinct types (a quarter of the time for a long plain list)."""
    return any(issubclass(kind, cls) for kind in set(map(type, tensors)))


def is_sharded(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    cls = _dtensor_class()
    return cls is not None and _any_of(cls, tensors)


def local_parts(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """Each ``DTensor``'s local part (the same storage: in-place changes reach it), other tensors as they are.

    Returns ``tensors`` itself when none is a ``DTensor``.
    """
    cls = _dtensor_class()
    if cls is None or not _any_of(cls, tensors):
        return tensors
    with torch.no_grad():
        return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def local_part(t: Tensor) -> Tensor:
    """:func:`local_parts` of one tensor."""
    return local_parts([t])[0]


def copies_per_tensor(tensors: Sequence[Tensor]) -> list[int] | None:
    """For each tensor, how many ranks hold its local part; ``None`` when none is a ``DTensor``.

    A ``DTensor`` is held by the product of its mesh's sizes over the ``Replicate`` dimensions, times
    the number of copies of its mesh in the world: a mesh smaller than the world is taken as one slice
    of a larger one whose other ranks hold the same tensor (FSDP2 beside tensor parallelism shards a
    parameter over the data-parallel sub-mesh; each tensor-parallel rank holds a copy). A plain tensor
    beside ``DTensor``s is held by every rank. Raises ``ValueError`` for what norms of local parts
    cannot add up: a ``Partial`` placement (a sum still pending), or a mesh whose size does not divide
    the world's.
    """
    cls = _dtensor_class()
    if cls is None or not _any_of(cls, tensors):
        return None
    size = world()[1]
    out = []
    for t in tensors:
        if not isinstance(t, cls):
            out.append(size)
            continue
        mesh, placements = t.device_mesh, t.placements
        if size % mesh.size():
            raise ValueError(
                f"A DTensor on a device mesh of {mesh.size()} ranks, in a world of {size}: norms over ranks need "
                "a mesh that spans the world, or a slice of a mesh that does."
            )
        copies = size // mesh.size()
        for dim, placement in enumerate(placements):
            if placement.is_partial():
                raise ValueError(
                    f"A DTensor with placements {tuple(placements)}: a Partial placement holds a sum still pending "
                    "across ranks, whose norm cannot be taken part by part. Redistribute it (Shard or Replicate) first."
                )
            if placement.is_replicate():
                copies *= mesh.size(dim)
        out.append(copies)
    return out


def norms_over_ranks(local_norms: Tensor, copies: Sequence[int] | None, norm_type: float = 2.0) -> Tensor:
    """Per-tensor ``norm_type``-norms over all ranks, from each rank's norms of its local parts.

    A collective when ``copies`` (from :func:`copies_per_tensor`, one per norm) is given: every rank
    calls it at the same point. No host synchronisation.
    """
    if copies is None or world()[1] == 1:
        return local_norms
    if math.isinf(norm_type):
        out = local_norms.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out
    return _sum_over_ranks(_shares(local_norms, copies, norm_type)).pow(1.0 / norm_type)


def total_over_ranks(local_norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of disjoint shards (FSDP1's flat parameters) over all ranks: a 0-dim tensor.

    The order of ``FullyShardedDataParallel.clip_grad_norm_``: this rank's total, to the power
    ``norm_type``, summed over ranks. A collective, as above. (For a ``DTensor`` take
    ``total_norm(norms_over_ranks(...))``, the order of ``clip_grad_norm_``.)
    """
    if math.isinf(norm_type):
        out = local_norms.max().clone() if local_norms.numel() else torch.zeros((), device=local_norms.device)
        if world()[1] > 1:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out
    local = torch.linalg.vector_norm(local_norms, norm_type)
    if world()[1] == 1:
        return local
    return _sum_over_ranks(local.pow(norm_type)).pow(1.0 / norm_type)


def _shares(local_norms: Tensor, copies: Sequence[int], norm_type: float) -> Tensor:
    powers = local_norms.pow(norm_type)
    if all(c == 1 for c in copies):
        return powers
    return powers / torch.tensor(copies, dtype=powers.dtype).to(powers.device, non_blocking=True)


def _sum_over_ranks(x: Tensor) -> Tensor:
    out = x.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out
