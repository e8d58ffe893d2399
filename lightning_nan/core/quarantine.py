"""The quarantine file: samples that produced NaN/Inf, one JSON record per line, never lost.

Records are appended with :func:`~lightning_nan.core.jsonl.append_jsonl` (one ``O_APPEND`` write,
then ``fsync``), so a crash can at worst tear the last line, which readers skip. ``clear`` renames the
file to a timestamped backup instead of deleting it. Writing on rank zero only is the caller's job.

A record identifies a sample by its dataset ``index``; when that cannot be known (an iterable
dataset) ``index`` is ``None`` and ``position`` (its place in the batch) plus ``fingerprint`` (a hash
of its content) identify it instead. Files written by hand or by other tools are read the same way
by training and by ``lightning-nan quarantine list`` (:func:`record_index`): an index written as
``"9"`` or ``17.0`` is index 9 or 17; a record whose index is no data set index (``"abc"``, ``-1``,
``2.5``) or that names no sample at all is kept in the file and reported (:meth:`Quarantine.problems`).

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

import json
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from lightning_nan.core.files import fsync_dir
from lightning_nan.core.fingerprint import sample_fingerprint as sample_fingerprint  # where callers have always found it
from lightning_nan.core.jsonl import append_jsonl, locked, read_jsonl_lines

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
        return [record for _, record in self._lines()[0]]

    def _lines(self) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
        try:
            lines, torn = read_jsonl_lines(self.path)
        except FileNotFoundError:
            return [], None
        except UnicodeDecodeError as err:
            with open(self.path, "rb") as f:
                lineno = f.read(err.start).count(b"\n") + 1
            raise ValueError(f"{self.path}, line {lineno}: not UTF-8 text; {_EXPECTED}.") from None
        except ValueError as err:
            raise ValueError(f"{err} ({_EXPECTED})") from None
        bad = next(((n, r) for n, r in lines if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(
                f"{self.path}, line {bad[0]}: expected a JSON object (one record per"
                f" line), got a JSON {type(bad[1]).__name__}; {_EXPECTED}."
            )
        return lines, torn

    def indices(self, split: str | None = None) -> set[int]:
        """The dataset indices in quarantine: every record's :func:`record_index` that is usable; with
        ``split``, only those of that data set (``"train"``, ``"val"``, ``"test"``; a record without one is
        ``"train"``).

        >>> import tempfile, os
        >>> q = Quarantine(os.path.join(tempfile.mkdtemp(), "q.jsonl"))
        >>> _ = q.add([make_record(index=3, position=0, epoch=0, step=1, batch_idx=0, reason="r", fingerprint="a"),
        ...            make_record(index=5, position=1, epoch=0, step=1, batch_idx=0, reason="r", fingerprint="b", split="val")])
        >>> sorted(q.indices()), q.indices("train"), q.indices("val")
        ([3, 5], {3}, {5})
        """
        records = self.records()
        if split is not None:
            records = [r for r in records if r.get("split", "train") == split]
        return usable_indices(records)

    def problems(self) -> list[str]:
        r"""What in the file names no sample that training can leave out, one line each (``[]``: nothing).

        Such records are kept in the file (never dropped); training warns about them once and
        ``lightning-nan quarantine list`` shows them.

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "q.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"index": "9"}\n{"index": 17.0}\n{"index": "abc"}\n{"reason": "nan"}\n{"index": 4')
        >>> sorted(Quarantine(path).indices())
        [9, 17]
        >>> for problem in Quarantine(path).problems():
        ...     print(problem)
        line 3: index 'abc' is not a data set index (an integer >= 0)
        line 4: no index and no fingerprint: it names no sample
        line 5: not a whole JSON record (an append cut short, or a line without its end): skipped
        """
        lines, torn = self._lines()
        found = []
        for lineno, record in lines:
            try:
                index = record_index(record)
            except ValueError as err:
                found.append(f"line {lineno}: {err}")
                continue
            if index is None and not isinstance(record.get("fingerprint"), str):
                found.append(f"line {lineno}: no index and no fingerprint: it names no sample")
        if torn is not None:
            with open(self.path, encoding="utf-8") as f:
                n = f.read().count("\n") + 1
            found.append(f"line {n}: not a whole JSON record (an append cut short, or a line without its end): skipped")
        return found

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
        seen = {record_key(r) for r in self.records()}
        new: list[dict[str, Any]] = []
        for record in records:
            key = record_key(record)
            if key in seen:
                continue
            seen.add(key)
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


def record_index(record: Mapping[str, Any]) -> int | None:
    """The data set index a record names, read as training and the CLI both read it.

    An integer >= 0, also when written as a string (``"9"``) or an integral number (``17.0``);
    ``None`` when ``index`` is null or absent (a record of an iterable data set, named by its
    ``fingerprint``). Raises ``ValueError`` saying why for anything else.

    >>> [record_index({"index": v}) for v in (3, "9", " 12 ", 17.0, None)], record_index({})
    ([3, 9, 12, 17, None], None)
    >>> record_index({"index": 2.5})
    Traceback (most recent call last):
    ValueError: index 2.5 is not a data set index (an integer >= 0)
    """
    value = record.get("index")
    if value is None:
        return None
    index: Any = None
    if _is_index(value):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        index = int(value.strip())
    if index is None or index < 0:
        raise ValueError(f"index {value!r} is not a data set index (an integer >= 0)")
    return index


def usable_indices(records: Sequence[Mapping[str, Any]]) -> set[int]:
    """The data set indices of ``records`` (:func:`record_index`), the unusable ones left aside.

    >>> sorted(usable_indices([{"index": 3}, {"index": "9"}, {"index": "x"}, {"index": None}]))
    [3, 9]
    """
    found = set()
    for record in records:
        try:
            index = record_index(record)
        except ValueError:
            continue
        if index is not None:
            found.add(index)
    return found


def record_key(record: Mapping[str, Any]) -> tuple[str, Any]:
    """What makes two records the same sample: the data set index; without one, the fingerprint;
    for a record that names no usable sample, its whole content.

    >>> record_key({"index": "9", "step": 1}) == record_key({"index": 9, "step": 5})
    True
    >>> record_key({"index": None, "fingerprint": "ab12"})
    ('fingerprint', 'ab12')
    """
    try:
        index = record_index(record)
    except ValueError:
        index = None
    else:
        if index is not None:
            return ("index", index)
        if isinstance(record.get("fingerprint"), str):
            return ("fingerprint", record["fingerprint"])
    return ("record", json.dumps(record, sort_keys=True, default=str))


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
