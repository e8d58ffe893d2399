"""``lightning-nan quarantine list|clear PATH``: show or set aside the quarantined samples of a run.

``PATH`` is the quarantine file, or a folder holding ``quarantine.jsonl`` (a run's log dir).
``clear`` never deletes: it renames the file to a timestamped ``.bak`` next to it. ``list`` reads the
indices as training does (``"9"`` and ``17.0`` are indices 9 and 17) and reports, on stderr, every
record training cannot use (it stays in the file).

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser)
>>> parser.parse_args(["list", "runs/quarantine.jsonl", "--json"])
Namespace(action='list', path='runs/quarantine.jsonl', json=True)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lightning_nan.cli import CLIError
from lightning_nan.cli._kinds import not_quarantine
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, record_index

COLUMNS = ("index", "epoch", "step", "batch_idx", "reason", "fingerprint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``list`` and ``clear`` actions."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    path_help = f"the quarantine file, or a folder holding {QUARANTINE_FILE}"
    show = actions.add_parser("list", help="print the quarantined samples")
    show.add_argument("path", metavar="PATH", help=path_help)
    show.add_argument("--json", action="store_true", help="print the records as a JSON array")
    clear = actions.add_parser("clear", help="move the file aside to a timestamped backup (nothing is deleted)")
    clear.add_argument("path", metavar="PATH", help=path_help)


def run(args: argparse.Namespace) -> int:
    """Carry out ``args.action`` on ``args.path``."""
    quarantine = Quarantine(_resolve(args.path))
    if args.action == "clear":
        _refuse_another_file(quarantine, strict=False)
        try:
            backup = quarantine.clear()
        except OSError as err:
            raise CLIError(f"could not move {quarantine.path} aside: {err.strerror}; check the folder's permissions") from None
        print(f"moved {quarantine.path} to {backup} (delete that backup yourself if you no longer need it)")
        return 0
    records = _refuse_another_file(quarantine, strict=True)
    try:
        problems = quarantine.problems()
    except (ValueError, OSError) as err:
        raise CLIError(f"{err}") from None
    for problem in problems:  # kept in the file, left out of nothing: say so
        print(f"lightning-nan: warning: {quarantine.path}, {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if records:
        print(format_table(records))
    n_idx = len(quarantine.indices())  # what training leaves out
    unusable = f"; {len(problems)} problem(s) on stderr" if problems else ""
    print(f"{len(records)} quarantined sample(s) in {quarantine.path} ({n_idx} with a dataset index{unusable})")
    return 0


def format_table(records: list[dict[str, Any]]) -> str:
    """The records as an aligned text table, one row per record.

    >>> print(format_table([{"index": 3, "epoch": 0, "step": 7, "batch_idx": 7, "reason": "nan", "fingerprint": "ab"}]))
    index  epoch  step  batch_idx  reason  fingerprint
    3      0      7     7          nan     ab
    """
    rows = [list(COLUMNS)] + [[_cell(r, c) for c in COLUMNS] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _cell(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if column == "index":
        try:
            value = record_index(record)  # as training reads it
        except ValueError:
            return f"{value!r} (unusable)"
    if column == "index" and value is None and record.get("position") is not None:
        return f"? (pos {record['position']})"  # iterable dataset: the index is unknown
    return "-" if value is None else str(value)


def _refuse_another_file(quarantine: Quarantine, *, strict: bool) -> list[dict[str, Any]]:
    """The records, after refusing a file of another kind (an incidents file, ``{"a": 1}``).

    ``strict=False`` (``clear``): a file that cannot be read is no reason to refuse moving it aside.
    """
    try:
        records = quarantine.records()
    except (ValueError, OSError) as err:
        if not strict:
            return []
        raise CLIError(f"{err}") from None
    wrong = not_quarantine(quarantine.path, records)
    if wrong is not None:
        raise CLIError(wrong)
    return records


def _resolve(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, QUARANTINE_FILE)
    if not os.path.exists(path):
        raise CLIError(
            f"no quarantine file at {path!r}: pass the {QUARANTINE_FILE} of your run (by default in its log dir)"
        )
    return path
