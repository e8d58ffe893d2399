"""Failure dumps: the failing samples and the model in one file, to reproduce a NaN offline.

The model is stored twice: pickled whole (as ``torch.save(model)`` does: loading it needs the model's
class, importable by its module and name) and, when torch can export it, as the failing loss captured
by :func:`torch.export` (:mod:`~lightning_nan.core.exported`: no source code needed, e.g. for a model
class defined in the training script itself, ``__main__``). A dump that neither way could replay
elsewhere is written with a warning that says so.

>>> import os, tempfile, torch
>>> path = os.path.join(tempfile.mkdtemp(), "dump.pt")
>>> write_dump(path, module=torch.nn.Linear(2, 1), batch=torch.ones(1, 2), batch_idx=3)
>>> dump = read_dump(path)
>>> type(dump["module"]).__name__, dump["exported"] is not None, dump["batch_idx"]
('Linear', True, 3)
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lightning_nan.core.exported import export_loss
from lightning_nan.core.files import atomic_write

#: 2: the model as pickled bytes beside an exported program (1: the model pickled in the payload).
FORMAT = 2


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
    loss_fn: Callable[[Any], Any] | None = None,
) -> None:
    """Save the module (pickled, and exported with ``loss_fn``) and the failing batch, atomically.

    ``loss_fn(batch)`` computes the loss with ``module`` (a LightningModule's ``training_step``, say);
    default: ``module(batch)`` for a module that is not a LightningModule. When the dump could only
    be replayed where the model's class can be imported and that class is defined in ``__main__`` or
    inside a function, a warning says so now. The file appears complete or not at all
    (:func:`~lightning_nan.core.files.atomic_write`).
    """
    cls = type(module)
    module_bytes, module_error = _pickled(module)
    if loss_fn is None and not hasattr(module, "training_step"):
        loss_fn = module
    exported, export_error = (None, "no loss function given") if loss_fn is None else export_loss(module, loss_fn, batch)
    local = sorted({f"{type(m).__qualname__} ({type(m).__module__})" for m in module.modules() if not _importable(type(m))})
    if exported is None and (module_bytes is None or local):
        warnings.warn(
            f"The NaN dump {os.fspath(path)} cannot be replayed without your source code: torch.export could not capture the "
            f"failing loss ({export_error}), and "
            + (f"the model could not be pickled ({module_error})" if module_bytes is None else
               f"{', '.join(local)} can only be imported in the script that defines it")
            + ". Define the model's classes in a module of their own (imported by the training script) to replay it.",
            UserWarning,
            stacklevel=3,
        )
    payload = {
        "format": FORMAT,
        "module_bytes": module_bytes,
        "module_error": module_error,
        "module_class": f"{cls.__module__}.{cls.__qualname__}",
        "module_folder": _source_folder(cls),
        "exported": exported,
        "export_error": export_error,
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
    """Load a dump written by :func:`write_dump` (it holds pickled code: only open files you trust).

    ``module`` is the model when its class can be imported here (the folder of its source file and the
    current folder are searched too), else ``None`` with the reason in ``module_error``; ``exported``
    is the exported program's bytes (see :func:`~lightning_nan.core.exported.load_program`) or ``None``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dump file at {path!r}: pass the path BatchBisection(dump_dir=...) wrote.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{path!r} is not a readable lightning_nan dump ({type(err).__name__}: {err}). If a class of the batch "
            "cannot be imported, run from the project folder that defines it."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in (1, FORMAT):
        raise ValueError(f"{path!r} is not a lightning_nan dump (format {FORMAT} expected).")
    if payload["format"] == 1:
        return {**payload, "module_error": None, "exported": None, "export_error": "written by an older version"}
    payload["module"] = None
    if payload.get("module_bytes") is not None:
        try:
            payload["module"] = _unpickled(payload["module_bytes"], payload.get("module_folder"))
        except Exception as err:  # noqa: BLE001 - e.g. "Can't get attribute 'MLP' on <module '__main__'>"
            payload["module_error"] = f"{type(err).__name__}: {err}"
    return payload


def _pickled(module: torch.nn.Module) -> tuple[bytes | None, str | None]:
    buffer = io.BytesIO()
    try:
        torch.save(module, buffer)
    except Exception as err:  # noqa: BLE001 - a class defined in a function, an unpicklable attribute
        return None, f"{type(err).__name__}: {err}"
    return buffer.getvalue(), None


def _unpickled(data: bytes, folder: str | None) -> torch.nn.Module:
    """The pickled model, its class looked up also in ``folder`` (its source's) and the current folder."""
    extra = [p for p in (folder, os.getcwd()) if p and p not in sys.path]
    sys.path[:0] = extra
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    finally:
        for p in extra:
            if p in sys.path:
                sys.path.remove(p)


def _importable(cls: type) -> bool:
    """Whether another process can import ``cls`` by its module and name (not ``__main__``, not local)."""
    return cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__


def _source_folder(cls: type) -> str | None:
    """The folder to put on ``sys.path`` to import ``cls``'s module (``a.b`` in ``/x/a/b.py``: ``/x``)."""
    try:
        source = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None
    if not source:
        return None
    folder = os.path.dirname(os.path.abspath(source))
    depth = cls.__module__.count(".") + (os.path.basename(source) == "__init__.py")
    for _ in range(depth):
        folder = os.path.dirname(folder)
    return folder
