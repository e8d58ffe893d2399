"""Failure dumps: the failing samples and the model in one file, to reproduce a NaN offline.

>>> import os, tempfile, torch
>>> path = os.path.join(tempfile.mkdtemp(), "dump.pt")
>>> write_dump(path, module=torch.nn.Linear(2, 1), batch=torch.ones(1, 2), batch_idx=3)
>>> sorted(read_dump(path))[:4]
['backward', 'batch', 'batch_idx', 'format']
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from lightning_nan.core.files import atomic_write


FORMAT = 1


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor moved to the CPU (lists, tuples, dicts, dataclasses walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    return obj


def write_dump(
    path: str | os.PathLike[str],
    *,
    module: torch.nn.Module,
    batch: Any,
    batch_idx: int,
    backward: bool = False,
    manual: bool = False,
    positions: list[int] | None = None,
    indices: list[int] | None = None,
    incident: dict[str, Any] | None = None,
) -> None:
    """Save the module (pickled whole, as ``torch.save(model)`` does) and the failing batch, atomically.

    The file appears complete or not at all (:func:`~lightning_nan.core.files.atomic_write`).
    """
    payload = {
        "format": FORMAT,
        "module": module,
        "batch": to_cpu(batch),
        "batch_idx": batch_idx,
        "backward": backward,
        "manual": manual,
        "positions": positions,
        "indices": indices,
        "incident": incident,
        "torch": torch.__version__,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def read_dump(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a dump written by :func:`write_dump` (it holds pickled code: only open files you trust)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dump file at {path!r}: pass the path BatchBisection(dump_dir=...) wrote.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{path!r} is not a readable lightning_nan dump ({type(err).__name__}: {err}). If the model class cannot be "
            "imported, run from the project folder that defines it."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a lightning_nan dump (format {FORMAT} expected).")
    return payload
