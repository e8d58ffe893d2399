"""Snapshots of a training state in host memory (and on disk), pending until declared known-good.

Pure PyTorch; the Lightning callback :class:`~lightning_nan.CheckpointRollback` drives it. A
:class:`SnapshotStore` copies a model's ``state_dict``, the optimizers', schedulers' and AMP
scaler's states (every tensor, to CPU; asynchronously from a GPU, into pinned memory) so that later
in-place updates do not touch the copy, and writes them back in place, bit for bit. A new snapshot
is *pending* until :meth:`SnapshotStore.promote` declares it *good* (the caller decides when, with
:func:`~lightning_nan.core.known_good.check_known_good`); the newest ``max_snapshots`` good ones
are kept, in memory and optionally on disk.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> model(torch.ones(1, 2)).sum().backward(); opt.step()
>>> store = SnapshotStore(max_snapshots=2)
>>> snap = store.take(1, model, [opt])
>>> before = [p.detach().clone() for p in model.parameters()]
>>> with torch.no_grad():
...     _ = model.weight.fill_(float("nan"))  # training goes wrong
>>> good = store.promote()
>>> _ = store.restore(store.newest, model, [opt])
>>> all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
True
"""

from __future__ import annotations

import copy
import glob
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.files import atomic_write
from lightning_nan.core.known_good import state_norm
from lightning_nan.core.state_copies import clone_tree, copy_to_host
from lightning_nan.core.validate import integer

#: Default ``every_n_steps`` of :class:`~lightning_nan.CheckpointRollback`. A snapshot copies the
#: whole training state once; at one copy per 100 steps that copy costs under 1% of the training
#: time even when it takes as long as a whole step (a GPU model whose state crosses PCIe in about
#: one step's time), and far less on the reference CNN (see BENCHMARKS.md). 100 steps is also what
#: PaLM went back on a loss spike.
DEFAULT_EVERY_N_STEPS = 100

_FILE = "snapshot-step{step:010d}.pt"
_FILE_RE = re.compile(r"^snapshot-step(\d{10})\.pt$")


@dataclass
class Snapshot:
    """One copy of a training state (all tensors on CPU).

    Attributes:
        step: the step it was taken at (the caller's count; the trainer's ``global_step``).
        model: the model's ``state_dict`` (parameters and buffers).
        optimizers: each optimizer's ``state_dict``.
        schedulers: each LR scheduler's ``state_dict``.
        scaler: the AMP GradScaler's ``state_dict`` (``None``: none given).
        extra: anything else the caller passed (callback states, ...), tensors copied too.
        norm: total 2-norm of the model's floating-point state when taken (``inf``/``nan`` when not
            finite); read from the device on first use.
        path: the file holding it, when written to disk; the tensors may then be loaded lazily.
        restores: how often it has been restored.
    """

    step: int
    model: dict[str, Any] | None = None
    optimizers: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    restores: int = 0
    _norm: Tensor | float | None = field(default=None, repr=False)
    _events: list[Any] = field(default_factory=list, repr=False)

    @property
    def norm(self) -> float:
        if isinstance(self._norm, Tensor):
            self._norm = float(self._norm)
        if self._norm is None:
            model = self.load().model
            assert model is not None  # a loaded snapshot holds the model's state
            self._norm = float(state_norm(model))
        return self._norm

    @property
    def loaded(self) -> bool:
        """Whether the tensors are in memory (``False`` for a snapshot known only by its file)."""
        return self.model is not None

    def wait(self) -> Snapshot:
        """Block until the asynchronous device-to-host copies have landed (a no-op on CPU)."""
        for event in self._events:
            event.synchronize()
        self._events = []
        return self

    def load(self) -> Snapshot:
        """The tensors, read from :attr:`path` if they are not in memory yet."""
        if self.model is None:
            if self.path is None:
                raise RuntimeError(f"Snapshot of step {self.step} has neither tensors nor a file")
            other = load_snapshot(self.path)
            self.model, self.optimizers, self.schedulers = other.model, other.optimizers, other.schedulers
            self.scaler, self.extra = other.scaler, other.extra
            if self._norm is None:
                self._norm = other._norm
        return self.wait()


class SnapshotStore:
    """Takes, keeps and restores snapshots: at most one pending, the newest ``max_snapshots`` good.

    Args:
        max_snapshots: good snapshots to keep (the oldest is evicted first).
        dirpath: also write every good snapshot to this folder (``snapshot-step<step>.pt``, written
            to a temporary file, flushed, then renamed, so a crash never leaves a torn one); a file
            is deleted only once its successor is complete.

    Tensors are copied with ``copy_`` into the buffers of an evicted or discarded snapshot when the
    shapes match, so a steady run allocates (and, on a GPU host, pins) its host memory only once.

    >>> import torch, tempfile
    >>> model = torch.nn.Linear(2, 1)
    >>> store = SnapshotStore(max_snapshots=1, dirpath=tempfile.mkdtemp())
    >>> _ = store.take(0, model); first = store.promote()
    >>> _ = store.take(5, model); second = store.promote()
    >>> [s.step for s in store.good], [os.path.basename(p) for p in store.files()]
    ([5], ['snapshot-step0000000005.pt'])
    """

    def __init__(self, max_snapshots: int = 2, dirpath: str | os.PathLike[str] | None = None) -> None:
        self.max_snapshots = integer("max_snapshots", max_snapshots, low=1)
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.good: list[Snapshot] = []  # oldest first
        self.pending: Snapshot | None = None
        self._spare: Snapshot | None = None  # buffers to reuse

    @property
    def newest(self) -> Snapshot | None:
        """The newest good snapshot, or ``None``."""
        return self.good[-1] if self.good else None

    def take(
        self,
        step: int,
        model: torch.nn.Module | dict[str, Tensor],
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> Snapshot:
        """Copy the state as the pending snapshot (replacing an earlier pending one) and return it.

        ``optimizers``, ``schedulers`` and ``scaler`` are objects with ``state_dict()``. Returns
        without waiting for device-to-host copies; :meth:`restore` and :meth:`promote` wait.
        """
        if self.pending is not None:
            self.discard()
        spare, self._spare = self._spare, None
        reuse = spare if spare is not None and spare.loaded else None
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        events: dict[torch.device, Any] = {}
        snap = Snapshot(
            step=int(step),
            model=copy_to_host(state, reuse.model if reuse else None, events),
            optimizers=copy_to_host([o.state_dict() for o in optimizers], reuse.optimizers if reuse else None, events),
            schedulers=copy_to_host([s.state_dict() for s in schedulers], None, events),
            scaler=None if scaler is None else copy_to_host(scaler.state_dict(), None, events),
            extra=copy_to_host(dict(extra or {}), None, events),
            _norm=state_norm(state),
        )
        for device in events:
            event = torch.cuda.Event()
            with torch.cuda.device(device):
                event.record()
            snap._events.append(event)
        self.pending = snap
        return snap

    def promote(self, snapshot: Snapshot | None = None) -> Snapshot:
        """Declare the pending snapshot (or ``snapshot``, e.g. one loaded from disk) good; evict beyond ``max_snapshots``."""
        snap = snapshot if snapshot is not None else self.pending
        if snap is None:
            raise ValueError("No pending snapshot to promote: call `take` first")
        if snap is self.pending:
            self.pending = None
        snap.wait()
        if self.dirpath is not None and snap.path is None and snap.loaded:
            snap.path = save_snapshot(snap, os.path.join(self.dirpath, _FILE.format(step=snap.step)))
        self.good = sorted([s for s in self.good if s.step != snap.step] + [snap], key=lambda s: s.step)
        while len(self.good) > self.max_snapshots:
            self._drop(self.good.pop(0))
        return snap

    def discard(self, snapshot: Snapshot | None = None) -> None:
        """Forget the pending snapshot (or the given good one, deleting its file)."""
        if snapshot is None or snapshot is self.pending:
            if self.pending is not None:
                self._spare = self.pending.wait()
            self.pending = None
            return
        self.good = [s for s in self.good if s is not snapshot]
        self._drop(snapshot)

    def clear(self) -> None:
        """Forget every snapshot in memory (files on disk stay)."""
        self.good, self.pending, self._spare = [], None, None

    def restore(
        self,
        snapshot: Snapshot,
        model: torch.nn.Module,
        optimizers: Sequence[Any] = (),
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
    ) -> dict[str, Any]:
        """Write ``snapshot`` back in place (the parameter objects stay the same); return a copy of its ``extra``.

        Model tensors are written with ``copy_`` (``load_state_dict``), so optimizers and DDP that
        hold the parameters keep working; optimizers, schedulers and scaler load fresh copies, so the
        snapshot itself never aliases live state and can be restored again.
        """
        snap = snapshot.load()
        if len(optimizers) != len(snap.optimizers) or len(schedulers) != len(snap.schedulers):
            raise ValueError(
                f"Snapshot of step {snap.step} holds {len(snap.optimizers)} optimizer(s) and {len(snap.schedulers)} "
                f"scheduler(s), got {len(optimizers)} and {len(schedulers)}: restore with the objects it was taken from"
            )
        self.restore_model(snap, model)
        for opt, state in zip(optimizers, snap.optimizers):
            opt.load_state_dict(clone_tree(state))
        for sched, state in zip(schedulers, snap.schedulers):
            sched.load_state_dict(copy.deepcopy(state))
        if scaler is not None and snap.scaler is not None:
            scaler.load_state_dict(copy.deepcopy(snap.scaler))
        snap.restores += 1
        return clone_tree(snap.extra)

    @staticmethod
    def restore_model(snapshot: Snapshot, model: torch.nn.Module) -> None:
        """Write only the model's parameters and buffers back, in place (not counted in ``restores``).

        For a caller that needs finite weights at once, in the middle of an optimizer step, and
        restores the rest with :meth:`restore` once the step is over.
        """
        state = snapshot.load().model
        assert state is not None  # a loaded snapshot holds the model's state
        model.load_state_dict(state)

    # ------------------------------------------------------------------ disk
    def files(self) -> list[str]:
        """The complete snapshot files in ``dirpath``, oldest step first (temporary files ignored)."""
        if self.dirpath is None:
            return []
        names = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(self.dirpath), "snapshot-step*.pt"))]
        return [os.path.join(self.dirpath, n) for n in sorted(n for n in names if _FILE_RE.match(n))]

    def reload(self, steps: Iterable[int], norms: dict[int, float | None] | None = None) -> list[int]:
        """Add the files of ``steps`` found in ``dirpath`` as good snapshots (loaded on first use); return the steps found."""
        found = []
        for step in steps:
            path = os.path.join(self.dirpath or "", _FILE.format(step=int(step)))
            if self.dirpath is not None and os.path.isfile(path):
                self.promote(Snapshot(step=int(step), path=path, _norm=(norms or {}).get(int(step))))
                found.append(int(step))
        return found

    def _drop(self, snap: Snapshot) -> None:
        if snap.path is not None and self.dirpath is not None:
            try:
                os.remove(snap.path)
            except FileNotFoundError:
                pass
        if snap.loaded:
            self._spare = snap


# ---------------------------------------------------------------------------------- files
def save_snapshot(snapshot: Snapshot, path: str | os.PathLike[str]) -> str:
    """Write ``snapshot`` to ``path`` atomically (temporary file, fsync, rename); return the path.

    >>> import torch, tempfile
    >>> snap = SnapshotStore().take(3, torch.nn.Linear(2, 1))
    >>> path = save_snapshot(snap, os.path.join(tempfile.mkdtemp(), "s.pt"))
    >>> load_snapshot(path).step
    3
    """
    path = os.fspath(path)
    snap = snapshot.load()
    payload = {
        "format": 1,
        "step": snap.step,
        "model": snap.model,
        "optimizers": snap.optimizers,
        "schedulers": snap.schedulers,
        "scaler": snap.scaler,
        "extra": snap.extra,
        "norm": snap.norm,
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read a file written by :func:`save_snapshot` (only files this library wrote: it unpickles)."""
    path = os.fspath(path)
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or "model" not in data or "step" not in data:
        raise ValueError(f"{path} is not a snapshot written by lightning_nan (no 'step'/'model' entries)")
    return Snapshot(
        step=int(data["step"]),
        model=data["model"],
        optimizers=data.get("optimizers", []),
        schedulers=data.get("schedulers", []),
        scaler=data.get("scaler"),
        extra=data.get("extra", {}),
        path=path,
        _norm=data.get("norm"),
    )
