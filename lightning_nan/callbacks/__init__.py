"""The callbacks' shared code, bound to a Lightning ``Callback`` class by each namespace.

``CALLBACKS`` maps each public name to the module and base class that implement it;
:func:`bind` makes the namespace's class (``Base`` + that namespace's ``Callback``) on first use.
A new callback joins both namespaces by adding one line here.

>>> CALLBACKS["NaNGuard"]
('lightning_nan.callbacks.nan_guard', 'NaNGuardBase')
"""

from __future__ import annotations

import importlib
from typing import Any

CALLBACKS: dict[str, tuple[str, str]] = {
    "NaNGuard": ("lightning_nan.callbacks.nan_guard", "NaNGuardBase"),
    "GradientClipping": ("lightning_nan.callbacks.gradient_clipping", "GradientClippingBase"),
    "NormMonitor": ("lightning_nan.callbacks.norm_monitor", "NormMonitorBase"),
    "BatchBisection": ("lightning_nan.callbacks.batch_bisection", "BatchBisectionBase"),
    "CheckpointRollback": ("lightning_nan.callbacks.checkpoint_rollback", "CheckpointRollbackBase"),
    "LRBackoff": ("lightning_nan.callbacks.lr_backoff", "LRBackoffBase"),
}


def bind(name: str, callback: type, namespace: dict[str, Any]) -> type:
    """The class ``name`` for a namespace module: ``<name>Base`` mixed with ``callback``, made once.

    The class is stored in ``namespace`` (the module's globals) under ``name``, with that module as
    its ``__module__``, so it pickles and prints like a class written there by hand.
    """
    if name not in CALLBACKS:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    if name in namespace:
        return namespace[name]
    module, base_name = CALLBACKS[name]
    base = getattr(importlib.import_module(module), base_name)
    doc = f":class:`~{module}.{base_name}` for ``{callback.__module__.split('.')[0]}.Trainer``."
    cls = type(name, (base, callback), {"__module__": namespace["__name__"], "__qualname__": name, "__doc__": doc})
    namespace[name] = cls
    return cls
