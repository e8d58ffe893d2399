"""Gradient clipping that never turns finite gradients non-finite, with no host synchronisation.

Every rule works on the device: thresholds and running statistics are tensors, updated with
``torch.where``, so a step whose gradient norm is NaN/Inf leaves them untouched and is not clipped
(the guard skips it). The pieces compose as in :func:`torch.nn.utils.clip_grad_norm_`:
per-tensor norms (:func:`~lightning_nan.core.norms.tensor_norms`) -> total norm -> coefficient ->
:func:`scale_grads_`.

>>> import torch
>>> g = [torch.tensor([3.0, 4.0])]
>>> coef = clip_coefficient(torch.tensor(5.0), 1.0)
>>> scale_grads_(g, coef); g[0]
tensor([0.6000, 0.8000])
>>> clip_coefficient(torch.tensor(float("nan")), 1.0)  # torch's clip would give NaN here
tensor(1.)
>>> rule = AutoClip(percentile=50, window=3)
>>> [round(float(rule.threshold(torch.tensor(n))), 2) for n in (1.0, 3.0, float("nan"), 2.0)]
[1.0, 2.0, 2.0, 2.0]
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.norms import tensor_norms, total_norm
from lightning_nan.core.sharding import copies_per_tensor, local_parts, norms_over_ranks, total_over_ranks
from lightning_nan.core.validate import choice, integer, number

METHODS = ("norm", "value", "autoclip", "agc", "zclip")
#: ZClip's cap on every step's norm unless told otherwise: the reference ``zclip`` package's
#: ``max_grad_norm=1.0``, which is what lets a model that blows up in its first (warm-up) steps survive.
ZCLIP_MAX_NORM = 1.0


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
        _agc_with_fraction(with_grad, clip_factor, eps)


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): the threshold is the ``percentile``-th percentile of the
    total gradient norms seen so far (the current one included), over the last ``window`` finite ones.

    The history is a device tensor; non-finite norms never enter it.
    """

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        self.percentile = number("percentile", percentile, low=0, high=100, low_open=True)
        self.window = integer("window", window, low=1)
        self.history: Tensor | None = None

    def threshold(self, total_norm: Tensor) -> Tensor:
        """Record ``total_norm`` (if finite) and return the current threshold (NaN: nothing seen yet)."""
        norm = total_norm.detach().float().reshape(1)
        if self.history is None:
            self.history = torch.full((self.window,), math.nan, device=norm.device)
        self.history = self.history.to(norm.device)  # e.g. loaded from a checkpoint on the CPU
        shifted = torch.cat([self.history[1:], norm])
        self.history = torch.where(torch.isfinite(norm), shifted, self.history)
        return torch.nanquantile(self.history, self.percentile / 100.0)

    def reset(self) -> None:
        """Forget the norms seen (a new run)."""
        self.history = None

    def state_dict(self) -> dict[str, Any]:
        """The recorded norms, oldest first (empty slots are not stored)."""
        if self.history is None:
            return {"history": []}
        return {"history": self.history[torch.isfinite(self.history)].tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history")
        if history:
            values = torch.tensor(history, dtype=torch.float32)[-self.window :]
            self.history = torch.cat([torch.full((self.window - len(values),), math.nan), values])


class ZClip:
    """Z-score clipping (Kumar et al. 2025) over an EMA of the gradient norm's mean and variance.

    The first ``warmup`` finite norms initialise the mean and variance (clipping only to
    ``max_norm`` meanwhile). Then a norm whose z-score exceeds ``z_thresh`` is clipped to
    ``mean + z_thresh * std / (z / z_thresh)`` (the paper's adaptive scaling), the EMA is updated
    with the clipped value, and ``max_norm`` (1.0 by default, as the reference's ``max_grad_norm``;
    ``None``: no cap) caps every threshold. Matches the reference ``zclip`` package (mode "zscore",
    clip_option "adaptive_scaling") for the same arguments, without its host syncs.

    >>> rule = ZClip(warmup=2)
    >>> [float(rule.threshold(torch.tensor(n))) for n in (0.5, 40.0)]  # warm-up: only the cap applies
    [0.5, 1.0]
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        max_norm: float | None = ZCLIP_MAX_NORM,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = number("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
        self.z_thresh = number("z_thresh", z_thresh, low=0, low_open=True)
        self.warmup = integer("warmup", warmup, low=1)
        self.max_norm = number("max_norm", max_norm, low=0, low_open=True, optional=True, infinite=True)
        self.eps = number("eps", eps, low=0, low_open=True)
        self.buffer: Tensor | None = None  # warm-up norms, NaN where not yet seen
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.seen: Tensor | None = None  # finite norms seen (a device counter)

    def reset(self) -> None:
        """Forget the statistics (a new run): the next norms warm up again."""
        self.buffer = self.mean = self.var = self.seen = None

    def _init(self, device: torch.device) -> None:
        self.buffer = torch.full((self.warmup,), math.nan, device=device)
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def threshold(self, total_norm: Tensor) -> Tensor:
        """Update the statistics with ``total_norm`` (if finite) and return the norm to clip to.

        Returns ``total_norm`` itself (no clipping) when it is not a spike and no cap applies.
        """
        g = total_norm.detach().float().reshape(())
        if self.buffer is None:
            self._init(g.device)
        assert self.buffer is not None and self.mean is not None and self.var is not None and self.seen is not None
        if self.buffer.device != g.device:  # e.g. loaded from a checkpoint on the CPU
            self.buffer, self.mean, self.var, self.seen = (t.to(g.device) for t in (self.buffer, self.mean, self.var, self.seen))
        finite = torch.isfinite(g)
        warm = self.seen < self.warmup
        # warm-up: collect; the norm that fills the buffer initialises mean and (population) variance
        slot = torch.arange(self.warmup, device=g.device) == self.seen.long()
        buffer = torch.where(slot & finite & warm, g, self.buffer)
        filled = warm & finite & (self.seen + 1 >= self.warmup)
        init_mean = buffer.nanmean()
        init_var = ((buffer - init_mean) ** 2).nanmean()
        # after warm-up: z-score against the EMA
        std = self.var.sqrt()
        z = (g - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        adaptive = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        clip_to = torch.where(spike & ~warm, adaptive, g)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * clip_to
        new_var = self.alpha * self.var + (1 - self.alpha) * (clip_to - new_mean) ** 2
        update = finite & ~warm
        self.mean = torch.where(filled, init_mean, torch.where(update, new_mean, self.mean))
        self.var = torch.where(filled, init_var, torch.where(update, new_var, self.var))
        self.buffer = buffer
        self.seen = self.seen + finite.float()
        if self.max_norm is not None:
            clip_to = torch.clamp(clip_to, max=self.max_norm)
        return clip_to

    def state_dict(self) -> dict[str, Any]:
        """Mean, variance, count and the warm-up norms recorded so far (no NaN placeholders)."""
        if self.buffer is None:
            return {}
        state = {k: getattr(self, k).item() for k in ("mean", "var", "seen")}
        state["buffer"] = self.buffer[torch.isfinite(self.buffer)].tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seen" in state:
            self._init(torch.device("cpu"))
            recorded = torch.tensor(state.get("buffer", []), dtype=torch.float32)[: self.warmup]
            self.buffer = torch.cat([recorded, torch.full((self.warmup - len(recorded),), math.nan)])
            for k in ("mean", "var", "seen"):
                setattr(self, k, torch.tensor(float(state[k])))


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
            fraction = _agc_with_fraction(clipped, self.clip_factor, self.eps) if clipped else torch.zeros_like(total)
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


def final_layer_parameters(module: torch.nn.Module) -> list[Tensor]:
    """The parameters of the last ``nn.Linear`` in ``module`` (the classifier AGC's paper leaves unclipped)."""
    last = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return [] if last is None else list(last.parameters())


def _agc_with_fraction(params: Sequence[Tensor], clip_factor: float, eps: float) -> Tensor:
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
