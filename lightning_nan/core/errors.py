"""The error raised when skipping a step cannot help.

>>> from lightning_nan.core.incident import Incident
>>> err = NonFiniteError(Incident(step=3, kind="param", params=["fc.weight"], advice="Lower the learning rate."))
>>> print(err)
Non-finite param at step 3 (in fc.weight). Lower the learning rate.
>>> err.incident.params
['fc.weight']
>>> print(NonFiniteError(Incident(step=9, kind="loss", cause="divergence", advice="Lower the learning rate.")))
Cause: divergence. Lower the learning rate. Non-finite loss at step 9.
"""

from __future__ import annotations

from lightning_nan.core.incident import Incident


class NonFiniteError(RuntimeError):
    """Training cannot continue: the weights are non-finite, or too many steps in a row were skipped.

    ``error.incident`` is the :class:`~lightning_nan.core.incident.Incident` that escalated;
    ``error.history`` holds the incidents before it, oldest first.
    """

    def __init__(self, incident: Incident, history: list[Incident] | None = None) -> None:
        self.incident = incident
        self.history = list(history or [])
        where = incident.where()
        where = f" ({where})" if where else ""
        what = f"Non-finite {incident.kind} at step {incident.step}{where}."
        reason = incident.detail.get("escalation")
        parts: tuple[str | None, ...]
        if incident.cause != "unknown":  # lead with the cause and what to do about it
            parts = (f"Cause: {incident.cause}.", incident.advice, what, reason)
        else:
            parts = (what, reason, incident.advice)
        super().__init__(" ".join(p for p in parts if p))

    def __reduce__(self):  # keep the incident when pickled across processes
        return (type(self), (self.incident, self.history))


class NonFiniteWarning(UserWarning):
    """Emitted once per incident (rank zero) with its one-line summary."""
