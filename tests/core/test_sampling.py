import itertools

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, SequentialSampler

from lightning_nan.core.sampling import TrackingBatchSampler, track, untrack


class IndexData(Dataset):
    """Sample ``i`` is ``i`` itself, so a batch's content tells which indices it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i)


class Every3rdReversed(Sampler):
    """A custom sampler: 3k+2 first, then the rest, both descending."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(sorted(range(self.n), key=lambda i: (i % 3 != 2, -i)))

    def __len__(self):
        return self.n


def _expected(inner_batches, excluded):
    """Independent reference: each batch keeps its clean indices and cycles them to its size; a batch with
    none takes the clean ones of the nearest batch that has some (the earlier one on a tie)."""
    clean = [[i for i in b if i not in excluded] for b in inner_batches]
    out = []
    for k, b in enumerate(inner_batches):
        source = clean[k] or clean[min((j for j in range(len(clean)) if clean[j]), key=lambda j: (abs(j - k), j))]
        out.append(list(itertools.islice(itertools.cycle(source), len(b))))
    return out


def _loader(kind, n=23, batch_size=4, num_workers=0, **kw):
    ds = IndexData(n)
    if kind == "shuffle":
        generator = torch.Generator().manual_seed(3)
        return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator, **kw)
    if kind in ("ddp0", "ddp1"):
        sampler = DistributedSampler(ds, num_replicas=2, rank=int(kind[-1]), shuffle=True, seed=5)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, **kw)
    if kind == "custom":
        return DataLoader(ds, batch_size=batch_size, sampler=Every3rdReversed(n), num_workers=num_workers, **kw)
    if kind == "custom_batches":  # a custom batch sampler: a plain list of uneven batches
        batches = [[5, 1], [0, 2, 9, 7, 3], [4], [8, 6, 22, 21], list(range(10, 21))]
        return DataLoader(ds, batch_sampler=batches, num_workers=num_workers, **kw)
    raise AssertionError(kind)


KINDS = ["shuffle", "ddp0", "ddp1", "custom", "custom_batches"]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_fifo_gives_the_delivered_indices(kind, num_workers):
    loader = _loader(kind, num_workers=num_workers)
    n_batches = len(loader)
    excluded = {2, 9, 14}
    tracker = track(loader, exclude=excluded)
    for _epoch in range(2):
        if isinstance(loader.sampler, DistributedSampler):
            _set_sampler_epoch(loader, _epoch)
        seen = []
        for batch in loader:
            indices = tracker.next_batch_indices()
            assert indices == batch.tolist()
            seen.append(indices)
        assert tracker.next_batch_indices() is None
        assert len(seen) == n_batches == len(loader)
        assert not excluded & set(itertools.chain(*seen))


@pytest.mark.parametrize("kind", KINDS)
def test_batches_match_the_reference_and_keep_their_sizes(kind):
    reference_loader, loader = _loader(kind), _loader(kind)  # two identical, independently seeded loaders
    excluded = {0, 1, 4, 7, 13, 19, 21, 22}  # custom_batches: [4] has no clean index left
    tracker = TrackingBatchSampler(loader.batch_sampler, exclude=excluded)
    for epoch in range(3):
        for dl in (reference_loader, loader):
            _set_sampler_epoch(dl, epoch)
        inner = list(reference_loader.batch_sampler)
        got = list(tracker)
        assert got == _expected(inner, excluded)
        assert [len(b) for b in got] == [len(b) for b in inner]
        assert all(set(g) <= set(b) for g, b in zip(got, inner) if set(b) - excluded)  # nothing from other batches
        assert len(got) == len(tracker) == len(loader.batch_sampler)
        assert tracker.excluded_this_epoch() == sum(i in excluded for b in inner for i in b)


def test_gaps_are_refilled_from_the_same_batch():
    inner = BatchSampler(SequentialSampler(range(10)), 4, drop_last=False)
    assert list(TrackingBatchSampler(inner, exclude={1, 2})) == [[0, 3, 0, 3], [4, 5, 6, 7], [8, 9]]
    inner = BatchSampler(SequentialSampler(range(9)), 4, drop_last=True)
    assert list(TrackingBatchSampler(inner, exclude={0, 5})) == [[1, 2, 3, 1], [4, 6, 7, 4]]
    inner = BatchSampler(SequentialSampler(range(8)), 4, drop_last=False)
    assert list(TrackingBatchSampler(inner, exclude={0, 1, 2})) == [[3, 3, 3, 3], [4, 5, 6, 7]]


def test_a_batch_with_no_clean_index_takes_the_nearest_batch():
    inner = BatchSampler(SequentialSampler(range(6)), 2, drop_last=False)
    tracker = TrackingBatchSampler(inner, exclude=[0, 1, 2, 3])  # the first two: only a later batch is clean
    assert list(tracker) == [[4, 5], [4, 5], [4, 5]]
    assert tracker.excluded_this_epoch() == 4
    inner = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9, 10]]
    # batches 1..3 are empty: 1 is nearest to 0, 2 is as near to 0 as to 4 (the earlier wins), 3 is nearest to 4
    got = list(TrackingBatchSampler(inner, exclude={2, 3, 4, 5, 6, 7, 9}))
    assert got == [[0, 1], [0, 1], [0, 1], [8, 10], [8, 10, 8]]
    assert list(TrackingBatchSampler(inner, exclude=set(range(8, 11)))) == [[0, 1], [2, 3], [4, 5], [6, 7], [6, 7, 6]]


class ShapedData(Dataset):
    """Samples 0..7 have 2 features, 8..15 have 3: a batch mixing both cannot be collated."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((2 if i < 8 else 3,), float(i))


class Buckets(Sampler):
    """A grouping batch sampler (as for aspect ratios or lengths): every batch holds equal shapes, shuffled."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):
        groups = [torch.randperm(8, generator=self.generator) + base for base in (0, 8)]
        batches = [g[k : k + 4].tolist() for g in groups for k in (0, 4)]
        return iter([batches[k] for k in torch.randperm(4, generator=self.generator).tolist()])

    def __len__(self):
        return 4


def test_a_grouping_batch_sampler_keeps_its_groups():
    loader = DataLoader(ShapedData(), batch_sampler=Buckets())
    tracker = track(loader, exclude={2, 9, 10, 11})
    for _epoch in range(3):
        batches = [batch for batch in loader]  # collating a mixed batch would raise "stack expects ..."
        for batch in batches:
            indices = tracker.next_batch_indices()
            assert batch[:, 0].long().tolist() == indices and len(indices) == 4
            assert len({i < 8 for i in indices}) == 1  # one group per batch
        seen = {i for batch in batches for i in batch[:, 0].long().tolist()}
        assert not seen & {2, 9, 10, 11} and seen == set(range(16)) - {2, 9, 10, 11}


def test_everything_excluded_is_a_clear_error():
    tracker = TrackingBatchSampler(BatchSampler(SequentialSampler(range(4)), 2, False), exclude=range(4))
    with pytest.raises(RuntimeError, match="quarantine"):
        list(tracker)


def test_a_growing_quarantine_applies_from_the_next_iteration():
    quarantined = set()
    inner = BatchSampler(SequentialSampler(range(8)), 3, drop_last=False)
    tracker = TrackingBatchSampler(inner, exclude=lambda: quarantined)
    it = iter(tracker)
    assert next(it) == [0, 1, 2]
    quarantined.update({4, 5})  # found bad during this epoch
    assert list(it) == [[3, 4, 5], [6, 7]]  # the running iteration is unchanged
    assert tracker.excluded_this_epoch() == 0
    assert list(tracker) == [[0, 1, 2], [3, 3, 3], [6, 7]]
    assert tracker.excluded_this_epoch() == 2


def test_an_abandoned_iteration_does_not_disturb_the_queue():
    tracker = TrackingBatchSampler(BatchSampler(SequentialSampler(range(8)), 2, False), exclude={3})
    old = iter(tracker)
    assert next(old) == [0, 1]
    new = iter(tracker)  # e.g. the loop broke off and the loader was iterated again
    assert next(new) == [0, 1] and next(old) == [2, 2]
    assert next(new) == [2, 2]
    assert [tracker.next_batch_indices() for _ in range(3)] == [[0, 1], [2, 2], None]
    assert tracker.excluded_this_epoch() == 1


def test_lazy_stream_reads_only_what_it_needs():
    pulled = []

    def inner_batches():
        for b in ([0, 1], [2, 3], [4, 5], [6, 7]):
            pulled.append(b)
            yield b

    class Inner:
        def __iter__(self):
            return inner_batches()

        def __len__(self):
            return 4

    it = iter(TrackingBatchSampler(Inner(), exclude={1}))
    assert next(it) == [0, 0] and pulled == [[0, 1]]
    assert next(it) == [2, 3] and len(pulled) == 2
    pulled.clear()
    it = iter(TrackingBatchSampler(Inner(), exclude={0, 1}))  # the first batch waits for its donor, the next one
    assert next(it) == [2, 3] and pulled == [[0, 1], [2, 3]]
    assert next(it) == [2, 3] and len(pulled) == 2


def test_ddp_ranks_keep_equal_step_counts_with_a_global_quarantine():
    ds = IndexData(30)
    # every quarantined index sits in rank 0's shard, none in rank 1's
    shards = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1)) for r in (0, 1)]
    excluded = set(shards[0][:5])
    assert not excluded & set(shards[1])
    batches = {}
    for rank in (0, 1):
        loader = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1))
        tracker = track(loader, exclude=excluded)
        batches[rank] = [b.tolist() for b in loader]
        assert [len(b) for b in batches[rank]] == [4, 4, 4, 3]
        assert tracker.excluded_this_epoch() == (5 if rank == 0 else 0)
    assert len(batches[0]) == len(batches[1])
    assert batches[1] == [shards[1][i : i + 4] for i in range(0, 15, 4)]  # untouched rank: unchanged
    s = shards[0]  # its first batch has no clean index left: it takes the next batch's clean ones
    assert batches[0] == [[s[5], s[6], s[7], s[5]]] * 2 + [s[8:12], s[12:15]]


def test_set_epoch_still_reshuffles_a_distributed_sampler_through_the_wrapper():
    ds = IndexData(40)
    loader = DataLoader(ds, batch_size=5, sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=7))
    tracker = track(loader)
    assert tracker.sampler is loader.sampler
    orders = []
    for epoch in range(3):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls each epoch
        reference = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        order = [i for b in loader for i in b.tolist()]
        assert order == list(reference)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    tracker.set_epoch(0)
    assert [i for b in loader for i in b.tolist()] == orders[0]


def test_track_installs_once_and_keeps_the_loader_working():
    loader = DataLoader(IndexData(10), batch_size=3, drop_last=True)
    inner = loader.batch_sampler
    tracker = track(loader)
    assert isinstance(tracker, TrackingBatchSampler) and tracker.inner is inner
    assert track(loader) is tracker and loader.batch_sampler is tracker
    assert len(loader) == 3 and loader.batch_size == 3 and tracker.batch_size == 3 and tracker.drop_last
    assert [b.tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert track(loader, exclude={0}) is tracker  # updates the exclusion
    # the inner sampler drops 9 (drop_last), so the short tail is padded with the first clean index
    assert [b.tolist() for b in loader] == [[1, 2, 1], [3, 4, 5], [6, 7, 8]]
    assert track(loader) is tracker and tracker.exclude == {0}
    with pytest.raises(ValueError, match="batch_sampler"):
        loader.batch_sampler = inner  # DataLoader's own guard is still in place


def test_out_of_order_delivery_still_excludes_but_reports_no_indices():
    loader = DataLoader(IndexData(16), batch_size=4, num_workers=2, in_order=False)
    tracker = track(loader, exclude={4, 5})
    assert not tracker.ordered
    delivered = []
    for batch in loader:
        assert tracker.next_batch_indices() is None
        delivered += batch.tolist()
    assert sorted(delivered) == sorted(list(range(4)) + [6, 7, 6, 7] + list(range(8, 16)))
    assert track(DataLoader(IndexData(4), batch_size=2, in_order=False)).ordered  # no workers: in order


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(6))


def test_track_returns_none_when_indices_cannot_be_known():
    assert track(DataLoader(Stream(), batch_size=2)) is None
    assert track(DataLoader(IndexData(4), batch_size=None)) is None
    with pytest.raises(ValueError, match="DataLoader"):
        track([[0, 1]])
    with pytest.raises(ValueError, match="`exclude`"):
        TrackingBatchSampler([[0]], exclude=3)


def test_track_takes_effect_on_a_live_persistent_worker_iterator():
    loader = DataLoader(IndexData(12), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    first = [b.tolist() for b in loader]  # creates the persistent iterator with the plain batch sampler
    assert sorted(itertools.chain(*first)) == list(range(12))
    tracker = track(loader, exclude={0, 5})
    for _ in range(2):
        for batch in loader:
            assert tracker.next_batch_indices() == batch.tolist()
            assert not {0, 5} & set(batch.tolist())
    assert tracker.excluded_this_epoch() == 2


def test_untrack_puts_the_loader_back_and_a_new_track_works():
    loader = DataLoader(IndexData(10), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    reference = DataLoader(IndexData(10), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    inner = loader.batch_sampler
    tracker = track(loader, exclude={3})
    assert all(3 not in b.tolist() for b in loader) and len(loader) == 3
    reference_first = [b.tolist() for b in reference]
    assert untrack(loader) is tracker and loader.batch_sampler is inner and untrack(loader) is None
    assert [b.tolist() for b in loader] == [b.tolist() for b in reference]  # the same as never tracked
    assert sorted(itertools.chain(*reference_first)) == list(range(10))
    again = track(loader, exclude={5})  # e.g. a second fit
    assert again is not tracker and again.inner is inner
    for batch in loader:
        assert again.next_batch_indices() == batch.tolist() and 5 not in batch.tolist()
    with pytest.raises(ValueError, match="DataLoader"):
        untrack([[0, 1]])


def test_untrack_reaches_a_live_persistent_worker_iterator():
    loader = DataLoader(IndexData(8), batch_size=4, num_workers=2, persistent_workers=True)
    tracker = track(loader, exclude={0, 1})
    assert [b.tolist() for b in loader] == [[2, 3, 2, 3], [4, 5, 6, 7]]  # creates the persistent iterator
    assert untrack(loader) is tracker
    for _ in range(2):
        assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# --- Under a real Lightning Trainer -------------------------------------------------------------------
#
# What a callback can reach: ``trainer.train_dataloader`` is the DataLoader itself (``fit_loop.
# _combined_loader.iterables``, after Lightning's processing, e.g. DistributedSampler injection), not a
# CombinedLoader, when ``train_dataloader()`` returns one loader. ``FitLoop.setup_data`` creates the
# first epoch's DataLoader iterator (``iter(self._data_fetcher)``) before ``on_train_start``, so a
# tracker installed in ``on_train_start``/``on_train_epoch_start`` only sees later epochs (the
# training epoch loop calls ``iter`` again after ``on_train_epoch_start`` when ``current_epoch > 0``
# and the run is not resuming). Re-creating the iterator right after installing,
# ``iter(trainer.fit_loop._data_fetcher)``, makes the first epoch (and a resumed one) tracked too.


class _FloatIndexData(IndexData):
    def __getitem__(self, i):
        return torch.tensor([float(i)])


def _fit(ns, tmp_path, callback, *, max_epochs=2, num_workers=2, ckpt_path=None, n=22, persistent=False):
    class Model(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return DataLoader(
                _FloatIndexData(n), batch_size=4, shuffle=True, num_workers=num_workers, persistent_workers=persistent
            )

    trainer = ns.pl.Trainer(
        max_epochs=max_epochs, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
        logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(Model(), ckpt_path=ckpt_path)
    return trainer


class _Recorder:
    """Installs ``track`` in ``on_train_epoch_start``; records (epoch, batch_idx, data, tracked indices)."""

    def __init__(self, restart, quarantine_at=None):
        self.restart, self.quarantine_at = restart, quarantine_at
        self.quarantined, self.rows, self.tracker, self.loader_types = set(), [], None, []

    def on_train_epoch_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        self.loader_types.append(type(loader))
        new = not isinstance(loader.batch_sampler, TrackingBatchSampler)
        self.tracker = track(loader, exclude=lambda: self.quarantined)
        if new and self.restart:
            iter(trainer.fit_loop._data_fetcher)  # the live iterator predates the tracker: re-create it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        indices = self.tracker.next_batch_indices()
        self.rows.append((trainer.current_epoch, batch_idx, batch.flatten().long().tolist(), indices))
        if (trainer.current_epoch, batch_idx) == self.quarantine_at:
            self.quarantined.update(indices)


def _callback(ns, args):
    return type("RecorderCallback", (_Recorder, ns.pl.Callback), {})(*args)


@pytest.mark.parametrize("persistent", [False, True])
def test_lightning_fit_tracks_every_batch_when_the_iterator_is_recreated(ns, tmp_path, persistent):
    cb = _callback(ns, (True, (0, 1)))
    _fit(ns, tmp_path, cb, persistent=persistent)
    assert cb.loader_types == [DataLoader, DataLoader]
    epochs = {e: [r for r in cb.rows if r[0] == e] for e in (0, 1)}
    assert [len(epochs[e]) for e in (0, 1)] == [6, 6]  # 22 samples, batches of 4: the count never changes
    for _epoch, _batch_idx, data, indices in cb.rows:
        assert indices == data  # the dataset index of every sample, as the data itself says
    assert sorted(i for r in epochs[0] for i in r[2]) == list(range(22))
    bad = set(epochs[0][1][2])
    assert cb.quarantined == bad and len(bad) == 4
    assert not bad & {i for r in epochs[1] for i in r[2]}  # left out from the next epoch on
    assert [len(r[2]) for r in epochs[1]] == [4, 4, 4, 4, 4, 2]
    assert cb.tracker.excluded_this_epoch() == 4


def test_lightning_fit_without_recreating_tracks_from_the_second_epoch(ns, tmp_path):
    cb = _callback(ns, (False,))
    _fit(ns, tmp_path, cb, num_workers=0)
    assert [r[3] for r in cb.rows if r[0] == 0] == [None] * 6  # epoch 0's iterator predates the tracker
    assert [r[3] for r in cb.rows if r[0] == 1] == [r[2] for r in cb.rows if r[0] == 1]


def test_lightning_resumed_fit_is_tracked_with_the_same_recipe(ns, tmp_path):
    ckpt = tmp_path / "one_epoch.ckpt"
    first = _fit(ns, tmp_path, _callback(ns, (True,)), max_epochs=1, num_workers=0)
    first.save_checkpoint(ckpt)
    cb = _callback(ns, (True,))
    cb.quarantined.update({0, 1, 2})
    _fit(ns, tmp_path, cb, max_epochs=2, num_workers=0, ckpt_path=ckpt)
    assert [r[0] for r in cb.rows] == [1] * 6
    assert all(r[3] == r[2] for r in cb.rows)
    assert not {0, 1, 2} & {i for r in cb.rows for i in r[2]}
