"""Argument checks for the constructors: one message format, and a ``ValueError`` for any wrong type.

Each check returns the value (an ``int`` stays an ``int``; a number becomes a ``float``) or raises
``ValueError("Expected `name` ..., got value")``. Python, numpy and one-element torch numbers are
taken; ``bool`` never is, nor NaN, nor ±inf unless asked for; ``hint`` says what a special value means.

>>> integer("every_n_steps", 50, low=1)
50
>>> number("factor", 0.5, low=0, high=1, low_open=True, high_open=True)
0.5
>>> import numpy, torch
>>> number("max_norm", numpy.float32(2.0)), number("max_norm", torch.tensor(2.0)), integer("window", numpy.int64(3))
(2.0, 2.0, 3)
>>> integer("patience", True, low=1)
Traceback (most recent call last):
...
ValueError: Expected `patience` to be an int >= 1, got True
>>> number("max_norm", "1.0", low=0, low_open=True, optional=True)
Traceback (most recent call last):
...
ValueError: Expected `max_norm` to be None or a number > 0, got '1.0'
>>> choice("group_by", "layer", ("parameter", "module"))
Traceback (most recent call last):
...
ValueError: Expected `group_by` in ('parameter', 'module'), got 'layer'
>>> fs_path("incidents_path", 123, optional=True)
Traceback (most recent call last):
...
ValueError: Expected `incidents_path` to be None or a file path (a str or pathlib.Path), got 123
>>> regex("include", "(", optional=True)
Traceback (most recent call last):
...
ValueError: Expected `include` to be None or a regular expression (a str), got '(': missing ), unterminated subpattern at position 0
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if math.isnan(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def integer(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False, hint: str = ""
) -> Any:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[low, high]`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and _within(int(value), low, high, False, False):
        return int(value)
    kind = "None or an int" if optional else "an int"
    raise ValueError(f"Expected `{name}` to be {kind}{_range(low, high, False, False)}{_hint(hint)}, got {value!r}")


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    infinite: bool = False,
    hint: str = "",
) -> Any:
    """``float(value)`` if it is a finite real number (not a ``bool``) in the range; ``None`` when ``optional``.

    ``infinite``: ``inf`` is allowed too (e.g. a norm type).
    """
    if optional and value is None:
        return None
    real = _real(value)
    if real is not None:
        if infinite and real == math.inf:
            return math.inf
        if math.isfinite(real) and _within(real, low, high, low_open, high_open):
            return real
    kind = "None or a number" if optional else "a number"
    extra = " or inf" if infinite else ""
    raise ValueError(
        f"Expected `{name}` to be {kind}{_range(low, high, low_open, high_open)}{extra}{_hint(hint)}, got {value!r}"
    )


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (a one-element real tensor too), else ``None``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float: out of any range here
        return -math.inf if value < 0 else math.inf


def boolean(name: str, value: Any, *, hint: str = "") -> bool:
    """``value`` if it is a ``bool``."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"Expected `{name}` to be a bool{_hint(hint)}, got {value!r}")


def choice(name: str, value: T, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``."""
    try:
        if value in choices:
            return value
    except TypeError:  # an unhashable or incomparable value: not one of them
        pass
    raise ValueError(f"Expected `{name}` in {tuple(choices)}, got {value!r}")


def fs_path(name: str, value: Any, *, optional: bool = False, kind: str = "file", hint: str = "") -> Any:
    """``os.fspath(value)`` if it is a non-empty ``str`` or ``os.PathLike`` naming a text path (``None`` when ``optional``)."""
    if optional and value is None:
        return None
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if isinstance(text, str) and text:
        return text
    what = f"None or a {kind} path" if optional else f"a {kind} path"
    raise ValueError(f"Expected `{name}` to be {what} (a str or pathlib.Path){_hint(hint)}, got {value!r}")


def regex(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is a ``str`` that compiles as a regular expression (``None`` when ``optional``)."""
    if optional and value is None:
        return None
    why = ""
    if isinstance(value, str):
        try:
            re.compile(value)
            return value
        except re.error as err:
            why = f": {err}"
    what = "None or a regular expression" if optional else "a regular expression"
    raise ValueError(f"Expected `{name}` to be {what} (a str), got {value!r}{why}")
