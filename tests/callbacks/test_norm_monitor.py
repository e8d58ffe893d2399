"""NormMonitor: values read back from real TensorBoard event files, against independently computed norms."""

from __future__ import annotations

import warnings

import pytest
import torch
from faulty import loader, model_class, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.overrides import TorchFunctionMode


def probe_class(pl):
    class Probe(pl.Callback):
        """First in the list: gradient norms before any clipping, weights before and after each step (float64)."""

        def __init__(self):
            self.grad, self.before, self.after = {}, {}, {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            self.grad[step] = {n: p.grad.double().norm().item() for n, p in pl_module.named_parameters()}
            self.before[step] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
            self._step = step

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.after[self._step] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}

    return Probe


def run(ns, tmp_path, monitor, extra=()):
    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="norms")
    probe = probe_class(ns.pl)()
    model = model_class(ns.pl)()
    trainer = ns.pl.Trainer(callbacks=[probe, *extra, monitor], **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    logger.finalize("success")
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc, probe, [n for n, _ in model.named_parameters()]


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_per_parameter_values_match_independent_norms(ns, tmp_path):
    clip = ns.lib.GradientClipping("norm", max_norm=0.1)  # the logged gradient norms are the ones before clipping
    acc, probe, names = run(ns, tmp_path, ns.lib.NormMonitor(every_n_steps=3), extra=[ns.NaNGuard(), clip])
    for name in names:
        weight, grad, ratio = (scalars(acc, f"norms/{q}/{name}") for q in ("weight", "grad", "update_ratio"))
        assert sorted(weight) == sorted(grad) == sorted(ratio) == [0, 3, 6]
        for step in (0, 3, 6):
            after, before = probe.after[step][name], probe.before[step][name]
            assert weight[step] == pytest.approx(after.norm().item(), rel=1e-5)
            assert grad[step] == pytest.approx(probe.grad[step][name], rel=1e-5)
            assert ratio[step] == pytest.approx(((after - before).norm() / before.norm()).item(), rel=1e-4)


def test_grouped_per_module_with_include_and_exclude(ns, tmp_path):
    monitor = ns.lib.NormMonitor(every_n_steps=2, group_by="module", include=r"^(body|head)", exclude=r"head\.bias")
    acc, probe, _ = run(ns, tmp_path, monitor)
    tags = {t for t in acc.Tags()["scalars"] if t.startswith("norms/")}
    assert tags == {f"norms/{q}/{m}" for q in ("weight", "grad", "update_ratio") for m in ("body.0", "head")}
    weight = scalars(acc, "norms/weight/body.0")
    for step in (0, 2, 4, 6):
        after = probe.after[step]
        expected = (after["body.0.weight"].norm() ** 2 + after["body.0.bias"].norm() ** 2).sqrt().item()
        assert weight[step] == pytest.approx(expected, rel=1e-5)
    assert scalars(acc, "norms/weight/head")[0] == pytest.approx(probe.after[0]["head.weight"].norm().item(), rel=1e-5)


def test_custom_scalars_layout_and_histograms(ns, tmp_path):
    acc, _, names = run(ns, tmp_path, ns.lib.NormMonitor(every_n_steps=4, histograms=True))
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["weight norm ||w||"] == ["norms/weight/.*"]
    assert charts["guard: skipped steps and incidents"] == ["nan_guard/.*"]
    assert charts["clipping: total norm, threshold, coefficient"] == ["grad_clip/.*"]
    assert {f"weights/{n}" for n in names} <= set(acc.Tags()["histograms"])
    assert [e.step for e in acc.Histograms(f"weights/{names[0]}")] == [0, 4]


class HostSyncCounter(TorchFunctionMode):
    SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_host_transfer_per_logging_step(ns, tmp_path):
    monitor = ns.lib.NormMonitor(every_n_steps=4)
    counts = []
    real = monitor.on_train_batch_end

    def counted(*args, **kwargs):
        with HostSyncCounter() as counter:
            real(*args, **kwargs)
        counts.append(counter.count)

    monitor.on_train_batch_end = counted
    run(ns, tmp_path, monitor)
    assert counts == [1, 0, 0, 0, 1, 0, 0, 0]


def test_bad_arguments(ns):
    for kwargs, match in [({"every_n_steps": 0}, "every_n_steps"), ({"group_by": "layer"}, "group_by"), ({"include": "("}, "include")]:
        with pytest.raises(ValueError, match=match):
            ns.lib.NormMonitor(**kwargs)
