"""GradientClipper: five clipping methods behind one call, NaN-proof, with no host synchronisation.

The primitives are in :mod:`~lightning_nan.core.clip_ops`, the adaptive thresholds (AutoClip, ZClip)
in :mod:`~lightning_nan.core.clip_rules`; a step whose gradient norm is NaN/Inf is not clipped (the
guard skips it) and never enters a rule's statistics.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.clip_ops import (
    adaptive_clip_,
    agc_with_fraction,
    clip_coefficient,
    clip_grads_value_,
    final_layer_parameters,
    scale_grads_,
    unitwise_norm,
)
from lightning_nan.core.clip_rules import ZCLIP_MAX_NORM, AutoClip, ZClip
from lightning_nan.core.norms import tensor_norms, total_norm
from lightning_nan.core.sharding import copies_per_tensor, local_parts, norms_over_ranks, total_over_ranks
from lightning_nan.core.validate import choice, number

__all__ = [
    "ARGUMENTS", "DEFAULT", "METHODS", "ZCLIP_MAX_NORM", "AutoClip", "ClipStats", "DefaultType", "GradientClipper", "ZClip",
    "adaptive_clip_", "agc_refused", "clip_coefficient", "clip_grads_value_", "final_layer_parameters",
    "refuse_other_methods", "scale_grads_", "unitwise_norm",
]

METHODS = ("norm", "value", "autoclip", "agc", "zclip")


class DefaultType(enum.Enum):
    """The type of :data:`DEFAULT`."""

    TOKEN = "default"

    def __repr__(self) -> str:
        return "DEFAULT"


#: ``max_norm=DEFAULT``: the method's own default (:data:`ZCLIP_MAX_NORM` for ``zclip``, none for the
#: others); ``None`` means no cap (``inf`` too).
DEFAULT = DefaultType.TOKEN


#: The arguments each method takes (``norm_type``, the norm of ``total_norm``, is every method's).
ARGUMENTS: dict[str, tuple[str, ...]] = {
    "norm": ("max_norm",),
    "value": ("clip_value",),
    "autoclip": ("percentile", "window"),
    "agc": ("clip_factor", "eps"),
    "zclip": ("alpha", "z_thresh", "warmup", "max_norm"),
}
#: ``norm`` skips a coefficient of exactly 1 when the host's norm plus torch's 1e-6, times this, is under
#: ``max_norm``: a margin far beyond the float32 rounding of the device's norm, its 1e-6 and its division.
_MARGIN = 1.001


@dataclass
class ClipStats:
    """What one clipping step saw and did (device tensors; ``None`` where a method has no such value).

    Attributes:
        total_norm: the total gradient norm before clipping.
        threshold: the norm clipped to (``norm``, ``autoclip``, ``zclip``).
        coef: the factor the gradients were multiplied by (1: untouched).
        clipped_units: the fraction of units AGC clipped (``agc``).
    """

    total_norm: Tensor | None = None
    threshold: Tensor | None = None
    coef: Tensor | None = None
    clipped_units: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


class GradientClipper:
    """One of five clipping methods behind one call, for any training loop.

    ``norm`` (``max_norm``, ``norm_type``) is :func:`torch.nn.utils.clip_grad_norm_` (bit for bit on
    float32 gradients; norms are taken in float32 for every dtype), except that a non-finite total
    norm leaves the gradients alone; ``value`` (``clip_value``) is
    :func:`torch.nn.utils.clip_grad_value_`; ``autoclip`` (``percentile``, ``window``) clips to a
    percentile of past norms (:class:`AutoClip`); ``agc`` (``clip_factor``, ``eps``) is unit-wise
    adaptive clipping (:func:`adaptive_clip_`); ``zclip`` (``alpha``, ``z_thresh``, ``warmup``,
    ``max_norm``, which defaults to 1.0 there) is z-score clipping (:class:`ZClip`).

    >>> model = torch.nn.Linear(3, 1)
    >>> model(torch.ones(1, 3)).sum().mul(100).backward()
    >>> stats = GradientClipper("norm", max_norm=1.0).clip_(model.parameters())
    >>> round(float(stats.total_norm), 1), round(float(total_norm(tensor_norms([p.grad for p in model.parameters()]))), 3)
    (200.0, 1.0)
    """

    def __init__(
        self,
        method: str = "norm",
        *,
        max_norm: float | None | DefaultType = DEFAULT,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        percentile: float = 10.0,
        window: int = 1000,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
    ) -> None:
        self.method = choice("method", method, METHODS)
        given = dict(
            max_norm=None if max_norm is DEFAULT else max_norm, clip_value=clip_value, percentile=percentile, window=window,
            clip_factor=clip_factor,
        )
        refuse_other_methods(method, given | dict(eps=eps, alpha=alpha, z_thresh=z_thresh, warmup=warmup), _DEFAULTS)
        if max_norm is DEFAULT:
            max_norm = ZCLIP_MAX_NORM if method == "zclip" else None
        positive: dict[str, Any] = {"low": 0, "low_open": True}
        needs = {"norm": "max_norm", "value": "clip_value"}.get(method)
        hint = f"method={method!r} needs it"
        self.max_norm = number(
            "max_norm", max_norm, optional=needs != "max_norm", infinite=True, hint=hint if needs == "max_norm" else "", **positive
        )
        self.norm_type = number("norm_type", norm_type, infinite=True, **positive)
        self.clip_value = number(
            "clip_value", clip_value, optional=needs != "clip_value", hint=hint if needs == "clip_value" else "", **positive
        )
        self.clip_factor = number("clip_factor", clip_factor, **positive)
        self.eps = number("eps", eps, **positive)
        #: ids of parameters AGC leaves alone (e.g. :func:`final_layer_parameters`).
        self.exclude: set[int] = set()
        #: gradients are FSDP1's flat shards: the total norm is all-reduced to the global one (sharded
        #: ``DTensor`` parameters, FSDP2's, are recognised by themselves).
        self.sharded = False
        self.rule: AutoClip | ZClip | None = None
        self._constant_cache: tuple[tuple[float, torch.device, torch.dtype], tuple[Tensor, Tensor]] | None = None
        if method == "autoclip":
            self.rule = AutoClip(percentile, window)
        elif method == "zclip":
            self.rule = ZClip(alpha=alpha, z_thresh=z_thresh, warmup=warmup, max_norm=max_norm)

    @torch.no_grad()
    def clip_(self, params: Iterable[Tensor], norms: Tensor | None = None, norm_bound: float | None = None) -> ClipStats:
        """Clip the gradients of ``params`` in place.

        ``norms``: their per-tensor gradient 2-norms if already computed this step (e.g. by the
        guard), in the order of the parameters that have gradients; reused instead of a second pass.
        ``norm_bound``: the 2-norm of all those gradients together (or more), already on the host and
        the same on every rank, such as the guard's ``last_grad_norm_bound``: when it is clearly under
        ``max_norm``, method ``norm`` skips multiplying the gradients by what would be exactly 1. Pass it
        only where every rank holds whole gradients (not under FSDP or DeepSpeed's partitioning).
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            return ClipStats()
        copies = copies_per_tensor(params)  # sharded parameters (DTensor): clip this rank's parts
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        if copies is not None:
            grads = list(local_parts(grads))
        if norms is None or self.norm_type != 2.0 or len(norms) != len(grads):
            norms = tensor_norms(grads, self.norm_type)
            norm_bound = None  # it came with the norms passed in, which are not these
        if copies is not None:  # the whole tensors' norms (a collective), then as clip_grad_norm_ with DTensors
            total = total_norm(norms_over_ranks(norms, copies, self.norm_type), self.norm_type)
        elif self.sharded:  # FSDP1's flat shards, as FullyShardedDataParallel.clip_grad_norm_ (a collective)
            total = total_over_ranks(norms, self.norm_type)
        else:
            total = total_norm(norms, self.norm_type)
        if self.method == "value":
            clip_grads_value_(grads, float(self.clip_value))
            return ClipStats(total_norm=total)
        if self.method == "agc":
            if self.sharded or copies is not None:
                raise agc_refused("FSDP (sharded parameters)")
            clipped = [p for p in params if id(p) not in self.exclude]
            fraction = agc_with_fraction(clipped, self.clip_factor, self.eps) if clipped else torch.zeros_like(total)
            return ClipStats(total_norm=total, clipped_units=fraction)
        if self.method == "norm":
            max_norm = float(self.max_norm)
            threshold, one = self._constants(max_norm, total)
            unsharded = copies is None and not self.sharded  # a bound from rank-local parts would not hold
            if unsharded and norm_bound is not None and (norm_bound + 1e-6) * _MARGIN < max_norm:
                # torch's coefficient would clamp to exactly 1, and x * 1.0 == x: nothing to do
                return ClipStats(total_norm=total, threshold=threshold, coef=one)
            coef = clip_coefficient(total, max_norm)
        else:
            assert self.rule is not None
            threshold = self.rule.threshold(total)
            clip = torch.isfinite(total) & torch.isfinite(threshold) & (total > threshold)
            coef = torch.where(clip, threshold / (total + 1e-6), 1.0)
        scale_grads_(grads, coef)
        return ClipStats(total_norm=total, threshold=threshold, coef=coef)

    def _constants(self, max_norm: float, like: Tensor) -> tuple[Tensor, Tensor]:
        """``max_norm`` and 1 as tensors like ``like``, made once (read-only: they are handed out)."""
        key = (max_norm, like.device, like.dtype)
        cache = getattr(self, "_constant_cache", None)  # (absent from a clipper pickled by an older version)
        if cache is None or cache[0] != key:
            cache = self._constant_cache = (key, (torch.full_like(like, max_norm), torch.ones_like(like)))
        return cache[1]

    def reset(self) -> None:
        """Forget AutoClip's or ZClip's statistics (a new run)."""
        if self.rule is not None:
            self.rule.reset()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.rule is None else self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rule is not None:
            self.rule.load_state_dict(state)


_DEFAULTS: dict[str, Any] = {
    "max_norm": None, "clip_value": None, "percentile": 10.0, "window": 1000, "clip_factor": 0.01, "eps": 1e-3,
    "alpha": 0.97, "z_thresh": 2.5, "warmup": 25, "exclude_final_layer": True,
}


def refuse_other_methods(method: str, arguments: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise ``ValueError`` when an argument of another method than ``method`` differs from its default.

    >>> refuse_other_methods("norm", {"percentile": 500}, {"percentile": 10.0})
    Traceback (most recent call last):
    ...
    ValueError: `percentile` is an argument of method='autoclip', not of method='norm' (which takes max_norm, norm_type): remove `percentile`, or use method='autoclip'
    """
    for name, value in arguments.items():
        owners = [m for m, names in ARGUMENTS.items() if name in names] or ["agc"]  # exclude_final_layer: agc's
        if method in owners or _same(value, defaults[name]):
            continue
        takes = ", ".join(ARGUMENTS[method] + ("norm_type",) + (("exclude_final_layer",) if method == "agc" else ()))
        of = " or ".join(f"method={m!r}" for m in owners)
        raise ValueError(
            f"`{name}` is an argument of {of}, not of method={method!r} (which takes {takes}): "
            f"remove `{name}`, or use {of}"
        )


def _same(value: Any, default: Any) -> bool:
    if value is None or default is None or isinstance(default, bool) or isinstance(value, bool):
        return value is default
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several elements, say
        return False


def agc_refused(splitter: str) -> ValueError:
    """The error for AGC where ``splitter`` (a strategy) splits each output unit across ranks."""
    return ValueError(
        f"GradientClipping('agc') needs each output unit's whole gradient and weight, which {splitter} splits "
        "across ranks: use method='zclip', 'autoclip' or 'norm' (their norm is taken over all ranks), or a "
        "strategy that does not shard parameters ('ddp')."
    )
