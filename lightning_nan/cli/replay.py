"""``lightning-nan replay FILE``: reproduce a dumped failure offline and print where the NaN appears."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a dump written by BatchBisection(dump_dir=...)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def replay(path: str) -> dict[str, Any]:
    """Re-run the dumped samples through the dumped model; return whether it fails and the localization."""
    from lightning_nan.core.dump import read_dump
    from lightning_nan.core.localize import localize
    from lightning_nan.core.reevaluate import evaluate, preserved

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the model's class is usually defined in the user's project
    dump = read_dump(path)
    module, batch = dump["module"], dump["batch"]
    loss_fn = _loss_fn(module, dump)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with preserved(module, params=[p for _, p in params]):
        fails = evaluate(loss_fn, batch, params=[p for _, p in params], backward=dump["backward"])
    where = localize(module, lambda: loss_fn(batch), backward=dump["backward"], params=params)
    return {
        "file": path,
        "reproduced": fails,
        "samples": dump.get("indices") if dump.get("indices") is not None else dump.get("positions"),
        "indices_known": dump.get("indices") is not None,
        "step": (dump.get("incident") or {}).get("step"),
        "kind": (dump.get("incident") or {}).get("kind"),
        "localization": where.to_dict(),
        "summary": where.summary(),
    }


def _loss_fn(module: Any, dump: dict[str, Any]) -> Any:
    if hasattr(module, "training_step"):
        from lightning_nan.callbacks.batch_bisection import training_step_loss

        return lambda b: training_step_loss(module, b, dump["batch_idx"], manual=dump["manual"])
    return lambda b: module(b)  # a plain nn.Module whose forward returns the loss


def run(args: argparse.Namespace) -> int:
    try:
        result = replay(args.file)
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-nan replay: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    label = "data set indices" if result["indices_known"] else "positions in the batch"
    print(f"{result['file']}: step {result['step']}, non-finite {result['kind']}; {label} {result['samples']}")
    print(f"reproduced: {'yes' if result['reproduced'] else 'no (the failure did not recur)'}")
    print(f"localization: {result['summary']}")
    return 0
