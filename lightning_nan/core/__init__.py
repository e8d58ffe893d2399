"""The pure-PyTorch core of lightning_nan: no Lightning import, usable from any training loop.

>>> import lightning_nan.core as core
>>> {"StepGuard", "find_culprits", "Quarantine", "LRBackoffController"} <= set(core.__all__)
True
"""

from lightning_nan.core.batches import BatchSplitError, batch_size, fingerprint, select
from lightning_nan.core.bisection import BisectionResult, bisect
from lightning_nan.core.clipping import AutoClip, ClipStats, GradientClipper, ZClip, adaptive_clip_, clip_coefficient
from lightning_nan.core.culprits import CulpritReport, find_culprits
from lightning_nan.core.distributed import all_reduce_max
from lightning_nan.core.dump import read_dump, write_dump
from lightning_nan.core.errors import NonFiniteError, NonFiniteWarning
from lightning_nan.core.events import EscalationHandler, IncidentEvent, IncidentListener
from lightning_nan.core.incident import Incident, IncidentAction, IncidentCause, IncidentKind
from lightning_nan.core.jsonl import append_jsonl, read_jsonl
from lightning_nan.core.known_good import state_norm
from lightning_nan.core.localize import Localization, localize
from lightning_nan.core.lr_backoff import LRBackoffController
from lightning_nan.core.metric_states import MetricStates, find_metrics
from lightning_nan.core.norms import any_nonfinite, iter_tensors, tensor_norms, total_norm
from lightning_nan.core.quarantine import Quarantine
from lightning_nan.core.reevaluate import preserved
from lightning_nan.core.sampling import TrackingBatchSampler, track
from lightning_nan.core.snapshots import Snapshot, SnapshotStore
from lightning_nan.core.spikes import LossSpikeDetector
from lightning_nan.core.step_guard import DEFAULT_MAX_CONSECUTIVE, StepGuard, StepVerdict

__all__ = [
    "adaptive_clip_",
    "all_reduce_max",
    "any_nonfinite",
    "append_jsonl",
    "AutoClip",
    "batch_size",
    "BatchSplitError",
    "bisect",
    "BisectionResult",
    "clip_coefficient",
    "ClipStats",
    "CulpritReport",
    "DEFAULT_MAX_CONSECUTIVE",
    "EscalationHandler",
    "find_culprits",
    "find_metrics",
    "fingerprint",
    "GradientClipper",
    "Incident",
    "IncidentAction",
    "IncidentCause",
    "IncidentEvent",
    "IncidentKind",
    "IncidentListener",
    "iter_tensors",
    "Localization",
    "localize",
    "LossSpikeDetector",
    "LRBackoffController",
    "MetricStates",
    "NonFiniteError",
    "NonFiniteWarning",
    "preserved",
    "Quarantine",
    "read_dump",
    "read_jsonl",
    "select",
    "Snapshot",
    "SnapshotStore",
    "state_norm",
    "StepGuard",
    "StepVerdict",
    "tensor_norms",
    "total_norm",
    "track",
    "TrackingBatchSampler",
    "write_dump",
    "ZClip",
]
