"""CheckpointRollback's arguments, checked before anything is built: a bad one gets a message naming it and the fix.

>>> check_arguments(every_n_steps=10, confirm_steps=10)
Traceback (most recent call last):
ValueError: Expected `confirm_steps` < `every_n_steps` (10), got 10: a snapshot must be confirmed before the next one is taken
"""

from __future__ import annotations

import os

from lightning_nan.core.rollback import SOURCES
from lightning_nan.core.snapshots import DEFAULT_EVERY_N_STEPS
from lightning_nan.core.validate import choice, fs_path, integer, number


def check_arguments(
    *,
    every_n_steps: int = DEFAULT_EVERY_N_STEPS,
    confirm_steps: int = 20,
    max_norm_growth: float = 2.0,
    max_consecutive_skips: int = 5,
    skip_rate: tuple[int, int] | None = (3, 10),
    spike_threshold: float | None = 6.0,
    spike_patience: int = 10,
    skip_batches: int = 0,
    max_rollbacks: int = 5,
    source: str = "memory",
    dirpath: str | os.PathLike[str] | None = None,
) -> str | None:
    """Raise ``ValueError`` naming the first of CheckpointRollback's arguments that is out of range; return
    ``dirpath`` as a path string (or ``None``)."""
    for name, value, low in (
        ("every_n_steps", every_n_steps, 1),
        ("confirm_steps", confirm_steps, 0),
        ("max_consecutive_skips", max_consecutive_skips, 1),
        ("spike_patience", spike_patience, 0),
        ("skip_batches", skip_batches, 0),
        ("max_rollbacks", max_rollbacks, 0),
    ):
        integer(name, value, low=low)
    if skip_rate is not None and not (
        isinstance(skip_rate, (tuple, list))
        and len(skip_rate) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in skip_rate)
        and 1 <= skip_rate[0] <= skip_rate[1]
    ):
        raise ValueError(
            f"Expected `skip_rate` to be None or (k, n) with ints 1 <= k <= n (k skipped steps among the last n), "
            f"got {skip_rate!r}"
        )
    if confirm_steps >= every_n_steps:
        raise ValueError(
            f"Expected `confirm_steps` < `every_n_steps` ({every_n_steps}), got {confirm_steps!r}: "
            "a snapshot must be confirmed before the next one is taken"
        )
    number("max_norm_growth", max_norm_growth, low=1, low_open=True, infinite=True, hint="inf: no growth test")
    choice("source", source, SOURCES)
    folder: str | None = fs_path("dirpath", dirpath, optional=True, kind="folder", hint="None: snapshots in memory only")
    number("spike_threshold", spike_threshold, low=0, low_open=True, optional=True, infinite=True, hint="None: no loss tests")
    if folder is not None and source != "memory":
        raise ValueError(f"`dirpath` stores snapshots, which source={source!r} does not take: remove `dirpath`")
    return folder
