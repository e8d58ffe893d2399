"""Which of lightning_nan's files a list of records comes from, so a command refuses the wrong one.

NaNGuard's ``nan_incidents.jsonl`` holds :class:`~lightning_nan.core.incident.Incident` records (``step``,
``kind``, ``cause``, ``action``, ...); BatchBisection's ``quarantine.jsonl`` holds one record per sample
(``index``, or ``position`` and ``fingerprint``, ...). Quarantine records carry ``step`` and ``kind``
too, so the tell-tale keys are the ones only one kind has.

>>> kind_of([{"step": 7, "kind": "loss", "cause": "unknown", "action": "skipped"}])
'incidents'
>>> kind_of([{"index": 3, "step": 7, "kind": "loss", "reason": "nan", "fingerprint": "ab"}])
'quarantine'
>>> kind_of([{"a": 1}]) is None
True
"""

from __future__ import annotations

from typing import Any

from lightning_nan.callbacks.nan_guard import INCIDENTS_FILE
from lightning_nan.core.quarantine import QUARANTINE_FILE

_INCIDENT_ONLY = ("action", "cause", "ranks", "params", "detail", "advice")
_QUARANTINE_ONLY = ("index", "position", "fingerprint", "reason")


def is_incident(record: Any) -> bool:
    """A record as NaNGuard writes it: ``step`` and ``kind``, a key only incidents have, none of a quarantine record's."""
    return (
        isinstance(record, dict)
        and "step" in record
        and "kind" in record
        and any(k in record for k in _INCIDENT_ONLY)
        and not any(k in record for k in _QUARANTINE_ONLY)
    )


def is_quarantine(record: Any) -> bool:
    """A record as BatchBisection or ``lightning-nan scan`` writes it: a key only quarantine records have."""
    return isinstance(record, dict) and any(k in record for k in _QUARANTINE_ONLY) and not any(
        k in record for k in ("action", "cause")
    )


def kind_of(records: list[Any]) -> str | None:
    """``"incidents"`` or ``"quarantine"`` when every record is of that kind; ``None`` otherwise (or when empty)."""
    if records and all(is_incident(r) for r in records):
        return "incidents"
    if records and all(is_quarantine(r) for r in records):
        return "quarantine"
    return None


def not_quarantine(path: str, records: list[Any]) -> str | None:
    """Why ``records`` (read from ``path``) are not a quarantine file, or ``None`` when some record is one."""
    if not records or any(is_quarantine(r) for r in records):
        return None
    if all(is_incident(r) for r in records):
        return (
            f"{path} holds NaN incidents (the {INCIDENTS_FILE} NaNGuard writes), not quarantined samples: "
            f"run `lightning-nan report {path}`, or pass the {QUARANTINE_FILE} of the run"
        )
    keys = sorted({k for r in records if isinstance(r, dict) for k in r})[:8]
    return (
        f"{path} is not a quarantine file: none of its {len(records)} record(s) names a sample (`index`, or `position` "
        f"and `fingerprint`, as BatchBisection and `lightning-nan scan` write them); it has the keys {keys}. "
        f"Pass the {QUARANTINE_FILE} of your run"
    )


def not_incidents(path: str, records: list[Any]) -> str | None:
    """Why ``records`` (read from ``path``) are not an incidents file, or ``None``."""
    if records and all(is_quarantine(r) for r in records):
        return (
            f"{path} holds quarantined samples (the {QUARANTINE_FILE} BatchBisection writes), not NaN incidents: "
            f"run `lightning-nan quarantine list {path}`, or pass it as `--quarantine {path}` with the run's {INCIDENTS_FILE}"
        )
    return None
