"""Why did the loss go NaN? Name the cause of an incident from the evidence the library already has.

Practitioners tell the causes apart by what happened before the NaN; :func:`diagnose` does that
reasoning on the incident (its kind, the bisection and localization results other callbacks added)
and on the steps before it (:class:`StepRecord`: loss, gradient norm, weight norm, from the guard's
one transfer per step, so the history costs nothing extra).

====================  =====================================================================
cause                 evidence
====================  =====================================================================
``dirty_data``        the input holds NaN/Inf, or bisection shows a few samples alone cause it
``divergence``        the loss or the gradient norm grew over the preceding steps, or the
                      weights are huge
``overflow``          magnitudes at the limit of the dtype (fp16 65504, fp32/bf16 ~3.4e38) in
                      the inputs of the operation that failed, or in the weights
``unsafe_op``         from finite, ordinary inputs and healthy weights an operation produced
                      NaN/Inf: log(0), 0/0, sqrt of a negative, exp overflow, log of a
                      saturated softmax
``unknown``           the evidence does not decide (``missing`` says what would)
====================  =====================================================================

>>> from lightning_nan.core.incident import Incident
>>> history = [StepRecord(step=s, loss=v) for s, v in enumerate([2.0, 2.1, 40.0, 9e3, 4e7])]
>>> d = diagnose(Incident(step=5, kind="loss"), history)
>>> d.cause, d.evidence[0]
('divergence', 'the loss rose from 2 to 4e+07 over the 5 steps up to the incident')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_nan.core.incident import Incident

#: How many steps before an incident the trend tests look at.
TREND_STEPS = 10
#: A loss (or gradient norm) this many times its earlier level, rising into the incident, is divergence.
GROWTH = 10.0
#: Weights whose total norm passed this are "huge" (float32 overflows a square at ~1.8e19).
HUGE_WEIGHT_NORM = 1e8
#: |x| beyond this fraction of the dtype's largest value counts as "at the limit".
NEAR_LIMIT = 1e-3
#: Below this batch size, samples that fail alone (with finite inputs) are no evidence against the data.
MIN_BATCH = 8
DTYPE_MAX = {"torch.float16": 65504.0, "torch.bfloat16": 3.39e38, "torch.float32": 3.4028e38, "torch.float64": 1.8e308}

STABLE_ALTERNATIVE = {
    "log": "use log_softmax (or logsumexp) instead of log(softmax), or log(x.clamp_min(eps))",
    "log_softmax": "check the logits are finite: clip gradients and lower the learning rate",
    "div": "add an epsilon to the denominator (x / (y + eps)), or standardise with std + eps",
    "sqrt": "clamp the argument (x.clamp_min(0) or x + eps) before sqrt; its gradient is infinite at 0",
    "rsqrt": "add an epsilon before rsqrt",
    "exp": "subtract the maximum first (logsumexp, softmax) or clamp the argument",
    "pow": "normalise the input before pow, or use a smaller exponent",
    "reciprocal": "add an epsilon before 1/x",
    "acos": "clamp the argument into [-1 + eps, 1 - eps]",
    "asin": "clamp the argument into [-1 + eps, 1 - eps]",
}


@dataclass
class StepRecord:
    """What one optimizer step looked like (host values the guard read anyway; ``None``: not measured)."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    weight_norm: float | None = None


@dataclass
class Diagnosis:
    """``cause`` (see the table above), the ``evidence`` used, one actionable ``advice``, what is ``missing``."""

    cause: str
    evidence: list[str] = field(default_factory=list)
    advice: str = ""
    missing: list[str] = field(default_factory=list)


def diagnose(incident: Incident, history: Sequence[StepRecord] = (), *, lr_hint: str | None = None) -> Diagnosis:
    """Decide the cause of ``incident`` from its details and the ``history`` of the steps before it.

    ``lr_hint``: what is known about a safe learning rate (e.g. from LRBackoff), added to divergence advice.
    """
    detail = incident.detail or {}
    bisection: dict[str, Any] = detail.get("bisection") or {}
    loc: dict[str, Any] = detail.get("localization") or {}
    before = [r for r in history if r.step <= incident.step][-TREND_STEPS:]  # the failing step's finite values count

    # 1. the data: non-finite inputs, or a few samples of a real batch alone make it fail
    found = bool(incident.samples) or bool(bisection.get("positions"))
    sizes = [b.get("size", 0) for b in bisection.get("batches", []) if b.get("reproduced")]
    dirty_inputs = loc.get("first_nonfinite_input") is not None or incident.kind == "input"
    few_of_many = found and not bisection.get("whole_batch") and max(sizes, default=MIN_BATCH) >= MIN_BATCH
    if dirty_inputs or few_of_many:
        evidence = []
        if incident.kind == "input":
            evidence.append(f"the input batch holds NaN/Inf ({', '.join(detail.get('input_fields', [])[:3]) or 'checked by the guard'})")
        if found:
            who = f"samples {incident.samples}" if incident.samples else "samples at positions " + str(bisection.get("positions"))
            evidence.append(f"bisection: {who} make the batch fail on their own; the rest of the batch trains ({bisection.get('forward_passes', '?')} forward passes)")
        if loc.get("first_nonfinite_input") is not None:
            evidence.append("localization: the NaN/Inf was already in the data reaching the model")
        where = f"data set indices {incident.samples}" if incident.samples else "the samples named in the quarantine file (by position and fingerprint)"
        return Diagnosis(
            "dirty_data",
            evidence,
            f"Dirty data: {where} are quarantined (`lightning-nan quarantine list`); fix or drop them in the data set, "
            "and check the data pipeline (normalisation, missing values, corrupted files).",
        )

    # 2. magnitudes at the dtype's limit, or a run-away trend
    overflow = _overflow_evidence(incident, loc, before)
    trend = _trend_evidence(before)
    if trend and not overflow:
        advice = (
            "Divergence: lower the learning rate (LRBackoff does it automatically), clip gradients "
            "(GradientClipping), normalise the inputs and check the initialisation."
        )
        if lr_hint:
            advice += f" {lr_hint}"
        return Diagnosis("divergence", trend, advice)
    if overflow:
        return Diagnosis(
            "overflow",
            overflow + trend,
            "Overflow: values reached the dtype's limit. Normalise the inputs and activations, scale the loss down; "
            "under fp16 use precision='bf16-mixed' (same range as fp32) or keep this layer in fp32.",
        )

    # 3. an operation that made NaN/Inf from finite, ordinary inputs
    op = loc.get("op")
    if op is not None and loc.get("op_inputs_finite", True) is not False:
        name = op.rstrip("_")
        where = f"{op} at {loc.get('op_location')}" if loc.get("op_location") else op
        module = incident.module or loc.get("module")
        evidence = [f"localization: {where} turned finite inputs into NaN/Inf" + (f" inside {module}" if module else "")]
        hint = _op_hint(loc)
        if hint:
            evidence.append(hint)
        if before:
            evidence.append("the loss and gradient norm were steady before the incident")
        fix = STABLE_ALTERNATIVE.get(name, "guard the operation's input (clamp, add an epsilon) or use a numerically stable variant")
        if name in ("log", "sqrt") and any(i.get("has_negative") for i in loc.get("op_inputs") or []):
            fix = f"its argument went negative: keep it positive by construction (learn its logarithm, or use softplus(raw) + eps) or clamp it before {name}"
        return Diagnosis("unsafe_op", evidence, f"Unsafe operation {where}: {fix}.")
    if loc.get("module") and loc.get("inputs_finite"):
        module = incident.module or loc["module"]
        return Diagnosis(
            "unsafe_op",
            [f"localization: module {module} ({loc.get('module_type')}) produced NaN/Inf from finite inputs in {loc.get('input_range')}"],
            f"Unsafe operation in {module}: look for log(0), 0/0, sqrt of a negative or exp overflow there; use log_softmax, an epsilon or clamping.",
        )

    missing = []
    if not loc:
        missing.append("no localization (add BatchBisection to name the module and operation)")
    if not before:
        missing.append("no history of the steps before the incident")
    if bisection.get("whole_batch"):
        missing.append("every sample fails, so the data is not to blame, but nothing else stood out")
    return Diagnosis("unknown", [], incident.advice, missing)


def _trend_evidence(before: Sequence[StepRecord]) -> list[str]:
    evidence = []
    losses = [(r.step, r.loss) for r in before if r.loss is not None and math.isfinite(r.loss)]
    if len(losses) >= 3:
        # the rise into the incident: from the lowest point of the window to the last finite loss
        low_i = min(range(len(losses)), key=lambda i: losses[i][1])
        low, last = losses[low_i][1], losses[-1][1]
        rising = all(b[1] >= a[1] for a, b in zip(losses[low_i:], losses[low_i + 1 :]))
        if len(losses) - low_i >= 2 and rising and last - low > (GROWTH - 1) * max(abs(low), 1e-12):
            evidence.append(f"the loss rose from {low:.3g} to {last:.3g} over the {len(losses) - low_i} steps up to the incident")
    grads = [r.grad_norm for r in before if r.grad_norm is not None and math.isfinite(r.grad_norm)]
    if len(grads) >= 3:
        typical = sorted(grads[:-1])[len(grads[:-1]) // 2]
        if grads[-1] > GROWTH * max(typical, 1e-12):
            evidence.append(f"the gradient norm grew to {grads[-1]:.3g}, {grads[-1] / max(typical, 1e-12):.0f}x its median of {typical:.3g}")
    weights = [r.weight_norm for r in before if r.weight_norm is not None]
    if weights and (not math.isfinite(weights[-1]) or weights[-1] > HUGE_WEIGHT_NORM):
        evidence.append(f"the weights are huge (total norm {weights[-1]:.3g})")
    return evidence


def _overflow_evidence(incident: Incident, loc: dict[str, Any], before: Sequence[StepRecord]) -> list[str]:
    evidence = []
    for item in loc.get("op_inputs") or []:
        limit = DTYPE_MAX.get(str(item.get("dtype")), DTYPE_MAX["torch.float32"])
        biggest = max(abs(_num(item.get("min"))), abs(_num(item.get("max"))), abs(_num(item.get("value"))))
        if math.isfinite(biggest) and biggest > NEAR_LIMIT * limit:
            evidence.append(
                f"localization: {loc.get('op')} at {loc.get('op_location')} got values up to {biggest:.3g}, near the "
                f"{item.get('dtype', 'float32')} limit {limit:.3g}"
            )
            break
    if not evidence and loc.get("input_range"):
        lo, hi = (abs(_num(v)) for v in loc["input_range"])
        if max(lo, hi) > NEAR_LIMIT * DTYPE_MAX["torch.float32"]:
            evidence.append(f"localization: {loc.get('module')} got inputs up to {max(lo, hi):.3g}, near the float32 limit")
    return evidence


def _op_hint(loc: dict[str, Any]) -> str | None:
    name = str(loc.get("op", "")).rstrip("_")
    inputs = loc.get("op_inputs") or []
    zero = any(i.get("has_zero") for i in inputs)
    negative = any(i.get("has_negative") for i in inputs)
    if name == "log" and zero:
        return "its input holds exact zeros: log(0) = -inf (a saturated softmax fed to log gives them)"
    if name == "div" and zero:
        return "the division has zeros: 0/0 = NaN or x/0 = Inf"
    if name in ("sqrt", "log") and negative:
        return f"its input holds negative values: {name} of a negative is NaN"
    if name == "exp":
        return "exp overflows float32 above ~88.7"
    return None


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return math.inf
