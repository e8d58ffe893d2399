"""Which data set indices each training batch holds: the train loader's batch sampler, tracked for a fit.

:class:`TrainLoaderTracking` installs a :class:`~lightning_nan.core.sampling.TrackingBatchSampler`
in the train loader as Lightning prepares it (leaving quarantined indices out), pops each batch's
indices at ``on_train_batch_start`` and gives the loader its own batch sampler back when the fit ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.sampling import TrackingBatchSampler, track, untrack

__all__ = ["TrainLoaderTracking"]

#: Batches whose indices are kept (an incident with gradient accumulation looks back over its micro-batches).
_KEEP = 64


class TrainLoaderTracking:
    """The data set indices of the recent training batches (``None`` per batch where unknown)."""

    def __init__(self) -> None:
        self.tracker: TrackingBatchSampler | None = None
        self.loaders: list[torch.utils.data.DataLoader] = []  # to give their batch samplers back
        #: batch_idx -> the data set indices of that batch
        self.indices: dict[int, list[int] | None] = {}
        self._own: Any = None  # the strategy instance's own process_dataloader before watch(), if it had one

    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": None, "loaders": [], "indices": {}, "_own": None}

    def watch(self, trainer: TrainerLike, exclude: Callable[[], set[int]]) -> None:
        """Track the train loader's batch sampler from the moment Lightning has prepared the loader.

        Lightning builds the train loader (adding a DistributedSampler under DDP), hands it to
        ``strategy.process_dataloader`` and makes the first epoch's iterator right away, before any
        callback hook runs; so the tracker goes in at that call, and the data order, the RNG and the
        epoch's iterator are exactly what they would be without this callback.

        Why not a public hook (Lightning 2.6, ``FitLoop.setup_data``): ``setup`` and ``on_fit_start``
        run before the loader exists (``trainer.train_dataloader`` is ``None``; it is requested, and
        re-made with a DistributedSampler, inside ``setup_data``), and ``setup_data`` ends with
        ``iter(self._data_fetcher)``, which makes the iterator of the first epoch, and of the epoch a
        checkpoint resumes in (``TrainingEpochLoop.on_run_start`` calls ``iter`` again only for later
        epochs of an unresumed run), before ``on_train_start`` or ``on_train_epoch_start``. By then the
        iterator holds the untracked batch sampler (``_BaseDataLoaderIter`` captures it at creation),
        its base seed is drawn from torch's RNG, and with ``num_workers > 0`` the indices of the first
        ``prefetch_factor * num_workers`` batches are already handed to the workers. Tracking from
        ``on_train_epoch_start`` (tried: ``track(trainer.train_dataloader)``) knows no index in those
        epochs and leaves no quarantined sample out of a resumed epoch: 31 of the 40 tests in
        tests/callbacks/test_batch_bisection.py fail. Making a new iterator there would draw another
        seed from the RNG (another order, other worker seeds) and cannot reach the fit loop's fetcher
        without its private attributes. ``Strategy.process_dataloader`` is the one public method
        between the loader's making and its first iterator; it is wrapped on this strategy instance
        only, for the fit, and :meth:`restore` gives the strategy its own method back.
        """
        strategy = trainer.strategy
        original, own = strategy.process_dataloader, vars(strategy).get("process_dataloader")
        if getattr(own, "_tracks_train_loader", False):  # a wrapper an interrupted fit left: start from what it had
            original, own = own.__wrapped__, own.own_before
        self._own = own

        def process_dataloader(dataloader: Any) -> Any:
            dataloader = original(dataloader)
            if trainer.training and isinstance(dataloader, torch.utils.data.DataLoader):
                self.tracker = track(dataloader, exclude=exclude)
                if self.tracker is not None and not any(dataloader is d for d in self.loaders):
                    self.loaders.append(dataloader)
            return dataloader

        process_dataloader.__wrapped__ = original  # type: ignore[attr-defined]
        process_dataloader._tracks_train_loader = True  # type: ignore[attr-defined]
        process_dataloader.own_before = own  # type: ignore[attr-defined]
        strategy.process_dataloader = process_dataloader

    def restore(self, trainer: TrainerLike) -> None:
        """Undo :meth:`watch`: the strategy's own method (or what the instance had), the loaders' own batch samplers."""
        strategy = trainer.strategy
        if getattr(vars(strategy).get("process_dataloader"), "_tracks_train_loader", False):
            if self._own is not None:
                strategy.process_dataloader = self._own
            else:
                del strategy.process_dataloader
        self._own = None
        for loader in self.loaders:
            untrack(loader)
        self.loaders, self.tracker = [], None

    def epoch_start(self, trainer: TrainerLike) -> None:
        """Several train loaders (a CombinedLoader): which one a sample came from is unknown."""
        if not isinstance(trainer.train_dataloader, torch.utils.data.DataLoader):
            self.tracker = None

    def batch_start(self, batch_idx: int) -> None:
        """Pop the indices of the batch about to be trained on; forget those long past."""
        if self.tracker is not None:
            self.indices[batch_idx] = self.tracker.next_batch_indices()
            for old in [k for k in self.indices if k < batch_idx - _KEEP]:
                del self.indices[old]
