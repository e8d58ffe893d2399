"""``lightning-nan report RUN_DIR [--json] [--width N] [--quarantine PATH]``: the incident summary of a finished run.

``RUN_DIR`` is the run's log dir (``NaNGuard`` writes ``nan_incidents.jsonl`` there), a folder above it
(the newest ``nan_incidents.jsonl`` below is read, e.g. ``lightning_logs/version_3/``), or the
``.jsonl`` file itself. The quarantined samples are read from ``quarantine.jsonl`` next to it, or from
``--quarantine PATH``.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser)
>>> parser.parse_args(["lightning_logs", "--json"])
Namespace(run_dir='lightning_logs', json=True, width=None, quarantine=None)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

from lightning_nan.callbacks.nan_guard import INCIDENTS_FILE
from lightning_nan.cli import CLIError
from lightning_nan.cli._kinds import not_incidents, not_quarantine
from lightning_nan.core.incident import Incident
from lightning_nan.core.jsonl import read_jsonl
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine
from lightning_nan.core.summary import summary_json, summary_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``RUN_DIR``, ``--json``, ``--width`` and ``--quarantine``."""
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help=f"the run's log dir holding {INCIDENTS_FILE} (or a folder above it: the newest one below is read), or the file",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--width", type=int, default=None, metavar="N",
        help="characters per line, at least 60 (default: the terminal's width, or 100 when not a terminal)",
    )
    parser.add_argument(
        "--quarantine", metavar="PATH", default=None, help=f"the quarantine file (default: {QUARANTINE_FILE} next to the incidents file)"
    )


def run(args: argparse.Namespace) -> int:
    """Print the summary of the incidents found from ``args.run_dir``."""
    if args.width is not None and args.width < 60:
        raise CLIError(f"--width must be at least 60 characters, got {args.width}")
    path, note = find_incidents(args.run_dir)
    incidents = read_incidents(path)
    quarantine_path = args.quarantine
    if quarantine_path is not None:
        if os.path.isdir(quarantine_path):
            quarantine_path = os.path.join(quarantine_path, QUARANTINE_FILE)
        if not os.path.isfile(quarantine_path):
            raise CLIError(f"no quarantine file at {quarantine_path!r}: pass the {QUARANTINE_FILE} of your run, or leave out --quarantine")
    else:
        default = os.path.join(os.path.dirname(path), QUARANTINE_FILE)
        quarantine_path = default if os.path.isfile(default) else None
    records: list[dict[str, Any]] = []
    if quarantine_path is not None:
        try:
            records = Quarantine(quarantine_path).records()
        except (ValueError, OSError) as err:
            raise CLIError(f"{err}") from None
        wrong = not_quarantine(quarantine_path, records)
        if wrong is not None:
            raise CLIError(f"--quarantine: {wrong}")
    if args.json:
        out = {"incidents_file": path, "quarantine_file": quarantine_path, **summary_json(incidents, records)}
        print(json.dumps(out, indent=2))
        return 0
    width = args.width
    if width is None:
        width = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 200) if sys.stdout.isatty() else 100
    print(f"incidents from {path}{note}")
    print(summary_table(incidents, records, width=width, quarantine_path=quarantine_path))
    return 0


def find_incidents(run_dir: str) -> tuple[str, str]:
    """The incidents file for ``run_dir``, and a note saying how it was chosen (``""`` when given directly).

    >>> find_incidents("/no/such/run")
    Traceback (most recent call last):
    ...
    lightning_nan.cli.CLIError: no such file or folder: '/no/such/run' (NaNGuard writes nan_incidents.jsonl in the run's log dir)
    """
    hint = f"NaNGuard writes {INCIDENTS_FILE} in the run's log dir"
    if os.path.isfile(run_dir):
        return run_dir, ""
    if not os.path.isdir(run_dir):
        raise CLIError(f"no such file or folder: {run_dir!r} ({hint})")
    direct = os.path.join(run_dir, INCIDENTS_FILE)
    if os.path.isfile(direct):
        return direct, ""
    found = []
    for folder, subfolders, files in os.walk(run_dir):
        subfolders.sort()
        if INCIDENTS_FILE in files:
            found.append(os.path.join(folder, INCIDENTS_FILE))
    if not found:
        raise CLIError(
            f"no {INCIDENTS_FILE} in {run_dir!r} or its subfolders ({hint}, e.g. lightning_logs/version_0; "
            "a run without incidents writes none)"
        )
    newest = max(found, key=lambda p: (os.path.getmtime(p), p))
    return newest, f" (the newest of {len(found)} found)" if len(found) > 1 else ""


def read_incidents(path: str) -> list[Incident]:
    """The incidents recorded in ``path``, oldest first; user errors as :class:`~lightning_nan.cli.CLIError`."""
    try:
        records = read_jsonl(path)
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not UTF-8 text; expected the {INCIDENTS_FILE} that NaNGuard writes") from None
    except (ValueError, OSError) as err:
        raise CLIError(f"{err}") from None
    wrong = not_incidents(path, records)
    if wrong is not None:
        raise CLIError(wrong)
    incidents = []
    for n, record in enumerate(records, 1):
        try:
            if not isinstance(record, dict):
                raise TypeError(f"a JSON {type(record).__name__}, not an object")
            incidents.append(Incident.from_dict(record))
        except (TypeError, ValueError) as err:
            raise CLIError(f"{path}, record {n}: not an incident ({err}); expected the {INCIDENTS_FILE} that NaNGuard writes") from None
    return incidents
