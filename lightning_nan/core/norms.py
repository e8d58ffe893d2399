"""Fused norms and finiteness flags, computed on the device without a host synchronisation.

One ``torch._foreach_norm`` call per device covers a whole list of tensors; the results come back as a
single float32 tensor, so a caller decides everything with one ``.tolist()`` at the end.

>>> import torch
>>> norms = tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([float("nan")])])
>>> norms
tensor([5., nan])
>>> total_norm(norms[:1]).item(), bool(any_nonfinite(norms))
(5.0, True)
>>> [path for path, _ in iter_tensors({"x": torch.zeros(2), "meta": ["a", torch.ones(1)]})]
["['x']", "['meta'][1]"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from lightning_nan.core.sharding import local_parts


@torch.no_grad()
def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor ``norm_type``-norms as one float32 tensor (one fused kernel per device).

    A tensor holding NaN gets a NaN norm, one holding ±Inf an Inf norm (for ``norm_type=inf`` too),
    so ``isfinite`` of the result flags exactly the tensors that are not finite — except that a
    2-norm can also overflow float32 when the elements are finite but beyond ~1.8e19, which is
    reported as non-finite, as :func:`torch.nn.utils.clip_grad_norm_` does. An empty tensor's norm is 0
    (its inf-norm too, which torch refuses). Never records autograd
    history, so it is safe on parameters. A sharded tensor (``DTensor``) gets the norm of this rank's
    part (:mod:`~lightning_nan.core.sharding` adds them up across ranks).
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    tensors = local_parts(tensors)
    if math.isinf(norm_type) and any(t.numel() == 0 for t in tensors):  # torch refuses the max of nothing: 0
        out = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
        full = [i for i, t in enumerate(tensors) if t.numel()]
        if full:
            out[torch.tensor(full, device=out.device)] = tensor_norms([tensors[i] for i in full], norm_type).to(out.device)
        return out
    if tensors[0].dtype not in _WIDE:
        try:  # the common case, one device and nothing wider than float32: one kernel, no look at each tensor
            return torch.stack(torch._foreach_norm(cast(list[Tensor], tensors), norm_type, dtype=torch.float32))
        except RuntimeError:  # float64 or complex further on (the kernel will not narrow them), or several devices
            pass
    groups: dict[tuple[torch.device, bool], list[int]] = {}
    for i, t in enumerate(tensors):  # norms of float64 and complex tensors are taken in their own precision
        groups.setdefault((t.device, t.dtype in _WIDE), []).append(i)
    home = tensors[0].device
    if len(groups) == 1:
        ((_, wide),) = groups
        return _norms(list(tensors), norm_type, wide)
    out = torch.empty(len(tensors), dtype=torch.float32, device=home)
    for (_, wide), idx in groups.items():
        norms = _norms([tensors[i] for i in idx], norm_type, wide)
        out[torch.tensor(idx, device=home)] = norms.to(home, non_blocking=True)
    return out


_WIDE = (torch.float64, torch.complex64, torch.complex128)


def _norms(tensors: list[Tensor], norm_type: float, wide: bool) -> Tensor:
    if wide:
        return torch.stack(torch._foreach_norm(tensors, norm_type)).float()
    return torch.stack(torch._foreach_norm(cast(list[Tensor], tensors), norm_type, dtype=torch.float32))


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors together (as ``clip_grad_norm_`` does)."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=norms.device)
    if math.isinf(norm_type):
        return norms.max()
    return torch.linalg.vector_norm(norms, norm_type)


def any_nonfinite(values: Tensor) -> Tensor:
    """A 0-dim bool tensor: does ``values`` hold a NaN or an Inf? (No host synchronisation.)"""
    return ~torch.isfinite(values).all()


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(path, tensor)`` for every floating-point tensor nested in ``obj``.

    Walks mappings, lists, tuples (named ones too) and dataclasses; other values are ignored.
    """
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from iter_tensors(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name), f"{path}.{f.name}")
