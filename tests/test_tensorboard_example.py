"""examples/tensorboard_norms.py writes what its docstring and the README say, in real TensorBoard event files."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata

from lightning_nan.callbacks.norm_monitor import LAYOUT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import tensorboard_norms  # noqa: E402

STEPS = 40


def test_tensorboard_example_writes_norms_guard_clipping_and_the_custom_scalars_layout(tmp_path, capsys):
    result = tensorboard_norms.main(["--logdir", str(tmp_path), "--steps", str(STEPS)])
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert str(Path(result.log_dir).resolve()) in out
    assert Path(result.log_dir).resolve().parent == (tmp_path / "norms_demo").resolve()

    planted = result.nan_steps
    assert len(planted) == 4 and all(0 < s < STEPS for s in planted)
    assert result.guard.skipped_steps == len(planted)
    assert [i.step for i in result.guard.incidents] == list(planted)

    acc = EventAccumulator(result.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])

    # NormMonitor: three quantities per module, every 5 steps.
    for module in tensorboard_norms.MODULES:
        for quantity in ("weight", "grad", "update_ratio"):
            tag = f"norms/{quantity}/{module}"
            assert tag in scalars, tag
            assert [e.step for e in acc.Scalars(tag)] == list(range(0, STEPS, 5)), tag
    assert {t for t in scalars if t.startswith("norms/")} == {
        f"norms/{q}/{m}" for q in ("weight", "grad", "update_ratio") for m in tensorboard_norms.MODULES
    }
    for module in tensorboard_norms.MODULES:
        ratios = {e.step: e.value for e in acc.Scalars(f"norms/update_ratio/{module}")}
        weights = [e.value for e in acc.Scalars(f"norms/weight/{module}")]
        assert all(math.isfinite(w) and w > 0 for w in weights)
        for step, ratio in ratios.items():
            assert ratio == 0.0 if step in planted else 0.0 < ratio < 1.0, (module, step, ratio)

    # NaNGuard: the counter reaches the number of planted faults; every fault is logged at its step.
    skipped = {e.step: e.value for e in acc.Scalars("nan_guard/skipped_steps")}
    assert max(skipped.values()) == len(planted)
    assert [skipped[s] for s in planted] == list(range(1, len(planted) + 1))
    consecutive = {e.step: e.value for e in acc.Scalars("nan_guard/consecutive_skips")}
    assert max(consecutive.values()) == 3
    assert max(e.value for e in acc.Scalars("nan_guard/incidents")) == len(planted)

    # GradientClipping("autoclip"): a coefficient in (0, 1], some steps clipped, none at a skipped step.
    coefs = {e.step: e.value for e in acc.Scalars("grad_clip/coef")}
    assert coefs and all(0.0 < c <= 1.0 for c in coefs.values())
    assert min(coefs.values()) < 1.0
    assert not set(coefs) & set(planted)
    for tag in ("grad_clip/total_norm", "grad_clip/threshold"):
        assert all(math.isfinite(e.value) and e.value > 0 for e in acc.Scalars(tag)), tag

    # The custom-scalars layout: TensorBoard reads it from this tensor tag as a serialized Layout proto.
    assert custom_scalars_metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]
    (event,) = acc.Tensors(custom_scalars_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    written = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }
    assert written == {
        category: {title: regexes for title, (kind, regexes) in charts.items()} for category, charts in LAYOUT.items()
    }
    assert all(kind == "Multiline" for charts in LAYOUT.values() for kind, _ in charts.values())
    assert "norms/weight/.*" in written["lightning_nan"]["weight norm ||w||"]
    # ...and its regexes match the tags actually written.
    for regexes in written["lightning_nan"].values():
        assert any(re.fullmatch(rx, tag) for rx in regexes for tag in scalars), regexes
