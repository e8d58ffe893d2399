"""Every wrong constructor argument gets a ValueError naming it: wrong types too (strings, bools, NaN),
which used to slip through or end in a TypeError from a comparison."""

from __future__ import annotations

import math

import pytest

import lightning_nan as ln

CASES = [
    (lambda: ln.GradientClipping("norm"), "Expected `max_norm` to be a number > 0 or inf \\(method='norm' needs it\\), got None"),
    (lambda: ln.GradientClipping("norm", max_norm="1.0"), "Expected `max_norm` to be a number > 0 or inf .*, got '1.0'"),
    (lambda: ln.GradientClipping("value", clip_value=None), "\\(method='value' needs it\\), got None"),
    (lambda: ln.GradientClipping("zclip", max_norm=0), "Expected `max_norm` to be None or a number > 0 or inf, got 0"),
    (lambda: ln.GradientClipping("norm", max_norm=1.0, norm_type="2"), "Expected `norm_type` to be a number > 0 or inf"),
    (lambda: ln.GradientClipping("value", clip_value=math.nan), "Expected `clip_value`"),
    (lambda: ln.GradientClipping("autoclip", percentile="10"), "Expected `percentile` to be a number in \\(0, 100\\]"),
    (lambda: ln.GradientClipping("autoclip", window=True), "Expected `window` to be an int >= 1, got True"),
    (lambda: ln.GradientClipping("zclip", alpha=None), "Expected `alpha` to be a number in \\(0, 1\\)"),
    (lambda: ln.GradientClipping("zclip", warmup=2.5), "Expected `warmup` to be an int >= 1"),
    (lambda: ln.GradientClipping("agc", clip_factor=0), "Expected `clip_factor` to be a number > 0"),
    (lambda: ln.GradientClipping("agc", exclude_final_layer=1), "Expected `exclude_final_layer` to be a bool"),
    (lambda: ln.GradientClipping("clip"), "Expected `method` in \\('norm', 'value', 'autoclip', 'agc', 'zclip'\\)"),
    (lambda: ln.NaNGuard(log_every_n_steps=True), "Expected `log_every_n_steps` to be None or an int >= 1"),
    (lambda: ln.NaNGuard(min_loss_scale=True), "Expected `min_loss_scale` to be a number > 0"),
    (lambda: ln.NaNGuard(check_params_every_n_steps=-1), "\\(0 disables it\\)"),
    (lambda: ln.NaNGuard(clean_metrics="yes"), "Expected `clean_metrics` to be a bool"),
    (lambda: ln.NaNGuard(check_eval=None), "Expected `check_eval` to be a bool"),
    (lambda: ln.NormMonitor(histograms="yes"), "Expected `histograms` to be a bool"),
    (lambda: ln.NormMonitor(eps=math.nan), "Expected `eps` to be a number >= 0"),
    (lambda: ln.NormMonitor(group_by=["module"]), "Expected `group_by` in \\('parameter', 'module'\\)"),
    (lambda: ln.CheckpointRollback(max_norm_growth="2"), "Expected `max_norm_growth` to be a number > 1"),
    (lambda: ln.CheckpointRollback(spike_window=4), "Expected `spike_window` to be an int >= 5"),
    (lambda: ln.CheckpointRollback(max_snapshots=0), "Expected `max_snapshots` to be an int >= 1"),
    (lambda: ln.LRBackoff(factor="0.5"), "Expected `factor` to be a number in \\(0, 1\\), got '0.5'"),
    (lambda: ln.LRBackoff(window=10, min_history=11), "Expected `min_history` to be an int in \\[3, 10\\]"),
    (lambda: ln.BatchBisection(max_tests=0), "Expected `max_tests` to be None or an int >= 1"),
    (lambda: ln.BatchBisection(localize="yes"), "Expected `localize` in"),
    # issue 16: the argument's own name, paths and regexes of the wrong type, arguments of another method
    (lambda: ln.CheckpointRollback(spike_threshold=0), "Expected `spike_threshold` to be None or a number > 0"),
    (lambda: ln.NaNGuard(incidents_path=123), "Expected `incidents_path` to be None or a file path \\(a str or pathlib.Path\\)"),
    (lambda: ln.BatchBisection(dump_dir=3.5), "Expected `dump_dir` to be None or a folder path .*, got 3.5"),
    (lambda: ln.BatchBisection(quarantine_path=b"q.jsonl"), "Expected `quarantine_path` to be None or a file path"),
    (lambda: ln.CheckpointRollback(dirpath=""), "Expected `dirpath` to be None or a folder path"),
    (lambda: ln.NormMonitor(include=123), "Expected `include` to be None or a regular expression \\(a str\\), got 123"),
    (lambda: ln.NormMonitor(exclude="(bias"), "Expected `exclude` to be None or a regular expression .*: missing \\)"),
    (
        lambda: ln.GradientClipping("norm", max_norm=1.0, percentile=500),
        "`percentile` is an argument of method='autoclip', not of method='norm' .*: remove `percentile`",
    ),
    (
        lambda: ln.GradientClipping("autoclip", max_norm=1.0),
        "`max_norm` is an argument of method='norm' or method='zclip', not of method='autoclip'",
    ),
    (lambda: ln.GradientClipping("zclip", clip_value=0.5), "`clip_value` is an argument of method='value'"),
    (lambda: ln.GradientClipping("autoclip", exclude_final_layer=False), "`exclude_final_layer` is an argument of method='agc'"),
]


@pytest.mark.parametrize("make, message", CASES, ids=[m for _, m in CASES])
def test_a_wrong_argument_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_defaults_are_valid():
    for name in ("NaNGuard", "GradientClipping", "NormMonitor", "CheckpointRollback", "LRBackoff", "BatchBisection"):
        getattr(ln, name)() if name != "GradientClipping" else ln.GradientClipping("norm", max_norm=1.0)
    for method in ("autoclip", "agc", "zclip"):
        ln.GradientClipping(method)
    ln.GradientClipping("value", clip_value=0.5)
    ln.GradientClipping("norm", max_norm=1.0, norm_type=math.inf)
    # numpy and torch numbers, and inf where it means "no limit", are taken as before
    import numpy
    import torch

    ln.GradientClipping("norm", max_norm=numpy.float32(1.0))
    ln.GradientClipping("norm", max_norm=torch.tensor(1.0))
    ln.GradientClipping("norm", max_norm=math.inf)
    ln.GradientClipping("autoclip", percentile=numpy.float32(10), window=numpy.int64(100))
    ln.CheckpointRollback(max_norm_growth=math.inf)
    # a method's own arguments, and another method's at their defaults, are taken
    import pathlib

    ln.GradientClipping("autoclip", percentile=50, window=10, norm_type=1.0)
    ln.GradientClipping("norm", max_norm=1.0, percentile=10.0, exclude_final_layer=True)
    ln.NaNGuard(incidents_path=pathlib.Path("runs") / "x.jsonl")
    assert ln.BatchBisection(dump_dir=pathlib.Path("dumps")).dump_dir == "dumps"
    # recommended(): another clipping method drops AutoClip's preset percentile
    clip = ln.recommended(clipping={"method": "norm", "max_norm": 2.0})[1]
    assert (clip.method, clip.clipper.max_norm) == ("norm", 2.0)


def stand_in(name, pl=None):
    """A subclass of Lightning's strategy class ``name`` that skips its ``__init__`` (FSDP needs a GPU,
    DeepSpeed its package): what the callbacks' setup checks see of it is its class."""
    import pytorch_lightning

    base = getattr((pl or pytorch_lightning).strategies, name)
    return type(name, (base,), {"__init__": lambda self: None})()


def test_fsdp1_is_recognised_by_the_strategy_class():
    """Lightning's FSDPStrategy needs a GPU: its setup checks run here with a subclass that skips its set-up."""
    from types import SimpleNamespace

    import torch

    trainer = SimpleNamespace(strategy=stand_in("FSDPStrategy"), gradient_clip_val=None, is_global_zero=True)
    module = torch.nn.Linear(2, 2)
    clip = ln.GradientClipping("norm", max_norm=1.0)
    clip.setup(trainer, module, "fit")
    assert clip.clipper.sharded  # the total norm is all-reduced over the flat shards
    with pytest.raises(ValueError, match="GradientClipping\\('agc'\\) needs .* which FSDPStrategy splits"):
        ln.GradientClipping("agc").setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="CheckpointRollback\\(source='memory'\\) copies the full state"):
        ln.CheckpointRollback().setup(trainer, module, "fit")
    with pytest.warns(UserWarning, match="NormMonitor under FSDPStrategy \\(FSDP1\\)"):
        ln.NormMonitor().setup(trainer, module, "fit")
    for impostor in (type("FSDPStrategy", (), {})(), stand_in("DDPStrategy")):  # a name alone is not FSDP
        other = SimpleNamespace(strategy=impostor, gradient_clip_val=None, is_global_zero=True)
        clip = ln.GradientClipping("norm", max_norm=1.0)
        clip.setup(other, module, "fit")
        assert not clip.clipper.sharded


def test_strategies_of_the_lightning_namespace_are_recognised_too():
    import lightning.pytorch as lpl

    from lightning_nan.callbacks._trainer import (
        partitions_state,
        shards_parameters,
        strategy_is,
    )

    for name, shards in (("FSDPStrategy", True), ("ModelParallelStrategy", True), ("DeepSpeedStrategy", False)):
        trainer = type("Trainer", (), {"strategy": stand_in(name, lpl)})()
        assert strategy_is(trainer, name) and partitions_state(trainer)
        assert shards_parameters(trainer) == shards
    trainer = type("Trainer", (), {"strategy": lpl.strategies.DDPStrategy()})()
    assert not partitions_state(trainer) and not shards_parameters(trainer)


@pytest.mark.parametrize("strategy, trusted", [("DDPStrategy", True), ("FSDPStrategy", False), ("DeepSpeedStrategy", False), ("ModelParallelStrategy", False)])
def test_the_guards_norm_bound_is_used_only_where_ranks_hold_whole_gradients(monkeypatch, strategy, trusted):
    """Under FSDP, ModelParallelStrategy or DeepSpeed a rank's gradient norm is its part's: the clipper then
    multiplies even when the guard's norm is under max_norm."""
    import torch

    import lightning_nan.core.clipping as clipping
    from lightning_nan.core.step_grads import StepGrads

    class Trainer:  # a stand-in (weak references to it are taken)
        def __init__(self) -> None:
            self.strategy = stand_in(strategy)
            self.gradient_clip_val, self.is_global_zero, self.callbacks, self.loggers = None, True, [], []
            self.global_step, self.log_every_n_steps = 0, 50

    calls = []
    monkeypatch.setattr(clipping, "scale_grads_", lambda grads, coef: calls.append(1))
    trainer, module = Trainer(), torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.01)
    clip = ln.GradientClipping("norm", max_norm=1.0)
    clip.setup(trainer, module, "fit")
    params = list(module.parameters())
    norms = torch.stack([p.grad.norm() for p in params])
    checked = StepGrads(params, norms, False, float(norms.norm()))

    class Guard:  # hands out the step's gradients, as NaNGuard does once it checked the step
        def step_grads(self, trainer, pl_module, optimizer):
            return checked

    trainer.callbacks = [Guard()]
    clip.on_before_optimizer_step(trainer, module, opt)
    assert calls == ([] if trusted else [1])
