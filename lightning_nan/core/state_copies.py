"""Copies of nested training states (dicts, lists, tuples of tensors): to host memory, and clones.

A snapshot must not alias the live state: :func:`copy_to_host` copies every tensor to CPU
(asynchronously from a GPU, into pinned memory, reusing the buffers of an earlier copy when they
fit), :func:`clone_tree` clones a copy before it is handed back to a live object.

>>> import torch
>>> state = {"w": torch.ones(2), "steps": [torch.tensor(3)], "lr": 0.1}
>>> events = {}
>>> copied = copy_to_host(state, None, events)
>>> copied["w"] is state["w"], torch.equal(copied["w"], state["w"]), events
(False, True, {})
>>> again = copy_to_host(state, copied, events)  # into the same buffers
>>> again["w"] is copied["w"], clone_tree(again)["w"] is again["w"]
(True, False)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor


def copy_to_host(obj: Any, reuse: Any, events: dict[torch.device, Any]) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor copied to CPU (into ``reuse``'s buffers when they fit).

    Copies from a CUDA device are asynchronous: each such device is added to ``events`` (the caller
    records an event there and waits for it before reading the copy). Other values are deep-copied.
    """
    if isinstance(obj, Tensor):
        src = obj.detach()
        if src.device.type == "cpu":
            if _fits(reuse, src):
                return reuse.copy_(src)
            return src.clone()
        cuda = src.device.type == "cuda"
        dst = reuse if _fits(reuse, src) and (reuse.is_pinned() or not cuda) else None
        if dst is None:
            dst = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=cuda)
        dst.copy_(src, non_blocking=cuda)  # asynchronous into pinned memory; waited for before use
        if cuda:
            events.setdefault(src.device, None)
        return dst
    if isinstance(obj, dict):
        return {k: copy_to_host(v, reuse.get(k) if isinstance(reuse, dict) else None, events) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        same = isinstance(reuse, (list, tuple)) and len(reuse) == len(obj)
        items = [copy_to_host(v, reuse[i] if same else None, events) for i, v in enumerate(obj)]
        return type(obj)(items) if type(obj) in (list, tuple) else copy.deepcopy(obj)
    return copy.deepcopy(obj)


def clone_tree(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor cloned (other values deep-copied)."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(clone_tree(v) for v in obj)
    return copy.deepcopy(obj)


def _fits(buf: Any, src: Tensor) -> bool:
    return isinstance(buf, Tensor) and buf.shape == src.shape and buf.dtype == src.dtype and buf.device.type == "cpu"
