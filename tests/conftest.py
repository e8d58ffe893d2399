"""Shared fixtures: both Lightning namespaces, and a small model whose faults are planted at known steps."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest


@pytest.fixture(params=["pytorch_lightning", "lightning"])
def ns(request):
    """``ns.pl`` is the Lightning namespace, ``ns.NaNGuard`` its callback class from lightning_nan."""
    if request.param == "pytorch_lightning":
        pl = importlib.import_module("pytorch_lightning")
        mod = importlib.import_module("lightning_nan")
    else:
        pl = importlib.import_module("lightning.pytorch")
        mod = importlib.import_module("lightning_nan.lightning")
    return SimpleNamespace(name=request.param, pl=pl, NaNGuard=mod.NaNGuard, lib=mod)
