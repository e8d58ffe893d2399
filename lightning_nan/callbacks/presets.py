"""``recommended()``: the whole library as one list of callbacks, with defaults that work out of the box."""

from __future__ import annotations

import importlib
from typing import Any

#: Part name -> (callback class name, default arguments), in the order the list is built.
PARTS: dict[str, tuple[str, dict[str, Any]]] = {
    "guard": ("NaNGuard", {}),
    # AutoClip at the median of the norms seen so far: scale-free (a fixed norm is right for one model
    # and stalls another), and it cuts a spike to a typical step from the first steps on (z-score
    # clipping lets everything through during its warm-up, when a badly scaled model blows up); the
    # smaller half of the steps is never touched. A blow-up it lets through is rolled back.
    "clipping": ("GradientClipping", {"method": "autoclip", "percentile": 50}),
    "bisection": ("BatchBisection", {}),
    # A learning rate that diverges is usually off by orders of magnitude (the two-layer net of
    # examples/exploding_mlp.py: 1e-4 diverges, 1e-6 converges), so each incident quarters it.
    "backoff": ("LRBackoff", {"factor": 0.25}),
    "rollback": ("CheckpointRollback", {}),
    "norms": ("NormMonitor", {"every_n_steps": 50}),
}


def recommended_for(namespace: str, **overrides: Any) -> list[Any]:
    """The :data:`PARTS` as callbacks of ``namespace`` (``"lightning_nan._pytorch_lightning"`` or ``"lightning_nan.lightning"``).

    Each keyword names a part: a dict updates its arguments, ``False`` leaves it out.
    """
    unknown = sorted(set(overrides) - set(PARTS))
    if unknown:
        raise ValueError(f"Expected parts among {sorted(PARTS)}, got {unknown}: pass e.g. clipping={{'percentile': 25}} or norms=False")
    module = importlib.import_module(namespace)
    callbacks = []
    for part, (name, defaults) in PARTS.items():
        choice = overrides.get(part, {})
        if choice is False:
            continue
        if choice is True:
            choice = {}
        if not isinstance(choice, dict):
            raise ValueError(f"Expected `{part}` to be a dict of arguments for {name}, or False, got {choice!r}")
        if "method" in choice and choice["method"] != defaults.get("method", choice["method"]):
            defaults = {}  # another method: the default's own arguments (AutoClip's percentile) do not apply
        callbacks.append(getattr(module, name)(**{**defaults, **choice}))
    return callbacks
