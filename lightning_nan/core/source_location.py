"""Where in the user's code an operation ran: the innermost frame outside torch, Lightning,
``lightning_nan`` and the standard library.

>>> is_library_file(torch.__file__), is_library_file("<doctest x>"), is_library_file("<frozen os>")
(True, False, True)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch

__all__ = ["is_library_file", "relative_path", "user_location"]

@functools.cache
def _library_roots() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The folders of torch, Lightning and ``lightning_nan``; those of the standard library."""
    roots = [os.path.dirname(torch.__file__), str(Path(__file__).resolve().parents[1])]
    for name in ("pytorch_lightning", "lightning", "lightning_fabric"):
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            roots.extend(spec.submodule_search_locations)
    paths = sysconfig.get_paths()
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    folders = lambda paths: tuple(os.path.join(os.path.realpath(r), "") for r in paths)  # noqa: E731
    return folders(roots), folders(stdlib)


@functools.lru_cache(maxsize=4096)
def is_library_file(filename: str) -> bool:
    """Whether ``filename`` belongs to torch, Lightning, ``lightning_nan`` or the standard library."""
    if filename.startswith("<"):  # <frozen ...> is the standard library; <doctest ...>, <string>, <stdin> user code
        return filename.startswith("<frozen")
    real = os.path.realpath(filename)
    packages, stdlib = _library_roots()
    if real.startswith(packages):
        return True
    # The standard library's folder may hold site-packages (a virtual environment's, or a plain installation's).
    third_party = {"site-packages", "dist-packages"}
    return any(real.startswith(r) and not third_party & set(real[len(r) :].split(os.sep)) for r in stdlib)


def relative_path(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    if os.path.isabs(path):
        try:
            rel = os.path.relpath(path)
        except ValueError:  # another drive
            rel = os.pardir
        path = path if rel.startswith(os.pardir) else rel
    return path


def user_location(frame: Any) -> str | None:
    """``"file.py:LINE in function"`` of the innermost frame, from ``frame`` outwards, in user code."""
    while frame is not None:
        code = frame.f_code
        if not is_library_file(code.co_filename):
            return f"{relative_path(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return None

