"""The typed rollback record on an incident: written to and read back from nan_incidents.jsonl, old files included."""

from __future__ import annotations

import torch

from lightning_nan.core import Incident, append_jsonl, read_jsonl
from lightning_nan.core.rollback import RollbackRecord
from lightning_nan.core.rollback_triggers import SpikeTrigger
from lightning_nan.core.spikes import LossSpikeDetector


def test_the_record_round_trips_through_a_jsonl_file(tmp_path):
    done = RollbackRecord(step=25, reason="non-finite weights", source="memory", restored_step=20, restored_from="x")
    refused = RollbackRecord(step=30, reason="3 consecutive skipped steps", source="checkpoint", refused="no save yet")
    incidents = [Incident(step=25, kind="param", rollback=done), Incident(step=30, kind="loss", rollback=refused)]
    incidents.append(Incident(step=31, kind="grad"))
    path = tmp_path / "nan_incidents.jsonl"
    append_jsonl(path, [i.to_dict() for i in incidents])
    lines = read_jsonl(path)
    assert lines[0]["rollback"]["restored_step"] == 20 and lines[1]["rollback"]["refused"] == "no save yet"
    assert [Incident.from_dict(line) for line in lines] == incidents
    assert isinstance(Incident.from_dict(lines[0]).rollback, RollbackRecord) and lines[2]["rollback"] is None


def test_files_of_older_versions_with_the_rollback_in_detail_still_load(tmp_path):
    path = tmp_path / "nan_incidents.jsonl"
    old = [
        {"step": 25, "kind": "param", "detail": {"rollback": {"step": 25, "restored_step": 20, "reason": "non-finite weights"}}},
        {"step": 30, "kind": "loss", "detail": {"rollback": "no known-good snapshot yet", "consecutive_skips": 3}},
    ]
    append_jsonl(path, old)
    done, refused = (Incident.from_dict(line) for line in read_jsonl(path))
    assert done.rollback == RollbackRecord(step=25, reason="non-finite weights", restored_step=20) and done.detail == {}
    assert refused.rollback == RollbackRecord(step=30, reason="", refused="no known-good snapshot yet")
    assert refused.detail == {"consecutive_skips": 3}


def test_spike_trigger_adds_up_micro_batches_and_scores_what_the_ranks_agree_on():
    """Two micro-batch losses of one step count as their sum; ``reduce`` (the mean over ranks) is what gets scored."""
    spikes = SpikeTrigger(LossSpikeDetector(window=10, threshold=6.0), patience=2, confirm_steps=1)
    for step in range(8):
        for _ in range(2):
            spikes.record(step, torch.tensor(0.5 + 0.01 * (step % 3)))
    seen = []

    def reduce(vector):
        seen.append(vector.clone())
        return vector * 1.0

    assert spikes.flush_due(8, confirm_due=False)
    spikes.flush(8, reduce)
    assert torch.allclose(seen[0], torch.tensor([1.0 + 0.02 * (s % 3) for s in range(8)]))
    assert list(spikes.detector.history) == seen[0].tolist() and spikes.run == 0
    for step in (8, 9):
        spikes.record(step, torch.tensor(40.0))
    spikes.flush(10)
    assert spikes.fired and list(spikes.steps) == [8, 9] and spikes.spiked_near(8) and not spikes.spiked_near(10)


def test_records_given_as_dicts_become_records_and_a_copy_of_the_trigger_holds_no_unread_loss():
    import pickle

    from lightning_nan.core.diagnosis import diagnose
    from lightning_nan.core.records import BisectionRecord, LocalizationRecord

    loc = {"module": "head", "op": "log", "inputs_finite": True, "op_inputs_finite": True}
    inc = Incident(step=3, kind="loss", bisection={"step": 3, "forward_passes": 5}, localization=loc)
    assert isinstance(inc.bisection, BisectionRecord) and inc.bisection.forward_passes == 5
    assert isinstance(inc.localization, LocalizationRecord) and inc.localization.op == "log"
    assert diagnose(inc).cause == "unsafe_op"  # the diagnosis reads the records of an incident made by hand

    spikes = SpikeTrigger(LossSpikeDetector(window=10, threshold=6.0), patience=2, confirm_steps=1)
    spikes.record(4, torch.tensor(0.5))
    copied = pickle.loads(pickle.dumps(spikes))
    assert copied._losses == [] and len(spikes._losses) == 1  # the original keeps its own
