"""Clipping primitives that never turn finite gradients non-finite, with no host synchronisation.

They compose as in :func:`torch.nn.utils.clip_grad_norm_`: per-tensor norms
(:func:`~lightning_nan.core.norms.tensor_norms`) -> total norm -> :func:`clip_coefficient` ->
:func:`scale_grads_`; :func:`clip_grads_value_` and :func:`adaptive_clip_` (AGC) work element- and unit-wise.

>>> import torch
>>> g = [torch.tensor([3.0, 4.0])]
>>> coef = clip_coefficient(torch.tensor(5.0), 1.0)
>>> scale_grads_(g, coef); g[0]
tensor([0.6000, 0.8000])
>>> clip_coefficient(torch.tensor(float("nan")), 1.0)  # torch's clip would give NaN here
tensor(1.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor, eps: float = 1e-6) -> Tensor:
    """``min(1, max_norm / (total_norm + eps))`` as in torch, but 1 when either norm is not finite."""
    if isinstance(max_norm, Tensor):
        coef = torch.clamp(max_norm / (total_norm + eps), max=1.0)
        return torch.where(torch.isfinite(total_norm) & torch.isfinite(max_norm), coef, 1.0)
    # A NaN/Inf total becomes a 0 denominator, whose coefficient clamps to 1; a finite one is left as
    # it is, so the coefficient is torch's, bit for bit (max_norm is positive, inf included).
    return torch.clamp(max_norm / (total_norm + eps).nan_to_num_(nan=0.0, posinf=0.0), max=1.0)


@torch.no_grad()
def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply gradients by ``coef`` in place (one fused kernel per device)."""
    for device, group in _by_device(grads).items():
        torch._foreach_mul_(group, coef.to(device, non_blocking=True))


@torch.no_grad()
def clip_grads_value_(grads: Sequence[Tensor], clip_value: float) -> None:
    """Clamp gradients to ``[-clip_value, clip_value]`` in place, as :func:`torch.nn.utils.clip_grad_value_`."""
    for group in _by_device(grads).values():
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm per output unit: over all dims but the first (whole tensor for scalars and vectors)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x.float())
    return torch.linalg.vector_norm(x.float(), dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_(params: Sequence[Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), in place.

    For each output unit, when ``|G| / max(|W|, eps) > clip_factor`` the unit's gradient is scaled to
    ``clip_factor * max(|W|, eps)``. A unit whose gradient norm is not finite is left alone.

    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    >>> w.grad = torch.tensor([[1.0, 0.0], [1e-6, 0.0]])
    >>> adaptive_clip_([w], clip_factor=0.1)
    >>> w.grad  # unit 0 capped at 0.1 * 5; unit 1 under 0.1 * eps
    tensor([[5.0000e-01, 0.0000e+00],
            [1.0000e-06, 0.0000e+00]])
    """
    with_grad = [p for p in params if p.grad is not None]
    if with_grad:
        agc_with_fraction(with_grad, clip_factor, eps)


def final_layer_parameters(module: torch.nn.Module) -> list[Tensor]:
    """The parameters of the last ``nn.Linear`` in ``module`` (the classifier AGC's paper leaves unclipped)."""
    last = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return [] if last is None else list(last.parameters())


def agc_with_fraction(params: Sequence[Tensor], clip_factor: float, eps: float) -> Tensor:
    """:func:`adaptive_clip_`, returning the fraction of units clipped (a device scalar)."""
    clipped, units = [], 0
    for p in params:
        assert p.grad is not None
        max_norm = unitwise_norm(p).clamp_min(eps) * clip_factor
        grad_norm = unitwise_norm(p.grad)
        clip = torch.isfinite(grad_norm) & (grad_norm > max_norm)
        p.grad.mul_(torch.where(clip, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm)).to(p.grad.dtype))
        clipped.append(clip.sum())
        units += clip.numel()
    return torch.stack(clipped).sum().float() / max(units, 1)


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[Tensor]]:
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return {devices.pop(): list(tensors)}
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups
