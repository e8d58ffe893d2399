"""NormMonitor: values read back from real TensorBoard event files, against independently computed norms."""

from __future__ import annotations

import math
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from faulty import loader, model_class, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.overrides import TorchFunctionMode

from lightning_nan.callbacks._tensorboard import ScalarBatch, tensorboard_writer


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


def per_key_logger_class(pl):
    class PerKeyLogger(pl.loggers.TensorBoardLogger):
        """Overrides ``log_metrics`` (then runs Lightning's: one ``add_scalar`` per key): must see every call."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))
            super().log_metrics(metrics, step)

    return PerKeyLogger


def fit_logged(ns, root, logger, monitor, **model_kwargs):
    model = model_class(ns.pl)(**model_kwargs)
    callbacks = [ns.NaNGuard(), monitor]
    trainer = ns.pl.Trainer(callbacks=callbacks, **trainer_kwargs(root, logger=logger, log_every_n_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    logger.finalize("success")


def norm_events(log_dir, prefix="", raw=False):
    """``[(step, [(tag, float32 bits), ...]), ...]`` for every event holding norms scalars, in file order
    (``raw``: ``(step, Event)`` for every event holding scalars)."""
    (path,) = Path(log_dir).glob("events.out.tfevents.*")
    out = []
    for record in RawEventFileLoader(str(path)).Load():  # the records as written (no conversion on reading)
        event = Event.FromString(record)
        if raw:
            if event.summary.value:
                out.append((event.step, event))
            continue
        values = [(v.tag, struct.pack("<f", v.simple_value)) for v in event.summary.value]
        if values and all(tag.startswith(f"{prefix}norms/") for tag, _ in values):
            out.append((event.step, values))
    return out


MONITORS = [
    {"every_n_steps": 1},
    {"every_n_steps": 1, "exclude": r"body\.0\.bias"},  # a subset of the gradient norms
    {"every_n_steps": 2, "group_by": "module"},
]


@pytest.mark.parametrize("kwargs", MONITORS)
def test_tensorboard_events_hold_what_log_metrics_writes(ns, tmp_path, kwargs):
    """One event per logging step, with the tags (prefix included), steps and values of ``log_metrics``."""
    fast = ns.pl.loggers.TensorBoardLogger(str(tmp_path / "fast"), name="n", prefix="fit")
    per_key = per_key_logger_class(ns.pl)(str(tmp_path / "per_key"), name="n", prefix="fit")
    faults = {2: "grad"}  # an Inf gradient norm, a skipped step: a zero update ratio
    fit_logged(ns, tmp_path, fast, ns.lib.NormMonitor(**kwargs), faults=faults)
    fit_logged(ns, tmp_path, per_key, ns.lib.NormMonitor(**kwargs), faults=faults)

    steps = list(range(0, 8, kwargs["every_n_steps"]))
    calls = [(step, m) for step, m in per_key.calls if all(k.startswith("norms/") for k in m)]  # not the guard's
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

    events = norm_events(fast.log_dir, "fit-")
    assert [step for step, _ in events] == steps  # one event per logging step...
    expected = [(step, [(f"fit-{k}", struct.pack("<f", v)) for k, v in metrics.items()]) for step, metrics in calls]
    assert events == expected  # ...holding every key, in order, with the value log_metrics got (as float32)
    reference = norm_events(per_key.log_dir, "fit-")  # Lightning's own writing: one event per key
    assert len(reference) == len(steps) * len(keys)
    assert sorted((s, t, v) for s, values in reference for t, v in values) == sorted(
        (s, t, v) for s, values in events for t, v in values
    )


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


@pytest.mark.parametrize("step", [0, 1, 300, 2**40])
def test_scalar_batch_encodes_the_event_protobuf_would(step):
    tags = ["loss", "norms/update_ratio/features.10.weight", "é/" + "x" * 200]  # a 2-byte length, UTF-8
    values = [float("nan"), -0.0, float("-inf")]
    summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)])
    expected = Event(wall_time=1234.5, step=step, summary=summary).SerializeToString()
    assert ScalarBatch(tags).serialize(values, step, wall_time=1234.5) == expected


@pytest.mark.parametrize("step", [0, 1, 300, 2**40])
def test_scalar_batch_frames_the_record_tensorboards_writer_would(step):
    """The checksums ScalarBatch computes from its template are those of tensorboard's own RecordWriter."""
    import io
    import random

    from tensorboard.summary.writer.record_writer import RecordWriter

    rng = random.Random(step)
    tags = ["loss", "norms/update_ratio/features.10.weight", "é/" + "x" * 200]
    batch = ScalarBatch(tags)
    for _ in range(20):
        values = [rng.choice([rng.uniform(-1e30, 1e30), float("nan"), -0.0, rng.random()]) for _ in tags]
        data = batch.serialize(values, step, wall_time=rng.uniform(0, 2e9))
        out = io.BytesIO()
        RecordWriter(out).write(data)
        assert batch.record(data) == out.getvalue()


def test_framed_records_are_read_back_with_their_checksums_checked(tmp_path):
    """Through a real SummaryWriter: the reader verifies both checksums of every record."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    batch = ScalarBatch([f"norms/weight/layer{i}" for i in range(48)])
    for step in range(0, 3000, 7):
        batch.write(writer, [step + i / 64 for i in range(48)], step)
    writer.add_scalar("other", 2.0, 5)  # the writer's own path still works beside it
    batch.flush()  # the records still held back
    writer.close()
    (path,) = list(tmp_path.glob("events.out.tfevents.*"))
    reader = PyRecordReader_New(str(path))
    records = []
    while True:
        try:
            reader.GetNext()  # raises DataLossError on a bad checksum
        except Exception as err:  # noqa: BLE001 - the end of the file
            assert type(err).__name__ == "OutOfRangeError", err
            break
        records.append(Event.FromString(reader.record()))
    steps = [e.step for e in records if e.summary.value and e.summary.value[0].tag.startswith("norms/")]
    assert steps == list(range(0, 3000, 7))
    assert [(e.step, e.summary.value[0].simple_value) for e in records if e.summary.value and e.summary.value[0].tag == "other"] == [(5, 2.0)]
    assert all(e.summary.value[1].simple_value == e.step + 1 / 64 for e in records if len(e.summary.value) == 48)


def written_steps(root, tag):
    return [e.step for _, e in norm_events(root, "", raw=True) if e.summary.value and e.summary.value[0].tag == tag]


def test_frequent_events_are_held_back_until_a_batch_is_full_or_flushed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    batch = ScalarBatch(["a", "b"])
    batch.HOLD_SECONDS = 60.0  # no hand-over by age in this test
    batch.HOLD_RECORDS = 16
    for step in range(40):
        batch.write(writer, [float(step), -1.0], step)
    writer.flush()  # what the writer's thread has, on disk
    # the first write goes at once (no write before it), then the records go 16 at a time; 7 are held
    assert written_steps(tmp_path, "a") == list(range(33))
    written_by = time.time()
    time.sleep(0.01)
    batch.flush()
    writer.flush()
    assert written_steps(tmp_path, "a") == list(range(40))
    # a held event keeps the time of its write, not of the hand-over
    assert all(e.wall_time < written_by for _, e in norm_events(tmp_path, "", raw=True))
    batch.write(writer, [float("inf"), 1e39], 40)  # beyond float32: held, then written through protobuf
    batch.write(writer, [2.0, 3.0], 41)
    batch.HOLD_SECONDS = 0.0  # every write counts as infrequent: none is held
    batch.write(writer, [0.5, 0.25], 42)  # hands over 40 and 41 first
    writer.close()
    assert written_steps(tmp_path, "a") == list(range(43))
    last = [(e.step, [v.simple_value for v in e.summary.value]) for _, e in norm_events(tmp_path, "", raw=True)][-3:]
    assert last == [(40, [math.inf, math.inf]), (41, [2.0, 3.0]), (42, [0.5, 0.25])]


def test_monitor_hands_held_events_over_when_the_fit_fails(ns, tmp_path):
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


@pytest.mark.parametrize("at", ["validation", "epoch"])
def test_monitor_hands_held_events_over_before_validation_and_at_each_epoch_end(ns, tmp_path, at):
    """What was logged so far is in the event file when validation starts and when the next epoch starts."""

    class WithValidation(model_class(ns.pl)):
        def validation_step(self, batch, batch_idx):
            return self._loss(batch, batch_idx)

    name = next(n for n, _ in model_class(ns.pl)().named_parameters())
    seen = []

    class Look(ns.pl.Callback):  # after the monitor in the list: its hooks have run
        def look(self, trainer):
            trainer.logger.experiment.flush()  # what the writer's thread has, on disk
            seen.append((trainer.global_step, written_steps(trainer.logger.log_dir, f"norms/weight/{name}")))

        def on_validation_start(self, trainer, pl_module):
            if at == "validation" and not trainer.sanity_checking:
                self.look(trainer)

        def on_train_epoch_start(self, trainer, pl_module):
            if at == "epoch" and trainer.current_epoch > 0:
                self.look(trainer)

    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="norms")
    kwargs = trainer_kwargs(tmp_path, logger=logger, max_epochs=2, num_sanity_val_steps=0)
    trainer = ns.pl.Trainer(callbacks=[ns.lib.NormMonitor(every_n_steps=1), Look()], val_check_interval=4, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if at == "validation":
            trainer.fit(WithValidation(), loader(), loader(8))
        else:
            trainer.fit(model_class(ns.pl)(), loader())
    assert seen and all(steps == list(range(step)) for step, steps in seen), seen
    assert [step for step, _ in seen] == ([4, 8, 12, 16] if at == "validation" else [8])


def test_events_held_for_a_writer_closed_meanwhile_are_dropped_with_a_warning(ns, tmp_path):
    class CloseWriter(ns.pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:  # step 3 was just logged: steps 1-3 are held (step 0 went at once)
                trainer.logger.experiment.close()  # its next write opens a new event file

    logger = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="norms")
    callbacks = [ns.lib.NormMonitor(every_n_steps=1), CloseWriter()]
    trainer = ns.pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, logger=logger))
    with pytest.warns(UserWarning, match=r"^3 TensorBoard event\(s\) held back could not be written: Writer is closed"):
        trainer.fit(model_class(ns.pl)(), loader())
    assert trainer.state.finished  # the fit goes on
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})  # both event files
    acc.Reload()
    name = next(n for n, _ in model_class(ns.pl)().named_parameters())
    assert sorted(scalars(acc, f"norms/weight/{name}")) == [0, 4, 5, 6, 7]


def test_scalar_batch_beyond_float32_is_written_as_add_scalar_writes_it(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    ScalarBatch(["big", "small"]).write(writer, [1e39, 0.5], step=4)
    writer.close()
    (event,) = [e for _, e in norm_events(tmp_path, "", raw=True)]
    assert event.step == 4 and [(v.tag, v.simple_value) for v in event.summary.value] == [("big", math.inf), ("small", 0.5)]


def test_tensorboard_writer_only_for_lightnings_own_log_metrics(ns, tmp_path):
    stock = ns.pl.loggers.TensorBoardLogger(str(tmp_path), name="a")
    assert tensorboard_writer(stock) is stock.experiment
    assert tensorboard_writer(per_key_logger_class(ns.pl)(str(tmp_path), name="b")) is None
    assert tensorboard_writer(ns.pl.loggers.CSVLogger(str(tmp_path), name="c")) is None
    with pytest.raises(ValueError, match="Expected 2 values"):
        ScalarBatch(["a", "b"]).write(stock.experiment, [1.0], step=0)


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


def test_template_crc_matches_tensorboards_crc32c():
    import os
    import random

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from lightning_nan.callbacks._crc32c import TemplateCRC, masked

    rng = random.Random(0)
    template = os.urandom(700)
    positions = sorted(rng.sample(range(700), 60)) + [0, 699]
    crc = TemplateCRC(template, positions)
    for _ in range(30):
        tail = bytearray(template)
        for i in positions:
            tail[i] = rng.randrange(256)
        prefix = os.urandom(rng.randrange(0, 24))
        assert masked(crc.crc(prefix, bytes(tail))) == masked_crc32c(prefix + bytes(tail))
    with pytest.raises(ValueError, match="positions"):
        TemplateCRC(b"abc", [3])


def test_rows_group_and_divide_on_the_host_like_torch_would():
    """Ratios, module grouping and repeated names computed on the host after the one transfer."""
    from lightning_nan.callbacks.norm_monitor import _Keys

    names = ["a.weight", "a.bias", "b.weight", "a.weight"]  # a.weight stepped twice: its last values count
    weights, grads, updates = [1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0], [0.1, 0.0, 0.3, 0.2]
    keys = _Keys(names, by_module=True)
    assert keys.keys == [f"norms/{q}/{m}" for m in ("a", "b") for q in ("weight", "grad", "update_ratio")]
    t = torch.tensor
    a_w, a_g, a_u = (math.hypot(c[3], c[1]) for c in (weights, grads, updates))
    expected = [a_w, a_g, a_u / (a_w + 1e-12), 3.0, 1.0, 0.3 / (3.0 + 1e-12)]
    assert keys.rows(weights, grads, updates, 1e-12) == pytest.approx(expected, rel=1e-12)
    # a zero weight with eps=0 gives what torch gives (inf, or nan for 0/0), not ZeroDivisionError
    per_param = _Keys(["w", "z"], by_module=False)
    ratios = per_param.rows([0.0, 0.0], [1.0, 0.0], [0.5, 0.0], 0.0)[2::3]
    torch_ratios = (t([0.5, 0.0]) / t([0.0, 0.0])).tolist()
    assert math.isinf(ratios[0]) and ratios[0] == torch_ratios[0] and math.isnan(ratios[1]) and math.isnan(torch_ratios[1])
