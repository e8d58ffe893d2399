"""Know which dataset indices each batch holds, and leave quarantined samples out.

:class:`TrackingBatchSampler` wraps a DataLoader's batch sampler. It drops quarantined indices and
keeps every batch within its own inner batch, at the inner size: the gap an excluded index leaves is
filled by repeating the batch's clean indices (so batch samplers that group samples by shape, aspect
ratio or length still get batches of one group, every epoch has the same number of batches, on every
rank). It also queues the indices of each batch it yields. A DataLoader delivers batches in the order
its batch sampler yielded them (with ``num_workers > 0`` too, the default ``in_order=True``), so
popping one entry per delivered batch gives that batch's dataset indices. :func:`untrack` puts the
loader's own batch sampler back.

>>> import torch
>>> from torch.utils.data import DataLoader
>>> loader = DataLoader(list(range(10)), batch_size=4)
>>> tracker = track(loader, exclude={1, 2, 8, 9})
>>> for batch in loader:
...     print(batch.tolist(), tracker.next_batch_indices())
[0, 3, 0, 3] [0, 3, 0, 3]
[4, 5, 6, 7] [4, 5, 6, 7]
[4, 5] [4, 5]
>>> len(loader), tracker.excluded_this_epoch()
(3, 4)
>>> untrack(loader) is tracker, [batch.tolist() for batch in loader][0]
(True, [0, 1, 2, 3])
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

Exclude = Callable[[], Collection[int]] | Collection[int]


class TrackingBatchSampler:
    """A batch sampler that leaves out ``exclude``-d indices and remembers what each batch holds.

    Args:
        inner: the batch sampler to wrap (e.g. ``loader.batch_sampler``: a ``BatchSampler`` over a
            sequential, random, distributed or custom sampler).
        exclude: the indices to leave out, or a function returning them. It is read once at the start
            of each iteration, so a quarantine that grows applies from the next epoch.
        ordered: whether the loader delivers batches in the order they were sampled. ``False`` (a
            ``DataLoader(in_order=False)`` with workers) still leaves indices out, but
            :meth:`next_batch_indices` then answers ``None``: which batch comes next is unknown.

    Each batch is made from its own inner batch and keeps its size: the clean indices in their order,
    then, for each excluded one, a repeat of the batch's clean indices (cycling through them). So a
    batch sampler that groups samples (equal shapes, aspect ratio or length buckets) still yields
    batches of one group, and under DDP every rank keeps the same number and sizes of steps. Only an
    inner batch whose indices are all excluded is filled from another one: the clean indices of the
    nearest inner batch that has some (the earlier one on a tie), which may belong to another group.

    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> tracker = TrackingBatchSampler(BatchSampler(SequentialSampler(range(7)), 3, False), exclude=[4, 6])
    >>> list(tracker), len(tracker)
    ([[0, 1, 2], [3, 5, 3], [3]], 3)
    >>> tracker.next_batch_indices(), tracker.next_batch_indices()
    ([0, 1, 2], [3, 5, 3])
    """

    def __init__(self, inner: Iterable[list[int]], exclude: Exclude = (), *, ordered: bool = True) -> None:
        if isinstance(inner, TrackingBatchSampler):
            raise ValueError("Expected `inner` to be a plain batch sampler, got a TrackingBatchSampler; wrap it once")
        if not isinstance(inner, Iterable):
            raise ValueError(f"Expected `inner` to be an iterable of index lists (a batch sampler), got {inner!r}")
        self.inner = inner
        self.exclude = exclude
        self.ordered = bool(ordered)
        self._queue: deque[list[int]] = deque()
        self._excluded = 0
        self._generation = 0  # which iteration is current: an abandoned one no longer reports

    @property
    def exclude(self) -> Exclude:
        """The indices to leave out (or a function returning them); read at each new iteration."""
        return self._exclude

    @exclude.setter
    def exclude(self, exclude: Exclude) -> None:
        if not callable(exclude) and not isinstance(exclude, Collection):
            raise ValueError(
                f"Expected `exclude` to be a collection of dataset indices or a function returning one, got {exclude!r}"
            )
        self._exclude = exclude

    @property
    def sampler(self) -> Any:
        """The inner batch sampler's sampler (Lightning calls ``set_epoch`` on it), or ``None``."""
        return getattr(self.inner, "sampler", None)

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to the inner batch sampler, or else to its sampler, if they have one."""
        target: Any = self.inner if callable(getattr(self.inner, "set_epoch", None)) else self.sampler
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:
        # Other attributes (batch_size, drop_last, ...) read through to the inner batch sampler.
        if name.startswith("_") or name in ("inner", "exclude"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        exclude = self._exclude() if callable(self._exclude) else self._exclude
        excluded = frozenset(int(i) for i in exclude)
        self._queue.clear()
        self._excluded = 0
        self._generation += 1
        return self._batches(excluded, self._generation)

    def next_batch_indices(self) -> list[int] | None:
        """Pop the dataset indices of the next batch the DataLoader delivers; ``None`` if unknown.

        Call it exactly once per delivered batch. ``None`` means no batch is queued: the loader's
        current iteration did not come from this sampler (it was created before :func:`track`), or
        the loader does not deliver batches in order (``ordered=False``).
        """
        return self._queue.popleft() if self._queue else None

    def excluded_this_epoch(self) -> int:
        """How many quarantined indices the current iteration has left out so far."""
        return self._excluded

    def _batches(self, excluded: frozenset[int], generation: int) -> Iterator[list[int]]:
        def emit(source: list[int], size: int) -> list[int]:
            out = [source[k % len(source)] for k in range(size)] if size else []
            if self.ordered and generation == self._generation:
                self._queue.append(list(out))  # a copy: the consumer of ``out`` may change it
            return out

        donor: list[int] = []  # clean indices of the latest inner batch that had some
        donor_at = -1
        waiting: list[tuple[int, int]] = []  # (position, size) of inner batches with no clean index
        for at, batch in enumerate(self.inner):
            batch = [int(i) for i in batch]
            clean = [i for i in batch if i not in excluded]
            if generation == self._generation:
                self._excluded += len(batch) - len(clean)
            if not clean:
                waiting.append((at, len(batch)))  # its donor may be the next batch: wait for it
                continue
            for w_at, size in waiting:
                yield emit(donor if donor and w_at - donor_at <= at - w_at else clean, size)
            waiting.clear()
            donor, donor_at = clean, at
            yield emit(clean, len(batch))
        if any(size for _, size in waiting) and not donor:
            raise RuntimeError(
                f"Every sample of this iteration is excluded ({self._excluded} quarantined indices), so no batch"
                " can be formed. Check the quarantine (`lightning-nan quarantine list PATH`) and clear it if needed."
            )
        for _, size in waiting:
            yield emit(donor, size)


def track(loader: DataLoader, exclude: Exclude | None = None) -> TrackingBatchSampler | None:
    """Install a :class:`TrackingBatchSampler` in ``loader`` and return it (the existing one if tracked).

    ``exclude`` sets the indices to leave out (``None`` keeps the current setting; nothing for a new
    tracker). Returns ``None`` when indices cannot be known: an ``IterableDataset``, or a loader with
    ``batch_size=None`` (no auto-collation). With ``in_order=False`` and workers, batches can arrive
    out of order: indices are still left out, but :meth:`~TrackingBatchSampler.next_batch_indices`
    answers ``None``. Takes effect at the next ``iter(loader)``.

    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader(list(range(5)), batch_size=2, shuffle=True)
    >>> tracker = track(loader)
    >>> track(loader) is tracker, len(loader)
    (True, 3)
    >>> sorted(sum((tracker.next_batch_indices() for _ in loader), []))
    [0, 1, 2, 3, 4]
    """
    if not isinstance(loader, DataLoader):
        raise ValueError(f"Expected a torch DataLoader, got {type(loader).__name__}")
    current = loader.batch_sampler
    if isinstance(current, TrackingBatchSampler):
        if exclude is not None:
            current.exclude = exclude
        return current
    if current is None or isinstance(loader.dataset, IterableDataset):
        return None
    ordered = loader.num_workers == 0 or getattr(loader, "in_order", True)
    tracker = TrackingBatchSampler(current, () if exclude is None else exclude, ordered=ordered)
    # DataLoader.__setattr__ refuses `batch_sampler` once initialised; the check is a guard against
    # mistakes, not an invariant: `_index_sampler` and `__len__` read `self.batch_sampler` on every
    # call, and every new iterator takes `loader._index_sampler` when created
    # (`_BaseDataLoaderIter.__init__`), so the next `iter(loader)` uses the tracker.
    object.__setattr__(loader, "batch_sampler", tracker)
    # With persistent workers the loader keeps one iterator (`loader._iterator`) for its lifetime and
    # only calls `_reset`, which iterates the `_index_sampler` the iterator captured at creation:
    # point it at the tracker so that the next epoch uses it (workers never see the sampler).
    live = getattr(loader, "_iterator", None)
    if live is not None and getattr(live, "_index_sampler", None) is current:
        live._index_sampler = tracker
    return tracker


def untrack(loader: DataLoader) -> TrackingBatchSampler | None:
    """Put back the batch sampler :func:`track` wrapped in ``loader``; return the removed tracker (``None``: untracked).

    Afterwards the loader yields exactly what it did before :func:`track` (no index left out), from
    its next ``iter(loader)``; a later :func:`track` installs a new tracker.

    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader(list(range(4)), batch_size=2)
    >>> inner = loader.batch_sampler
    >>> tracker = track(loader, exclude={0})
    >>> untrack(loader) is tracker, loader.batch_sampler is inner, untrack(loader)
    (True, True, None)
    >>> [batch.tolist() for batch in loader]
    [[0, 1], [2, 3]]
    """
    if not isinstance(loader, DataLoader):
        raise ValueError(f"Expected a torch DataLoader, got {type(loader).__name__}")
    tracker = loader.batch_sampler
    if not isinstance(tracker, TrackingBatchSampler):
        return None
    inner, queue = tracker.inner, tracker._queue
    object.__setattr__(loader, "batch_sampler", inner)  # DataLoader's own guard refuses a plain assignment
    live = getattr(loader, "_iterator", None)  # a persistent workers' iterator (see `track`)
    if live is not None and getattr(live, "_index_sampler", None) is tracker:
        live._index_sampler = inner
    queue.clear()
    return tracker

