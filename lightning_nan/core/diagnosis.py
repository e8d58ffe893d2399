"""Why did the loss go NaN? Name the cause of an incident from the evidence the library already has.

Practitioners tell the causes apart by what happened before the NaN; :func:`diagnose` does that
reasoning on the incident (its kind, the bisection and localization results other callbacks added)
and on the steps before it (:class:`StepRecord`: loss, gradient norm, weight norm, from the guard's
one transfer per step, so the history costs nothing extra).

====================  =====================================================================
cause                 evidence
====================  =====================================================================
``broken_pipeline``   every sample's input is non-finite (the fields and positions are named)
``dirty_data``        a sample's own input is non-finite, near its dtype's limit or a gross
                      outlier, and bisection confirmed it makes the batch fail
``corruption``        the weights turned non-finite, or jumped far beyond what one update moves
                      them, while the loss and gradients were steady
``divergence``        the loss or the gradient norm grew by orders of magnitude over the
                      preceding steps, or the weights are huge
``overflow``          magnitudes at the limit of the dtype (fp16 65504, fp32/bf16 ~3.4e38) in
                      the inputs of the operation that failed, or in the weights
``unsafe_op``         from finite, ordinary inputs and healthy weights an operation produced
                      NaN/Inf (forward, or backward: named by an anomaly-mode replay): log(0),
                      0/0, sqrt of a negative or its derivative at 0, exp overflow
``unknown``           the evidence does not decide (``missing`` says what would)
====================  =====================================================================

Samples that make a batch fail but hold ordinary finite inputs are *triggers* of an unsafe
operation, not dirty data: the model is at fault.

>>> from lightning_nan.core.incident import Incident
>>> history = [StepRecord(step=s, loss=v) for s, v in enumerate([2.0, 2.1, 40.0, 9e3, 4e7])]
>>> d = diagnose(Incident(step=5, kind="loss"), history)
>>> d.cause, d.evidence[0]
('divergence', 'the loss rose from 2 to 4e+07 over the 5 steps up to the incident')
>>> steady = [StepRecord(step=s, loss=1.0, grad_norm=0.5, weight_norm=10.0) for s in range(6)]
>>> diagnose(Incident(step=6, kind="param"), steady + [StepRecord(step=6, weight_norm=float("nan"))]).cause
'corruption'
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_nan.core.events import Evidence
from lightning_nan.core.incident import Incident
from lightning_nan.core.records import BisectionRecord, LocalizationRecord

#: How many steps before an incident the trend tests look at.
TREND_STEPS = 10
#: A loss (or gradient norm) this many times its earlier level, rising into the incident, is divergence.
GROWTH = 10.0
#: Weights whose total norm passed this are "huge" (float32 overflows a square at ~1.8e19).
HUGE_WEIGHT_NORM = 1e8
#: |x| beyond this fraction of the dtype's largest value counts as "at the limit".
NEAR_LIMIT = 1e-3
#: A change of the weights' total norm this many times the typical change per step is a jump.
JUMP = 1e3
DTYPE_MAX = {"torch.float16": 65504.0, "torch.bfloat16": 3.39e38, "torch.float32": 3.4028e38, "torch.float64": 1.8e308}

STABLE_ALTERNATIVE = {
    "log": "use log_softmax (or logsumexp) instead of log(softmax), or log(x.clamp_min(eps))",
    "log_softmax": "check the logits are finite: clip gradients and lower the learning rate",
    "softmax": "a row whose every position is masked with -inf gives 0/0 = NaN: keep one position unmasked "
    "(or mask with torch.finfo(dtype).min instead of -inf) and zero the fully masked rows after softmax",
    "div": "add an epsilon to the denominator (x / (y + eps)), or standardise with std + eps",
    "sqrt": "clamp the argument (x.clamp_min(0) or x + eps) before sqrt; its gradient is infinite at 0",
    "rsqrt": "add an epsilon before rsqrt",
    "exp": "subtract the maximum first (logsumexp, softmax) or clamp the argument",
    "pow": "normalise the input before pow, or use a smaller exponent",
    "reciprocal": "add an epsilon before 1/x",
    "acos": "clamp the argument into [-1 + eps, 1 - eps]",
    "asin": "clamp the argument into [-1 + eps, 1 - eps]",
}

#: Fixes for operations whose derivative, not value, is the problem (named by the backward replay).
BACKWARD_FIX = {
    "sqrt": "its derivative is infinite at 0: use sqrt(x + eps) or x.clamp_min(eps).sqrt()",
    "pow": "a fractional power has an infinite derivative at 0: add an epsilon to the base",
    "linalgvectornorm": "the norm's derivative is 0/0 at a zero vector: use x / (x.norm() + eps) or F.normalize(x, eps=...)",
    "norm": "the norm's derivative is 0/0 at a zero vector: use x / (x.norm() + eps) or F.normalize(x, eps=...)",
    "div": "a division by (near) zero in a branch: add an epsilon to the denominator",
    "log": "torch.where(m, x, log(x)) still differentiates log(x) where m is true: compute log(x.clamp_min(eps)) or mask x before log",
    "mul": "0 * inf in the backward: an infinite derivative upstream (sqrt, log or a division at 0) meets a zero mask; clamp the input of that op or mask before it",
    "where": "torch.where(m, a, f(x)) still differentiates f where m is true: make f's input safe in both branches (mask x before f)",
}


@dataclass
class StepRecord:
    """What one optimizer step looked like (host values the guard read anyway; ``None``: not measured)."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    weight_norm: float | None = None
    #: The diagnosed cause when this step had an incident.
    cause: str | None = None


#: The advice of a divergence (LRBackoff adds what it learnt about a safe learning rate).
DIVERGENCE_ADVICE = (
    "Divergence: lower the learning rate (LRBackoff does it automatically), clip gradients "
    "(GradientClipping), normalise the inputs and check the initialisation."
)


@dataclass
class Diagnosis:
    """``cause`` (see the table above), the ``evidence`` used, one actionable ``advice``, what is ``missing``."""

    cause: str
    evidence: list[str] = field(default_factory=list)
    advice: str = ""
    missing: list[str] = field(default_factory=list)


def diagnose(
    incident: Incident,
    history: Sequence[StepRecord] = (),
    *,
    finders: Collection[Evidence] = (),
) -> Diagnosis:
    """Decide the cause of ``incident`` from its own details and the ``history`` of the steps before it.

    ``finders``: what the fact finders taking part establish (:func:`~lightning_nan.core.events.evidence_of`),
    so that the advice and ``missing`` never ask for one that is there. The advice for divergence is :data:`DIVERGENCE_ADVICE`, to which LRBackoff, acting
    after the diagnosis, adds what it knows about a safe learning rate.
    """
    detail = incident.detail or {}
    bisection = incident.bisection or BisectionRecord(step=incident.step)
    loc = incident.localization or LocalizationRecord()
    before = [r for r in history if r.step <= incident.step][-TREND_STEPS:]  # the failing step's finite values count
    earlier = [r for r in before if r.step < incident.step]

    # 0. the whole pipeline: every sample's input is non-finite
    if detail.get("pipeline"):
        return Diagnosis(
            "broken_pipeline",
            [f"data: {detail['pipeline']}"],
            f"Broken data pipeline: {detail['pipeline']}. Fix the preprocessing (standardise with std + eps, fill "
            "missing values); nothing was quarantined and no learning-rate cut or rollback was spent on it.",
        )

    # 1. the weights changed in a way no update explains, while training was steady
    jump = _weight_jump(before, incident.step)
    steady = len(earlier) >= 3 and not _trend_evidence(earlier, weights=False)
    if steady and (incident.kind in ("param", "jump") or jump):
        evidence = [jump or "the weights turned non-finite"]
        evidence.append(f"the loss and gradient norm were steady over the {len(earlier)} steps before")
        return Diagnosis(
            "corruption",
            evidence,
            "Weight corruption: the weights changed without an update that could explain it (silent data corruption "
            "on the device, or an in-place write to a parameter: `p.data[...] = ...`, a shared buffer, a hook). "
            "The last good state is restored; the learning rate is not to blame. Check the hardware (ECC errors, "
            "a different GPU) and code that writes to parameters in place.",
        )

    # 2. the data: a confirmed culprit whose own input is bad, or non-finite inputs seen by the guard
    quarantined = bisection.quarantined
    if incident.samples or quarantined or incident.kind == "input":
        evidence = []
        if incident.kind == "input":
            evidence.append(f"the input batch holds NaN/Inf ({', '.join(detail.get('input_fields', [])[:3]) or 'checked by the guard'})")
        facts = [f"{k}: {v}" for b in bisection.batches for k, v in b.evidence.items() if int(k) in (incident.samples or []) or not incident.samples]
        if quarantined:
            who = f"samples {incident.samples}" if incident.samples else f"samples at (rank, batch, position) {quarantined}"
            evidence.append(
                f"bisection: {who} make the batch fail on their own, again under a fresh random state, and the rest of "
                f"the batch trains ({bisection.forward_passes} forward passes)"
            )
            evidence.extend(f"sample {f}" for f in facts[:4])
            where = f"data set indices {incident.samples}" if incident.samples else "the samples named in the quarantine file (by position and fingerprint)"
            advice = (
                f"Dirty data: {where} are quarantined (`lightning-nan quarantine list`); fix or drop them in the data set, "
                "and check the data pipeline (normalisation, missing values, corrupted files)."
            )
        else:
            find = "" if Evidence.SAMPLES in finders else " BatchBisection would find and quarantine the samples."
            advice = f"Dirty data: the batch holds NaN/Inf inputs; clean the data set.{find}"
        return Diagnosis("dirty_data", evidence, advice)

    # 3. magnitudes at the dtype's limit, or a run-away trend
    overflow = _overflow_evidence(incident, loc, before)
    trend = _trend_evidence(before)
    if incident.kind == "divergence" and detail.get("growth"):
        trend = [detail["growth"], *trend]
    if incident.kind in ("param", "jump") and not trend:
        trend = [jump or "the weights turned non-finite"]
    if not trend and bisection.whole_batch:  # not some samples: the weights themselves
        trend = _whole_batch_trend(earlier)
    if trend and not overflow:
        return Diagnosis("divergence", trend, DIVERGENCE_ADVICE)
    if overflow:
        return Diagnosis(
            "overflow",
            overflow + trend,
            "Overflow: values reached the dtype's limit. Normalise the inputs and activations, scale the loss down; "
            "under fp16 use precision='bf16-mixed' (same range as fp32) or keep this layer in fp32.",
        )

    # 4. an operation that made NaN/Inf from finite, ordinary inputs (forward or backward)
    triggers = incident.triggers or bisection.triggers
    who = f"; triggered by samples {triggers} (ordinary, finite inputs: not quarantined)" if triggers else ""
    degenerate = [f"sample {k}: {v}" for b in bisection.batches for k, v in b.evidence.items() if "constant" in v]
    op = loc.op
    own_infinities = loc.op_inputs_finite is False and loc.module is not None and loc.inputs_finite
    if op is not None and (loc.op_inputs_finite is not False or own_infinities):
        name = op.rstrip("_")
        where = f"{op} at {loc.op_location}" if loc.op_location else op
        module = incident.module or loc.module
        made = "turned the module's own +-inf (no NaN) into NaN" if own_infinities else "turned finite inputs into NaN/Inf"
        evidence = [f"localization: {where} {made}" + (f" inside {module}" if module else "") + who]
        hint = _op_hint(loc)
        if hint:
            evidence.append(hint)
        evidence.extend(degenerate[:2])
        if before:
            evidence.append("the loss and gradient norm were steady before the incident")
        fix = STABLE_ALTERNATIVE.get(name, "guard the operation's input (clamp, add an epsilon) or use a numerically stable variant")
        if name in ("log", "sqrt") and any(i.get("has_negative") for i in loc.op_inputs or []):
            fix = f"its argument went negative: keep it positive by construction (learn its logarithm, or use softplus(raw) + eps) or clamp it before {name}"
        return Diagnosis("unsafe_op", evidence, f"Unsafe operation {where}: {fix}.")
    if loc.backward_op:
        node = str(loc.backward_op)
        name = re.sub(r"Backward\d*$", "", node).lower()
        where = f"{node} (forward at {loc.backward_location})" if loc.backward_location else node
        module = loc.backward_module
        inside = f" inside {module or '<root>'} ({loc.backward_module_type})" if module is not None else ""
        evidence = [f"the loss was finite but the gradient was not: the backward of {where}{inside} made NaN/Inf from finite gradients{who}"]
        evidence.extend(degenerate[:2])
        fix = BACKWARD_FIX.get(name, STABLE_ALTERNATIVE.get(name, "make the operation's derivative finite where it is used (clamp or add an epsilon)"))
        return Diagnosis("unsafe_op", evidence, f"Unsafe operation in the backward pass, {where}: {fix}.")
    if loc.module and loc.inputs_finite:
        module = incident.module or loc.module
        return Diagnosis(
            "unsafe_op",
            [f"localization: module {module} ({loc.module_type}) produced NaN/Inf from finite inputs in {loc.input_range}{who}"],
            f"Unsafe operation in {module}: look for log(0), 0/0, sqrt of a negative or exp overflow there; use log_softmax, an epsilon or clamping.",
        )

    missing = []
    if incident.localization is None:
        if Evidence.LOCALIZATION in finders:
            missing.append("no localization (BatchBisection localizes each incident it can re-evaluate)")
        elif Evidence.SAMPLES in finders:
            missing.append("no localization (BatchBisection(localize='every') names the module and operation)")
        else:
            missing.append("no localization (add BatchBisection to name the module and operation)")
    if not before:
        missing.append("no history of the steps before the incident")
    if bisection.whole_batch:
        missing.append("every sample fails, so the data is not to blame, but nothing else stood out")
    if bisection.unconfirmed:
        missing.append(f"samples {bisection.unconfirmed} failed only together or only once: not confirmed as culprits")
    return Diagnosis("unknown", [], incident.advice, missing)


def _whole_batch_trend(earlier: Sequence[StepRecord]) -> list[str]:
    """Evidence that a batch failing on every sample comes from a blow-up of the weights, not an op's corner case."""
    diverged = [r.step for r in earlier if r.cause == "divergence"]
    if diverged:
        return [
            f"every sample of the batch fails, and the run diverged at steps {diverged[-5:]}: the weights have not "
            "recovered from the blow-up"
        ]
    grads = [(r.step, r.grad_norm) for r in earlier if r.grad_norm is not None and math.isfinite(r.grad_norm)]
    if len(grads) >= 3:
        step, peak = max(grads, key=lambda g: g[1])
        typical = sorted(g for _, g in grads)[len(grads) // 2]
        if peak > GROWTH * max(typical, 1e-12):
            return [
                f"every sample of the batch fails, after the gradient norm spiked to {peak:.3g} at step {step} "
                f"({peak / max(typical, 1e-12):.0f}x its median of {typical:.3g}): the weights were thrown off"
            ]
    return []


def _weight_jump(before: Sequence[StepRecord], step: int) -> str | None:
    """Evidence that the weights at ``step`` moved far more than the steps before moved them."""
    weights = [(r.step, r.weight_norm) for r in before if r.weight_norm is not None]
    if len(weights) < 4 or weights[-1][0] != step:
        return None
    values = [w for _, w in weights]
    last, prev = values[-1], values[-2]
    if not all(math.isfinite(v) for v in values[:-1]):
        return None
    if math.isnan(last):
        return f"the weights turned non-finite at step {step} (total norm {prev:.3g} the step before)"
    if not math.isfinite(last):
        return (
            f"the weights' total norm overflowed at step {step} (it was {prev:.3g} the step before): a value beyond "
            "~1e19 appeared in them in one step"
        )
    moves = [abs(b - a) for a, b in zip(values[:-2], values[1:-1])]
    largest = max(max(moves), 1e-12 * max(abs(prev), 1e-12))  # a run whose updates grow fast is divergence, not a jump
    if abs(last - prev) > JUMP * largest and last > 2 * prev:
        return (
            f"the weights' total norm jumped from {prev:.3g} to {last:.3g} in one step, {abs(last - prev) / largest:.3g}x "
            f"the largest change per step before ({largest:.3g})"
        )
    return None


def _trend_evidence(before: Sequence[StepRecord], *, weights: bool = True) -> list[str]:
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
    norms = [r.weight_norm for r in before if r.weight_norm is not None] if weights else []
    if norms and math.isfinite(norms[-1]) and norms[-1] > HUGE_WEIGHT_NORM:
        evidence.append(f"the weights are huge (total norm {norms[-1]:.3g})")
    return evidence


def _overflow_evidence(incident: Incident, loc: LocalizationRecord, before: Sequence[StepRecord]) -> list[str]:
    evidence = []
    for item in loc.op_inputs or []:
        limit = DTYPE_MAX.get(str(item.get("dtype")), DTYPE_MAX["torch.float32"])
        biggest = max(abs(_num(item.get("min"))), abs(_num(item.get("max"))), abs(_num(item.get("value"))))
        if math.isfinite(biggest) and biggest > NEAR_LIMIT * limit:
            evidence.append(
                f"localization: {loc.op} at {loc.op_location} got values up to {biggest:.3g}, near the "
                f"{item.get('dtype', 'float32')} limit {limit:.3g}"
            )
            break
    if not evidence and loc.input_range:
        lo, hi = (abs(_num(v)) for v in loc.input_range)
        if max(lo, hi) > NEAR_LIMIT * DTYPE_MAX["torch.float32"]:
            evidence.append(f"localization: {loc.module} got inputs up to {max(lo, hi):.3g}, near the float32 limit")
    return evidence


def _op_hint(loc: LocalizationRecord) -> str | None:
    name = str(loc.op or "").rstrip("_")
    inputs = loc.op_inputs or []
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
    if name in ("softmax", "log_softmax") and any(i.get("nonfinite") for i in inputs):
        return "its input holds -inf: a row where every position is masked makes softmax 0/0 = NaN"
    return None


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return math.inf
