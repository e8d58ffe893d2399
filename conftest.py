"""Doctest collection: the written-out callback classes carry their ``...Base`` class's docstring.

``lightning_nan._pytorch_lightning.NaNGuard.__doc__ is NaNGuardBase.__doc__`` (and so for each callback,
in both namespace modules), so that ``help()`` shows it; its examples run once, on the Base class.
"""

from __future__ import annotations

import pytest

_COPIES = {
    f"{module}.{name}"
    for module in ("lightning_nan._pytorch_lightning", "lightning_nan.lightning")
    for name in ("BatchBisection", "CheckpointRollback", "GradientClipping", "LRBackoff", "NaNGuard", "NormMonitor")
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    copies = [item for item in items if type(item).__name__ == "DoctestItem" and item.name in _COPIES]
    if copies:
        config.hook.pytest_deselected(items=copies)
        items[:] = [item for item in items if item not in copies]
