"""Know which dataset indices each batch holds, and leave quarantined samples out.

:class:`TrackingBatchSampler` wraps a DataLoader's batch sampler. It drops quarantined indices and
re-forms batches of exactly the inner sizes (so every epoch has the same number of batches, on every
rank), and it queues the indices of each batch it yields. A DataLoader delivers batches in the order
its batch sampler yielded them (with ``num_workers > 0`` too, the default ``in_order=True``), so
popping one entry per delivered batch gives that batch's dataset indices.

>>> import torch
>>> from torch.utils.data import DataLoader
>>> loader = DataLoader(list(range(10)), batch_size=4)
>>> tracker = track(loader, exclude={1, 2})
>>> for batch in loader:
...     print(batch.tolist(), tracker.next_batch_indices())
[0, 3, 4, 5] [0, 3, 4, 5]
[6, 7, 8, 9] [6, 7, 8, 9]
[0, 3] [0, 3]
>>> len(loader), tracker.excluded_this_epoch()
(3, 2)
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

    Batches keep the sizes of the inner batches: the gap an excluded index leaves is filled from the
    following inner batches, and when the stream runs short at the end of the iteration the last
    batches are padded with the first clean indices of that iteration (as ``DistributedSampler``
    pads). Under DDP every rank therefore keeps the same number of steps.

    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> tracker = TrackingBatchSampler(BatchSampler(SequentialSampler(range(7)), 3, False), exclude=[4])
    >>> list(tracker), len(tracker)
    ([[0, 1, 2], [3, 5, 6], [0]], 3)
    >>> tracker.next_batch_indices(), tracker.next_batch_indices()
    ([0, 1, 2], [3, 5, 6])
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
        target = self.inner if callable(getattr(self.inner, "set_epoch", None)) else self.sampler
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
        def emit(out: list[int]) -> list[int]:
            if self.ordered and generation == self._generation:
                self._queue.append(list(out))  # a copy: the consumer of ``out`` may change it
            return out

        pending: deque[int] = deque()  # clean indices not yet placed in a batch
        sizes: deque[int] = deque()  # sizes of the inner batches not yet yielded
        head: list[int] = []  # the first clean indices of this iteration, to pad a short tail
        for batch in self.inner:
            batch = [int(i) for i in batch]
            sizes.append(len(batch))
            for i in batch:
                if i in excluded:
                    self._excluded += generation == self._generation
                else:
                    pending.append(i)
                    if len(head) < len(excluded):
                        head.append(i)
            while sizes and len(pending) >= sizes[0]:
                yield emit([pending.popleft() for _ in range(sizes.popleft())])
        if not sizes:
            return
        if not head:
            raise RuntimeError(
                f"Every sample of this iteration is excluded ({self._excluded} quarantined indices), so no batch"
                " can be formed. Check the quarantine (`lightning-nan quarantine list PATH`) and clear it if needed."
            )
        pad = 0
        while sizes:
            out = list(pending)[: sizes[0]]
            pending.clear()
            while len(out) < sizes[0]:
                out.append(head[pad % len(head)])
                pad += 1
            sizes.popleft()
            yield emit(out)


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

