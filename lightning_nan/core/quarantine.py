"""The quarantine file: samples that produced NaN/Inf, one JSON record per line, never lost.

Records are appended with :func:`~lightning_nan.core.jsonl.append_jsonl` (one ``O_APPEND`` write,
then ``fsync``), so a crash can at worst tear the last line, which readers skip. ``clear`` renames the
file to a timestamped backup instead of deleting it. Writing on rank zero only is the caller's job.

A record identifies a sample by its dataset ``index``; when that cannot be known (an iterable
dataset) ``index`` is ``None`` and ``position`` (its place in the batch) plus ``fingerprint`` (a hash
of its content) identify it instead.

>>> import tempfile, os
>>> q = Quarantine(os.path.join(tempfile.mkdtemp(), QUARANTINE_FILE))
>>> rec = make_record(index=7, position=2, epoch=0, step=12, batch_idx=3, reason="non-finite loss", fingerprint="ab12")
>>> [r["index"] for r in q.add([rec, rec])]  # the duplicate is dropped
[7]
>>> q.indices()
{7}
>>> q.add([rec])  # already quarantined
[]
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from lightning_nan.core.files import fsync_dir
from lightning_nan.core.jsonl import append_jsonl, locked, read_jsonl

QUARANTINE_FILE = "quarantine.jsonl"

_EXPECTED = "a quarantine file holds one JSON object per line (JSON Lines), as lightning_nan writes it"


class Quarantine:
    """Read and append the quarantine records at ``path`` (created on the first :meth:`add`).

    >>> import tempfile, os
    >>> q = Quarantine(os.path.join(tempfile.mkdtemp(), "q.jsonl"))
    >>> q.records(), q.indices()
    ([], set())
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"Expected `path` to be a non-empty file path, got {path!r}")
        self.path: str = os.fspath(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def records(self) -> list[dict[str, Any]]:
        """All records, oldest first; ``[]`` if the file does not exist. A torn last line is skipped.

        Raises ``ValueError`` naming the file and line when the file is not a quarantine file.
        """
        try:
            records = read_jsonl(self.path)
        except FileNotFoundError:
            return []
        except UnicodeDecodeError as err:
            with open(self.path, "rb") as f:
                lineno = f.read(err.start).count(b"\n") + 1
            raise ValueError(f"{self.path}, line {lineno}: not UTF-8 text; {_EXPECTED}.") from None
        except ValueError as err:
            raise ValueError(f"{err} ({_EXPECTED})") from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(
                f"{self.path}, line {_line_of_record(self.path, bad)}: expected a JSON object (one record per"
                f" line), got a JSON {type(records[bad]).__name__}; {_EXPECTED}."
            )
        return records

    def indices(self, split: str | None = None) -> set[int]:
        """The dataset indices in quarantine (records whose ``index`` is an int); with ``split``, only
        those of that data set (``"train"``, ``"val"``, ``"test"``; a record without one is ``"train"``).

        >>> import tempfile, os
        >>> q = Quarantine(os.path.join(tempfile.mkdtemp(), "q.jsonl"))
        >>> _ = q.add([make_record(index=3, position=0, epoch=0, step=1, batch_idx=0, reason="r", fingerprint="a"),
        ...            make_record(index=5, position=1, epoch=0, step=1, batch_idx=0, reason="r", fingerprint="b", split="val")])
        >>> sorted(q.indices()), q.indices("train"), q.indices("val")
        ([3, 5], {3}, {5})
        """
        return {
            r["index"]
            for r in self.records()
            if _is_index(r.get("index")) and (split is None or r.get("split", "train") == split)
        }

    def add(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append, in one atomic write, the ``records`` not already present; return those appended.

        A record is already present when one with the same ``index`` exists, or, for records whose
        ``index`` is ``None``, one with the same ``fingerprint``. Safe between processes: an
        advisory lock on the file serialises the read-check-append of concurrent writers.
        """
        records = list(records)
        for record in records:
            if not isinstance(record, Mapping):
                raise ValueError(f"Expected each record to be a dict (see `make_record`), got {record!r}")
            index = record.get("index")
            if index is not None and not _is_index(index):
                raise ValueError(f"Expected a record's `index` to be an int or None, got {index!r}")
        if not records:
            return []
        with locked(self.path):
            return self._add_unlocked(records)

    def _add_unlocked(self, records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        known = self.records()
        seen_index = {r["index"] for r in known if _is_index(r.get("index"))}
        seen_fp = {r.get("fingerprint") for r in known if r.get("index") is None}
        new: list[dict[str, Any]] = []
        for record in records:
            index = record.get("index")
            if index is not None:
                if index in seen_index:
                    continue
                seen_index.add(index)
            else:
                if record.get("fingerprint") in seen_fp:
                    continue
                seen_fp.add(record.get("fingerprint"))
            new.append(dict(record))
        append_jsonl(self.path, new, lock=False)
        return new

    def clear(self) -> str | None:
        """Move the file aside to ``<path>.<UTC timestamp>.bak`` (never deleted); return that path.

        Returns ``None`` when there is no file. The rename is atomic: readers see either the old file
        or none.
        """
        if not os.path.lexists(self.path):
            return None
        with locked(self.path):
            return self._clear_unlocked()

    def _clear_unlocked(self) -> str | None:
        if not os.path.lexists(self.path):  # cleared by another process meanwhile
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        backup = f"{self.path}.{stamp}.bak"
        n = 1
        while os.path.lexists(backup):  # two clears within the same microsecond
            backup = f"{self.path}.{stamp}-{n}.bak"
            n += 1
        os.rename(self.path, backup)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return backup


def make_record(
    *,
    index: int | None,
    position: int | None,
    epoch: int | None,
    step: int | None,
    batch_idx: int | None,
    reason: str,
    fingerprint: str,
    rank: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A quarantine record. ``index=None`` when the dataset index is unknown (iterable datasets).

    >>> r = make_record(index=None, position=3, epoch=1, step=40, batch_idx=9, reason="non-finite: ['x']",
    ...                 fingerprint="0f3a", rank=1, source="bisection")
    >>> sorted(r)
    ['batch_idx', 'epoch', 'fingerprint', 'index', 'position', 'rank', 'reason', 'source', 'step', 'time']
    """
    for name, value in (("index", index), ("position", position), ("epoch", epoch), ("step", step), ("batch_idx", batch_idx)):
        if value is not None and not _is_index(value):
            raise ValueError(f"Expected `{name}` to be an int or None, got {value!r}")
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"Expected `reason` to be a non-empty string, got {reason!r}")
    if not isinstance(fingerprint, str):
        raise ValueError(f"Expected `fingerprint` to be a string (see `sample_fingerprint`), got {fingerprint!r}")
    record = {
        "index": index,
        "position": position,
        "epoch": epoch,
        "step": step,
        "batch_idx": batch_idx,
        "reason": reason,
        "fingerprint": fingerprint,
        "rank": int(rank),
        "time": time.time(),
    }
    record.update(extra)
    return record


def sample_fingerprint(sample: Any) -> str:
    """A content hash of one sample (first 16 hex digits of a sha256), stable across runs and processes.

    Covers every tensor (path, dtype, shape, bytes) in structure order and ``repr`` of other leaves.

    >>> a = {"x": torch.tensor([1.0, 2.0]), "y": 3}
    >>> sample_fingerprint(a) == sample_fingerprint({"x": torch.tensor([1.0, 2.0]), "y": 3})
    True
    >>> sample_fingerprint(a) == sample_fingerprint({"x": torch.tensor([1.0, 2.5]), "y": 3})
    False
    >>> len(sample_fingerprint(a))
    16
    """
    h = hashlib.sha256()
    _hash_into(h, sample, "")
    return h.hexdigest()[:16]


def _hash_into(h: Any, obj: Any, path: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        t = (t.to_dense() if t.layout != torch.strided else t).contiguous()
        h.update(f"{path}|tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        # bytes through uint8 works for every dtype (bfloat16 and bool included), unlike .numpy()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(f"{path}|map|{len(obj)}|".encode())
        for key, value in obj.items():
            _hash_into(h, value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}|seq|{len(obj)}|".encode())
        for i, value in enumerate(obj):
            _hash_into(h, value, f"{path}[{i}]")
    else:
        h.update(f"{path}|{obj!r}|".encode())


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _line_of_record(path: str, i: int) -> int:
    """The line number of the ``i``-th record (read_jsonl skips blank lines)."""
    with open(path, encoding="utf-8") as f:
        nonblank = [n for n, line in enumerate(f, 1) if line.strip()]
    return nonblank[i]
