"""BatchBisection: name the data set samples behind a NaN, quarantine them, and say where the NaN appears."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks.nan_guard import NaNGuardBase
from lightning_nan.callbacks._trainer import log_metrics, run_dir, shards_parameters, starts_afresh
from lightning_nan.core.batches import BatchSplitError, batch_size, select
from lightning_nan.core.culprits import CulpritReport, find_culprits
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.errors import NonFiniteWarning
from lightning_nan.core.events import IncidentEvent, Phase
from lightning_nan.core.files import FileWarning
from lightning_nan.core.pending import PendingRecords
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record, record_key, usable_indices
from lightning_nan.core.sampling import TrackingBatchSampler, track, untrack
from lightning_nan.core.sharding import is_sharded
from lightning_nan.core.validate import boolean, choice, fs_path, integer

#: Incident kinds a re-evaluation of the batch can explain (weights and loss scale are not the data).
BISECTED_KINDS = ("loss", "input", "grad")
LOCALIZE_CHOICES = ("first", "every", "never")


class BatchBisectionBase:
    """Find the exact samples behind each NaN incident; quarantine them only when their data is bad.

    Reacts to :class:`~lightning_nan.NaNGuard`'s incidents (put NaNGuard in the same Trainer). For a
    step skipped because of a non-finite loss, input or gradient, it re-evaluates sub-batches of the
    batch (each micro-batch, with gradient accumulation) from exactly the state that failed: same
    weights, buffers/gradients/RNG restored after each pass, dropout layers held off, no optimizer
    step, ``self.log`` muted, no progress counter touched. Forward only (``no_grad``) for a
    non-finite loss; with ``torch.autograd.grad`` (no ``.grad`` write, no DDP collective) when only
    the gradients were. Adaptive splitting isolates ``d`` culprits among ``n`` samples in about
    ``d*log2(n)`` passes.
    Validation/test incidents (kinds ``val``/``test``) are bisected with ``validation_step``/``test_step``;
    their records carry ``split`` and never leave a training sample out.

    **Confirmation.** A culprit counts only if, under a fresh random state, it fails again alone and
    among the clean rest of the batch, and that rest passes without it (``2d + 1`` more passes). So
    dropout, stochastic depth or augmentation inside ``training_step``, and losses that are not a
    per-sample sum (token-count means, batch statistics), give no false culprits; groups that fail
    only together, or fail only once, are reported in ``incident.detail["bisection"]`` and kept.

    **Dirty data or trigger.** A confirmed culprit is quarantined only when its own input is bad: it
    holds NaN/Inf, a value near its dtype's limit, or it is a gross outlier against the rest of the
    batch (:mod:`~lightning_nan.core.data_evidence`). Those samples' **data set indices** (read off
    the train loader's batch sampler, so any sampler, shuffled or distributed, any ``num_workers``)
    go to ``incident.samples`` and, one record per sample, to the quarantine file (rank zero writes
    after gathering every rank's findings). A culprit with ordinary finite inputs *triggers* an
    unsafe operation in the model: it goes to ``incident.triggers``, so the fault can be reproduced,
    and is never quarantined. When every sample of the batch is non-finite (a broken pipeline),
    nothing is searched. By default quarantined samples are left out of every later epoch, and out
    of later runs that use the same file (batch count and sizes stay the same: a batch refills its
    gaps by repeating its own clean samples, so batches grouped by shape or length stay grouped; see
    :class:`~lightning_nan.core.sampling.TrackingBatchSampler`). When ``fit`` ends, or raises, the
    train loader gets its own batch sampler back. Iterable data sets have no indices: positions in
    the batch and content fingerprints are recorded instead, and the incident says so.

    On each incident (``localize="every"``) the failing samples are run once more with forward
    hooks, to name the first module whose output turns non-finite (``incident.module``), the
    operation and source line, and the state and range of its inputs; for gradient faults also the
    first parameter whose gradient does and, replayed once under anomaly mode, the backward
    operation. Nothing runs while training is healthy, except popping one list of indices per batch.

    The quarantine travels in checkpoints (its records and where the file was): a run resumed with
    ``ckpt_path``, in the same log dir or a new ``version_N``, leaves out every sample quarantined
    before, and the checkpoint's records missing from the new run's file are appended to it. A
    warning says so when the file the checkpoint names is gone or lost some of its records (to train
    on those samples again, resume with ``exclude_quarantined=False``). If the file cannot be written
    (checked at setup), training goes on: the records stay in memory and in the checkpoint, are
    retried at each write, and one warning names the file and the fix. Records that name no usable
    sample (written by hand or by another tool) are kept in the file and reported once.

    Args:
        quarantine_path: the JSON Lines file; default ``<log dir>/quarantine.jsonl``.
        exclude_quarantined: leave quarantined indices out of later epochs (and resumed runs).
        localize: ``"every"`` incident (default: each is diagnosed on its own batch), ``"first"`` only, or ``"never"``.
        splitter: ``splitter(batch, positions) -> sub_batch`` for batch types the built-in splitter
            rejects (graph batches, say); with ``sizer(batch) -> int``.
        min_size: the smallest sub-batch the model accepts; default 2 with BatchNorm in training
            mode, else 1 (smaller sets are padded with samples already shown to be clean).
        max_tests: at most this many forward passes per micro-batch for the search (confirming what it
            found adds about two per culprit and one per batch).
        dump_dir: if set, the first failing samples and the model go to
            ``<dump_dir>/nan_dump_step<step>_rank<r>.pt``; ``lightning-nan replay FILE`` reproduces the
            failure offline and prints the localization. The model is pickled (replayed with its own
            code where its class can be imported) and its failing loss exported with ``torch.export``
            (replayed without the source code, e.g. for a class defined in the training script; the
            export runs once, for the one dump, and takes seconds for a large model); a dump that
            neither way can replay elsewhere is written with a warning.
        ddp: bisect under DDP (world size > 1). ``False`` for a ``training_step`` that communicates
            (see below): every rank then skips the search alike.

    Under DDP, sub-batches are re-evaluated on the rank that holds them only, while the other ranks
    wait at the gather that follows. So ``training_step`` must not communicate: with SyncBatchNorm
    (whose forward pass communicates) bisection is off, and a ``training_step`` that calls a
    collective itself (``self.all_gather``, ``torch.distributed.all_reduce``, ...; ``self.log(...,
    sync_dist=True)`` is muted during the search) would be paired with a different collective on the
    other ranks: a hang or wrong data. For such a model pass ``ddp=False``: under DDP no incident is
    bisected (``incident.detail["bisection"]["skipped"]`` says so), while a quarantine file from an
    earlier run still applies.

    Logged (rank zero): ``bisection/forward_passes`` and ``bisection/quarantined`` at each incident.

    Example:
        >>> import tempfile, torch, pytorch_lightning as pl
        >>> from lightning_nan import BatchBisection, NaNGuard
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         (x,) = batch
        ...         return self.layer(x).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.ones(64, 2)
        >>> data[37, 1] = float("nan")
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16, shuffle=True)
        >>> root = tempfile.mkdtemp()
        >>> bisection = BatchBisection()
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[NaNGuard(), bisection], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        >>> trainer.fit(Model(), loader)
        1 non-finite incident, step ...
        ...
        >>> [incident.samples for incident in trainer.callbacks[0].incidents]  # found in epoch 0, left out of epoch 1
        [[37]]
        >>> sorted(Quarantine(bisection.quarantine_file).indices())
        [37]
    """

    #: NaNGuard calls it before the callbacks that act on incidents (they read ``incident.samples``).
    incident_phase = Phase.EVIDENCE

    def __init__(
        self,
        *,
        quarantine_path: str | os.PathLike[str] | None = None,
        exclude_quarantined: bool = True,
        localize: str = "every",
        splitter: Callable[[Any, Sequence[int]], Any] | None = None,
        sizer: Callable[[Any], int] | None = None,
        min_size: int | None = None,
        max_tests: int | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        ddp: bool = True,
    ) -> None:
        choice("localize", localize, LOCALIZE_CHOICES)
        boolean("exclude_quarantined", exclude_quarantined)
        boolean("ddp", ddp, hint="False: no bisection under DDP")
        if splitter is not None and not callable(splitter):
            raise ValueError(f"Expected `splitter` to be a function (batch, positions) -> sub_batch, got {splitter!r}")
        if sizer is not None and not callable(sizer):
            raise ValueError(f"Expected `sizer` to be a function batch -> int, got {sizer!r}")
        integer("min_size", min_size, low=1, optional=True)
        integer("max_tests", max_tests, low=1, optional=True)
        quarantine_path = fs_path("quarantine_path", quarantine_path, optional=True, hint=f"None: {QUARANTINE_FILE} in the log dir")
        dump_dir = fs_path("dump_dir", dump_dir, optional=True, kind="folder", hint="None: no dump")
        super().__init__()
        self.quarantine_path = quarantine_path
        self.exclude_quarantined = exclude_quarantined
        self.localize = localize
        self.splitter = splitter
        self.sizer = sizer
        self.min_size = min_size
        self.max_tests = max_tests
        self.dump_dir = dump_dir
        self.ddp = ddp
        #: Every report so far: one dict per incident bisected (primitives; saved in checkpoints).
        self.reports: list[dict[str, Any]] = []
        self.forward_passes = 0
        self._quarantine: Quarantine | None = None
        self._records: list[dict[str, Any]] = []  # the whole quarantine as this run knows it (file, found, restored)
        self._restored: tuple[str | None, list[dict[str, Any]]] | None = None  # from a checkpoint, applied in setup
        self._fitting = False  # between setup("fit") and teardown: a checkpoint's quarantine applies at once
        self._unwritten = PendingRecords(
            "BatchBisection", "the quarantine file", fix="make its folder writable, or pass BatchBisection(quarantine_path=...) a writable file",
            errors=(OSError, ValueError),  # ValueError: the file was made unreadable while training
        )
        self._excluded: set[int] = set()
        self._tracker: TrackingBatchSampler | None = None
        self._tracked_loaders: list[torch.utils.data.DataLoader] = []  # to give their batch samplers back
        self._indices: dict[int, list[int] | None] = {}
        self._localized = False
        self._dumped = False
        self._rank_zero = True

    @property
    def quarantine_file(self) -> str | None:
        """The quarantine file of the current run (known once ``fit`` has started)."""
        return None if self._quarantine is None else self._quarantine.path

    @property
    def quarantine_records(self) -> list[dict[str, Any]]:
        """Every quarantine record this run knows (its file, those found, those restored from a checkpoint),
        written to the file or not."""
        return [dict(r) for r in self._records]

    @property
    def quarantined(self) -> set[int]:
        """The data set indices left out of the coming epochs."""
        return set(self._excluded)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state.update(_tracker=None, _tracked_loaders=[], _indices={})
        return state

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        if not any(isinstance(cb, NaNGuardBase) for cb in trainer.callbacks):
            raise ValueError(
                "BatchBisection reacts to NaNGuard's incidents, but the Trainer has no NaNGuard: "
                "use Trainer(callbacks=[NaNGuard(), BatchBisection(...)])."
            )
        if starts_afresh(trainer):  # a new run's reports (a resume loads its own after setup)
            self.reports, self.forward_passes = [], 0
        self._rank_zero = trainer.is_global_zero
        self._quarantine = Quarantine(self.quarantine_path or os.path.join(run_dir(trainer), QUARANTINE_FILE))
        try:
            self._records = self._quarantine.records()
        except OSError:  # a folder at its path, no permission: nothing to read; the check below warns
            self._records = []
        self._unwritten.reset()
        if self._rank_zero:
            problems = self._quarantine.problems() if self._records else []
            if problems:
                warnings.warn(
                    f"BatchBisection: {self._quarantine.path} holds {len(problems)} record(s) that name no sample it can"
                    f" leave out; they stay in the file: {'; '.join(problems)}. Fix those lines (an index is an integer"
                    " >= 0) to leave their samples out.",
                    FileWarning,
                    stacklevel=2,
                )
            self._unwritten.check(self._quarantine.path)
        self._update_excluded()
        self._fitting = True
        if self._restored is not None:  # load_state_dict came first (outside Trainer.fit's own order)
            self._apply_restored()
        self._localized = self._dumped = False
        self._watch_train_loader(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore(trainer)
        if stage == "fit":
            self._fitting = False

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore(trainer)  # Lightning calls no `teardown` hook when fit raises
        self._fitting = False

    def _restore(self, trainer: Any) -> None:
        """Undo :meth:`_watch_train_loader`: the strategy's own method, the loaders' own batch samplers."""
        trainer.strategy.__dict__.pop("process_dataloader", None)
        for loader in self._tracked_loaders:
            untrack(loader)
        self._tracked_loaders, self._tracker = [], None

    def _watch_train_loader(self, trainer: Any) -> None:
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
        only, for the fit, and :meth:`_restore` gives the strategy its own method back.
        """
        strategy = trainer.strategy
        strategy.__dict__.pop("process_dataloader", None)
        original = strategy.process_dataloader

        def process_dataloader(dataloader: Any) -> Any:
            dataloader = original(dataloader)
            if trainer.training and isinstance(dataloader, torch.utils.data.DataLoader):
                self._tracker = track(dataloader, exclude=self._exclude())
                if self._tracker is not None and not any(dataloader is d for d in self._tracked_loaders):
                    self._tracked_loaders.append(dataloader)
            return dataloader

        strategy.process_dataloader = process_dataloader

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not isinstance(trainer.train_dataloader, torch.utils.data.DataLoader):  # several loaders: unknown
            self._tracker = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._tracker is not None:
            self._indices[batch_idx] = self._tracker.next_batch_indices()
            for old in [k for k in self._indices if k < batch_idx - 64]:
                del self._indices[old]

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._indices = {}
        self._write([])  # records a write could not take: one more try

    def state_dict(self) -> dict[str, Any]:
        return {
            "reports": list(self.reports),
            "forward_passes": self.forward_passes,
            "localized": self._localized,
            "quarantine_file": None if self._quarantine is None else os.path.abspath(self._quarantine.path),
            "quarantine": [dict(r) for r in self._records],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = list(state_dict.get("reports", self.reports))
        self.forward_passes = int(state_dict.get("forward_passes", self.forward_passes))
        self._localized = bool(state_dict.get("localized", self._localized))
        if "quarantine" in state_dict:  # checkpoints from before it was saved have none
            self._restored = (state_dict.get("quarantine_file"), [dict(r) for r in state_dict["quarantine"]])
            if self._fitting and self._quarantine is not None:  # Trainer.fit(ckpt_path=...): setup has run
                self._apply_restored()

    def _apply_restored(self) -> None:
        """Merge a checkpoint's quarantine into this run's: its records, and those its file gained since
        (an interrupted run appends after its last checkpoint); append the missing ones to this run's file;
        report a file the checkpoint names that is gone or lost records."""
        assert self._restored is not None and self._quarantine is not None
        old_path, saved = self._restored
        self._restored = None
        path = self._quarantine.path
        same = old_path is not None and os.path.abspath(old_path) == os.path.abspath(path)
        on_disk: list[dict[str, Any]] = self._records if same else []
        problem = "is missing" if old_path is not None and not os.path.exists(old_path) else None
        if problem is None and old_path is not None and not same:
            try:
                on_disk = Quarantine(old_path).records()
            except (ValueError, OSError) as err:
                problem = f"cannot be read ({err})"
        lost = [r for r in saved if record_key(r) not in {record_key(d) for d in on_disk}]
        if not lost:  # a file never written (no record yet) is not missing anything
            problem = None
        elif problem is None:
            problem = f"no longer holds {len(lost)} of its {len(saved)} record(s)"
        known = {record_key(r) for r in self._records}
        new = []
        for record in saved + on_disk:
            key = record_key(record)
            if key not in known:
                known.add(key)
                new.append(record)
        self._records.extend(new)
        self._update_excluded()
        if not self._rank_zero:
            return
        if new:
            self._write(new)
        if problem is not None:
            indices = sorted(usable_indices(lost))
            warnings.warn(
                f"BatchBisection: the quarantine file of the checkpoint, {old_path}, {problem}; the checkpoint's"
                f" {len(lost)} record(s) (data set indices {indices}) are kept from the checkpoint, in {path}, and"
                " left out of training. To train on them again, resume with"
                " BatchBisection(exclude_quarantined=False).",
                FileWarning,
                stacklevel=2,
            )

    def _update_excluded(self) -> None:
        train = [r for r in self._records if r.get("split", "train") == "train"]  # a validation index is not a training one
        self._excluded = usable_indices(train) if self.exclude_quarantined else set()

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (and any a write could not take before) to the quarantine file, rank zero only."""
        if self._rank_zero and self._quarantine is not None:
            self._unwritten.write(self._quarantine.path, records, self._quarantine.add)

    def _exclude(self) -> Callable[[], set[int]]:
        return lambda: self._excluded if self.exclude_quarantined else set()

    # ------------------------------------------------------------------ the incident
    def on_nan_incident(self, event: IncidentEvent) -> None:
        incident = event.incident
        if incident.kind not in BISECTED_KINDS:
            return
        if incident.detail.get("pipeline"):  # every sample is non-finite: nothing to single out
            incident.detail["bisection"] = {"step": incident.step, "skipped": "every sample's input is non-finite: a broken pipeline"}
            return
        trainer, pl_module = event.extra.get("trainer"), event.extra.get("pl_module")
        if trainer is None or pl_module is None:
            return
        if not self.ddp and world()[1] > 1:  # the same on every rank: none reaches the gather below
            incident.detail["bisection"] = {
                "step": incident.step,
                "skipped": "BatchBisection(ddp=False): no bisection under DDP (world size > 1)",
            }
            return
        locate = self.localize == "every" or (self.localize == "first" and not self._localized)
        try:
            local = self._search_local(trainer, pl_module, event, locate)
        except Exception as err:  # noqa: BLE001 - every rank must reach the gather below
            local = {"error": f"{type(err).__name__}: {err}", "records": [], "batches": [], "localization": None}
        views = gather_objects(local)  # a collective: every rank reaches it once per incident
        self._merge(trainer, incident, views, locate)

    def on_nan_eval_incident(self, event: IncidentEvent) -> None:
        """A validation/test incident: name its samples, quarantine them with their ``split``, and hand
        NaNGuard the batch without them (see :mod:`lightning_nan.callbacks._eval_bisection`)."""
        from lightning_nan.callbacks._eval_bisection import bisect_eval

        bisect_eval(self, event)

    def _search_local(self, trainer: Any, pl_module: Any, event: IncidentEvent, locate: bool) -> dict[str, Any]:
        incident = event.incident
        rank = world()[0]
        if world()[1] > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            raise RuntimeError(
                "SyncBatchNorm communicates in its forward pass, so sub-batches cannot be re-evaluated on one rank "
                "alone; BatchBisection is off for models with SyncBatchNorm under DDP."
            )
        if world()[1] > 1 and (shards_parameters(trainer) or is_sharded(list(pl_module.parameters()))):
            raise RuntimeError(
                f"{type(trainer.strategy).__name__} shards the parameters, so every forward pass gathers them from "
                "every rank and sub-batches cannot be re-evaluated on one rank alone; BatchBisection is off there."
            )
        backward = incident.kind == "grad"
        manual = not pl_module.automatic_optimization
        loss_fn_for = _loss_fn_factory(trainer, pl_module, manual)
        records: list[dict[str, Any]] = []
        batches: list[dict[str, Any]] = []
        localization = None
        for batch_idx, batch in event.batches:
            indices = self._indices.get(batch_idx)
            if indices is not None and self.splitter is None and batch_size(batch) != len(indices):
                raise BatchSplitError(
                    f"Cannot split a batch of type {type(batch).__qualname__}: its first tensor has {batch_size(batch)} rows "
                    f"but the loader put {len(indices)} samples in it. Pass `splitter=` (a function (batch, positions) -> "
                    "sub_batch) and `sizer=` (batch -> number of samples) to BatchBisection."
                )
            report: CulpritReport = find_culprits(
                loss_fn_for(batch_idx),
                batch,
                module=pl_module,
                backward=backward,
                splitter=self.splitter,
                sizer=self.sizer,
                min_size=self.min_size,
                max_tests=self.max_tests,
                locate=locate and localization is None,
            )
            known, index_of = indices is not None, indices or []  # position in the batch -> data set index
            to_index = (lambda p: index_of[p]) if known else (lambda p: None)  # noqa: E731, B023 (used in this iteration)
            facts = dict(zip(report.positions, report.evidence))
            for pos, fp, dirty_input in zip(report.positions, report.fingerprints, report.input_nonfinite):
                if pos not in report.dirty:  # triggers and unconfirmed groups are reported, never quarantined
                    continue
                if known and any(r["index"] == index_of[pos] for r in records):
                    continue  # a sample a batch repeats (to fill a quarantined one's place): one record
                reason = f"non-finite {'gradient' if backward else 'loss'}: {facts.get(pos) or 'its input is bad'}"
                records.append(
                    make_record(
                        index=to_index(pos),
                        position=pos,
                        epoch=incident.epoch,
                        step=incident.step,
                        batch_idx=batch_idx,
                        reason=reason,
                        fingerprint=fp,
                        rank=rank,
                        kind=incident.kind,
                        input_nonfinite=dirty_input,
                    )
                )
            if report.localization is not None:
                localization = dict(
                    report.localization.to_dict(), summary=report.localization.summary(), model=type(pl_module).__name__
                )
            batches.append(
                {
                    "batch_idx": batch_idx,
                    "rank": rank,
                    "size": report.size,
                    "forward_passes": report.tests + report.confirm_tests,
                    "reproduced": report.reproduced,
                    "whole_batch": report.whole_batch,
                    "complete": report.complete,
                    "indices_known": known,
                    "groups": [[to_index(p) if known else p for p in g] for g in report.groups],
                    "dirty": [to_index(p) if known else p for p in report.dirty],
                    "triggers": [to_index(p) if known else p for p in report.triggers],
                    "unconfirmed": [[to_index(p) if known else p for p in g] for g in report.unconfirmed],
                    "evidence": {str(to_index(p) if known else p): e for p, e in zip(report.positions, report.evidence) if e},
                    "confirm_passes": report.confirm_tests,
                    "seconds": round(report.seconds, 4),
                }
            )
            if self.dump_dir is not None and not self._dumped and report.groups:
                try:
                    self._dump(pl_module, batch, batch_idx, report, incident, backward, manual, indices, loss_fn_for(batch_idx))
                except Exception as err:  # noqa: BLE001 - a dump is a bonus: never lose the search for it
                    incident.detail["dump_error"] = (
                        f"{type(err).__name__}: {err}. A dump pickles the model (its class must be importable) and "
                        "exports its loss with torch.export."
                    )
        return {"error": None, "records": records, "batches": batches, "localization": localization}

    def _merge(self, trainer: Any, incident: Any, views: list[dict[str, Any]], locate: bool) -> None:
        errors = [f"rank {r}: {v['error']}" for r, v in enumerate(views) if v["error"]]
        records = [r for v in views for r in v["records"]]
        batches = [b for v in views for b in v["batches"]]
        localization = next((v["localization"] for v in views if v["localization"]), None)
        passes = sum(b["forward_passes"] for b in batches)
        self.forward_passes += passes
        indices_known = all(b["indices_known"] for b in batches) if batches else True
        summary: dict[str, Any] = {
            "step": incident.step,
            "forward_passes": passes,
            "reproduced": any(b["reproduced"] for b in batches),
            "whole_batch": any(b["whole_batch"] for b in batches),
            "indices_known": indices_known,
            "batches": batches,
        }
        if errors:
            summary["errors"] = errors
        if not indices_known:
            summary["note"] = (
                "data set indices are unknown (iterable data set or custom loader): samples are identified by their "
                "position in the batch and a content fingerprint"
            )
        if summary["whole_batch"]:
            summary["note"] = "every sample fails on its own: a model problem (weights, learning rate, an unsafe op), not the data"
        incident.detail["bisection"] = summary
        found = sorted({r["index"] for r in records if r["index"] is not None})
        triggers = sorted({i for b in batches for i in b["triggers"] if i is not None})
        unconfirmed = [g for b in batches for g in b["unconfirmed"]]
        summary["quarantined"] = found if indices_known else [(r["rank"], r["batch_idx"], r["position"]) for r in records]
        summary["triggers"] = triggers
        summary["confirm_passes"] = sum(b["confirm_passes"] for b in batches)
        if unconfirmed:
            summary["unconfirmed"] = unconfirmed
            summary["note"] = (
                "samples that fail only together, or that failed only once (not again under a fresh random state, "
                "or not among the clean rest of the batch), are reported here and not quarantined"
            )
        if triggers and indices_known:
            incident.triggers = triggers
        if records:
            incident.samples = found if indices_known else None
            if not indices_known:
                incident.detail["bisection"]["positions"] = [(r["rank"], r["batch_idx"], r["position"]) for r in records]
                incident.detail["bisection"]["fingerprints"] = [r["fingerprint"] for r in records]
        if localization is not None:
            self._localized = True
            incident.detail["localization"] = localization
            name = localization.get("module")
            if name == "" or (name is None and localization.get("op")):  # the model itself, or its training_step
                name = localization.get("module_type") or localization.get("model")
            if name is None and localization.get("backward_op"):  # a backward-only fault: where its forward ran
                name = localization.get("backward_module") or localization.get("model")
                if name == "":
                    name = localization.get("backward_module_type") or localization.get("model")
            incident.module = name
        elif locate and summary["reproduced"]:
            self._localized = True
        known = {record_key(r) for r in self._records}
        for record in records:
            if record_key(record) not in known:
                known.add(record_key(record))
                self._records.append(record)
        if self.exclude_quarantined:
            self._excluded.update(found)
        if records:
            self._write(records)
        self.reports.append({k: v for k, v in summary.items() if k != "batches"} | {"samples": found})
        log_metrics(
            trainer,
            {"bisection/forward_passes": float(passes), "bisection/quarantined": float(len(self._excluded))},
            step=incident.step,
        )
        if errors and self._rank_zero:
            warnings.warn(f"BatchBisection could not search step {incident.step}: {'; '.join(errors)}", NonFiniteWarning, stacklevel=2)

    def _dump(
        self, pl_module: Any, batch: Any, batch_idx: int, report: CulpritReport, incident: Any, backward: bool, manual: bool,
        indices: list[int] | None, loss_fn: Callable[[Any], Any],
    ) -> None:
        from lightning_nan.core.dump import write_dump

        positions = report.groups[0]
        sub = self.splitter(batch, positions) if self.splitter is not None else select(batch, positions)
        path = os.path.join(self.dump_dir, f"nan_dump_step{incident.step}_rank{world()[0]}.pt")
        write_dump(
            path,
            module=pl_module,
            batch=sub,
            batch_idx=batch_idx,
            backward=backward,
            manual=manual,
            positions=positions,
            indices=[indices[p] for p in positions] if indices is not None else None,
            incident=incident.to_dict(),
            loss_fn=loss_fn,
        )
        self._dumped = True
        incident.detail["dump"] = path


def _loss_fn_factory(trainer: Any, pl_module: Any, manual: bool) -> Callable[[int], Callable[[Any], torch.Tensor | None]]:
    """``factory(batch_idx)(sub_batch) -> loss``: the module's ``training_step``, muted, under the trainer's precision."""
    n_optimizers = len(trainer.optimizers)
    context = trainer.precision_plugin.train_step_context

    def factory(batch_idx: int) -> Callable[[Any], torch.Tensor | None]:
        def loss_fn(sub: Any) -> torch.Tensor | None:
            with context():
                return training_step_loss(pl_module, sub, batch_idx, manual=manual, n_optimizers=n_optimizers)

        return loss_fn

    return factory


def training_step_loss(pl_module: Any, batch: Any, batch_idx: int, *, manual: bool, n_optimizers: int = 1) -> torch.Tensor | None:
    """Run ``training_step`` in a sandbox and return its loss (manual optimization: the sum of the
    losses given to ``manual_backward``), or ``None`` when it returned nothing."""
    with _sandbox(pl_module, manual, n_optimizers) as losses:
        out = pl_module.training_step(batch, batch_idx)
    if manual:
        if not losses:
            return None
        return torch.stack([loss.float().sum() for loss in losses]).sum()
    if isinstance(out, dict):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) else None


class _NoOpOptimizer:
    """Stands in for the optimizers ``training_step`` reaches under manual optimization."""

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextmanager
def _sandbox(pl_module: Any, manual: bool, n_optimizers: int) -> Iterator[list[torch.Tensor]]:
    """Mute ``self.log``; under manual optimization record ``manual_backward`` losses and no-op the optimizers."""
    losses: list[torch.Tensor] = []
    patches: dict[str, Any] = {
        "log": lambda *args, **kwargs: None,
        "log_dict": lambda *args, **kwargs: None,
    }
    if manual:
        stand_ins = [_NoOpOptimizer() for _ in range(max(n_optimizers, 1))]
        patches.update(
            manual_backward=lambda loss, *args, **kwargs: losses.append(loss),
            optimizers=lambda *args, **kwargs: stand_ins[0] if len(stand_ins) == 1 else stand_ins,
            lr_schedulers=lambda *args, **kwargs: None,
            toggle_optimizer=lambda *args, **kwargs: None,
            untoggle_optimizer=lambda *args, **kwargs: None,
        )
    with patched(pl_module, patches):
        yield losses


@contextmanager
def patched(pl_module: Any, patches: dict[str, Any]) -> Iterator[None]:
    """Shadow methods of this module instance (``self.log``, ...) with ``patches`` for the block, then put
    back exactly what the instance had (its class's methods are never touched)."""
    saved = {name: pl_module.__dict__[name] for name in patches if name in pl_module.__dict__}
    try:
        for name, fn in patches.items():
            object.__setattr__(pl_module, name, fn)  # past nn.Module.__setattr__: plain attributes, not submodules
        yield
    finally:
        for name in patches:
            if name in saved:
                object.__setattr__(pl_module, name, saved[name])
            else:
                pl_module.__dict__.pop(name, None)
