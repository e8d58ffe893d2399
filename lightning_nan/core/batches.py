"""Split any batch by sample positions, and fingerprint its samples.

A batch is any nesting of tensors, lists, tuples, namedtuples, mappings and dataclasses, as a
``DataLoader`` yields it. Its *per-sample fields* are the tensors whose first dimension is the batch
size and the lists/tuples of non-tensors (file names, say) of that length; :func:`select` picks
positions out of those and carries everything else (0-dim tensors, numbers, strings, ``None``,
tensors with another first dimension, objects of unknown classes) along unchanged.

>>> import torch
>>> batch = {"x": torch.arange(8.0).reshape(4, 2), "name": ["a", "b", "c", "d"], "scale": 2.0}
>>> batch_size(batch)
4
>>> sub = select(batch, [3, 1])
>>> sub["x"].tolist(), sub["name"], sub["scale"]
([[6.0, 7.0], [2.0, 3.0]], ['d', 'b'], 2.0)
>>> fingerprint(batch, 1) == fingerprint(sub, 1)  # same sample, other batch and position
True
>>> len(fingerprints(batch)), len(fingerprint(batch, 0))
(4, 16)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nan.core.fingerprint import DIGITS, hash_value, tensor_bytes, tensor_header

__all__ = ["BatchSplitError", "Splitter", "batch_size", "fingerprint", "fingerprints", "select"]

#: ``splitter(batch, positions) -> sub_batch``: the samples at ``positions``, in that order.
Splitter = Callable[[Any, Sequence[int]], Any]

_FIX = "Pass `splitter=` (a function (batch, positions) -> sub-batch) to BatchBisection."
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes)


class BatchSplitError(TypeError):
    """A batch that :func:`select` cannot split; the message names the type (and where it sits) and the fix.

    >>> try:
    ...     batch_size(object())
    ... except BatchSplitError as err:
    ...     print(str(err)[:44])
    Cannot split a batch of type object: lightni
    """


def batch_size(batch: Any) -> int:
    """The number of samples: the first dimension of the first tensor with ``dim >= 1``.

    Tensors are searched depth-first, in structure order (mapping insertion order, sequence order,
    dataclass field order). Raises :class:`BatchSplitError` when there is none, or when ``batch``
    itself is of a class this module cannot look into.

    >>> import torch
    >>> batch_size((torch.tensor(0.5), {"y": torch.zeros(3, 2)}, torch.zeros(7)))
    3
    """
    _check_top(batch)
    n = _first_dim(batch)
    if n is None:
        opaque = _first_opaque(batch)
        hint = f" (it holds a {_type_name(opaque)}, which cannot be looked into)" if opaque is not None else ""
        raise BatchSplitError(
            f"Cannot split a batch of type {_type_name(batch)}: no tensor with a batch dimension found{hint}. {_FIX}"
        )
    return n


def select(batch: Any, positions: Sequence[int], *, size: int | None = None) -> Any:
    """The sub-batch made of the samples at ``positions``, in that order, with the structure of ``batch``.

    Tensors are indexed on their own device (``index_select``), never copied to the host.
    ``size`` is the batch size when already known (default :func:`batch_size`). Containers keep their
    type: namedtuples, ``Mapping`` subclasses and dataclasses are rebuilt.

    >>> import torch
    >>> x = torch.arange(5)
    >>> select((x, ["a", "b", "c", "d", "e"], "shared"), [4, 0])
    (tensor([4, 0]), ['e', 'a'], 'shared')
    """
    n = _resolve_size(batch, size)
    pos = _check_positions(positions, n)
    return _select(batch, pos, n, {}, "")


def fingerprint(batch: Any, position: int, *, size: int | None = None) -> str:
    """A content hash of the sample at ``position`` (16 hex digits), the same in every process and run.

    It covers every per-sample field, in structure order: its path, dtype, per-sample shape and raw
    bytes (tensors, read on the CPU) or ``repr`` (other values). The same sample content gives the
    same fingerprint wherever it sits and whatever else is in the batch (for batches of the same
    structure), and it is the :func:`~lightning_nan.core.fingerprint.sample_fingerprint` of that
    sample as the data set yielded it (for a batch ``default_collate`` made). Raw bytes are
    native-endian; a ``repr`` that shows an object address is not stable.

    >>> import torch
    >>> a, b = {"x": torch.tensor([[1.0], [2.0]])}, {"x": torch.tensor([[9.0], [1.0], [2.0]])}
    >>> fingerprint(a, 0) == fingerprint(b, 1), fingerprint(a, 0) == fingerprint(a, 1)
    (True, False)
    """
    n = _resolve_size(batch, size)
    return _hashes(batch, _check_positions([position], n), n)[0]


def fingerprints(batch: Any, *, size: int | None = None) -> list[str]:
    """:func:`fingerprint` of every position, reading each tensor to the host once.

    >>> import torch
    >>> fps = fingerprints(torch.tensor([[1, 2], [3, 4], [1, 2]]))
    >>> fps[0] == fps[2], fps[0] == fps[1]
    (True, False)
    """
    n = _resolve_size(batch, size)
    return _hashes(batch, list(range(n)), n)


# --------------------------------------------------------------------------------------------- helpers


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """``(path suffix, child)`` of a container in structure order; nothing for leaves and unknown objects."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield f"[{key!r}]", value
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"[{i}]", value
    elif _is_dataclass_instance(obj):
        for f in dataclasses.fields(obj):
            if hasattr(obj, f.name):
                yield f".{f.name}", getattr(obj, f.name)


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (Mapping, list, tuple)) or _is_dataclass_instance(obj)


def _check_top(batch: Any) -> None:
    if isinstance(batch, (Tensor, *_PRIMITIVES)) or _is_container(batch):
        return
    raise BatchSplitError(
        f"Cannot split a batch of type {_type_name(batch)}: lightning_nan splits tensors, lists, tuples, "
        f"namedtuples, mappings and dataclasses (nested in any way). {_FIX}"
    )


def _first_dim(obj: Any) -> int | None:
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() >= 1 else None
    for _, child in _children(obj):
        n = _first_dim(child)
        if n is not None:
            return n
    return None


def _first_opaque(obj: Any) -> Any:
    """The first object of an unknown class nested in ``obj`` (for error messages), or ``None``."""
    for _, child in _children(obj):
        if not (isinstance(child, (Tensor, *_PRIMITIVES)) or _is_container(child)):
            return child
        found = _first_opaque(child)
        if found is not None:
            return found
    return None


def _holds_tensor(obj: Any) -> bool:
    return isinstance(obj, Tensor) or any(_holds_tensor(child) for _, child in _children(obj))


def _is_sample_list(obj: Any, n: int) -> bool:
    """A plain list/tuple (not a namedtuple) of ``n`` values with no tensor inside: one value per sample."""
    return isinstance(obj, (list, tuple)) and not _is_namedtuple(obj) and len(obj) == n and not _holds_tensor(obj)


def _is_sample_tensor(obj: Tensor, n: int) -> bool:
    return obj.dim() >= 1 and obj.shape[0] == n


def _resolve_size(batch: Any, size: int | None) -> int:
    _check_top(batch)
    if size is None:
        return batch_size(batch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Expected `size` to be the batch size (an int >= 0) or None, got {size!r}")
    return size


def _check_positions(positions: Sequence[int], n: int) -> list[int]:
    out = []
    for p in positions:
        i = operator.index(p)
        if not 0 <= i < n:
            raise IndexError(f"Position {i} is out of range for a batch of {n} samples (valid positions: 0 to {n - 1})")
        out.append(i)
    return out


def _index(pos: list[int], device: torch.device, cache: dict[torch.device, Tensor]) -> Tensor:
    if device not in cache:
        cache[device] = torch.tensor(pos, dtype=torch.long, device=device)
    return cache[device]


def _rebuild_failed(obj: Any, path: str, err: Exception) -> BatchSplitError:
    where = f"at {path}" if path else "at the top level"
    cause = f"{type(err).__name__}: {err}"
    return BatchSplitError(f"Cannot rebuild the {_type_name(obj)} {where} of the batch ({cause}). {_FIX}")


def _rebuild_sequence(obj: Sequence[Any], items: list[Any], path: str) -> Any:
    cls: Any = type(obj)  # a Sequence subclass: its constructor is its own
    if cls in (list, tuple):
        return cls(items)
    try:
        return cls(*items) if _is_namedtuple(obj) else cls(items)
    except Exception as err:
        raise _rebuild_failed(obj, path, err) from err


def _rebuild_mapping(obj: Mapping[Any, Any], items: dict[Any, Any], path: str) -> Any:
    if type(obj) is dict:
        return items
    try:
        if isinstance(obj, (dict, collections.UserDict)):  # a copy keeps attributes (defaultdict's factory, ...)
            out = copy.copy(obj)
            for key, value in items.items():
                out[key] = value
            return out
        cls: Any = type(obj)  # a Mapping subclass: its constructor is its own
        return cls(items)
    except Exception as err:
        raise _rebuild_failed(obj, path, err) from err


def _select(obj: Any, pos: list[int], n: int, cache: dict[torch.device, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        return obj.index_select(0, _index(pos, obj.device, cache)) if _is_sample_tensor(obj, n) else obj
    if isinstance(obj, Mapping):
        items = {key: _select(value, pos, n, cache, f"{path}[{key!r}]") for key, value in obj.items()}
        return _rebuild_mapping(obj, items, path)
    if isinstance(obj, (list, tuple)):
        if _is_sample_list(obj, n):
            return _rebuild_sequence(obj, [obj[i] for i in pos], path)
        return _rebuild_sequence(obj, [_select(v, pos, n, cache, f"{path}[{i}]") for i, v in enumerate(obj)], path)
    if _is_dataclass_instance(obj):
        fields = [f for f in dataclasses.fields(obj) if hasattr(obj, f.name)]
        values = {f.name: _select(getattr(obj, f.name), pos, n, cache, f"{path}.{f.name}") for f in fields}
        try:
            out = dataclasses.replace(obj, **{f.name: values[f.name] for f in fields if f.init})
            for f in fields:
                if not f.init:
                    object.__setattr__(out, f.name, values[f.name])  # works on frozen dataclasses too
        except Exception as err:
            raise _rebuild_failed(obj, path, err) from err
        return out
    return obj


def _sample_fields(obj: Any, n: int, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, field)`` of every per-sample field of ``obj``, in structure order."""
    if isinstance(obj, Tensor):
        if _is_sample_tensor(obj, n):
            yield path, obj
    elif _is_sample_list(obj, n):
        yield path, obj
    else:
        for suffix, child in _children(obj):
            yield from _sample_fields(child, n, path + suffix)


def _hashes(batch: Any, pos: list[int], n: int) -> list[str]:
    """:func:`~lightning_nan.core.fingerprint.sample_fingerprint` of the samples at ``pos``, each tensor read to the host once."""
    hashers = [hashlib.sha256() for _ in pos]
    for path, value in _sample_fields(batch, n, ""):
        if isinstance(value, Tensor):
            rows = value.detach()
            if len(pos) != n:  # only the rows asked for travel to the host
                rows = rows.index_select(0, torch.tensor(pos, dtype=torch.long, device=rows.device))
            raw = tensor_bytes(rows).numpy()
            head = tensor_header(path, rows.dtype, tuple(rows.shape[1:]), raw.shape[1])
            for h, row in zip(hashers, raw):
                h.update(head)
                h.update(row.tobytes())
        else:
            for h, i in zip(hashers, pos):
                hash_value(h, value[i], path)
    return [h.hexdigest()[:DIGITS] for h in hashers]
