"""``lightning-nan scan MODULE:FUNCTION``: find the samples of a dataset that would poison training.

Imports ``MODULE`` (the current folder first on ``sys.path``, as ``python -m`` does), calls
``FUNCTION()``, which must return a map-style dataset (``__getitem__`` and ``__len__``), and checks
every floating-point tensor of every sample for NaN/Inf and for magnitudes above ``--max-abs``. Each
flagged sample gets one record in the quarantine file (``--out``, default ``./quarantine.jsonl``), in
the format training runs use, so a run pointed at that file leaves them out. Records already in the
file are not written twice.

The exit code is 0 whether or not samples were flagged (the scan is a report); 2 for a usage error.

>>> import torch
>>> check_sample({"x": torch.tensor([1.0, float("nan")]), "y": torch.tensor([3e38])}, max_abs=1e30)
["non-finite: ['x']", "extreme magnitude |x|=3e+38 at ['y']"]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from lightning_nan.cli import CLIError
from lightning_nan.core.norms import iter_tensors
from lightning_nan.core.quarantine import QUARANTINE_FILE, Quarantine, make_record, sample_fingerprint

_FLUSH_EVERY = 256  # flagged samples buffered between two appends to the quarantine file
_SHOW_INDICES = 50  # indices printed in the summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODULE:FUNCTION [--out PATH] [--max-abs X] [--limit N]``."""
    parser.add_argument("target", metavar="MODULE:FUNCTION", help="e.g. mydata:make_dataset; FUNCTION() returns the dataset")
    parser.add_argument("--out", default=QUARANTINE_FILE, help=f"quarantine file to append to (default: ./{QUARANTINE_FILE})")
    parser.add_argument("--max-abs", type=float, default=1e30, help="flag finite values with |x| above this (default: 1e30)")
    parser.add_argument("--limit", type=int, default=None, help="scan only the first N samples")


def run(args: argparse.Namespace) -> int:
    """Scan the dataset, append the flagged samples to ``args.out``, print a summary."""
    if not (args.max_abs > 0 and math.isfinite(args.max_abs)):
        raise CLIError(f"expected --max-abs to be a positive finite number, got {args.max_abs!r}")
    if args.limit is not None and args.limit < 0:
        raise CLIError(f"expected --limit to be a non-negative number of samples, got {args.limit!r}")
    dataset = load_dataset(args.target)
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    quarantine = Quarantine(args.out)
    try:
        quarantine.records()  # fail now, not after the scan, if --out is not a quarantine file
    except (ValueError, OSError) as err:
        raise CLIError(f"cannot use --out: {err}") from None
    flagged: list[int] = []
    buffer: list[dict[str, Any]] = []
    written = 0
    for index in _progress(range(total)):
        sample = dataset[index]
        reasons = check_sample(sample, args.max_abs)
        if not reasons:
            continue
        flagged.append(index)
        buffer.append(
            make_record(
                index=index, position=None, epoch=None, step=None, batch_idx=None, reason="; ".join(reasons),
                fingerprint=sample_fingerprint(sample), source="scan",
            )
        )
        if len(buffer) >= _FLUSH_EVERY:
            written += len(quarantine.add(buffer))
            buffer = []
    written += len(quarantine.add(buffer))
    shown = ", ".join(map(str, flagged[:_SHOW_INDICES]))
    if len(flagged) > _SHOW_INDICES:
        shown += f", ... (+{len(flagged) - _SHOW_INDICES} more)"
    print(f"scanned {total} samples, flagged {len(flagged)}: indices [{shown}]")
    if flagged:
        print(f"{written} new record(s) appended to {quarantine.path}")
    return 0


def check_sample(sample: Any, max_abs: float) -> list[str]:
    """Why ``sample`` is suspicious: one reason per floating-point tensor holding NaN/Inf or ``|x| > max_abs``."""
    reasons = []
    for path, t in iter_tensors(sample):
        if t.numel() == 0:
            continue
        field = path or "<sample>"
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            reasons.append(f"non-finite: {field}")
            continue
        peak = float(t.abs().max())
        if peak > max_abs:
            reasons.append(f"extreme magnitude |x|={peak:.3g} at {field}")
    return reasons


def load_dataset(target: str) -> Any:
    """Import ``MODULE``, call ``FUNCTION()`` and check that it returned a map-style dataset."""
    fn = load_function(target)
    dataset = fn()
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise CLIError(
            f"{target}() returned a {type(dataset).__name__}, expected a map-style dataset (with __getitem__ and"
            " __len__); iterable datasets cannot be scanned by index"
        )
    return dataset


def load_function(target: str) -> Callable[[], Any]:
    """The function named by ``MODULE:FUNCTION``, importing ``MODULE`` with the current folder first on the path."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise CLIError(f"expected MODULE:FUNCTION (e.g. mydata:make_dataset), got {target!r}")
    if os.sep in module_name or module_name.endswith(".py"):
        raise CLIError(
            f"expected a module name, not a file path, got {module_name!r}: run from its folder and write"
            f" {os.path.splitext(os.path.basename(module_name))[0]}:{attr}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # the module exists but one of its own imports failed: show the user where
        raise CLIError(
            f"cannot import module {module_name!r} ({err}): run from the folder that contains it, or add that folder"
            " to PYTHONPATH"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}: check the name after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}, not a function: name a function that returns the dataset")
    return obj


def _progress(it: range) -> Any:
    from tqdm import tqdm

    return tqdm(it, desc="scan", unit="sample", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
