"""The pure-PyTorch core of lightning_nan: no Lightning import, usable from any training loop.

>>> import lightning_nan.core as core
>>> sorted(core.__all__)[:4]
['AutoClip', 'ClipStats', 'DEFAULT_MAX_CONSECUTIVE', 'EscalationHandler']
"""

from lightning_nan.core.clipping import AutoClip, ClipStats, GradientClipper, ZClip, adaptive_clip_, clip_coefficient
from lightning_nan.core.distributed import all_reduce_max
from lightning_nan.core.errors import NonFiniteError, NonFiniteWarning
from lightning_nan.core.events import EscalationHandler, IncidentEvent, IncidentListener
from lightning_nan.core.incident import Incident
from lightning_nan.core.jsonl import append_jsonl, read_jsonl
from lightning_nan.core.norms import any_nonfinite, iter_tensors, tensor_norms, total_norm
from lightning_nan.core.step_guard import DEFAULT_MAX_CONSECUTIVE, StepGuard, StepVerdict

__all__ = [
    "AutoClip",
    "ClipStats",
    "DEFAULT_MAX_CONSECUTIVE",
    "EscalationHandler",
    "GradientClipper",
    "Incident",
    "IncidentEvent",
    "IncidentListener",
    "NonFiniteError",
    "NonFiniteWarning",
    "StepGuard",
    "StepVerdict",
    "ZClip",
    "adaptive_clip_",
    "all_reduce_max",
    "any_nonfinite",
    "append_jsonl",
    "clip_coefficient",
    "iter_tensors",
    "read_jsonl",
    "tensor_norms",
    "total_norm",
]
