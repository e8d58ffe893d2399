"""The test that says a training state is known-good: finite weights, a bounded norm growth, a quiet run.

Pure PyTorch. :class:`~lightning_nan.core.snapshots.SnapshotStore` keeps a snapshot *pending* until
the caller has checked it with :func:`check_known_good`, from norms read with :func:`state_norm`.

>>> import torch
>>> snap, later = float(state_norm({"w": torch.tensor([3.0, 4.0])})), 5.5
>>> check_known_good(snap, later) is None, check_known_good(snap, later, spike=True)
(True, 'the loss spiked near it')
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_nan.core.norms import tensor_norms, total_norm


def state_norm(state: torch.nn.Module | dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """Total 2-norm of the floating-point tensors of a module's ``state_dict`` (or of tensors), on their device.

    Non-finite exactly when a tensor holds NaN/Inf (or the norm overflows float32). No host sync.

    >>> state_norm({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(7)})
    tensor(5.)
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = list(state.values()) if isinstance(state, dict) else list(state)
    floats = [t.detach() for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    return total_norm(tensor_norms(floats)) if floats else torch.zeros(())


def check_known_good(
    snapshot_norm: float,
    current_norm: float,
    *,
    reference_norm: float | None = None,
    intervals: float = 1.0,
    max_norm_growth: float = 2.0,
    incident: bool = False,
    spike: bool = False,
) -> str | None:
    """``None`` when a pending snapshot may be promoted, else why not (one sentence).

    A snapshot is known-good when no incident and no loss spike came near it, its weights and the
    weights ``confirm_steps`` later are finite, and neither norm grew more than ``max_norm_growth``
    per snapshot interval over the newest good snapshot (``reference_norm``, ``intervals`` intervals
    ago; at least one factor). Without a reference, the later norm is compared to the snapshot's.

    >>> check_known_good(10.0, 11.0, reference_norm=9.0) is None
    True
    >>> check_known_good(10.0, 50.0, reference_norm=9.0)
    'the weight norm grew from 9 to 50 (more than 2x per snapshot interval)'
    >>> check_known_good(10.0, float("nan"))
    'the weights are not finite'
    """
    if not (math.isfinite(snapshot_norm) and math.isfinite(current_norm)):
        return "the weights are not finite"
    if incident:
        return "a NaN/Inf incident happened near it"
    if spike:
        return "the loss spiked near it"
    ref = snapshot_norm if reference_norm is None else reference_norm
    allowed = ref * max_norm_growth ** max(1.0, float(intervals))
    worst = max(snapshot_norm, current_norm)
    if worst > allowed:
        return f"the weight norm grew from {ref:.3g} to {worst:.3g} (more than {max_norm_growth:g}x per snapshot interval)"
    return None
