"""What every two-rank DDP script of ``tests/ddp`` does at the end of its run.

Imported by the scripts (run from this folder, so it is on ``sys.path``); the tests that launch them
use ``launch`` from ``test_ddp_guard.py``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import torch

from lightning_nan.core.files import atomic_write


def load_namespace(namespace: str) -> tuple[ModuleType, ModuleType]:
    """``(pl, lib)``: the Lightning namespace (``pytorch_lightning`` or ``lightning``) and lightning_nan's for it."""
    if namespace == "pytorch_lightning":
        return importlib.import_module("pytorch_lightning"), importlib.import_module("lightning_nan")
    return importlib.import_module("lightning.pytorch"), importlib.import_module("lightning_nan.lightning")


def write_pid(outdir: str, rank: int) -> None:
    """Write this process's id to ``outdir/pid{rank}``, so the launcher can check that every rank ended."""
    with open(os.path.join(outdir, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))


def finish(outdir: str, result: dict[str, Any], trainer: Any, *, reraise: BaseException | None = None) -> int:
    """Write ``result`` to ``outdir/rank{r}.pt`` atomically, tear gloo down, wait for the child rank.

    Returns the exit code for ``sys.exit``: 0, or the child's non-zero code. With ``reraise`` the
    error is raised right after the file is written (what a user's script would do), skipping the rest.
    """
    path = os.path.join(outdir, f"rank{trainer.global_rank}.pt")
    atomic_write(path, lambda f: torch.save(result, f))
    if reraise is not None:
        raise reraise
    # Tear gloo down before the interpreter exits: left to exit-time destructors, its threads
    # sometimes abort the process ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    code = 0
    # Rank 0 started rank 1 (subprocess launcher): wait for it so the caller sees both finish.
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        child = proc.wait(timeout=150)
        code = code or child
    return code
