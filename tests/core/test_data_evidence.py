"""Evidence about the samples themselves: dirty (non-finite, extreme, gross outlier), or ordinary."""

from __future__ import annotations

import torch

from lightning_nan.core.data_evidence import OUTLIER_RATIO, broken_pipeline, sample_evidence


def _batch(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_ordinary_samples_are_never_dirty_even_at_the_tails():
    x = _batch(256)
    x[7] *= 4.0  # a 4-sigma sample: unusual, but ordinary data
    x[9] = 0.0  # an all-zero sample: degenerate, still not dirty
    facts = sample_evidence(x)
    assert not any(e.dirty for e in facts)
    assert facts[9].degenerate and "constant" in facts[9].reason
    assert not facts[7].degenerate


def test_each_kind_of_bad_input_is_named():
    x = _batch()
    x[3, 2] = float("inf")
    x[5, 0] = 1e38
    x[11] *= 10 * OUTLIER_RATIO
    facts = sample_evidence({"features": x, "label": torch.arange(32)})  # integer fields are not judged
    dirty = {i: e for i, e in enumerate(facts) if e.dirty}
    assert sorted(dirty) == [3, 5, 11]
    assert dirty[3].nonfinite and dirty[5].extreme and dirty[11].outlier
    assert "near the float32 limit" in dirty[5].reason and "gross outlier" in dirty[11].reason


def test_fp16_limit_is_the_dtype_s_own():
    x = _batch().half()
    x[4, 1] = 6e4  # near 65504: extreme for float16
    facts = sample_evidence(x)
    assert [i for i, e in enumerate(facts) if e.extreme] == [4] and "float16" in facts[4].reason


def test_a_whole_sample_of_a_custom_batch():
    graph = {"nodes": torch.ones(5, 3), "edges": torch.zeros(7, 2)}  # rows are not samples here
    assert not sample_evidence(graph, whole=True)[0].dirty
    graph["nodes"][2, 1] = float("nan")
    assert sample_evidence(graph, whole=True)[0].nonfinite


def test_broken_pipeline_names_the_columns_and_needs_every_sample():
    x = _batch()
    x[:, [1, 6]] = float("nan")
    text = broken_pipeline([(4, (x, torch.zeros(32)))])
    assert text is not None and "batch 4 [0] columns 1, 6 are NaN in all 32 samples" in text
    x[0, [1, 6]] = 0.0  # one sample is clean: not a broken pipeline, the dirty samples can be singled out
    assert broken_pipeline([(4, (x,))]) is None
    y = _batch(2)
    y[:] = float("nan")
    assert broken_pipeline([(0, y)]) is None  # two samples are too few to call it the pipeline
    z = _batch(8)
    z[torch.arange(8), torch.arange(8)] = float("nan")  # every sample, never the same column
    assert "in different positions in each sample" in broken_pipeline([(0, z)])
