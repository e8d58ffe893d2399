"""The benchmark scripts run (``--quick``) and measure what they claim to."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bisection_benchmark_quick(capsys):
    import bisection

    threads = torch.get_num_threads()
    try:
        results = bisection.main(["--quick", "--threads", "1"])  # 1 thread: the CI box may be busy
    finally:
        torch.set_num_threads(threads)
    assert [(c.model, c.d) for c in results.cases] == [("net", 1), ("net", 4)]
    for case in results.cases:
        assert len(case.bisection) == len(case.rescan) == 2
        for seed, (bis, rescan) in enumerate(zip(case.bisection, case.rescan)):
            _, planted = bisection.make_batch(case.n, case.d, seed, bisection.MODELS[case.model][1])
            assert len(planted) == case.d
            assert bis.found == planted and bis.correct
            assert rescan.found == planted and rescan.correct
            assert rescan.passes == rescan.samples == case.n  # one sample per forward pass
            assert bis.passes < rescan.passes
            assert bis.samples >= case.n  # the first pass re-evaluates the whole batch
    out = capsys.readouterr().out
    assert "| dirty_data.Net (1x8x8) | 4 | bisection |" in out


def test_alternating_monitor_benchmark_logs_on_even_steps_only(tmp_path):
    """The paired NormMonitor measurement: the monitor runs (and logs) on even steps, the odd ones are bare."""
    import clipping_overhead
    from guard_overhead import make_data

    loggers = []

    def memory(root):
        loggers.append(clipping_overhead.MemoryLogger())
        return loggers[-1]

    out = clipping_overhead.alternating(
        logger=memory, runs=1, warmup=2, steps=8, batch_size=4, data=make_data(60), root=str(tmp_path)
    )
    assert len(out) == 1 and out[0][0] > 0 and out[0][1] > 0
    steps = [step for step, metrics in loggers[0].records if any(k.startswith("norms/") for k in metrics)]
    assert steps == list(range(0, 11, 2))  # steps 0..10 ran (warm-up 2 + 8 + 1): the even ones logged
    control = clipping_overhead.alternating(
        logger=memory, runs=1, warmup=2, steps=8, batch_size=4, data=make_data(60), root=str(tmp_path), control=True
    )
    assert len(control) == 1 and control[0][0] > 0  # timed, with nothing logged in the monitor's place
    assert not any(k.startswith("norms/") for _, metrics in loggers[1].records for k in metrics)
    floor = clipping_overhead.alternating(
        logger=memory, runs=1, warmup=2, steps=8, batch_size=4, data=make_data(60), root=str(tmp_path), floor=True
    )
    assert len(floor) == 1 and floor[0][0] > 0  # the monitor's keys logged, at its steps, nothing computed
    logged = [(step, list(metrics)) for step, metrics in loggers[2].records if any(k.startswith("norms/") for k in metrics)]
    monitor_keys = [list(metrics) for _, metrics in loggers[0].records if any(k.startswith("norms/") for k in metrics)]
    assert [step for step, _ in logged] == steps and all(keys == monitor_keys[0] for _, keys in logged)


def test_gpu_checks_script_runs_on_the_cpu(capsys):
    """The prepared GPU script, CPU smoke run: its fault checks hold (16-mixed with a CPU GradScaler, bf16)."""
    import gpu_checks

    assert gpu_checks.main(["--device", "cpu", "--quick", "--skip-ratios"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16-mixed:") or line.startswith("| bf16-mixed:")]
    assert len(rows) == 5 and all("| yes |" in row for row in rows), rows
    assert "scale 65536.0 -> 32768.0" in out  # GradScaler halved its scale on its own overflow
    # No sync count on the CPU, one row per (precision, variant) all the same.
    assert out.count("| 16-mixed | ") == len(gpu_checks.SYNC_VARIANTS)


def test_alternating_clipping_pairs_the_guard_with_lightnings_clipping(tmp_path):
    """Even steps: the guard checks and GradientClipping clips; odd steps: Lightning's own clipping only."""
    import clipping_overhead as co
    from guard_overhead import make_data

    seen = {"lightning": [], "ours": []}
    made = []

    def make():
        model = co.OddStepClipCNN()
        guard, clip = co.NaNGuard(), co.GradientClipping("norm", max_norm=1.0)
        lightning_clip, ours = model.clip_gradients, clip.on_before_optimizer_step
        model.clip_gradients = lambda *a, **k: (seen["lightning"].append(model.trainer.global_step), lightning_clip(*a, **k))
        clip.on_before_optimizer_step = lambda tr, *a: (seen["ours"].append(tr.global_step), ours(tr, *a))
        made.append(guard)
        return model, co.EveryOtherStep(guard, clip)

    out = co._paired_fits(make, runs=1, warmup=2, steps=8, batch_size=4, data=make_data(60), root=str(tmp_path))
    assert len(out) == 1 and out[0][0] > 0 and out[0][1] > 0
    assert seen["ours"] == list(range(0, 11, 2)) and seen["lightning"] == list(range(1, 11, 2))
    assert made[0].guard.checks == 6  # the guard checked the even steps (and the clipper reused its norms)
