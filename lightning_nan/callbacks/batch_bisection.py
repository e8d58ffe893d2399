"""BatchBisection: name the data set samples behind a NaN, quarantine them, and say where the NaN appears."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from lightning_nan.callbacks._bisection_search import RankFindings, merge, search_local
from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._quarantine_keeper import QuarantineKeeper
from lightning_nan.callbacks._train_loader_tracking import TrainLoaderTracking
from lightning_nan.callbacks._trainer import run_dir, starts_afresh
from lightning_nan.callbacks._training_step import patched, training_step_loss
from lightning_nan.callbacks._types import TrainerLike, callbacks_of
from lightning_nan.core.distributed import gather_objects, world
from lightning_nan.core.events import Evidence, IncidentEvent, Phase
from lightning_nan.core.quarantine import QUARANTINE_FILE
from lightning_nan.core.records import BisectionRecord
from lightning_nan.core.validate import boolean, choice, fs_path, integer

__all__ = ["BISECTED_KINDS", "LOCALIZE_CHOICES", "BatchBisectionBase", "patched", "training_step_loss"]

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
    only together, or fail only once, are reported in ``incident.bisection`` and kept.

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
    bisected (``incident.bisection.skipped`` says so), while a quarantine file from an
    earlier run still applies.

    Logged (rank zero): ``bisection/forward_passes`` and ``bisection/quarantined`` at each incident.

    Example:
        >>> import tempfile, torch, pytorch_lightning as pl
        >>> from lightning_nan import BatchBisection, NaNGuard
        >>> from lightning_nan.core import Quarantine
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
        self._keeper = QuarantineKeeper(exclude=exclude_quarantined)
        self._fitting = False  # between setup("fit") and teardown: a checkpoint's quarantine applies at once
        self._loader = TrainLoaderTracking()
        self._localized = False
        self._dumped = False

    @property
    def incident_evidence(self) -> frozenset[Evidence]:
        """What it establishes about the next incident: the samples, and where the NaN starts when it localizes it."""
        localizes = self.localize == "every" or (self.localize == "first" and not self._localized)
        return frozenset({Evidence.SAMPLES, Evidence.LOCALIZATION} if localizes else {Evidence.SAMPLES})

    @property
    def quarantine_file(self) -> str | None:
        """The quarantine file of the current run (known once ``fit`` has started)."""
        return self._keeper.path

    @property
    def quarantine_records(self) -> list[dict[str, Any]]:
        """Every quarantine record this run knows (its file, those found, those restored from a checkpoint),
        written to the file or not."""
        return [dict(r) for r in self._keeper.records]

    @property
    def quarantined(self) -> set[int]:
        """The data set indices left out of the coming epochs."""
        return set(self._keeper.excluded)

    def batch_indices(self, batch_idx: int) -> list[int] | None:
        """The data set indices of the training batch ``batch_idx`` of this epoch (``None``: unknown)."""
        return self._loader.indices.get(batch_idx)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        from lightning_nan.callbacks.nan_guard import NaNGuardBase  # it imports this module

        check_namespace(self, trainer)
        if stage != "fit":
            return
        if not any(isinstance(cb, NaNGuardBase) for cb in callbacks_of(trainer)):
            raise ValueError(
                "BatchBisection reacts to NaNGuard's incidents, but the Trainer has no NaNGuard: "
                "use Trainer(callbacks=[NaNGuard(), BatchBisection(...)])."
            )
        if starts_afresh(trainer):  # a new run's reports (a resume loads its own after setup)
            self.reports, self.forward_passes = [], 0
        self._keeper.exclude = self.exclude_quarantined
        self._keeper.open(self.quarantine_path or os.path.join(run_dir(trainer), QUARANTINE_FILE), rank_zero=trainer.is_global_zero)
        self._fitting = True
        self._localized = self._dumped = False
        self._loader.watch(trainer, exclude=lambda: self._keeper.excluded if self.exclude_quarantined else set())

    def teardown(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        self._loader.restore(trainer)
        if stage == "fit":
            self._fitting = False

    def on_exception(self, trainer: TrainerLike, pl_module: Any, exception: BaseException) -> None:
        self._loader.restore(trainer)  # Lightning calls no `teardown` hook when fit raises
        self._fitting = False

    def on_train_epoch_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._loader.epoch_start(trainer)

    def on_train_batch_start(self, trainer: TrainerLike, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._loader.batch_start(batch_idx)

    def on_train_end(self, trainer: TrainerLike, pl_module: Any) -> None:
        self._loader.indices = {}
        self._keeper.write([])  # records a write could not take: one more try

    def state_dict(self) -> dict[str, Any]:
        return {"reports": list(self.reports), "forward_passes": self.forward_passes, "localized": self._localized, **self._keeper.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reports = list(state_dict.get("reports", self.reports))
        self.forward_passes = int(state_dict.get("forward_passes", self.forward_passes))
        self._localized = bool(state_dict.get("localized", self._localized))
        if "quarantine" in state_dict:  # checkpoints from before it was saved have none
            # Trainer.fit(ckpt_path=...): setup has run, the records apply now; else at setup
            self._keeper.restore(state_dict.get("quarantine_file"), state_dict["quarantine"], now=self._fitting)

    # ------------------------------------------------------------------ the incident
    def on_nan_incident(self, event: IncidentEvent) -> None:
        """A training incident: bisect its batches on every rank, gather, quarantine (see the class)."""
        incident = event.incident
        if incident.kind not in BISECTED_KINDS:
            return
        if incident.detail.get("pipeline"):  # every sample is non-finite: nothing to single out
            incident.bisection = BisectionRecord(step=incident.step, skipped="every sample's input is non-finite: a broken pipeline")
            return
        trainer, pl_module = event.extra.get("trainer"), event.extra.get("pl_module")
        if trainer is None or pl_module is None:
            return
        if not self.ddp and world()[1] > 1:  # the same on every rank: none reaches the gather below
            incident.bisection = BisectionRecord(step=incident.step, skipped="BatchBisection(ddp=False): no bisection under DDP (world size > 1)")
            return
        locate = self.localize == "every" or (self.localize == "first" and not self._localized)
        try:
            local = search_local(self, trainer, pl_module, event, locate)
        except Exception as err:  # noqa: BLE001 - every rank must reach the gather below
            local = RankFindings(error=f"{type(err).__name__}: {err}")
        views = gather_objects(local)  # a collective: every rank reaches it once per incident
        merge(self, trainer, incident, views, locate)

    def on_nan_eval_incident(self, event: IncidentEvent) -> None:
        """A validation/test incident: name its samples, quarantine them with their ``split``, and hand
        NaNGuard the batch without them (see :mod:`lightning_nan.callbacks._eval_bisection`)."""
        from lightning_nan.callbacks._eval_bisection import bisect_eval

        bisect_eval(self, event)
