"""Files a crash cannot leave half-written: write to a temporary file, sync it, rename it over the target.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "sub", "note.txt")
>>> atomic_write(path, lambda f: f.write(b"v1")) == path
True
>>> open(path, "rb").read()
b'v1'
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> str:
    """Write ``path`` (creating its folder) through ``write(f)`` on a binary file; return the path.

    ``write`` fills a temporary file in the same folder, which is flushed, fsynced and renamed over
    ``path`` (``os.replace``, atomic), then the folder is fsynced so the rename survives a crash too.
    Readers see the old file or the new one, never a mix. On any error the temporary file is removed,
    the previous file is left intact and the error propagates.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "state.bin")
    >>> _ = atomic_write(path, lambda f: f.write(b"good"))
    >>> def fail(f):
    ...     f.write(b"half")
    ...     raise RuntimeError("crash mid-write")
    >>> atomic_write(path, fail)
    Traceback (most recent call last):
    RuntimeError: crash mid-write
    >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
    (b'good', ['state.bin'])
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # hidden and unique (pid + random), so no glob of the target's pattern and no other writer meets it
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)
    return path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Sync a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened.

    >>> import tempfile
    >>> fsync_dir(tempfile.mkdtemp())
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class FileWarning(UserWarning):
    """A file of the run could not be written, or held something unusable: the message names it, says
    where its contents are kept instead and how to fix it. Nothing was lost."""


def unwritable(path: str | os.PathLike[str]) -> str | None:
    """Why records cannot be appended to ``path``, or ``None`` when they can; creates and changes nothing.

    An existing file is opened for appending (and closed); for a new one, the nearest existing folder
    above it gets a probe file, created and removed at once (so permissions, read-only mounts and a
    file standing where a folder should be all show, as root too).

    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> unwritable(os.path.join(root, "new", "records.jsonl")) is None
    True
    >>> os.listdir(root)
    []
    >>> unwritable(root)
    'it is a folder'
    >>> open(os.path.join(root, "file"), "w").close()
    >>> print(unwritable(os.path.join(root, "file", "records.jsonl")))
    /.../file is a file, not a folder
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return "it is a folder"
    if os.path.lexists(path):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as err:
            return err.strerror or str(err)
        return None
    folder = os.path.dirname(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as err:
        return f"cannot create files in {folder}: {err.strerror or err}"
    os.remove(probe)
    return None
