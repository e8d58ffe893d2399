"""``lightning-nan replay FILE``: reproduce a dumped failure offline and print where the NaN appears.

The model's own code is used when its class can be imported here (from the current folder, or the
folder its source file was in); otherwise, or with ``--exported``, the exported program the dump
holds, which needs no source code (a model class defined in the training script, say).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a dump written by BatchBisection(dump_dir=...)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--exported", action="store_true", help="replay the exported program even where the model's class can be imported"
    )


def replay(path: str, *, exported: bool = False) -> dict[str, Any]:
    """Re-run the dumped samples through the dumped model; return whether it fails and the localization."""
    from lightning_nan.core.dump import read_dump

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the batch's classes, if any, are usually defined in the user's project
    dump = read_dump(path)
    module, batch = dump["module"], dump["batch"]
    if module is not None and not exported:
        fails, where = _replay_module(module, batch, dump)
        replayed_with = f"the model's code ({type(module).__qualname__} from {type(module).__module__})"
    elif dump.get("exported") is not None:
        from lightning_nan.core.exported import load_program, replay_program

        try:
            fails, where = replay_program(load_program(dump["exported"]), batch, backward=dump["backward"])
        except Exception as err:  # noqa: BLE001 - e.g. another torch version, or an operation this machine lacks
            raise ValueError(
                f"{path}: the exported program could not run here ({type(err).__name__}: {err}); it was written with "
                f"torch {dump.get('torch')}, this is torch {_torch_version()}. Replay it where the model's class can be imported."
            ) from None
        replayed_with = "the exported program (no source code needed)"
    else:
        why = dump.get("module_error") if module is None else "--exported was asked for"
        raise ValueError(
            f"{path}: the model {dump.get('module_class', '')} cannot be loaded here ({why}), and the dump holds no "
            f"exported program ({dump.get('export_error')}). Run replay where the model's class can be imported "
            "(e.g. from the project folder)."
        )
    return {
        "file": path,
        "reproduced": fails,
        "samples": dump.get("indices") if dump.get("indices") is not None else dump.get("positions"),
        "indices_known": dump.get("indices") is not None,
        "step": (dump.get("incident") or {}).get("step"),
        "kind": (dump.get("incident") or {}).get("kind"),
        "replayed_with": replayed_with,
        "localization": where.to_dict(),
        "summary": where.summary(),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _replay_module(module: Any, batch: Any, dump: dict[str, Any]) -> tuple[bool, Any]:
    from lightning_nan.core.localize import localize
    from lightning_nan.core.reevaluate import evaluate, preserved

    loss_fn = _loss_fn(module, dump)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with preserved(module, params=[p for _, p in params]):
        fails = evaluate(loss_fn, batch, params=[p for _, p in params], backward=dump["backward"])
    return fails, localize(module, lambda: loss_fn(batch), backward=dump["backward"], params=params)


def _loss_fn(module: Any, dump: dict[str, Any]) -> Any:
    if hasattr(module, "training_step"):
        from lightning_nan.callbacks._training_step import training_step_loss

        return lambda b: training_step_loss(module, b, dump["batch_idx"], manual=dump["manual"])
    return lambda b: module(b)  # a plain nn.Module whose forward returns the loss


def run(args: argparse.Namespace) -> int:
    try:
        result = replay(args.file, exported=args.exported)
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-nan replay: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    label = "data set indices" if result["indices_known"] else "positions in the batch"
    print(f"{result['file']}: step {result['step']}, non-finite {result['kind']}; {label} {result['samples']}")
    print(f"reproduced: {'yes' if result['reproduced'] else 'no (the failure did not recur)'}, with {result['replayed_with']}")
    print(f"localization: {result['summary']}")
    return 0
