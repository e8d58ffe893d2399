"""Shared fixtures: the Lightning namespace the behaviour tests run under.

The behaviour is the same code in both namespaces (``lightning_nan`` and ``lightning_nan.lightning``
only write out the same classes against their own ``Callback``), so the tests that take ``ns`` run
once, under ``pytorch_lightning``; tests/callbacks/test_namespaces.py checks every callback of both.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest


#: Lightning namespace -> (its module, lightning_nan's module for it).
NAMESPACES = {"pytorch_lightning": ("pytorch_lightning", "lightning_nan"), "lightning": ("lightning.pytorch", "lightning_nan.lightning")}


def load(name: str) -> SimpleNamespace:
    """``.pl`` is the Lightning namespace ``name``, ``.lib`` lightning_nan's module for it, ``.NaNGuard`` its guard."""
    pl_module, lib_module = NAMESPACES[name]
    lib = importlib.import_module(lib_module)
    return SimpleNamespace(name=name, pl=importlib.import_module(pl_module), NaNGuard=lib.NaNGuard, lib=lib)


@pytest.fixture
def ns() -> SimpleNamespace:
    """The ``pytorch_lightning`` namespace (see the module docstring)."""
    return load("pytorch_lightning")
