"""GradientClipping with real Trainers, in both namespaces: parity with Lightning, guard-first, one pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from faulty import identical, loader, model_class, recorder_class, trainer_kwargs, unchanged_batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def fit(ns, tmp_path, callbacks=(), model=None, faults=None, **kw):
    model = model or model_class(ns.pl)(faults=faults)
    recorder = recorder_class(ns.pl)()
    trainer = ns.pl.Trainer(callbacks=[*callbacks, recorder], **trainer_kwargs(tmp_path, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    return trainer, recorder


class Scaled(torch.nn.Module):
    pass


def big_grads_model(ns, scale=50.0, **kwargs):
    """The faulty test model with a loss scaled up, so that clipping at 0.5 really clips."""
    base = model_class(ns.pl)

    class Big(base):
        def _loss(self, batch, batch_idx):
            return super()._loss(batch, batch_idx) * scale

    return Big(**kwargs)


@pytest.mark.parametrize("algorithm, kwargs", [("norm", {"method": "norm", "max_norm": 0.5}), ("value", {"method": "value", "clip_value": 0.05})])
def test_same_weights_as_lightnings_own_clipping(ns, tmp_path, algorithm, kwargs):
    limit = kwargs.get("max_norm", kwargs.get("clip_value"))
    _, ours = fit(ns, tmp_path / "ours", [ns.lib.GradientClipping(**kwargs)], model=big_grads_model(ns, optimizer="adam"))
    _, theirs = fit(
        ns, tmp_path / "theirs", model=big_grads_model(ns, optimizer="adam"), gradient_clip_val=limit, gradient_clip_algorithm=algorithm
    )
    _, unclipped = fit(ns, tmp_path / "none", model=big_grads_model(ns, optimizer="adam"))
    assert identical(ours.snaps, theirs.snaps)  # bit for bit, every step
    assert not identical(ours.snaps[-1]["params"], unclipped.snaps[-1]["params"])  # and it did clip


def test_beside_the_guard_same_weights_as_lightning_on_clipped_and_unclipped_steps(ns, tmp_path, monkeypatch):
    """Beside NaNGuard the clipper skips multiplying by exactly 1 where the guard's norm is under max_norm:
    the weights stay bit for bit those of gradient_clip_val (with the guard too), and both kinds of step occur."""
    import lightning_nan.core.clipping as clipping

    norms: list[float] = []

    class Norms(ns.pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters()]))))

    fit(ns, tmp_path / "probe", [Norms()], model=big_grads_model(ns, optimizer="adam"))
    max_norm = sorted(norms)[len(norms) // 2]  # about half of the steps clip
    clip = ns.lib.GradientClipping("norm", max_norm=max_norm)
    coefs: list[float] = []

    class Coefs(ns.pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after the clipper's hook
            coefs.append(float(clip.last["coef"]))

    multiplied = []  # the clipper's multiplications of the gradients
    scale = clipping.scale_grads_
    monkeypatch.setattr(clipping, "scale_grads_", lambda grads, coef: (multiplied.append(1), scale(grads, coef)))
    _, ours = fit(ns, tmp_path / "ours", [ns.NaNGuard(), clip, Coefs()], model=big_grads_model(ns, optimizer="adam"))
    _, theirs = fit(ns, tmp_path / "theirs", [ns.NaNGuard()], model=big_grads_model(ns, optimizer="adam"), gradient_clip_val=max_norm)
    assert identical(ours.snaps, theirs.snaps)
    clipped = sum(c < 1.0 for c in coefs)
    assert 0 < clipped < len(coefs) == len(norms)
    assert clipped <= len(multiplied) < len(coefs)  # steps under max_norm were not multiplied by 1


def test_same_as_lightning_under_fp16_amp_after_unscaling(ns, tmp_path):
    amp = pytest.importorskip(f"{ns.pl.__name__}.plugins.precision")

    def plugin():
        return amp.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=256.0))

    _, ours = fit(ns, tmp_path / "a", [ns.lib.GradientClipping("norm", max_norm=0.5)], model=big_grads_model(ns), plugins=[plugin()])
    _, theirs = fit(ns, tmp_path / "b", model=big_grads_model(ns), plugins=[plugin()], gradient_clip_val=0.5)
    assert identical(ours.snaps, theirs.snaps)


def test_manual_optimization_clips_inside_opt_step(ns, tmp_path):
    base = model_class(ns.pl)

    class ManualClip(base):
        """Clips itself the documented Lightning way, for comparison."""

        def __init__(self, clip):
            super().__init__(manual=True)
            self.clip = clip

        def _loss(self, batch, batch_idx):
            return super()._loss(batch, batch_idx) * 50.0

        def on_before_optimizer_step(self, optimizer):
            if self.clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 0.5)

    _, ours = fit(ns, tmp_path / "a", [ns.lib.GradientClipping("norm", max_norm=0.5)], model=ManualClip(clip=False))
    _, theirs = fit(ns, tmp_path / "b", model=ManualClip(clip=True))
    assert identical(ours.snaps, theirs.snaps)


def test_refuses_trainer_gradient_clip_val(ns, tmp_path):
    with pytest.raises(ValueError, match=r"replaces Trainer\(gradient_clip_val=1.0\)"):
        fit(ns, tmp_path, [ns.lib.GradientClipping("norm", max_norm=1.0)], gradient_clip_val=1.0)


@pytest.mark.parametrize("guard_first", [True, False])
def test_guard_decides_first_and_skipped_steps_stay_out_of_the_statistics(ns, tmp_path, guard_first):
    clip = ns.lib.GradientClipping("autoclip", percentile=50)
    guard = ns.NaNGuard()
    callbacks = [guard, clip] if guard_first else [clip, guard]
    _, rec = fit(ns, tmp_path, callbacks, faults={2: "loss", 5: "grad"})
    assert unchanged_batches(rec.snaps) == [2, 5]
    assert len(clip.clipper.rule.state_dict()["history"]) == 8 - 2  # the two skipped steps never entered
    assert [i.step for i in guard.incidents] == [2, 5]


@pytest.mark.parametrize("callbacks", ["clip", "guard+clip", "clip+guard", "guard+clip+monitor", "clip+monitor", "monitor+clip"])
def test_one_pass_over_the_gradients_per_step(ns, tmp_path, monkeypatch, callbacks):
    grad_passes: list[int] = []  # per step: _foreach_norm calls over the gradients
    other_passes: list[int] = []  # per step: over anything else (the monitor's weights and updates)
    grads: set[int] = set()
    real = torch._foreach_norm

    class Probe(ns.pl.Callback):
        def on_train_batch_start(self, *args):
            grad_passes.append(0)
            other_passes.append(0)

        def on_after_backward(self, trainer, pl_module):
            grads.clear()
            grads.update(id(p.grad) for p in pl_module.parameters() if p.grad is not None)

        def on_train_end(self, *args):  # the guard's one check of the final weights
            grad_passes.append(0)
            other_passes.append(0)

    def counting(tensors, *args, **kwargs):
        tensors = list(tensors)
        if any(id(t) in grads for t in tensors):
            grad_passes[-1] += 1
        else:
            other_passes[-1] += 1
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    made = {
        "clip": ns.lib.GradientClipping("zclip", warmup=2),
        "guard": ns.NaNGuard(),
        "monitor": ns.lib.NormMonitor(every_n_steps=4),
    }
    fit(ns, tmp_path, [Probe(), *(made[name] for name in callbacks.split("+"))])
    monitor_steps = {0, 4} if "monitor" in callbacks else set()
    # one fused pass over the gradients per step (the guard's, the clipper's or the monitor's), shared
    assert grad_passes[:8] == [1] * 8
    # when the monitor logs: one over the weights and updates after the step; the guard's weight check at
    # the end of the run is not a gradient pass either
    assert other_passes[:8] == [int(i in monitor_steps) for i in range(8)]
    assert grad_passes[8:] == [0] and other_passes[8:] == [int("guard" in callbacks)]


def test_zclip_in_a_trainer_logs_what_it_did(ns, tmp_path):
    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="clip")

    class Probe(ns.pl.Callback):
        """Runs before the clipper: the total norm before clipping, computed independently."""

        def __init__(self):
            self.norms = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
            self.norms[trainer.global_step] = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()

    probe = Probe()
    clip = ns.lib.GradientClipping("zclip", warmup=3, max_norm=2.0)
    trainer, _ = fit(ns, tmp_path, [probe, clip], model=big_grads_model(ns), logger=logger, log_every_n_steps=1)
    trainer.logger.finalize("success")
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    total = {e.step: e.value for e in acc.Scalars("grad_clip/total_norm")}
    coef = {e.step: e.value for e in acc.Scalars("grad_clip/coef")}
    threshold = {e.step: e.value for e in acc.Scalars("grad_clip/threshold")}
    assert sorted(total) == list(range(8))
    for step, value in total.items():
        assert value == pytest.approx(probe.norms[step], rel=1e-5)
        assert threshold[step] <= 2.0 + 1e-6  # the absolute cap
        assert coef[step] == pytest.approx(min(1.0, threshold[step] / (value + 1e-6)), rel=1e-5)
    assert min(coef.values()) < 1.0


def test_agc_excludes_the_final_layer_by_default(ns, tmp_path):
    clip = ns.lib.GradientClipping("agc", clip_factor=1e-4)
    _, clipped = fit(ns, tmp_path / "a", [clip], model=big_grads_model(ns))
    _, plain = fit(ns, tmp_path / "b", model=big_grads_model(ns))
    first_clipped, first_plain = clipped.snaps[1]["params"], plain.snaps[1]["params"]
    assert torch.equal(first_clipped["head.weight"], first_plain["head.weight"])  # the classifier: not clipped
    assert not torch.equal(first_clipped["body.0.weight"], first_plain["body.0.weight"])
    assert float(clip.last["clipped_units"]) > 0


def test_zclip_defaults_cap_the_warm_up_as_the_reference_package_does(ns, tmp_path):
    """A model that blows up in its first steps (all inside ZClip's 25-step warm-up): the reference
    ``zclip`` package with its defaults caps every step at 1.0 and the run trains; GradientClipping('zclip')
    with its defaults makes the same weights, step by step. Without a cap the same run skips step after step."""
    zclip = pytest.importorskip("zclip")

    class Reference(ns.pl.Callback):
        def __init__(self):
            self.rule = zclip.ZClip()  # its defaults: max_grad_norm=1.0, warmup_steps=25

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rule.step(pl_module)

    def run(name, callbacks):
        guard = ns.NaNGuard()
        _, recorder = fit(ns, tmp_path / name, [guard, *callbacks], model=big_grads_model(ns, scale=100.0), max_epochs=2)
        return guard, recorder.snaps

    ref_guard, reference = run("reference", [Reference()])
    our_guard, ours = run("ours", [ns.lib.GradientClipping("zclip")])
    assert ref_guard.skipped_steps == our_guard.skipped_steps == 0 and len(ours) == len(reference) == 17
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a["params"], b["params"], rtol=1e-5, atol=1e-7)
    uncapped_guard, uncapped = run("uncapped", [ns.lib.GradientClipping("zclip", max_norm=None)])
    assert uncapped_guard.skipped_steps >= 5  # the blow-up: non-finite gradients, step after step
    assert max(float(p.abs().max()) for p in uncapped[-1]["params"].values()) > 1e4
