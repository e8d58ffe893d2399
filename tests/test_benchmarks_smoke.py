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
