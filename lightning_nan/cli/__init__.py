"""The ``lightning-nan`` command line: ``lightning-nan COMMAND ...`` (also ``python -m lightning_nan.cli``).

Each command lives in its own module, imported only when that command runs; the module defines
``add_arguments(parser)`` and ``run(args) -> int``. Adding a command is one line in :data:`COMMANDS`.
Mistakes the user can fix (a missing or unreadable file, a bad ``module:function``) print one line on
stderr and exit with code 2, without a traceback.

>>> main(["quarantine", "list", "/no/such/quarantine.jsonl"])
2
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

PROG = "lightning-nan"

#: command name -> module defining ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS: dict[str, str] = {
    "quarantine": "lightning_nan.cli.quarantine",
    "scan": "lightning_nan.cli.scan",
    "replay": "lightning_nan.cli.replay",
    "report": "lightning_nan.cli.report",
}

# One-line summaries for ``--help`` (optional: a command without one is still listed).
_SUMMARIES: dict[str, str] = {
    "quarantine": "list or clear the quarantined samples of a run",
    "scan": "pre-flight scan of a dataset for non-finite values and extreme magnitudes",
    "replay": "replay a recorded incident",
    "report": "summarise the incidents of a run",
}


class CLIError(Exception):
    """A mistake the user can fix: printed as one line on stderr, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-nan`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _top_parser().parse_args(argv)
        if args.command is None:
            _top_parser().print_help(sys.stderr)
            return 2
        code = _dispatch(args.command, args.args)
        sys.stdout.flush()  # here, so a closed pipe is caught below rather than at exit
        return code
    except BrokenPipeError:  # the reader went away (`... | head -1`): stop quietly, as other tools do
        _silence_stdout()
        return 1
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), message already printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at ``os.devnull``, so the interpreter's final flush finds no broken pipe either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a captured stream): nothing to silence
        pass


def _dispatch(command: str, rest: list[str]) -> int:
    module_name = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # the command exists but one of its own imports is missing: a real bug
        print(f"{PROG} {command}: not available in this version", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=_SUMMARIES.get(command))
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args))


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for name, module_name in COMMANDS.items():
        summary = _SUMMARIES.get(name, "")
        if importlib.util.find_spec(module_name) is None:
            summary = f"{summary} (not available in this version)".strip()
        lines.append(f"  {name:<12}{summary}")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for lightning_nan runs: quarantined samples, data scans, incidents.",
        epilog="commands:\n" + "\n".join(lines) + f"\n\nRun `{PROG} COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser
