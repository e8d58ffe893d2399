"""JSON Lines files that a crash cannot corrupt.

Each append is one ``write`` of whole lines to a file opened with ``O_APPEND``, followed by
``fsync``. A crash in the middle can at worst leave a torn last line without its newline; readers
ignore it and the next append moves it aside (to ``<file>.torn-<UTC time>``, with a warning) before
writing, so every complete record survives and nothing is deleted. A last line without its newline
that *is* a whole JSON record (a file written by hand or by another tool) is a record like any other:
readers return it and the next append ends it with a newline first.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "records.jsonl")
>>> append_jsonl(path, [{"step": 1}, {"step": 2}])
>>> with open(path, "a") as f:
...     _ = f.write('{"step": 99, "tor')  # a crash mid-write
>>> [r["step"] for r in read_jsonl(path)]
[1, 2]
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     append_jsonl(path, [{"step": 3}])
>>> [r["step"] for r in read_jsonl(path)], "moved to" in str(caught[0].message)
([1, 2, 3], True)
>>> [open(os.path.join(os.path.dirname(path), name)).read() for name in os.listdir(os.path.dirname(path)) if ".torn-" in name]
['{"step": 99, "tor']
>>> with open(path, "a") as f:
...     _ = f.write('{"step": 4}')  # written by hand, without the final newline
>>> append_jsonl(path, [{"step": 5}])
>>> [r["step"] for r in read_jsonl(path)]
[1, 2, 3, 4, 5]
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning_nan.core.files import FileWarning


def append_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]], *, lock: bool = True) -> None:
    """Append ``records`` as JSON lines to ``path`` (creating it and its folder), durably.

    Holds an exclusive lock on the file meanwhile (``lock=False`` inside :func:`locked`, which holds it).
    """
    path = os.fspath(path)
    data = "".join(json.dumps(r, sort_keys=True, allow_nan=False, default=str) + "\n" for r in records).encode()
    if not data:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if lock:
            _lock(fd)  # another process's append in flight is not a torn tail: wait for it
        _end_last_line(fd, path)
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - only on a full disk
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes); nothing was appended")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """Every complete record of a JSON Lines file.

    A last line without its newline is a record when it parses as JSON (written by hand or by another
    tool), else an append cut short by a crash, and skipped; any other malformed line raises, naming
    the file and the line.
    """
    return [record for _, record in read_jsonl_lines(path)[0]]


def read_jsonl_lines(path: str | os.PathLike[str]) -> tuple[list[tuple[int, Any]], str | None]:
    r"""``([(line number, record), ...], torn)``: the records with their lines, and the torn last line
    (``None`` when there is none). Blank lines are skipped. Raises like :func:`read_jsonl`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b')
    >>> read_jsonl_lines(path)
    ([(1, {'a': 1}), (3, {'a': 2})], '{"a": 3, "b')
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    tail = lines.pop()  # after the last newline: empty, a record without its newline, or a torn append
    torn = None
    if tail.strip():
        if _is_json(tail):
            lines.append(tail)
        else:
            torn = tail
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {lineno}: not a JSON record ({err.msg}). Fix or delete that line; the others are intact."
            ) from None
    return records, torn


def missing_from(path: str | os.PathLike[str], records: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``records`` that ``path`` does not hold, matched on ``keys`` (all of them, for a missing file).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
    >>> missing_from(path, [{"step": 1, "t": 0.5}], ("step", "t"))
    [{'step': 1, 't': 0.5}]
    >>> append_jsonl(path, [{"step": 1, "t": 0.5, "more": True}])
    >>> missing_from(path, [{"step": 1, "t": 0.5}, {"step": 2, "t": 0.7}], ("step", "t"))
    [{'step': 2, 't': 0.7}]
    """
    try:
        held = read_jsonl(path)
    except FileNotFoundError:
        held = []
    have = {tuple(r.get(k) for k in keys) for r in held if isinstance(r, dict)}
    return [r for r in records if tuple(r.get(k) for k in keys) not in have]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the file's exclusive lock for a read-check-append (call ``append_jsonl(..., lock=False)`` inside)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int) -> None:
    """An exclusive advisory lock on the open file, released when it is closed (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: appends of one process at a time only
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _end_last_line(fd: int, path: str) -> None:
    """Before an append: end a last line left without its newline.

    A whole JSON record (written by hand or by another tool) gets its newline. Anything else is an
    append torn by a crash: it is copied to ``<path>.torn-<UTC time>`` (with a warning naming it), then
    cut off, so the file stays one record per line and no byte is lost.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start, pos, chunk = 0, size, 4096
    while pos > 0:
        begin = max(0, pos - chunk)
        nl = os.pread(fd, pos - begin, begin).rfind(b"\n")
        if nl >= 0:
            start = begin + nl + 1
            break
        pos = begin
    tail = os.pread(fd, size - start, start)
    try:
        whole = not tail.strip() or _is_json(tail.decode("utf-8"))
    except UnicodeDecodeError:
        whole = False
    if whole:
        os.write(fd, b"\n")
        return
    from datetime import datetime, timezone

    aside = f"{path}.torn-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
    with open(aside, "xb") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    os.ftruncate(fd, start)
    warnings.warn(
        f"{path}: its last line ({len(tail)} bytes) was not a whole JSON record (an append cut short by a crash, or"
        f" a line edited by hand); it was moved to {aside} before appending. Repair it and append it again if it"
        " mattered.",
        FileWarning,
        stacklevel=3,
    )
