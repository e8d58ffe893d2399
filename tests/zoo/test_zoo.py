"""The zoo of real-world NaN bugs under ``recommended()``: each diagnosis names the right cause, module and
operation, quarantines exactly the truly dirty samples (none where the data is clean), names the trigger
samples of an unsafe operation, and takes the action that cause calls for."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_nan.core.errors import NonFiniteError

from .scenarios import (
    BY_NAME,
    CONSTANT_COLUMNS,
    CORRUPT_AT,
    MANY_DIRTY,
    SPORADIC,
    SPORADIC_BATCHES,
    Result,
    line_of,
)


def run(name: str, tmp_path) -> Result:
    return BY_NAME[name].run(tmp_path)


def where(text: str, func: str) -> str:
    return f"zoo/scenarios.py:{line_of(text)} in {func}"


# ------------------------------------------------------------------------------------------------ shared checks


def assert_nothing_quarantined(r: Result) -> None:
    assert r.quarantined == set(), r.quarantined  # the quarantine file
    assert r.bisection.quarantined == set()
    assert [i.samples for i in r.incidents if i.samples] == []


def assert_triggers_named(r: Result, incident) -> None:
    """``incident.triggers`` are exactly the samples the model's own forward pass found failing in that batch."""
    candidates, count = r.truth(incident)
    assert count > 0, f"step {incident.step}: the model saw no failing sample"
    assert incident.triggers is not None and len(incident.triggers) == count, (incident.step, incident.triggers, count)
    assert set(incident.triggers) <= candidates, (incident.step, incident.triggers, sorted(candidates))


def assert_unsafe_op(r: Result, *, kind: str, module: str, at: str, op: str | None = None,
                     backward_op: str | None = None) -> None:
    """Every incident: unsafe_op on its own batch's evidence, module, operation and line named, triggers named,
    nothing quarantined; no LR cut, no rollback; after a few recurrences NonFiniteError names op and line.
    For a backward-only fault ``incident.module`` is the module of the forward source (the LightningModule's
    class name when the line is in ``training_step``, as for forward faults)."""
    incidents = r.incidents
    assert incidents, "no incident"
    for inc in incidents:
        assert (inc.kind, inc.cause) == (kind, "unsafe_op"), (inc.step, inc.kind, inc.cause, inc.advice)
        loc = inc.localization.to_dict() if inc.localization else {}
        assert inc.module == module, (inc.step, inc.module)
        if op is not None:
            assert loc.get("op") == op, (inc.step, loc)
        if backward_op is not None:
            assert loc.get("backward_op") == backward_op, (inc.step, loc)
        # the forward source: op_location (for a backward fault, backward_location holds the same line too)
        locations = [loc.get("op_location")] + ([loc.get("backward_location")] if backward_op else [])
        assert any(str(x).endswith(at) for x in locations if x), (inc.step, locations, at)
        assert_triggers_named(r, inc)
        assert "quarantined" not in inc.advice.replace("not quarantined", ""), inc.advice  # claims no action not taken
    assert_nothing_quarantined(r)
    assert r.lr_cuts == [], r.backoff.history
    assert r.rollback.history == []
    assert isinstance(r.error, NonFiniteError), f"expected NonFiniteError after recurrences, got {r.error!r}"
    assert 3 <= len(incidents) <= 4, [i.step for i in incidents]  # the first one and a few (3) recurrences
    assert r.error.incident.action == "raised" and r.error.incident.cause == "unsafe_op"
    message = str(r.error)
    assert at.split(" in ")[0] in message, message  # the line
    assert (op or backward_op) in message or (backward_op and at in message), message  # the operation


def assert_dirty(r: Result, *, module: str) -> None:
    """Exactly the dirty samples quarantined, by incidents blamed on dirty data; the next epoch clean; no LR
    cut, no rollback, no trigger, no group that fails only together."""
    dirty = set(r.scenario.dirty)
    assert r.error is None, r.error
    assert r.quarantined == dirty and r.bisection.quarantined == dirty
    assert r.incidents
    for inc in r.incidents:
        assert inc.cause == "dirty_data", (inc.step, inc.cause, inc.advice)
        assert inc.samples and set(inc.samples) <= dirty, (inc.step, inc.samples)
        assert not inc.triggers, (inc.step, inc.triggers)
        assert inc.epoch == 0
        for batch in inc.bisection.batches:
            assert batch.unconfirmed == [], batch  # no false groups
    assert inc_module(r) == module
    assert sorted(s for i in r.incidents for s in i.samples) == sorted(dirty)
    assert r.lr_cuts == [], r.backoff.history
    assert r.rollback.history == []
    later = [key for key, bad in r.model.failing.items() if key[0] > 0 and len(bad)]
    assert later == []  # quarantined samples are left out of the next epoch


def inc_module(r: Result) -> str | None:
    return r.incidents[0].module


def weights_finite(r: Result) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in r.model.parameters())


def assert_divergence_caught(r: Result) -> None:
    """A divergence incident before any non-finite one, at the latest when the loss has grown a millionfold;
    the LR cut, nothing quarantined, no trigger, the run finishes with finite weights."""
    first = r.incidents[0] if r.incidents else None
    assert first is not None, f"no incident; losses {r.model.losses[:40]}"
    assert (first.kind, first.cause) == ("divergence", "divergence"), (first.step, first.kind, first.cause)
    losses = r.model.losses
    blowup = next((s for s, loss in enumerate(losses) if not loss < 1e6 * losses[0]), len(losses))
    assert first.step <= blowup, (first.step, blowup, losses[: blowup + 1])
    assert r.lr_cuts and first.step <= r.lr_cuts[0]["step"] <= first.step + 1, r.backoff.history
    assert_nothing_quarantined(r)
    assert not any(i.triggers for i in r.incidents)
    assert r.error is None, r.error
    assert weights_finite(r)
    # a divergence after the recovery is seen too: the run does not end diverged again unseen
    assert losses[-1] < 100 * losses[0], ([i.step for i in r.incidents], [f"{v:.3g}" for v in losses])


# ------------------------------------------------------------------------------------------------ unsafe operations


def test_log_of_one_minus_sigmoid(tmp_path):
    r = run("log1m_sigmoid", tmp_path)
    at = where("per_sample = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))  # BUG: log(0) once", "training_step")
    assert_unsafe_op(r, kind="loss", module="SaturatingClassifier", op="log", at=at)


def test_sqrt_of_a_negative_gain(tmp_path):
    r = run("sqrt_negative", tmp_path)
    assert_unsafe_op(r, kind="loss", module="gain", op="sqrt", at=where("return torch.sqrt(self.lin(x))", "forward"))


def test_fully_masked_attention_row(tmp_path):
    r = run("masked_attention", tmp_path)
    at = where("att = torch.softmax(scores, dim=-1)", "forward")
    # the softmax is named although its input row is all -inf by design (the module's own mask fill)
    assert_unsafe_op(r, kind="loss", module="attn", op="softmax", at=at)
    # the padding mask is an ordinary input: a 0/1 field, not an outlier
    for inc in r.incidents:
        for i in inc.triggers:
            assert bool(r.data.tensors[1][i].any())  # every trigger is a left-padded sequence


def test_division_by_the_norm_of_an_empty_document(tmp_path):
    r = run("zero_norm_div", tmp_path)
    at = where("return x / x.norm(dim=-1, keepdim=True)", "forward")
    assert_unsafe_op(r, kind="loss", module="normalize", op="div", at=at)
    for inc in r.incidents:
        assert all(float(r.data.tensors[0][i].abs().sum()) == 0.0 for i in inc.triggers)


def test_sqrt_gradient_at_zero_distance(tmp_path):
    r = run("sqrt_grad_zero", tmp_path)
    at = where("d = torch.sqrt(((a - b) ** 2).sum(-1))", "training_step")
    assert_unsafe_op(r, kind="grad", module="PairNet", backward_op="SqrtBackward0", at=at)
    x1, x2, _ = r.data.tensors
    for inc in r.incidents:
        assert all(torch.equal(x1[i], x2[i]) for i in inc.triggers)  # the identical pairs


def test_where_log_gradient_trap(tmp_path):
    r = run("where_log_trap", tmp_path)
    at = where("return torch.where(rate > 0, torch.log(rate), torch.zeros_like(rate))", "forward")
    assert_unsafe_op(r, kind="grad", module="features", backward_op="LogBackward0", at=at)
    for inc in r.incidents:
        assert all(bool((r.data.tensors[0][i] == 0).any()) for i in inc.triggers)  # a zero count


def test_hand_written_softmax_overflow(tmp_path):
    """Logits bounded by 100 overflow exp: an unsafe op (use logsumexp); ``overflow`` is accepted too, and
    then the LR cut it calls for."""
    r = run("softmax_overflow", tmp_path)
    at = where("e = torch.exp(z)  # BUG", "training_step")
    causes = {i.cause for i in r.incidents}
    assert causes and causes <= {"unsafe_op", "overflow"}, causes
    if causes == {"unsafe_op"}:
        assert_unsafe_op(r, kind="loss", module="CosineClassifier", op="exp", at=at)
    else:
        for inc in r.incidents:
            loc = inc.localization.to_dict() if inc.localization else {}
            assert inc.module == "CosineClassifier" and loc.get("op") == "exp"
            assert str(loc.get("op_location", "")).endswith(at)
        assert_nothing_quarantined(r)
        assert r.lr_cuts


# ------------------------------------------------------------------------------------------------ dirty data


def test_nan_sample(tmp_path):
    assert_dirty(run("nan_sample", tmp_path), module="net")


def test_extreme_sample(tmp_path):
    r = run("extreme_sample", tmp_path)
    assert_dirty(r, module="Regressor")  # finite 1e38 inputs: the loss's square overflows first


def test_dirty_sample_under_dropout(tmp_path):
    assert_dirty(run("dropout_dirty", tmp_path), module="net")


def test_dirty_sample_with_a_loss_normalised_by_batch_statistics(tmp_path):
    """Alone, every sample fails (the variance of one target is NaN): only the dirty one is confirmed."""
    assert_dirty(run("batchstat_dirty", tmp_path), module="net")


def test_many_dirty_samples_in_a_row_train_through_the_first_epoch(tmp_path):
    r = run("many_dirty", tmp_path)
    assert len(MANY_DIRTY) > 20  # more than NaNGuard's max_consecutive
    assert_dirty(r, module="net")


def test_sporadic_dirty_sample_leaves_the_learning_rate_alone(tmp_path):
    r = run("sporadic_dirty", tmp_path)
    assert_dirty(r, module="net")
    assert [i.step for i in r.incidents] == list(SPORADIC_BATCHES)
    assert [i.samples for i in r.incidents] == [[s] for s in sorted(SPORADIC)]
    assert r.backoff.factor_now == 1.0 and r.backoff.history == []


# ------------------------------------------------------------------------------------------------ divergence, corruption, pipeline


def test_divergence_is_caught_before_the_first_nan(tmp_path):
    assert_divergence_caught(run("divergence", tmp_path))


def test_gpt2_divergence(tmp_path):
    """A real Hugging Face GPT-2 (tiny config, random weights) at SGD lr 50: 4.2 -> 1e13 unguarded."""
    assert_divergence_caught(run("gpt2_divergence", tmp_path))


@pytest.mark.parametrize("name, kind", [("corruption_nan", "param"), ("corruption_1e30", "jump")])
def test_weight_corruption_is_rolled_back_without_an_lr_cut(tmp_path, name, kind):
    r = run(name, tmp_path)
    assert r.error is None, r.error
    assert len(r.incidents) == 1, [(i.step, i.kind, i.cause) for i in r.incidents]
    inc = r.incidents[0]
    assert (inc.kind, inc.cause) == (kind, "corruption"), (inc.kind, inc.cause, inc.advice)
    assert inc.step in (CORRUPT_AT, CORRUPT_AT + 1)
    assert inc.action == "recovered by CheckpointRollback"
    assert [h["step"] for h in r.rollback.history] == [inc.step]
    assert r.backoff.history == [] and r.backoff.factor_now == 1.0
    assert_nothing_quarantined(r)
    assert weights_finite(r) and float(r.model.net[0].weight.abs().max()) < 1e3
    assert math.isfinite(r.model.losses[-1]) and r.model.losses[-1] < 1.0


def test_broken_pipeline_stops_fast_and_says_where(tmp_path):
    """The first batch NaN in every sample is skipped (it could be one bad shard); the next one stops the run."""
    r = run("broken_pipeline", tmp_path)
    assert isinstance(r.error, NonFiniteError), r.error
    assert [(i.step, i.cause, i.action) for i in r.incidents] == [(0, "broken_pipeline", "skipped"), (1, "broken_pipeline", "raised")]
    inc = r.incidents[-1]
    message = str(r.error)
    columns = ", ".join(map(str, CONSTANT_COLUMNS))
    assert f"columns {columns}" in message and "NaN" in message and "32 samples" in message, message
    assert "[0]" in message  # the field: the first element of the (x, y) batch
    assert_nothing_quarantined(r)
    assert not inc.triggers
    assert r.rollback.history == [] and r.backoff.history == []


def test_scoreboard_renders(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import zoo_scoreboard

    rows = zoo_scoreboard.main(["--only", "nan_sample,sqrt_negative", "--threads", "1"])
    out = capsys.readouterr().out
    assert [r.name for r in rows] == ["nan_sample", "sqrt_negative"]
    assert rows[0].false_quarantines == 0 and rows[0].survived and rows[0].forward_passes > 0
    assert "| nan_sample | dirty_data | dirty_data | yes | 0 | yes |" in out
    assert out.count("\n| ") >= 3 and "| **total** |" in out
