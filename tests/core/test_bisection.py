import math
import random
import statistics

import pytest

from lightning_nan.core.bisection import BisectionResult, bisect


class Oracle:
    """``fails`` for a batch whose failing groups are known: a set fails iff it contains a whole group.

    Records every call, refuses a repeated one, and (with ``min_size``) refuses sub-batches that are too small.
    """

    def __init__(self, groups, min_size=1):
        self.groups = [frozenset(g) for g in groups]
        self.min_size = min_size
        self.calls = []

    def __call__(self, positions):
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert positions not in self.calls, f"fails called twice with {positions}"
        if len(positions) < self.min_size:
            raise ValueError(f"Expected more than 1 value per channel when training, got {len(positions)}")
        self.calls.append(list(positions))
        return self.verdict(positions)

    def verdict(self, positions):
        s = set(positions)
        return any(g <= s for g in self.groups)


def _run(n, groups, **kwargs):
    oracle = Oracle(groups, min_size=kwargs.get("min_size", 1))
    result = bisect(n, oracle, **kwargs)
    assert result.tests == len(oracle.calls)
    return result, oracle


def _singletons(positions):
    return [[p] for p in sorted(positions)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_single_culprit_found_at_every_position(n):
    for culprit in range(n):
        result, oracle = _run(n, [[culprit]])
        assert result.culprits == [culprit] and result.groups == [[culprit]]
        assert result.reproduced and result.complete and not result.whole_batch
        assert oracle.calls[0] == list(range(n))  # the reproduction comes first


def test_random_lone_culprits_are_found_exactly():
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randint(8, 200)
        d = rng.randint(1, max(1, min(6, n // 8)))
        truth = rng.sample(range(n), d)
        result, oracle = _run(n, [[p] for p in truth])
        assert result.culprits == sorted(truth), (seed, n, truth)
        assert result.groups == _singletons(truth)
        assert not oracle.verdict([p for p in range(n) if p not in truth])  # the batch without them passes


def test_test_count_for_one_culprit_among_256():
    # Derived bound (see `bisect`): reproduction 1 + ceil(log2 n) halvings + at most one wasted probe of
    # the model-problem rule + at most one test of the culprit alone + one test of the rest.
    n = 256
    bound = 1 + math.ceil(math.log2(n)) + 3
    counts = [_run(n, [[c]])[0].tests for c in range(n)]
    assert max(counts) <= bound == 12
    # on average half the culprits are confirmed by the halving itself, and 3 in 4 need no wasted probe
    assert statistics.mean(counts) <= 1 + 8 + 0.5 + 0.25 + 1
    assert min(counts) >= math.ceil(math.log2(n))  # the group-testing floor


def test_test_count_for_four_culprits_among_256():
    # Each culprit: at most ceil(log2 n) halvings + 1 alone + 1 rest; plus the reproduction and one probe.
    n, d = 256, 4
    bound = d * (math.ceil(math.log2(n)) + 2) + 2
    counts = []
    for seed in range(60):
        truth = random.Random(seed).sample(range(n), d)
        result, _ = _run(n, [[p] for p in truth])
        assert result.culprits == sorted(truth)
        counts.append(result.tests)
    assert max(counts) <= bound == 42
    # expected: log2 n halvings + 1/2 test alone + 1 rest per culprit, plus 2
    assert statistics.mean(counts) <= d * (math.log2(n) + 1.5) + 2
    assert statistics.mean(counts) < n / 4  # far from testing samples one by one


def test_pair_that_fails_only_together():
    result, _ = _run(16, [[3, 9]])
    assert result.groups == [[3, 9]] and result.culprits == [3, 9] and result.complete


@pytest.mark.parametrize("n", [4, 16, 64])
def test_random_interactions_with_and_without_lone_culprits(n):
    for seed in range(60):
        rng = random.Random(seed)
        pos = rng.sample(range(n), 4 if n >= 16 else 3)
        kind = seed % 4
        if kind == 0:
            truth = [pos[:2]]  # a pair alone
        elif kind == 1:
            truth = [pos[:2], [pos[2]]]  # a pair and a lone culprit
        elif kind == 2:
            truth = [pos[:3]]  # a triple
        else:
            truth = [pos[:2], pos[2:]] if n >= 16 else [pos[:2], [pos[2]]]  # two pairs
        result, oracle = _run(n, truth)
        assert sorted(result.groups) == sorted(sorted(g) for g in truth), (seed, truth)
        assert result.culprits == sorted(p for g in truth for p in g)
        for group in result.groups:  # each group fails, and is 1-minimal
            assert oracle.verdict(group)
            assert not any(oracle.verdict([q for q in group if q != p]) for p in group)


def test_overlapping_groups_leave_a_passing_batch():
    # {1, 2} and {2, 5} overlap: removing the first group found breaks the other one.
    result, oracle = _run(16, [[1, 2], [2, 5], [11]])
    assert [11] in result.groups and len(result.groups) == 2
    for group in result.groups:
        assert oracle.verdict(group) and not any(oracle.verdict([q for q in group if q != p]) for p in group)
    assert not oracle.verdict([p for p in range(16) if p not in result.culprits])


@pytest.mark.parametrize("min_size", [1, 2])
def test_every_sample_failing_is_a_model_problem(min_size):
    result, _ = _run(256, [[p] for p in range(256)], min_size=min_size)
    assert result.whole_batch and result.reproduced and result.complete
    assert result.culprits == [] and result.groups == []
    assert result.tests <= 10


def test_not_reproduced():
    result, oracle = _run(32, [])
    assert not result.reproduced and result.tests == 1 and result.culprits == [] and result.groups == []
    assert oracle.calls == [list(range(32))]


def test_empty_batch_is_not_tested():
    assert bisect(0, Oracle([[0]])) == BisectionResult(tests=0, reproduced=False, complete=True)


@pytest.mark.parametrize("min_size", [2, 3])
@pytest.mark.parametrize("n", [16, 33])
def test_min_size_pads_with_known_clean_positions(n, min_size):
    padded = 0
    pairs = [random.Random(seed).sample(range(n), 2) for seed in range(20)]
    cases = [[[c]] for c in range(n)] + [[[a], [b]] for a, b in pairs]
    for truth in cases:
        result, oracle = _run(n, truth, min_size=min_size)  # the oracle raises on a sub-batch < min_size
        assert result.groups == sorted(truth)
        clean = set()  # positions seen in a passing call before each call
        for call in oracle.calls:
            unknown = set(call) - clean
            # Padding brings a set up to exactly min_size. A call of that size with fewer unknown
            # positions was padded, and its pads (the known-clean part) came from passing calls.
            if len(call) == min_size and len(unknown) < min_size:
                assert unknown, call
                padded += 1
            if not oracle.verdict(call):
                clean |= set(call)
    assert padded > n  # padding happened (at least once per single-culprit case, on average)


def test_max_tests_is_honoured():
    truth = [[5], [77], [140, 201]]
    full, _ = _run(256, truth)
    assert full.complete and sorted(full.groups) == [[5], [77], [140, 201]]
    for budget in range(1, full.tests + 2):
        result, oracle = _run(256, truth, max_tests=budget)
        assert result.tests <= budget
        assert result.complete == (budget >= full.tests)
        assert all(g in full.groups for g in result.groups)  # what is reported is established
        assert result.culprits == sorted(p for g in result.groups for p in g)
    assert _run(256, truth, max_tests=full.tests)[0] == full


def test_memoised_and_deterministic():
    # The Oracle already refuses repeated calls everywhere; here the whole call sequence repeats exactly.
    truth = [[3], [4], [40, 41], [90]]
    first, a = _run(128, truth)
    second, b = _run(128, truth)
    assert a.calls == b.calls and first == second
    assert len({tuple(c) for c in a.calls}) == len(a.calls)


def test_exceptions_from_fails_propagate():
    def fails(positions):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        bisect(8, fails)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": -1}, "Expected `n`"),
        ({"n": 4, "min_size": -1}, "Expected `min_size`"),
        ({"n": 4, "max_tests": 0}, "Expected `max_tests`"),
        ({"n": 4.0}, "got 4.0"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bisect(fails=lambda p: True, **kwargs)
