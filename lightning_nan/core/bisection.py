"""Adaptive group testing: which samples make a batch fail?

:func:`bisect` only sees ``fails(positions) -> bool``, which evaluates the sub-batch made of those
positions (a forward pass: expensive), so it spends as few calls as it can. It is pure Python and
deterministic.

>>> result = bisect(16, lambda positions: 11 in positions)
>>> result.culprits, result.groups, result.tests
([11], [[11]], 7)
>>> bisect(16, lambda positions: {3, 9} <= set(positions)).groups  # 3 and 9 fail only together
[[3, 9]]
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lightning_nan.core.validate import integer

__all__ = ["BisectionResult", "bisect"]


@dataclass
class BisectionResult:
    """What :func:`bisect` found.

    Attributes:
        culprits: positions (sorted) of the samples that make the batch fail: the members of ``groups``.
        groups: minimal failing groups (sorted): ``[[p]]`` for a sample that fails alone, ``[[3, 9]]``
            when 3 and 9 fail only together. Each group was seen to fail, and (by monotonicity) none of
            its proper subsets fails.
        tests: calls of ``fails`` made (the initial reproduction included).
        reproduced: the whole batch failed when re-evaluated; ``False``: nothing found (a transient fault).
        whole_batch: (nearly) every sample fails: a model problem, not dirty data; then ``culprits``
            and ``groups`` are empty.
        complete: the search ran to its end; ``False`` when ``max_tests`` stopped it, and then
            ``culprits``/``groups`` hold what was established so far.

    >>> BisectionResult(culprits=[2], groups=[[2]], tests=5, reproduced=True).complete
    True
    """

    culprits: list[int] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    tests: int = 0
    reproduced: bool = False
    whole_batch: bool = False
    complete: bool = True


def bisect(
    n: int, fails: Callable[[list[int]], bool], *, min_size: int = 1, max_tests: int | None = None
) -> BisectionResult:
    """Find the samples among positions ``0 .. n-1`` that make ``fails`` return ``True``.

    ``fails(positions)`` gets a sorted list and says whether that sub-batch is non-finite. It is
    never called twice with the same list, nor on a set whose answer follows from earlier ones by
    monotonicity (a set that contains a failing set fails; a subset of a passing set passes), which
    is assumed. Exceptions from ``fails`` propagate.

    The search:

    1. ``fails(all)``. ``False``: ``reproduced=False``, nothing else is tested (nor is anything
       for ``n == 0``).
    2. Model problem (only when ``n >= 8`` and ``min_size <= n // 4``): the halves, the quarters and
       two random sub-batches of ``max(1, min_size)`` samples (fixed seed) are tested one by one,
       stopping at the first that passes. If all eight fail, ``whole_batch=True`` (9 tests in all).
       The first half and first quarter come first, since the search below tests them anyway.
    3. Find one group in a failing set ``R``: take the smallest set inside ``R`` known to fail,
       keep its positions not yet seen in a passing set, and halve them: test the first half; if it
       fails go into it, else infer that the second half fails (not tested). A single position
       reached by inference is then tested alone. If it passes, the culprits interact: the last set
       seen to fail is reduced to a 1-minimal failing group by binary search (each member costs
       about ``log2`` of the set's size).
    4. Remove the group from ``R``, test the rest; if it still fails, go to 3.

    Cost, for one sample that fails alone: the reproduction, ``ceil(log2 n)`` halving tests (the
    first half and quarter of step 2 among them), at most one probe of step 2 wasted (the second
    half, when the culprit is in the first quarter), at most one test alone and one test of the
    rest: at most ``ceil(log2 n) + 4`` (12 among 256 samples, 10.75 on average). Each further
    culprit costs at most ``ceil(log2 n) + 2`` more, so about ``d * (ceil(log2 n) + 2) + 2`` for
    ``d`` culprits; the group-testing floor is ``ceil(log2 C(n, d))``. Samples that fail only
    together cost about ``(group size + 1) * log2 n`` more.

    ``min_size``: a set smaller than this is padded with positions seen in a passing set (never a
    culprit) before ``fails`` sees it; conclusions are about the unpadded set. If too few such
    positions are known, up to three blocks of ``min_size`` other positions are tested first to
    find some; failing that, the set is sent as it is. Padding assumes clean samples do not
    interact with the tested ones.

    ``max_tests``: stop after that many calls, with ``complete=False``.

    >>> r = bisect(256, lambda positions: 200 in positions or 17 in positions)
    >>> r.culprits, r.tests, r.complete
    ([17, 200], 20, True)
    >>> r = bisect(256, lambda positions: True)  # every sample fails: the model, not the data
    >>> r.whole_batch, r.culprits, r.tests
    (True, [], 9)
    """
    integer("n", n, low=0, hint="the batch size")
    integer("min_size", min_size, low=0, hint="1 or less: no padding")
    integer("max_tests", max_tests, low=1, optional=True)
    return _Search(n, fails, min_size, max_tests).run()


class _OutOfTests(Exception):
    pass


class _Search:
    def __init__(self, n: int, fails: Callable[[list[int]], bool], min_size: int, max_tests: int | None) -> None:
        self.n = n
        self.fails = fails
        self.min_size = min_size
        self.max_tests = max_tests
        self.tests = 0
        self.calls: dict[frozenset[int], bool] = {}
        self.passed: list[frozenset[int]] = []  # sets sent to `fails` (pads included) that passed
        self.failed: list[frozenset[int]] = []  # sets (pads excluded) that failed
        self.clean: set[int] = set()
        self.groups: list[list[int]] = []
        self.culprits: set[int] = set()

    # ------------------------------------------------------------------------------------ testing

    def known(self, q: frozenset[int]) -> bool | None:
        if any(q <= s for s in self.passed):
            return False
        if any(s <= q for s in self.failed):
            return True
        return None

    def test(self, positions: Iterable[int]) -> bool:
        q = frozenset(positions)
        verdict = self.known(q)
        if verdict is not None:
            return verdict
        sent = q | self._pads(q)
        verdict = self.calls.get(sent)
        if verdict is None:
            if self.max_tests is not None and self.tests >= self.max_tests:
                raise _OutOfTests
            self.tests += 1
            verdict = self.calls[sent] = bool(self.fails(sorted(sent)))
        if verdict:
            self.failed.append(q)
        else:
            self.passed.append(sent)
            self.clean |= sent
        return verdict

    def _pads(self, q: frozenset[int]) -> frozenset[int]:
        need = self.min_size - len(q)
        if need <= 0:
            return frozenset()
        if len(self.clean - q - self.culprits) < need:
            self._learn_clean(q, need)
        for s in self.passed:  # pads that passed together are safest
            pool = sorted(s - q - self.culprits)
            if len(pool) >= need:
                return frozenset(pool[:need])
        return frozenset(sorted(self.clean - q - self.culprits)[:need])

    def _learn_clean(self, q: frozenset[int], need: int) -> None:
        size = max(self.min_size, need)
        unknown = [p for p in reversed(range(self.n)) if p not in self.clean and p not in self.culprits]
        others = [p for p in unknown if p not in q] + [p for p in unknown if p in q]  # q last: it may be dirty
        for start in range(0, min(3 * size, len(others) - size + 1), size):
            self.test(others[start : start + size])  # >= min_size positions: needs no pads itself
            if len(self.clean - q - self.culprits) >= need:
                return

    # ------------------------------------------------------------------------------------- search

    def run(self) -> BisectionResult:
        result = BisectionResult()
        try:
            if self.n == 0 or not self.test(range(self.n)):
                return self._result(result)
            result.reproduced = True
            if self._whole_batch():
                result.whole_batch = True
                return self._result(result)
            rest = frozenset(range(self.n))
            while rest:
                group = self._find_group(rest)
                self.groups.append(group)
                self.culprits.update(group)
                rest = rest - frozenset(group)
                if not rest or not self.test(rest):
                    break
        except _OutOfTests:
            result.complete = False
        return self._result(result)

    def _result(self, result: BisectionResult) -> BisectionResult:
        result.tests = self.tests
        if not result.whole_batch:
            result.groups = sorted(sorted(g) for g in self.groups)
            result.culprits = sorted(self.culprits)
        return result

    def _whole_batch(self) -> bool:
        n, m = self.n, max(1, self.min_size)
        if n < 8 or n // 4 < m:
            return False
        h = n // 2
        q1, q3 = h // 2, h + (n - h) // 2
        spans = [(0, h), (0, q1), (h, n), (q1, h), (h, q3), (q3, n)]
        probes: list[Sequence[int]] = [range(a, b) for a, b in spans]
        picks = random.Random(0).sample(range(n), 2 * m)
        probes += [picks[:m], picks[m:]]
        return all(self.test(p) for p in probes)  # stops at the first that passes

    def _find_group(self, rest: frozenset[int]) -> list[int]:
        """A 1-minimal failing group inside ``rest``, which is known to fail."""
        smallest = min((s for s in self.failed if s <= rest), key=len, default=rest)  # `rest` itself fails
        last_failing = sorted(smallest)
        current = sorted(smallest - self.clean)
        if not current:
            return self._minimize(last_failing)
        tested = self.known(frozenset(current)) is True
        while len(current) > 1:
            half = len(current) // 2
            left, right = current[:half], current[half:]
            if self.test(left):
                current, tested = left, True
            else:  # inferred: the culprit is on the right (unless the culprits interact)
                current, tested = right, self.known(frozenset(right)) is True
            if tested:
                last_failing = current
        if tested or self.test(current):
            return current
        return self._minimize(last_failing)

    def _minimize(self, failing: list[int]) -> list[int]:
        """Reduce a failing set to a 1-minimal failing group (binary search for each member)."""
        group: list[int] = []
        candidates = list(failing)  # invariant: group + candidates fails
        while candidates and not (group and self.test(group)):
            lo, hi = 1, len(candidates)  # smallest k such that group + candidates[:k] fails
            while lo < hi:
                mid = (lo + hi) // 2
                if self.test(group + candidates[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            group.append(candidates[hi - 1])
            candidates = candidates[: hi - 1]
        return sorted(group)
