"""ModelCheckpoint's saves as CheckpointRollback(source="checkpoint") finds and checks them.

A save is a file, or, under ``ModelParallelStrategy`` (FSDP2) and FSDP with sharded checkpoints, a
folder of shards. Those strategies, and DeepSpeed (``_trainer.partitions_state``), load a save into
the model and the optimizers in place (``strategy.load_checkpoint``) and hand back only the rest, so
a save is checked *aside* first, without touching the live state, wherever it can be read that way.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_nan.callbacks._types import TrainerLike
from lightning_nan.core.known_good import state_norm

#: Lightning's metadata file in a folder of shards (``lightning_fabric.strategies.fsdp._METADATA_FILENAME``).
_METADATA = "meta.pt"


def candidate_saves(trainer: TrainerLike) -> list[str]:
    """Every save of the Trainer's ModelCheckpoints, newest first, each once: their best and last saves
    and every other ``*.ckpt`` in their folders (with ``monitor=None`` and ``save_top_k=-1`` they keep
    all saves without listing them)."""
    paths: dict[str, str] = {}
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        folder, ext = getattr(cb, "dirpath", None), getattr(cb, "FILE_EXTENSION", ".ckpt")
        kept = [e.path for e in os.scandir(folder) if e.name.endswith(ext)] if folder and os.path.isdir(folder) else []
        for p in (getattr(cb, "best_model_path", ""), getattr(cb, "last_model_path", ""), *kept):
            if p and os.path.exists(p):
                paths.setdefault(os.path.realpath(p), p)  # ``save_last="link"`` points at another save
    return sorted(paths.values(), key=_modified, reverse=True)


def _modified(path: str) -> float:
    """A save's time: a folder's own mtime misses files rewritten in place, so the newest of its entries too."""
    if not os.path.isdir(path):
        return os.path.getmtime(path)
    with os.scandir(path) as entries:
        return max([os.path.getmtime(path), *(e.stat().st_mtime for e in entries)])


def finite_aside(trainer: TrainerLike, path: str) -> bool | None:
    """Whether the save's model weights (and buffers) are all finite, read without loading them into the
    model; ``None`` where the save cannot be read aside (a DeepSpeed folder). This rank's part only: the
    caller agrees across ranks. A folder of shards is read with ``torch.distributed.checkpoint``, a
    collective: every rank must call this for the same path."""
    if os.path.isfile(path):
        state = torch.load(path, mmap=True, map_location="cpu", weights_only=False).get("state_dict")
        return None if state is None else bool(torch.isfinite(state_norm(state)))
    if os.path.isfile(os.path.join(path, _METADATA)):
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        with torch.no_grad():  # a scratch copy of this rank's shards, filled from the save
            shards: dict[str, Any] = get_model_state_dict(trainer.strategy.model)  # tensors (DTensors) by name
            scratch = {k: v.detach().clone() for k, v in shards.items()}
        load({"state_dict": scratch}, checkpoint_id=path)
        return bool(torch.isfinite(state_norm(scratch)))
    return None


def param_group_settings(optimizers: list[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Each optimizer's param-group settings (lr, momentum, ...), without the parameters."""
    return [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups] for opt in optimizers]


def restore_param_group_settings(optimizers: list[torch.optim.Optimizer], settings: list[list[dict[str, Any]]]) -> None:
    for opt, groups in zip(optimizers, settings):
        for group, saved in zip(opt.param_groups, groups):
            group.update(saved)
