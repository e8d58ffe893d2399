"""NormMonitor: values read back from real TensorBoard event files, against independently computed norms."""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import pytest
import torch
from faulty import loader, model_class, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
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


@pytest.mark.parametrize("every", [1, 3])  # 1: the weights before the step go to buffers kept between steps
def test_per_parameter_values_match_independent_norms(ns, tmp_path, every):
    clip = ns.lib.GradientClipping("norm", max_norm=0.1)  # the logged gradient norms are the ones before clipping
    acc, probe, names = run(ns, tmp_path, ns.lib.NormMonitor(every_n_steps=every), extra=[ns.NaNGuard(), clip])
    steps = list(range(0, 8, every))
    for name in names:
        weight, grad, ratio = (scalars(acc, f"norms/{q}/{name}") for q in ("weight", "grad", "update_ratio"))
        assert sorted(weight) == sorted(grad) == sorted(ratio) == steps
        for step in steps:
            after, before = probe.after[step][name], probe.before[step][name]
            assert weight[step] == pytest.approx(after.norm().item(), rel=1e-5)
            assert grad[step] == pytest.approx(probe.grad[step][name], rel=1e-5)
            assert ratio[step] == pytest.approx(((after - before).norm() / after.norm()).item(), rel=1e-4)


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


def recording_logger_class(pl):
    class RecordingLogger(pl.loggers.TensorBoardLogger):
        """Records each ``log_metrics`` call, then writes it as Lightning's TensorBoardLogger does."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))
            super().log_metrics(metrics, step)

    return RecordingLogger


def norm_scalars(log_dir, prefix=""):
    """``[(step, tag, float32 bits), ...]`` of every norms scalar in the event file, as written."""
    (path,) = Path(log_dir).glob("events.out.tfevents.*")
    out = []
    for record in RawEventFileLoader(str(path)).Load():  # the records as written (no conversion on reading)
        event = Event.FromString(record)
        out += [
            (event.step, v.tag, struct.pack("<f", v.simple_value))
            for v in event.summary.value
            if v.tag.startswith(f"{prefix}norms/")
        ]
    return out


MONITORS = [
    {"every_n_steps": 1},
    {"every_n_steps": 1, "exclude": r"body\.0\.bias"},  # a subset of the gradient norms
    {"every_n_steps": 2, "group_by": "module"},
]


@pytest.mark.parametrize("kwargs", MONITORS)
def test_one_log_metrics_call_per_logging_step_through_the_loggers_public_api(ns, tmp_path, kwargs):
    """Every logger gets one ``log_metrics`` call per logging step with every key; Lightning's own
    TensorBoardLogger (a prefix included) writes exactly those values."""
    recording = recording_logger_class(ns.pl)(str(tmp_path / "recording"), name="n", prefix="fit")
    stock = ns.pl.loggers.TensorBoardLogger(str(tmp_path / "stock"), name="n", prefix="fit")
    model = model_class(ns.pl)(faults={2: "grad"})  # an Inf gradient norm, a skipped step: a zero update ratio
    trainer = ns.pl.Trainer(
        callbacks=[ns.NaNGuard(), ns.lib.NormMonitor(**kwargs)],
        **trainer_kwargs(tmp_path, logger=[recording, stock], log_every_n_steps=1),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    for logger in (recording, stock):
        logger.finalize("success")

    steps = list(range(0, 8, kwargs["every_n_steps"]))
    calls = [(step, m) for step, m in recording.calls if all(k.startswith("norms/") for k in m)]  # not the guard's
    assert [step for step, _ in calls] == steps
    keys = list(calls[0][1])
    names = list(dict.fromkeys(key.split("/", 2)[2] for key in keys))
    assert keys == [f"norms/{q}/{n}" for n in names for q in ("weight", "grad", "update_ratio")]
    module = kwargs.get("group_by") == "module"
    if module:
        assert names == ["body.0", "head"]
    else:
        excluded = ["body.0.bias"] if "exclude" in kwargs else []
        assert names == [n for n in ("body.0.weight", "body.0.bias", "head.weight", "head.bias") if n not in excluded]
    if 2 in steps:  # the planted Inf gradient, and the step the guard skipped
        body = "body.0" if module else "body.0.weight"
        assert math.isinf(dict(calls)[2][f"norms/grad/{body}"])
        assert dict(calls)[2][f"norms/update_ratio/{body}"] == 0.0
    expected = sorted((step, f"fit-{k}", struct.pack("<f", v)) for step, m in calls for k, v in m.items())
    assert sorted(norm_scalars(stock.log_dir, "fit-")) == expected
    assert sorted(norm_scalars(recording.log_dir, "fit-")) == expected


def test_two_optimizers_in_one_batch(ns, tmp_path):
    """Manual optimization: both optimizers' parameters are logged at the first one's step, each update
    measured against the weights just before its own optimizer stepped."""

    class Probe(ns.pl.Callback):
        def __init__(self):
            self.before, self.after, self.first = {}, {}, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.first is None:
                self.first = trainer.global_step
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for name, p in pl_module.named_parameters():
                if id(p) in owned:
                    self.before[(self.first, name)] = p.detach().double().clone()

        def on_train_batch_end(self, trainer, pl_module, *args):
            for name, p in pl_module.named_parameters():
                self.after[(self.first, name)] = p.detach().double().clone()

    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="n")
    probe = Probe()
    model = model_class(ns.pl)(manual=True)
    trainer = ns.pl.Trainer(
        callbacks=[probe, ns.lib.NormMonitor(every_n_steps=1)], **trainer_kwargs(tmp_path, logger=logger, max_steps=6)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    logger.finalize("success")
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    names = [n for n, _ in model.named_parameters()]
    quantities = ("weight", "grad", "update_ratio")
    assert set(acc.Tags()["scalars"]) == {f"norms/{q}/{n}" for q in quantities for n in names}
    for name in names:
        ratio, weight = scalars(acc, f"norms/update_ratio/{name}"), scalars(acc, f"norms/weight/{name}")
        assert sorted(ratio) == sorted(weight) == [0, 2, 4]  # the step of each batch's first optimizer
        for step in (0, 2, 4):
            before, after = probe.before[(step, name)], probe.after[(step, name)]
            assert weight[step] == pytest.approx(after.norm().item(), rel=1e-5)
            assert ratio[step] == pytest.approx(((after - before).norm() / after.norm()).item(), rel=1e-4)


def test_steps_logged_before_the_fit_fails_are_in_the_event_file(ns, tmp_path):
    class Failing(model_class(ns.pl)):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="norms")
    monitor = ns.lib.NormMonitor(every_n_steps=1)
    trainer = ns.pl.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=logger))
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        trainer.fit(Failing(), loader())
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    name = next(n for n, _ in Failing().named_parameters())
    assert sorted(scalars(acc, f"norms/weight/{name}")) == [0, 1, 2, 3, 4]


def tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through containers and instance attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in tensors_in(child, seen)]


def test_holds_no_tensors_after_fit(ns, tmp_path):
    """The copies of the weights kept between steps (``every_n_steps=1``) and the parameters are let go at teardown."""
    monitor = ns.lib.NormMonitor(every_n_steps=1)
    seen_during_fit = []

    class Spy(ns.pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen_during_fit.append(len(tensors_in(monitor)))

    acc, _, names = run(ns, tmp_path, monitor, extra=[Spy()])
    assert len(acc.Scalars(f"norms/weight/{names[0]}")) == 8
    assert min(seen_during_fit) >= 2 * len(names)  # the parameters and their copies, between two logging steps
    assert tensors_in(monitor) == []


def test_rows_group_and_divide_on_the_host_like_torch_would():
    """Ratios, module grouping and repeated names computed on the host after the one transfer."""
    from lightning_nan.callbacks._norm_values import Keys

    names = ["a.weight", "a.bias", "b.weight", "a.weight"]  # a.weight stepped twice: its last values count
    weights, grads, updates = [1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0], [0.1, 0.0, 0.3, 0.2]
    keys = Keys(names, by_module=True)
    assert keys.keys == [f"norms/{q}/{m}" for m in ("a", "b") for q in ("weight", "grad", "update_ratio")]
    t = torch.tensor
    a_w, a_g, a_u = (math.hypot(c[3], c[1]) for c in (weights, grads, updates))
    expected = [a_w, a_g, a_u / (a_w + 1e-12), 3.0, 1.0, 0.3 / (3.0 + 1e-12)]
    assert keys.rows(weights, grads, updates, 1e-12) == pytest.approx(expected, rel=1e-12)
    # a zero weight with eps=0 gives what torch gives (inf, or nan for 0/0), not ZeroDivisionError
    per_param = Keys(["w", "z"], by_module=False)
    ratios = per_param.rows([0.0, 0.0], [1.0, 0.0], [0.5, 0.0], 0.0)[2::3]
    torch_ratios = (t([0.5, 0.0]) / t([0.0, 0.0])).tolist()
    assert math.isinf(ratios[0]) and ratios[0] == torch_ratios[0] and math.isnan(ratios[1]) and math.isnan(torch_ratios[1])
