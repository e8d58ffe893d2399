"""The end-of-run incident summary: a plain-text table for the console and a JSON form for machines.

One row per incident (step, epoch, kind, cause, module, samples, action), then the count by cause,
the advice for each cause once, and the quarantined samples. ``lightning-nan report RUN_DIR`` prints
the same from a run's ``nan_incidents.jsonl``.

>>> from lightning_nan.core.records import LocalizationRecord
>>> incidents = [
...     Incident(step=3, kind="loss", cause="dirty_data", samples=[137, 911, 4, 5, 6], epoch=0, advice="Clean the data."),
...     Incident(step=9, kind="grad", cause="unsafe_op", module="head.1", epoch=1, action="recovered by CheckpointRollback",
...              localization=LocalizationRecord(module="head.1", op="log", op_location="src/model.py:41 in forward")),
... ]
>>> print(summary_table(incidents, [{"index": 137}, {"index": 911}], quarantine_path="runs/quarantine.jsonl", width=120))
2 non-finite incidents, steps 3 to 9
step  epoch  kind  cause       module                       samples              action
3     0      loss  dirty_data  -                            [137, 911, +3 more]  skipped
9     1      grad  unsafe_op   head.1 (log at model.py:41)  -                    recovered by CheckpointRollback
by cause: dirty_data 1, unsafe_op 1
advice:
  dirty_data: Clean the data.
2 samples quarantined in runs/quarantine.jsonl: indices [137, 911]
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_nan.core.incident import Incident
from lightning_nan.core.quarantine import usable_indices
from lightning_nan.core.validate import integer

__all__ = ["COLUMNS", "summary_json", "summary_table"]

#: The table's columns, left to right.
COLUMNS: tuple[str, ...] = ("step", "epoch", "kind", "cause", "module", "samples", "action")

_SHRINKABLE = ("module", "action", "samples", "cause")  # cut these (widest first) to fit the width
_GAP = "  "
_ELLIPSIS = "…"


def summary_table(
    incidents: Sequence[Incident],
    quarantine: Sequence[Mapping[str, Any]] = (),
    *,
    width: int = 100,
    quarantine_path: str | os.PathLike[str] | None = None,
    max_rows: int | None = None,
) -> str:
    """The incidents (in the order they happened) as a console table, then counts, advice and quarantine.

    ``max_rows``: show only the first and the last incidents, with a line counting the others.

    Cells too long for ``width`` are cut with ``…`` (the widest of module, action, samples and cause
    first; a module's name from the left, sparing its ``(op at file:line)``); advice is wrapped. A line is longer than ``width`` only to show a file path whole. ``quarantine`` holds
    the records of the run's quarantine file (see :class:`~lightning_nan.core.quarantine.Quarantine`),
    ``quarantine_path`` where they were read.

    >>> print(summary_table([]))
    no incidents
    >>> rows = summary_table([Incident(step=1, kind="loss", module="", samples=[2])], width=60).splitlines()
    >>> rows[2].split()
    ['1', '-', 'loss', 'unknown', '<root>', '[2]', 'skipped']
    """
    integer("width", width, low=60, hint="characters per line")
    incidents = list(incidents)
    lines: list[str] = []
    if not incidents:
        lines.append("no incidents")
    else:
        steps = [i.step for i in incidents]
        s = "" if len(incidents) == 1 else "s"
        span = f"step {steps[0]}" if min(steps) == max(steps) else f"steps {min(steps)} to {max(steps)}"
        lines.append(f"{len(incidents)} non-finite incident{s}, {span}")
        shown = list(incidents)
        if max_rows is not None and len(shown) > max_rows:  # concise: the first and the last ones
            head, tail = shown[: max_rows - max_rows // 2], shown[len(shown) - max_rows // 2 :]
            table = _table([[_cell(inc, c) for c in COLUMNS] for inc in head + tail], width)
            hidden = len(shown) - len(head) - len(tail)
            table.insert(1 + len(head), f"… {hidden} more incident{'s' if hidden != 1 else ''} …")
            lines.extend(table)
        else:
            lines.extend(_table([[_cell(inc, c) for c in COLUMNS] for inc in shown], width))
        counts = _by_cause(incidents)
        lines.append(_fit("by cause: " + ", ".join(f"{c} {n}" for c, n in counts.items()), width))
        advice = _advice(incidents)
        if advice:
            lines.append("advice:")
            for cause, text in advice.items():
                lines.extend(textwrap.wrap(text, width, initial_indent=f"  {cause}: ", subsequent_indent="    "))
    if quarantine:
        lines.extend(_quarantine_lines(list(quarantine), quarantine_path, width))
    return "\n".join(lines)


def summary_json(incidents: Sequence[Incident], quarantine: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The same summary as JSON-safe data: the incidents' ``to_dict()``, counts, advice and quarantine records.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``; tuples become lists; other
    objects their ``str``.

    >>> out = summary_json([Incident(step=4, kind="loss", cause="overflow", advice="Lower the lr.", detail={"loss": math.nan})])
    >>> sorted(out), out["by_cause"], out["advice"], out["incidents"][0]["detail"]
    (['advice', 'by_cause', 'incidents', 'quarantine'], {'overflow': 1}, {'overflow': 'Lower the lr.'}, {'loss': 'nan'})
    """
    incidents = list(incidents)
    return {
        "incidents": [_json_safe(i.to_dict()) for i in incidents],
        "by_cause": _by_cause(incidents),
        "advice": _advice(incidents),
        "quarantine": [_json_safe(dict(r)) for r in quarantine],
    }


# ----------------------------------------------------------------------------------------------- cells


def _cell(inc: Incident, column: str) -> str:
    if column == "module":
        return _module_cell(inc)
    if column == "samples":
        return _samples_cell(inc)
    value = getattr(inc, column)
    return "-" if value is None or value == "" else str(value)


def _module_cell(inc: Incident) -> str:
    """``module``, ``<root>`` for the model itself, plus ``(op at file.py:LINE)`` when an operation was named."""
    text = "-" if inc.module is None else (inc.module or "<root>")
    loc = inc.localization
    op = None if loc is None else loc.op
    if op and loc is not None:
        at = _short_location(loc.op_location)
        op_text = f"{op} at {at}" if at else str(op)
        text = op_text if inc.module is None else f"{text} ({op_text})"
    return text


def _samples_cell(inc: Incident) -> str:
    if inc.samples is not None:
        return _short_list(list(inc.samples))
    positions = None if inc.bisection is None else inc.bisection.positions  # (rank, batch_idx, position) when indices are unknown
    if isinstance(positions, (list, tuple)) and positions:
        try:
            return "pos " + _short_list([p[-1] for p in positions])
        except (TypeError, IndexError, KeyError):
            return f"{len(positions)} by position"
    return "-"


def _short_location(location: Any) -> str | None:
    """``"src/model.py:41 in forward"`` -> ``"model.py:41"``."""
    if not isinstance(location, str) or not location:
        return None
    place = location.split(" in ")[0].strip()
    return os.path.basename(place) or place


def _short_list(values: list[Any], keep: int = 2) -> str:
    """``[137, 911, +3 more]``: the first ``keep`` values when there are more than ``keep + 1``."""
    if len(values) <= keep + 1:
        return "[" + ", ".join(map(str, values)) + "]"
    return "[" + ", ".join(map(str, values[:keep])) + f", +{len(values) - keep} more]"


# ----------------------------------------------------------------------------------------------- layout


def _table(rows: list[list[str]], width: int) -> list[str]:
    rows = [list(COLUMNS)] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    shrink = [COLUMNS.index(c) for c in _SHRINKABLE]
    floor = {i: max(len(COLUMNS[i]), 6) for i in shrink}
    # first spare the "(op at file:line)" of the module column (its name is cut from the left instead)
    m = COLUMNS.index("module")
    ops = [len(row[m].partition(" (")[1] + row[m].partition(" (")[2]) for row in rows[1:] if " (" in row[m]]
    keep_ops = {**floor, m: min(widths[m], max(floor[m], max(ops, default=0) + 7))}
    for floors in (keep_ops, floor):
        # the last column needs no padding, so only its own width counts
        while sum(widths) + len(_GAP) * (len(widths) - 1) > width:
            candidates = [i for i in shrink if widths[i] > floors[i]]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
    lines = []
    for row in rows:
        cells = [(_fit_module if c == "module" else _fit)(cell, w).ljust(w) for c, cell, w in zip(COLUMNS, row, widths)]
        lines.append(_fit(_GAP.join(cells).rstrip(), width))
    return lines


def _fit(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(n - 1, 0)] + _ELLIPSIS


def _fit_module(text: str, n: int) -> str:
    """Cut a module's name from the left (its tail is the specific part), keeping ``(op at file:line)``."""
    if len(text) <= n:
        return text
    name, sep, op = text.partition(" (")
    if sep and n - len(sep + op) - 1 >= 6:
        return _ELLIPSIS + name[len(name) - (n - len(sep + op) - 1) :] + sep + op
    if not sep and n >= 6:
        return _ELLIPSIS + text[len(text) - n + 1 :]
    return _fit(text, n)


def _quarantine_lines(records: list[Mapping[str, Any]], path: Any, width: int) -> list[str]:
    indices = sorted(usable_indices(records))  # read as training reads them ("9" is index 9)
    unknown = sum(1 for r in records if r.get("index") is None)
    s = "" if len(records) == 1 else "s"
    where = f" in {os.fspath(path)}" if path is not None else ""
    rest = f" ({unknown} without a data set index)" if unknown else ""

    def line(shown: str, where: str) -> str:
        return f"{len(records)} sample{s} quarantined{where}" + (f": indices {shown}" if indices else "") + rest

    for where_ in ([where, ""] if where else [""]):
        for keep in range(len(indices), 0, -1) if indices else [0]:
            text = line(_short_list(indices, keep=keep), where_)
            if len(text) <= width:
                return [text] if where_ == where else [text, f"  {where.strip()}"]
    text = _fit(line(_short_list(indices, keep=1), ""), width)
    return [text, f"  {where.strip()}"] if where else [text]  # a path is never cut


# ----------------------------------------------------------------------------------------------- facts


def _by_cause(incidents: list[Incident]) -> dict[str, int]:
    """Counts by cause, most frequent first (ties: first seen first)."""
    counts = Counter(i.cause for i in incidents)
    first = {c: n for n, c in reversed(list(enumerate(i.cause for i in incidents)))}
    return {c: counts[c] for c in sorted(counts, key=lambda c: (-counts[c], first[c]))}


def _advice(incidents: list[Incident]) -> dict[str, str]:
    """For each cause (in :func:`_by_cause` order), the advice of its most recent incident that gave one."""
    latest: dict[str, str] = {}
    for inc in incidents:
        if isinstance(inc.advice, str) and inc.advice.strip():
            latest[inc.cause] = inc.advice.strip()
    return {c: latest[c] for c in _by_cause(incidents) if c in latest}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    return str(value)
