"""Contract every lightning_nan callback keeps: constructible, picklable, fit twice, save and resume.

New callbacks join by adding their constructor arguments to ``REGISTRY``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
from faulty import cause_class, loader, model_class, trainer_kwargs

REGISTRY: dict[str, list[dict]] = {
    "NaNGuard": [{}, {"max_consecutive": 5, "check_inputs": True, "check_params_every_n_steps": 3}],
    "GradientClipping": [
        {"method": "norm", "max_norm": 1.0},
        {"method": "value", "clip_value": 0.5},
        {"method": "autoclip"},
        {"method": "agc"},
        {"method": "zclip", "warmup": 2, "max_norm": 5.0},
    ],
    "NormMonitor": [{}, {"every_n_steps": 1, "group_by": "module", "histograms": True}],
    "CheckpointRollback": [
        {},
        {"every_n_steps": 3, "confirm_steps": 1, "max_snapshots": 1, "skip_batches": 1, "spike_patience": 2, "spike_window": 5},
        {"source": "checkpoint", "spike_threshold": None},
    ],
    "LRBackoff": [{}, {"factor": 0.25, "patience": 2, "spike_zscore": 6.0, "window": 10, "min_history": 5}],
    "BatchBisection": [{}, {"localize": "every", "max_tests": 20, "exclude_quarantined": False}],
}
#: Callbacks that need another one beside them in the Trainer (set up in every fit of the contract).
COMPANIONS: dict[str, list[str]] = {"BatchBisection": ["NaNGuard"]}
CASES = [(name, kwargs) for name, variants in REGISTRY.items() for kwargs in variants]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_contract(ns, tmp_path, name, kwargs):
    cb = getattr(ns.lib, name)(**kwargs)
    assert isinstance(cb, ns.pl.Callback)
    assert type(pickle.loads(pickle.dumps(cb))) is type(cb)

    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    model = model_class(ns.pl)(faults={1: "loss"})
    def companions():
        return [getattr(ns.lib, other)() for other in COMPANIONS.get(name, [])]

    trainer = ns.pl.Trainer(callbacks=[*companions(), cb, ckpt], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    trainer.fit(model, loader())
    state = copy.deepcopy(cb.state_dict())
    # picklable after fit too (ddp_spawn and deep copies need it), with its counters
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.state_dict() == state and copy.deepcopy(cb).state_dict() == state

    # the same instance survives a second fit
    trainer = ns.pl.Trainer(callbacks=[*companions(), cb], **trainer_kwargs(tmp_path / "again"))
    trainer.fit(model_class(ns.pl)(), loader())

    # and a fresh instance resumes the saved state
    fresh = getattr(ns.lib, name)(**kwargs)
    trainer = ns.pl.Trainer(callbacks=[*companions(), fresh], **trainer_kwargs(tmp_path / "resume", max_epochs=2))
    trainer.fit(model_class(ns.pl)(), loader(), ckpt_path=ckpt.last_model_path)
    resumed = fresh.state_dict()
    for key, value in state.items():
        if isinstance(value, int):
            assert resumed[key] >= value, key
    if "incidents" in state:
        assert resumed["incidents"][: len(state["incidents"])] == state["incidents"]
    if state.get("rule"):  # AutoClip / ZClip statistics came back and kept growing
        assert resumed["rule"] != {} and resumed["method"] == state["method"]


def test_recommended_callbacks_fit_save_and_resume_together(ns, tmp_path):
    callbacks = ns.lib.recommended()
    assert [type(cb).__name__ for cb in callbacks] == [
        "NaNGuard", "GradientClipping", "BatchBisection", "LRBackoff", "CheckpointRollback", "NormMonitor"
    ]
    assert all(isinstance(cb, ns.pl.Callback) for cb in callbacks)
    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    blowup = cause_class(ns.pl)("divergence")  # the planted faults stand for a blow-up: the backoff acts on it
    trainer = ns.pl.Trainer(callbacks=[*callbacks, ckpt, blowup], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    trainer.fit(model_class(ns.pl)(faults={1: "loss", 5: "grad"}), loader())
    guard = callbacks[0]
    assert [i.step for i in guard.incidents] == [1, 5]
    assert callbacks[3].factor_now == 0.25 ** 2  # LRBackoff(factor=0.25), two incidents 3 clean steps apart
    resumed = ns.lib.recommended()
    trainer = ns.pl.Trainer(callbacks=resumed, **trainer_kwargs(tmp_path / "resume", max_epochs=2))
    trainer.fit(model_class(ns.pl)(), loader(), ckpt_path=ckpt.last_model_path)
    assert [i.step for i in resumed[0].incidents] == [1, 5] and resumed[3].factor_now == 0.25 ** 2
    with pytest.raises(ValueError, match="parts among"):
        ns.lib.recommended(clip=False)


def test_two_norm_monitors_share_a_trainer_and_resume(ns, tmp_path):
    """``state_key`` tells two NormMonitors apart (Lightning refuses two stateful callbacks with one key at Trainer init)."""
    monitors = [ns.lib.NormMonitor(1), ns.lib.NormMonitor(4, group_by="module", histograms=True)]
    assert monitors[0].state_key != monitors[1].state_key
    ckpt = ns.pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = ns.pl.Trainer(callbacks=[*monitors, ckpt], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    trainer.fit(model_class(ns.pl)(), loader())
    trainer = ns.pl.Trainer(callbacks=[ns.lib.NormMonitor(1), ns.lib.NormMonitor(4, group_by="module", histograms=True)], **trainer_kwargs(tmp_path / "resume", max_epochs=2))
    trainer.fit(model_class(ns.pl)(), loader(), ckpt_path=ckpt.last_model_path)
    assert trainer.global_step == 16
