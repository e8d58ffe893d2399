"""JSON Lines files that a crash cannot corrupt.

Each append is one ``write`` of whole lines to a file opened with ``O_APPEND``, followed by
``fsync``. A crash in the middle can at worst leave a torn last line without its newline; readers
ignore it and the next append cuts it off first, so every complete record survives.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "records.jsonl")
>>> append_jsonl(path, [{"step": 1}, {"step": 2}])
>>> with open(path, "a") as f:
...     _ = f.write('{"step": 99, "tor')  # a crash mid-write
>>> [r["step"] for r in read_jsonl(path)]
[1, 2]
>>> append_jsonl(path, [{"step": 3}])
>>> [r["step"] for r in read_jsonl(path)]
[1, 2, 3]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


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
        _cut_torn_tail(fd)
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - only on a full disk
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes); nothing was appended")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of a JSON Lines file.

    A last line without its newline is an append cut short by a crash and is skipped; any other
    malformed line raises, naming the file and the line.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    lines.pop()  # after the last newline: empty, or a torn append
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {lineno}: not a JSON record ({err.msg}). Fix or delete that line; the others are intact."
            ) from None
    return records


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


def _cut_torn_tail(fd: int) -> None:
    """Truncate a trailing partial line (no newline) left by an interrupted append."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    pos, chunk = size, 4096
    while pos > 0:
        start = max(0, pos - chunk)
        block = os.pread(fd, pos - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            os.ftruncate(fd, start + nl + 1)
            return
        pos = start
    os.ftruncate(fd, 0)
