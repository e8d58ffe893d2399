"""The failure path of a step check: exact per-tensor checks and what each rank saw (host syncs allowed).

The screen (:mod:`~lightning_nan.core.step_screen`) only says that a sum or a 2-norm was not finite;
a 2-norm also overflows on finite values beyond ~1.8e19. Here every screened value is checked exactly,
tensor by tensor, and the ranks' views are combined. This runs only when a step looks bad.

>>> import torch
>>> screened = {"input": False, "loss": True, "grad": True, "param": False, "scale": False}
>>> exact_faults(screened, batches=[], losses=[torch.tensor(1e30)], grad_norms=torch.tensor([float("inf")]),
...              params=[], scale=None, min_loss_scale=1.0)
{'input': False, 'loss': False, 'grad': True, 'param': False, 'scale': False}
>>> bad_input_fields([(3, {"x": torch.tensor([1.0, float("nan")]), "y": torch.ones(1)})])
["batch 3['x']"]
>>> json_number(float("nan")), json_number(2.5)
('nan', 2.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.distributed import gather_objects
from lightning_nan.core.norms import iter_tensors
from lightning_nan.core.sharding import local_part


def finite(t: Tensor) -> bool:
    """Exact check, with a host sync: for the failure path only (of this rank's part of a sharded tensor)."""
    return bool(torch.isfinite(local_part(t)).all())


def exact_faults(
    screened: dict[str, bool],
    *,
    batches: Sequence[tuple[int, Any]],
    losses: Sequence[Tensor],
    grad_norms: Tensor | None,
    params: Sequence[Tensor],
    scale: Tensor | None,
    min_loss_scale: float,
) -> dict[str, bool]:
    """This rank's exact view of each value the screen flagged: is it really non-finite (the scale: too low)?

    A gradient 2-norm that overflows counts as non-finite, as in :func:`torch.nn.utils.clip_grad_norm_`.
    """
    return {
        "input": screened["input"] and any(not finite(t) for _, b in batches for _, t in iter_tensors(b)),
        "loss": screened["loss"] and any(not finite(v) for v in losses),
        "grad": screened["grad"] and grad_norms is not None and not finite(grad_norms),
        "param": screened["param"] and any(not finite(p) for p in params),
        "scale": screened["scale"] and scale is not None and float(scale) < min_loss_scale,
    }


def bad_input_fields(batches: Sequence[tuple[int, Any]]) -> list[str]:
    """``"batch <idx><path>"`` of every non-finite floating-point tensor in the batches, sorted."""
    return sorted({f"batch {idx}{path}" for idx, batch in batches for path, t in iter_tensors(batch) if not finite(t)})


def merge_ranks(saw: bool, params: list[str], detail: dict[str, Any]) -> tuple[list[int], list[str], dict[str, Any]]:
    """Combine every rank's view of an agreed fault (a collective on the failure path only).

    Returns the ranks that saw it, the offending parameter names of those ranks (in rank order, no
    repeats), and the details of the first of them, with every such rank's details under
    ``per_rank`` when there are several; so rank zero records what the faulty ranks saw.
    """
    views = gather_objects((saw, params, detail))
    ranks = [r for r, (s, _, _) in enumerate(views) if s]
    chosen = ranks or [0]
    names = list(dict.fromkeys(n for r in chosen for n in views[r][1]))
    merged = dict(views[chosen[0]][2])
    if len(ranks) > 1 and any(views[r][2] != views[chosen[0]][2] for r in ranks):
        merged["per_rank"] = {str(r): views[r][2] for r in ranks}
    return ranks, names, merged


def json_number(x: float) -> float | str:
    """Keep JSON strict: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    return x if math.isfinite(x) else str(x)
