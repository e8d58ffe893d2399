"""The LR backoff's policy: when to lower the learning rate, by how much, and when to grow it back.

:class:`LRBackoffController` keeps a *factor*; each optimizer step uses ``scheduled LR x factor``,
applied inside the step by :class:`~lightning_nan.core.lr_scaling.LRScaler`, so schedulers and
checkpoints only ever see their own values: a backoff is neither lost at the next OneCycle step nor
compounded by ExponentialLR.

>>> import torch
>>> w = torch.nn.Parameter(torch.zeros(1))
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
>>> backoff = LRBackoffController(patience=2)
>>> backoff.attach(opt)
>>> backoff.back_off(step=0, reason="incident")
0.5
>>> for step in range(4):
...     w.grad = torch.ones(1)
...     before = w.item()
...     opt.step()
...     print(f"step {step}: scheduled {opt.param_groups[0]['lr']:.4f}, applied {before - w.item():.4f}")
...     backoff.observe(step, clean=True)
...     sched.step()
step 0: scheduled 0.1000, applied 0.0500
step 1: scheduled 0.0500, applied 0.0250
step 2: scheduled 0.0250, applied 0.0250
step 3: scheduled 0.0125, applied 0.0125
>>> backoff.detach()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_nan.core.distributed import all_reduce_max
from lightning_nan.core.losses import scalar_loss
from lightning_nan.core.lr_scaling import LRScaler
from lightning_nan.core.lr_trial import TRIAL_MIN_LOSSES, GrowthTrial
from lightning_nan.core.spikes import DeferredFlag, SpikeTest, read_flag
from lightning_nan.core.validate import integer, number

log = logging.getLogger(__name__)

#: The change log kept in ``history`` (and in ``state_dict``) is capped at this many entries.
MAX_HISTORY = 256
#: Clean steps in a row that test a factor: a failure after fewer says nothing against it.
TESTED_AFTER = 3


class LRBackoffController(LRScaler):
    """When to lower the learning rate's backoff factor and when to grow it back (applied at optimizer-step time).

    Rules (``f``: the current factor, ``c``: the ceiling, initially 1):

    * **Back off** (:meth:`back_off`, on an incident or a loss spike): ``f <- max(f * factor, min_factor)``,
      once ``f`` has been *tested*: ``3`` clean steps in a row were taken with it since the last back-off
      (at the start of a run, ``f = 1`` counts as tested). Failures before that come from a state an
      earlier, higher factor broke, and say nothing against ``f``: backing off on each of them would
      sink the factor to the floor within a few steps of one blow-up. Restoring a good state cures
      those; after a rollback to the state of step ``s``, :meth:`back_off_below` makes sure ``f`` is
      one level below the highest factor used since ``s``.
    * **Grow back**: after ``patience`` consecutive clean steps (no incident, no spike) since the
      last change, ``f <- min(f * growth, c)``.
    * **Trial** (``growth_trial`` losses given to :meth:`observe`): a growth is kept only if the mean
      loss of the ``growth_trial`` clean steps after it is not worse than that of the ``growth_trial``
      before it by more than one standard error (Welch's z > 1, one-sided). Otherwise the factor goes
      back down and that level becomes the ceiling for good: a higher LR that does not fail outright
      but leaves the loss noisier and higher (a model trained on unnormalised inputs, say) is not worth
      the risk of the level that failed. A loss that keeps falling passes; on a flat, noisy loss about
      one growth in six is undone (a cost of one level, after a run that had already failed there).
    * **Remember** (no loop): the controller knows whether ``f`` was reached by growing back. A back-off
      while at such a level means that level failed twice (it, or a level above it, failed before; that
      is why ``f`` had been lower): the ceiling drops for good to the level below,
      ``c <- max(f * factor, min_factor)``. Each such event lowers ``c`` by at least one level, and
      between two of them no growth is followed by a failure, so the back-offs form one descent.
      With ``L`` levels between 1 and ``min_factor`` the factor changes at most ``O(L**2)`` times in
      a run, however often the model fails: growing back cannot loop.
      A toy that diverges whenever ``f > 0.25`` backs off at 1, at 0.5, grows back to 0.5, fails
      there again, and stays at 0.25 from then on.

    Loss spikes (``spike_zscore`` set): a clean step's loss is a spike when its robust z-score against
    the last ``window`` clean losses (:func:`~lightning_nan.core.spikes.robust_zscore`), exceeds
    ``spike_zscore`` (upward only; tested once ``min_history`` losses are in). Every clean, finite loss
    enters the window, spikes included, so that a lasting change of level is absorbed within about
    ``window / 2`` steps; only the first step of a run of spikes backs off. Non-finite losses are the
    guard's business and never count. ``spike_zscore`` is ``None`` (off) by default: a spike is not a
    failure, healthy runs have them (new data shards, warm-up ends), and NaN/Inf incidents already back
    off. When you turn it on, 6.0 is a good value: a real spike is many times the spread, while
    false alarms are rare. Measured with the defaults (window 50, 196,000 tested steps each): normal
    noise 0 (at 5.0: 7e-5 per step); a decaying random-walk loss with half-normal noise 1.7e-4 per
    step (at 4.0: 2e-3); Student-t(3) noise 4e-3. A false alarm costs one back-off, undone after
    ``patience`` clean steps.

    The factor is applied by the step hooks of :class:`~lightning_nan.core.lr_scaling.LRScaler`
    (:meth:`attach`, :meth:`detach`): an ``lr`` written *inside* the step (by the closure, or by
    Lightning's ``on_before_optimizer_step``) is used **unscaled** for that step; set warm-up or
    hand-made LRs before it (a scheduler, ``on_train_batch_start``) for the backoff to apply to them.

    Cost: the hooks' (see :class:`~lightning_nan.core.lr_scaling.LRScaler`). A loss given to
    :meth:`observe` is written into a device ring (no host sync); a trial's verdict is one small read,
    a step after the trial ends. With spike detection each step adds a few small device ops, one
    ``all_reduce`` of a flag under DDP, and no host sync: the flag is read at the *next* :meth:`observe`
    (:class:`~lightning_nan.core.spikes.SpikeTest`), so spike decisions, and the growth that waits
    for them, act one step late.

    Args:
        factor: multiplier applied at each back-off, in (0, 1).
        min_factor: the floor of the factor, in (0, 1]; the default 1/1024 is ten halvings, three
            decades below the schedule: a run that still fails there needs a fix, not a smaller LR.
        patience: clean steps (calls to :meth:`observe` with ``clean=True``) before growing back.
            The default 200 is long against the tens of steps a divergence takes to build up again
            (so growing back tests a level for real), and short against a run: one halving costs
            200 steps at half the LR, and the memory rule stops retries of a level that keeps failing.
        growth: multiplier when growing back, > 1; default ``1 / factor`` (back to the same levels).
        spike_zscore: robust z-score above which a loss is a spike; ``None`` disables spike detection.
        window: losses kept for the spike statistics.
        min_history: losses needed before spikes are tested (at most ``window``).
        growth_trial: clean-step losses on each side of a growth that the trial compares (>= 10);
            ``None``: growths are kept without a trial. Without losses passed to :meth:`observe`
            there is no trial either.
        reduce: in-place element-wise max over ranks, for the spike flag and the trial's verdict
            (default ``torch.distributed``: a growth is undone if the loss got worse on any rank).

    Example: the toy that diverges whenever the factor is above 0.25 (it takes 3 clean steps to build up).

    >>> ctl = LRBackoffController(0.5, patience=5)
    >>> built = 0
    >>> for step in range(40):
    ...     built = built + 1 if ctl.factor_now > 0.25 else 0
    ...     diverged = built > 3
    ...     if diverged:
    ...         _ = ctl.back_off(step)
    ...         built = 0
    ...     ctl.observe(step, clean=not diverged)
    >>> [(h["step"], h["reason"], h["factor"]) for h in ctl.history]
    [(3, 'incident', 0.5), (7, 'incident', 0.25), (12, 'grow back', 0.5), (16, 'incident', 0.25)]
    >>> ctl.factor_now, ctl.ceiling
    (0.25, 0.25)
    """

    def __init__(
        self,
        factor: float = 0.5,
        *,
        min_factor: float = 1.0 / 1024,
        patience: int = 200,
        growth: float | None = None,
        spike_zscore: float | None = None,
        window: int = 50,
        min_history: int = 20,
        growth_trial: int | None = 50,
        reduce: Callable[[Tensor], Tensor] = all_reduce_max,
    ) -> None:
        number("factor", factor, low=0, high=1, low_open=True, high_open=True)
        number("min_factor", min_factor, low=0, high=1, low_open=True)
        integer("patience", patience, low=1)
        number("growth", growth, low=1, low_open=True, optional=True, hint="None: 1 / factor")
        number("spike_zscore", spike_zscore, low=0, low_open=True, optional=True, hint="None: no spike detection")
        integer("window", window, low=3)
        integer("min_history", min_history, low=3, high=window, hint="at most `window`")
        integer("growth_trial", growth_trial, low=TRIAL_MIN_LOSSES, optional=True, hint="None: no trial")
        self.factor = float(factor)
        self.min_factor = float(min_factor)
        self.patience = patience
        self.growth = 1.0 / self.factor if growth is None else float(growth)
        self.spike_zscore = None if spike_zscore is None else float(spike_zscore)
        self.window = window
        self.min_history = min_history
        self.growth_trial = growth_trial
        self.reduce = reduce

        super().__init__(1.0)
        self.ceiling = 1.0
        #: Whether the current factor was reached by growing back (see the memory rule).
        self.grown = False
        #: Whether 3 clean steps in a row were taken at the current factor since the last back-off.
        self.tested = True
        self.clean_steps = 0
        self.last_backoff_step: int | None = None
        self.backoffs = 0
        self.growths = 0
        #: The last changes, oldest first: ``{"step", "reason", "factor", "ceiling"}``.
        self.history: list[dict[str, Any]] = []

        self.spikes = SpikeTest(window, min_history)
        self._last_spike = False
        # (step, clean, deferred spike flag, superseded by a back-off) of the step still to settle
        self._pending: tuple[int, bool, DeferredFlag | bool | None, bool] | None = None
        self.trial = GrowthTrial(growth_trial)

    # ------------------------------------------------------------------ the factor
    def back_off(self, step: int, reason: str = "incident") -> float:
        """Lower the factor by ``factor`` (down to ``min_factor``); returns the new factor.

        Only when the current factor has been *tested*: 3 clean steps in a row were taken with it since
        the last back-off. Failures before that come from a state the earlier factor broke, so they say
        nothing against it: backing off on each would sink the factor to the floor in a few steps;
        rolling back (then :meth:`back_off_below`) is the cure.
        At most once per step. Call it on every rank with the same arguments (incident decisions are
        already agreed).
        """
        self.clean_steps = 0
        if step == self.last_backoff_step or not self.tested:
            return self._factor
        return self._lower(max(self._factor * self.factor, self.min_factor), step, reason)

    def back_off_below(self, since: int, step: int, reason: str = "rollback") -> float:
        """After a rollback to the state of step ``since``: go one level below the factor the run left
        that state with (the trajectory from there blew up), unless the factor is already lower.

        Returns the factor. Call it on every rank with the same arguments.
        """
        self.clean_steps = 0
        target = max(self.factor_since(since) * self.factor, self.min_factor)
        if self._factor <= target:
            return self._factor
        return self._lower(target, step, reason)

    def factor_since(self, step: int) -> float:
        """The highest factor steps were taken with since ``step`` (from :attr:`history`)."""
        earlier = [h for h in self.history if h["step"] < step]
        if earlier:
            start = float(earlier[-1]["factor"])
        elif len(self.history) < MAX_HISTORY:  # the whole log: nothing changed before `step`
            start = 1.0
        else:
            start = float(self.history[0]["factor"])
        return max([start] + [float(h["factor"]) for h in self.history if h["step"] >= step])

    def _lower(self, new: float, step: int, reason: str) -> float:
        f = self._factor
        self.last_backoff_step = step
        self.tested = False
        self.trial.cancel()  # the failure has decided
        if self.grown:  # this level was reached by growing back and failed again: never return to it
            self.ceiling = min(self.ceiling, new)
        self._factor, self.grown, self.clean_steps = new, False, 0
        if self._pending is not None:  # an earlier step still waiting for its spike flag: it neither
            self._pending = (*self._pending[:2], self._pending[2], True)  # counts as clean nor backs off again
        self.backoffs += 1
        self._note(step, reason)
        log.info("LRBackoff: %s at step %d: factor %.6g -> %.6g (ceiling %.6g)", reason, step, f, new, self.ceiling)
        return new

    def observe(self, step: int, loss: float | Tensor | None = None, clean: bool = True) -> None:
        """Count one training step: ``clean`` if no incident hit it; ``loss`` feeds spike detection.

        Call it once per optimizer step (or per training step with several optimizers), after the
        step, on every rank. Grows the factor back after ``patience`` clean steps in a row.
        """
        self._judge(step)
        x = None if loss is None or not clean else scalar_loss(loss)
        if x is not None and self.trial.collecting(self._factor, self.ceiling):
            self.trial.collect(x, self.reduce)
        if self.spike_zscore is None:
            self._settle(step, clean, False)
            return
        flag = None if x is None else self.spikes.test(x, self.spike_zscore, self.reduce)
        previous, self._pending = self._pending, (step, clean, flag, False)
        if previous is not None:
            self._settle(previous[0], previous[1], read_flag(previous[2]), previous[3])

    def _settle(self, step: int, clean: bool, spike: bool, superseded: bool = False) -> None:
        if spike and not self._last_spike and not superseded:
            self.back_off(step, "loss spike")
        self._last_spike = spike
        if not clean or spike or superseded:
            self.clean_steps = 0
            return
        self.clean_steps += 1
        self.tested = self.tested or self.clean_steps >= TESTED_AFTER
        if self.clean_steps >= self.patience and self._factor < self.ceiling:
            f = self._factor
            self._factor = min(f * self.growth, self.ceiling)
            self.grown, self.clean_steps = True, 0
            self.growths += 1
            self.trial.start(f, step)
            self._note(step, "grow back")
            log.info("LRBackoff: %d clean steps at step %d: factor %.6g -> %.6g", self.patience, step, f, self._factor)

    def _note(self, step: int, reason: str) -> None:
        self.history.append({"step": int(step), "reason": reason, "factor": self._factor, "ceiling": self.ceiling})
        del self.history[:-MAX_HISTORY]

    # ------------------------------------------------------------------ growth trial, spike window
    @property
    def wants_losses(self) -> bool:
        """Whether :meth:`observe` would use a loss now: spike detection is on, or a growth (or its trial) may come.

        At the full factor with nothing to grow back to, losses are not needed and need not be kept.
        """
        return self.spike_zscore is not None or self.trial.collecting(self._factor, self.ceiling)

    def _judge(self, step: int) -> None:
        """Undo the growth the verdict is about if the loss got worse after it (the level is then the ceiling)."""
        undo = self.trial.judge()
        if undo is None:
            return
        before, grown_at = undo
        f = self._factor
        self._factor = self.ceiling = before
        self.grown, self.clean_steps = False, 0
        self._note(step, f"growth of step {grown_at} undone: the loss got worse")
        log.info("LRBackoff: the loss got worse after growing at step %d: factor %.6g -> %.6g for good", grown_at, f, before)

    def spike_window(self) -> list[float]:
        """The finite losses of the spike window, oldest first (reads them back to the host)."""
        return self.spikes.ring.tolist()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-backoff, as primitives (reads the spike window to the host)."""
        pending = None
        if self._pending is not None:
            step, clean, flag, superseded = self._pending
            pending = [step, clean, read_flag(flag), superseded]
        return {
            "factor_now": self._factor,
            "ceiling": self.ceiling,
            "grown": self.grown,
            "clean_steps": self.clean_steps,
            "last_backoff_step": self.last_backoff_step,
            "backoffs": self.backoffs,
            "growths": self.growths,
            "history": [dict(h) for h in self.history],
            "spike_window": self.spike_window(),
            "spike_seen": self.spikes.seen,
            "last_spike": self._last_spike,
            "pending": pending,
            "tested": self.tested,
            **self.trial.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; missing keys keep their current values."""
        self._factor = float(state.get("factor_now", self._factor))
        self.ceiling = float(state.get("ceiling", self.ceiling))
        self.grown = bool(state.get("grown", self.grown))
        self.clean_steps = int(state.get("clean_steps", self.clean_steps))
        last = state.get("last_backoff_step", self.last_backoff_step)
        self.last_backoff_step = None if last is None else int(last)
        self.backoffs = int(state.get("backoffs", self.backoffs))
        self.growths = int(state.get("growths", self.growths))
        self.history = [dict(h) for h in state.get("history", self.history)]
        self._last_spike = bool(state.get("last_spike", self._last_spike))
        self.spikes.seen = int(state.get("spike_seen", self.spikes.seen))
        if "spike_window" in state:
            self.spikes.ring.load(state["spike_window"])
        self.tested = bool(state.get("tested", self.tested))
        self.trial.load_state_dict(state)
        pending = state.get("pending", None)
        if pending is not None:
            pending = (int(pending[0]), bool(pending[1]), bool(pending[2]), bool(pending[3]) if len(pending) > 3 else False)
        self._pending = pending

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings and state; the hooks, the optimizers and the reducer are runtime links."""
        state = super().__getstate__()
        state["reduce"] = all_reduce_max
        if self._pending is not None:
            step, clean, flag, superseded = self._pending
            state["_pending"] = (step, clean, read_flag(flag), superseded)
        return state
