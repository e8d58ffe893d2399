"""One content fingerprint of a sample, the same wherever the sample is seen.

:func:`sample_fingerprint` hashes a sample as the data set yields it; :func:`~lightning_nan.core.batches.fingerprint`
gives the same hash for that sample inside a batch ``default_collate`` made (any position, any
batch), so a quarantine record written by ``lightning-nan scan``, by a training incident or by a
validation incident names a sample the same way, and records of an iterable data set (no index)
de-duplicate by it. Python numbers count as ``default_collate`` turns them into tensors (``int``:
int64, ``float``: float64, ``bool``: bool), NumPy arrays as the tensors they become; strings and
other values by ``repr`` (an object address in it left out). Raw bytes are native-endian.

>>> import torch
>>> from torch.utils.data import default_collate
>>> from lightning_nan.core.batches import fingerprint
>>> samples = [{"x": torch.tensor([1.0, 2.0]), "label": 3, "name": "a"}, {"x": torch.tensor([0.0, 5.0]), "label": 1, "name": "b"}]
>>> batch = default_collate(samples)
>>> [fingerprint(batch, i) for i in range(2)] == [sample_fingerprint(s) for s in samples]
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["hash_value", "sample_fingerprint", "tensor_bytes", "tensor_header"]

#: An object address in a ``repr`` (``<Foo object at 0x7f...>``): left out of the hash.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: Hex digits kept of the sha256.
DIGITS = 16


def sample_fingerprint(sample: Any) -> str:
    """A content hash of one sample (first 16 hex digits of a sha256), stable across runs and processes.

    Covers every tensor (path, dtype, shape, bytes) in structure order and ``repr`` of other leaves.

    >>> a = {"x": torch.tensor([1.0, 2.0]), "y": 3}
    >>> sample_fingerprint(a) == sample_fingerprint({"x": torch.tensor([1.0, 2.0]), "y": 3})
    True
    >>> sample_fingerprint(a) == sample_fingerprint({"x": torch.tensor([1.0, 2.5]), "y": 3})
    False
    >>> sample_fingerprint(a) == sample_fingerprint({"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(3)})  # as collated
    True
    >>> sample_fingerprint({"x": torch.ones(1), "meta": object()}) == sample_fingerprint({"x": torch.ones(1), "meta": object()})
    True
    """
    h = hashlib.sha256()
    hash_value(h, sample, "")
    return h.hexdigest()[:DIGITS]


def tensor_header(path: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> bytes:
    """What precedes a tensor's bytes in the hash: its path in the sample, dtype, shape and byte count."""
    return f"{path}\0{dtype}\0{shape}\0".encode() + str(nbytes).encode() + b"\0"


def tensor_bytes(t: Tensor) -> Tensor:
    """``t`` on the host, dense and contiguous, as a 2-D uint8 tensor: one row of raw bytes per first-dim entry."""
    rows = t.detach().cpu()
    if rows.layout != torch.strided:
        rows = rows.to_dense()
    rows = rows.resolve_conj().resolve_neg().contiguous()
    n = rows.shape[0] if rows.dim() else 1
    return rows.reshape(n, -1 if rows.numel() else 0).view(torch.uint8)


def hash_value(h: Any, value: Any, path: str) -> None:
    """Feed one sample (or a field of one, at ``path``) into the hasher ``h``, in structure order."""
    value = _as_collated(value)
    if isinstance(value, Tensor):
        data = tensor_bytes(value.reshape(1, *value.shape)).numpy().tobytes()
        h.update(tensor_header(path, value.dtype, tuple(value.shape), len(data)))
        h.update(data)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            hash_value(h, item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            hash_value(h, item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if hasattr(value, f.name):
                hash_value(h, getattr(value, f.name), f"{path}.{f.name}")
    else:
        data = _ADDRESS.sub(" at 0x", repr(value)).encode()  # an object's address differs from run to run
        h.update(f"{path}\0repr\0{len(data)}\0".encode())
        h.update(data)


def _as_collated(value: Any) -> Any:
    """A leaf as ``default_collate`` puts it in a batch: Python and NumPy numbers, NumPy arrays as tensors."""
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64) if -(2**63) <= value < 2**63 else value
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None and value.dtype.kind in "biufc":
        return torch.as_tensor(value)
    return value
