"""BatchBisection's quarantine over a run: the file, the records this run knows, the indices left out.

The file is read at setup; records found at an incident are appended (rank zero), kept in memory
when the file cannot take them (retried at each write) and saved in checkpoints; a checkpoint's
records are merged back on resume (:meth:`QuarantineKeeper.apply_restored`), with a warning when
the file the checkpoint names is gone or lost records.

>>> import os, tempfile
>>> from lightning_nan.core.quarantine import make_record
>>> keeper = QuarantineKeeper(exclude=True)
>>> keeper.open(os.path.join(tempfile.mkdtemp(), "quarantine.jsonl"), rank_zero=True)
>>> keeper.add([make_record(index=4, position=0, epoch=0, step=1, batch_idx=0, reason="nan", fingerprint="ab")])
>>> keeper.excluded, [r["index"] for r in Quarantine(keeper.path).records()]
({4}, [4])
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning_nan.core.files import FileWarning
from lightning_nan.core.pending import PendingRecords
from lightning_nan.core.quarantine import Quarantine, record_key, usable_indices

__all__ = ["QuarantineKeeper"]


class QuarantineKeeper:
    """The quarantine of one BatchBisection: its file, every record this run knows, the training indices left out."""

    def __init__(self, *, exclude: bool) -> None:
        self.exclude = exclude
        self.quarantine: Quarantine | None = None
        #: the whole quarantine as this run knows it (file, found, restored)
        self.records: list[dict[str, Any]] = []
        self.excluded: set[int] = set()
        self.rank_zero = True
        self._restored: tuple[str | None, list[dict[str, Any]]] | None = None  # from a checkpoint, applied at open
        self._unwritten = PendingRecords(
            "BatchBisection", "the quarantine file", fix="make its folder writable, or pass BatchBisection(quarantine_path=...) a writable file",
            errors=(OSError, ValueError),  # ValueError: the file was made unreadable while training
        )

    @property
    def path(self) -> str | None:
        """The quarantine file (once :meth:`open` ran)."""
        return None if self.quarantine is None else self.quarantine.path

    def open(self, path: str | os.PathLike[str], *, rank_zero: bool) -> None:
        """Read the file at ``path`` (warn once about records naming no usable sample, and about a file that
        cannot be written) and apply a checkpoint's records restored before."""
        self.rank_zero = rank_zero
        self.quarantine = Quarantine(path)
        try:
            self.records = self.quarantine.records()
        except OSError:  # a folder at its path, no permission: nothing to read; the check below warns
            self.records = []
        self._unwritten.reset()
        if rank_zero:
            problems = self.quarantine.problems() if self.records else []
            if problems:
                warnings.warn(
                    f"BatchBisection: {self.quarantine.path} holds {len(problems)} record(s) that name no sample it can"
                    f" leave out; they stay in the file: {'; '.join(problems)}. Fix those lines (an index is an integer"
                    " >= 0) to leave their samples out.",
                    FileWarning,
                    stacklevel=3,
                )
            self._unwritten.check(self.quarantine.path)
        self.update_excluded()
        if self._restored is not None:  # load_state_dict came first (outside Trainer.fit's own order)
            self.apply_restored()

    def restore(self, path: str | None, records: list[dict[str, Any]], *, now: bool) -> None:
        """A checkpoint's quarantine (its file and records): merged at once when ``now`` (the run is set
        up), else when :meth:`open` runs."""
        self._restored = (path, [dict(r) for r in records])
        if now and self.quarantine is not None:
            self.apply_restored()

    def add(self, records: list[dict[str, Any]], *, leave_out: bool = True) -> None:
        """Keep the ``records`` not known yet, leave their indices out of training (``leave_out``, not for
        validation samples), append them to the file."""
        known = {record_key(r) for r in self.records}
        for record in records:
            if record_key(record) not in known:
                known.add(record_key(record))
                self.records.append(record)
        if leave_out and self.exclude:
            self.excluded.update(usable_indices(records))
        if records:
            self.write(records)

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (and any a write could not take before) to the quarantine file, rank zero only."""
        if self.rank_zero and self.quarantine is not None:
            self._unwritten.write(self.quarantine.path, records, self.quarantine.add)

    def update_excluded(self) -> None:
        """The training indices to leave out: every usable train record's index (none with ``exclude=False``)."""
        train = [r for r in self.records if r.get("split", "train") == "train"]  # a validation index is not a training one
        self.excluded = usable_indices(train) if self.exclude else set()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: where the file was and every record."""
        return {
            "quarantine_file": None if self.quarantine is None else os.path.abspath(self.quarantine.path),
            "quarantine": [dict(r) for r in self.records],
        }

    def apply_restored(self) -> None:
        """Merge a checkpoint's quarantine into this run's: its records, and those its file gained since
        (an interrupted run appends after its last checkpoint); append the missing ones to this run's file;
        report a file the checkpoint names that is gone or lost records."""
        assert self._restored is not None and self.quarantine is not None
        old_path, saved = self._restored
        self._restored = None
        path = self.quarantine.path
        same = old_path is not None and os.path.abspath(old_path) == os.path.abspath(path)
        on_disk: list[dict[str, Any]] = self.records if same else []
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
        known = {record_key(r) for r in self.records}
        new = []
        for record in saved + on_disk:
            key = record_key(record)
            if key not in known:
                known.add(key)
                new.append(record)
        self.records.extend(new)
        self.update_excluded()
        if not self.rank_zero:
            return
        if new:
            self.write(new)
        if problem is not None:
            indices = sorted(usable_indices(lost))
            warnings.warn(
                f"BatchBisection: the quarantine file of the checkpoint, {old_path}, {problem}; the checkpoint's"
                f" {len(lost)} record(s) (data set indices {indices}) are kept from the checkpoint, in {path}, and"
                " left out of training. To train on them again, resume with"
                " BatchBisection(exclude_quarantined=False).",
                FileWarning,
                stacklevel=3,
            )
