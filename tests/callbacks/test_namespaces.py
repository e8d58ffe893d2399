"""Both Lightning namespaces: every callback is written out against that namespace's ``Callback``.

The behaviour tests (``ns`` fixture) run under ``pytorch_lightning`` only; this contract runs each
public class of ``lightning_nan`` and ``lightning_nan.lightning`` once, and checks that a callback
given to the other namespace's Trainer is refused with the import to use.
"""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest
from faulty import loader, model_class, trainer_kwargs

import lightning_nan.callbacks.batch_bisection
import lightning_nan.callbacks.checkpoint_rollback
import lightning_nan.callbacks.gradient_clipping
import lightning_nan.callbacks.lr_backoff
import lightning_nan.callbacks.nan_guard
import lightning_nan.callbacks.norm_monitor

NAMESPACES = {"pytorch_lightning": ("pytorch_lightning", "lightning_nan"), "lightning": ("lightning.pytorch", "lightning_nan.lightning")}
BASES = {
    "NaNGuard": lightning_nan.callbacks.nan_guard.NaNGuardBase,
    "GradientClipping": lightning_nan.callbacks.gradient_clipping.GradientClippingBase,
    "BatchBisection": lightning_nan.callbacks.batch_bisection.BatchBisectionBase,
    "LRBackoff": lightning_nan.callbacks.lr_backoff.LRBackoffBase,
    "CheckpointRollback": lightning_nan.callbacks.checkpoint_rollback.CheckpointRollbackBase,
    "NormMonitor": lightning_nan.callbacks.norm_monitor.NormMonitorBase,
}
ARGS = {"GradientClipping": {"method": "norm", "max_norm": 1.0}}
PUBLIC = {*BASES, "recommended", "Incident", "IncidentEvent", "NonFiniteError", "NonFiniteWarning"}


def load(namespace: str):
    pl_name, lib_name = NAMESPACES[namespace]
    return importlib.import_module(pl_name), importlib.import_module(lib_name)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_callback_is_a_written_out_class_of_its_namespace_and_fits(namespace, tmp_path):
    pl, lib = load(namespace)
    assert set(lib.__all__) == PUBLIC and all(hasattr(lib, name) for name in PUBLIC)
    callbacks = []
    for name, base in BASES.items():
        cls = getattr(lib, name)
        # a class written in that module (pickles by name, shows its module in help()), not made with type()
        assert cls.__module__ == lib.NaNGuard.__module__ and cls.__qualname__ == name
        assert inspect.getsource(cls).startswith(f"class {name}({base.__name__}, Callback):")
        assert cls.__bases__ == (base, pl.Callback) and cls.__mro__[1] is base  # the Base's hooks (and its mixins') come first
        assert all(pl.Callback not in k.__mro__ for k in base.__mro__)  # the Base itself stays namespace-free
        assert cls.__doc__ == base.__doc__ and len(cls.__doc__.splitlines()) > 20
        cb = cls(**ARGS.get(name, {}))
        clone = pickle.loads(pickle.dumps(cb))
        assert type(clone) is cls and clone.state_dict() == cb.state_dict()
        callbacks.append(cb)
    assert [type(cb) for cb in lib.recommended()] == [type(cb) for cb in callbacks]

    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path))
    trainer.fit(model_class(pl)(faults={1: "loss"}), loader())
    guard = callbacks[0]
    assert trainer.global_step == 8 and [(i.step, i.kind, i.action) for i in guard.incidents] == [(1, "loss", "skipped")]


@pytest.mark.parametrize("callback_namespace, trainer_namespace", [("pytorch_lightning", "lightning"), ("lightning", "pytorch_lightning")])
def test_a_callback_in_the_other_namespaces_trainer_is_refused_with_the_import_to_use(callback_namespace, trainer_namespace, tmp_path):
    _, lib = load(callback_namespace)
    pl, right = load(trainer_namespace)
    for name in BASES:
        trainer = pl.Trainer(callbacks=[getattr(lib, name)(**ARGS.get(name, {}))], **trainer_kwargs(tmp_path))
        with pytest.raises(TypeError, match=f"import it with `from {right.__name__} import {name}`"):
            trainer.fit(model_class(pl)(), loader())
