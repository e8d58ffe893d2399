"""Records bound for a file that cannot be written: kept, retried at the next write, one warning.

A log dir that turned read-only, a full disk, or a folder standing where the file should be must not
end a training run: the records stay in memory (and in the checkpoint, through the callback's
state), every later write tries the file again with everything still pending, and the user gets one
:class:`~lightning_nan.core.files.FileWarning` naming the file, the reason and the fix.

>>> import os, tempfile, warnings
>>> from lightning_nan.core.jsonl import append_jsonl, read_jsonl
>>> root = tempfile.mkdtemp()
>>> path = os.path.join(root, "records.jsonl")
>>> os.mkdir(path)  # a folder where the file should be
>>> pending = PendingRecords("NaNGuard", "the incidents file", fix="pass `incidents_path=` a writable file")
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     pending.check(path), pending.write(path, [{"step": 1}], lambda rs: append_jsonl(path, rs))
...     pending.write(path, [{"step": 2}], lambda rs: append_jsonl(path, rs))
(False, False)
False
>>> len(caught), pending.records
(1, [{'step': 1}, {'step': 2}])
>>> print(caught[0].message)
NaNGuard cannot write the incidents file .../records.jsonl (it is a folder); training goes on, and its records stay in memory and in the checkpoint (retried at each write). Fix: pass `incidents_path=` a writable file.
>>> os.rmdir(path)
>>> pending.write(path, [{"step": 3}], lambda rs: append_jsonl(path, rs)), [r["step"] for r in read_jsonl(path)]
(True, [1, 2, 3])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lightning_nan.core.files import FileWarning, unwritable


class PendingRecords:
    """Write records through a function; keep those it could not write, and warn once.

    Args:
        who: the callback writing, for the message (``"BatchBisection"``).
        what: the file in words, for the message (``"the quarantine file"``).
        fix: what the user can do, ending the message (``"pass `quarantine_path=` a writable file"``).
        errors: the exceptions of ``append`` that mean "the file cannot take them now".
    """

    def __init__(self, who: str, what: str, *, fix: str, errors: tuple[type[Exception], ...] = (OSError,)) -> None:
        self.who = who
        self.errors = errors
        self.what = what
        self.fix = fix
        #: Records not written yet, oldest first.
        self.records: list[Any] = []
        self.warned = False

    def reset(self) -> None:
        """Forget the pending records and warn again (a new run)."""
        self.records = []
        self.warned = False

    def check(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` can be written now (:func:`~lightning_nan.core.files.unwritable`); warns if not."""
        problem = unwritable(path)
        if problem is not None:
            self._warn(path, problem)
        return problem is None

    def write(self, path: str | os.PathLike[str], records: Sequence[Any], append: Callable[[list[Any]], Any]) -> bool:
        """``append(pending + records)``; on one of ``errors`` keep them all pending and warn (once).
        Returns whether everything is written."""
        batch = self.records + list(records)
        if not batch:
            return True
        try:
            append(batch)
        except self.errors as err:
            self.records = batch
            reason = getattr(err, "strerror", None) or str(err)
            self._warn(path, reason)
            return False
        self.records = []
        return True

    def _warn(self, path: str | os.PathLike[str], reason: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"{self.who} cannot write {self.what} {os.fspath(path)} ({reason}); training goes on, and its records stay in memory"
            f" and in the checkpoint (retried at each write). Fix: {self.fix}.",
            FileWarning,
            stacklevel=3,
        )
