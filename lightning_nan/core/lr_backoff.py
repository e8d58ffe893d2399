"""Learning-rate backoff that never fights the LR scheduler: ``effective LR = scheduled LR x factor``.

:class:`LRBackoffController` multiplies a *factor* by ``factor`` on every incident (and optionally on
every loss spike), down to ``min_factor``, and grows it back after ``patience`` clean steps. It never
leaves a modified value in ``group["lr"]``: an optimizer step pre-hook remembers each group's ``lr``
(whatever the scheduler set), writes ``lr * factor``, and the post-hook writes the remembered value
back once the update is done. Schedulers (closed-form, chainable, ``ReduceLROnPlateau``) and
checkpoints only ever see their own values, so a backoff is neither lost at the next OneCycle step nor
compounded by ExponentialLR; the update uses exactly ``scheduled x factor``.

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
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor

from lightning_nan.core.losses import scalar_loss
from lightning_nan.core.distributed import all_reduce_max
from lightning_nan.core.validate import integer, number

log = logging.getLogger(__name__)

#: Robust z-score scale: ``1.4826 * MAD`` estimates the standard deviation of normal data.
MAD_TO_STD = 1.4826
#: Floor of the spread, relative to the median: on a flat loss (MAD ~ 0) a wobble of 0.1% is not a spike.
REL_SCALE_FLOOR = 1e-3
#: The change log kept in ``history`` (and in ``state_dict``) is capped at this many entries.
MAX_HISTORY = 256
#: A growth is undone when the mean loss after it exceeds the mean before it by more than this many
#: standard errors (one-sided; about one false alarm in six on a flat, noisy loss).
TRIAL_Z = 1.0
#: Clean steps in a row that test a factor: a failure after fewer says nothing against it.
TESTED_AFTER = 3
#: Losses needed on each side of a growth for the trial to be run.
TRIAL_MIN_LOSSES = 10


class LRBackoffController:
    """Scale every param group's learning rate by a backoff factor at optimizer-step time.

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
    the last ``window`` clean losses, ``(loss - median) / max(1.4826 * MAD, 1e-3 * |median|)``, exceeds
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

    At each step the pre-hook saves every group's ``lr``, then scales it (a tensor ``lr`` shared by
    several groups, as torch makes for ``lr=torch.tensor(...)``, is scaled and restored once); the
    post-hook puts the saved value back only where the ``lr`` still holds what the pre-hook wrote. An
    ``lr`` written *inside* ``optimizer.step()`` (by the closure, or by Lightning's
    ``on_before_optimizer_step`` under automatic optimization: both run after the pre-hook) is used
    **unscaled** for that step and kept; set warm-up or hand-made LRs before the step (a scheduler,
    ``on_train_batch_start``) for the backoff to apply to them. A group without a numeric ``lr`` (none,
    or ``lr=None``: an optimizer that sets its own step size) is left alone (:func:`has_numeric_lr`).

    Cost: the hooks do nothing but record the factor while it is 1; otherwise they rescale the
    ``lr`` of each group twice per step (a float, or an in-place op on a tensor ``lr``; no host sync).
    A loss given to :meth:`observe` is written into a device ring (no host sync); a trial's verdict is
    one small read, a step after the trial ends.
    With spike detection each step adds a few small device ops, one ``all_reduce`` of a flag under
    DDP, and no host sync: the flag is read at the *next* :meth:`observe` (through a non-blocking copy
    on CUDA), so spike decisions, and the growth that waits for them, act one step late.

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

        self._factor = 1.0
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

        self._window = _LossRing(window)  # the spike window
        self._seen = 0  # losses tested or put into the ring so far (a counter, for the record)
        self._last_spike = False
        # (step, clean, deferred spike flag, superseded by a back-off) of the step still to settle
        self._pending: tuple[int, bool, Any, bool] | None = None
        # growth trials: the last `growth_trial` clean losses (NaN: empty), and while a trial runs the
        # losses before it and the factor it grew from; then the verdict, read at the next observe
        self._ring = _LossRing(growth_trial or TRIAL_MIN_LOSSES)
        self._trial: tuple[Tensor, float, int] | None = None  # (losses before, factor before, step)
        self._verdict: tuple[Any, float, int] | None = None  # (deferred flag, factor before, step)

        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        # id(optimizer) -> (factor, [(group, scheduled lr, float written)], [[tensor lr, scheduled, written]])
        # while a step is in progress
        self._inside: dict[int, tuple[float, list[tuple[dict, Any, Any]] | None, list[list[Any]] | None]] = {}

    # ------------------------------------------------------------------ the factor
    @property
    def factor_now(self) -> float:
        """The factor the next optimizer step will be taken with."""
        return self._factor

    def step_factor(self, optimizer: torch.optim.Optimizer) -> float:
        """The factor of ``optimizer``'s step in progress (inside ``step()``), else :attr:`factor_now`."""
        entry = self._inside.get(id(_unwrap(optimizer)))
        return self._factor if entry is None else entry[0]

    def effective_lrs(self, optimizer: torch.optim.Optimizer) -> list[float | None]:
        """Each group's ``scheduled lr x factor`` for the step in progress or, outside a step, the next one
        (``None`` for a group without a numeric ``lr``, which is left alone).

        Reads tensor learning rates back to the host: call it on logging steps only.
        """
        optimizer = _unwrap(optimizer)
        entry = self._inside.get(id(optimizer))
        if entry is not None and entry[1] is not None:
            return [None if written is _UNSCALED else float(lr) * entry[0] for _, lr, written in entry[1]]
        f = self._factor if entry is None else entry[0]
        return [float(group["lr"]) * f if has_numeric_lr(group) else None for group in optimizer.param_groups]

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
        self._trial = self._verdict = None  # the failure has decided
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
        if self._verdict is not None:
            self._judge(step)
        if clean and loss is not None and self._trial_collects():
            self._collect(loss)
        if self.spike_zscore is None:
            self._settle(step, clean, False)
            return
        flag = self._test(loss) if clean and loss is not None else None
        previous, self._pending = self._pending, (step, clean, flag, False)
        if previous is not None:
            self._settle(previous[0], previous[1], _read(previous[2]), previous[3])

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
            self._start_trial(f, step)
            self._note(step, "grow back")
            log.info("LRBackoff: %d clean steps at step %d: factor %.6g -> %.6g", self.patience, step, f, self._factor)

    def _note(self, step: int, reason: str) -> None:
        self.history.append({"step": int(step), "reason": reason, "factor": self._factor, "ceiling": self.ceiling})
        del self.history[:-MAX_HISTORY]

    # ------------------------------------------------------------------ growth trials (on the device)
    @property
    def wants_losses(self) -> bool:
        """Whether :meth:`observe` would use a loss now: spike detection is on, or a growth (or its trial) may come.

        At the full factor with nothing to grow back to, losses are not needed and need not be kept.
        """
        return self.spike_zscore is not None or self._trial_collects()

    def _trial_collects(self) -> bool:
        return self.growth_trial is not None and (self._factor < self.ceiling or self._trial is not None)

    @torch.no_grad()
    def _collect(self, loss: float | Tensor) -> None:
        """Put a clean step's loss in the ring; at the end of a trial, compare the two sides."""
        ring = self._ring
        ring.push(scalar_loss(loss))
        if self._trial is not None and ring.count >= ring.size:
            before, f, step = self._trial
            self._trial = None
            worse = (_zscore(before.to(ring.values.device), ring.values) > TRIAL_Z).float().reshape(1)
            self._verdict = (_Deferred(self.reduce(worse)), f, step)

    def _start_trial(self, before: float, step: int) -> None:
        if self._ring.count < TRIAL_MIN_LOSSES:
            return
        self._trial = (self._ring.values.clone(), before, step)
        self._ring.clear()

    def _judge(self, step: int) -> None:
        """Undo the growth the verdict is about if the loss got worse after it (the level is then the ceiling)."""
        flag, before, grown_at = self._verdict  # type: ignore[misc]
        self._verdict = None
        if not _read(flag):
            return
        f = self._factor
        self._factor = self.ceiling = before
        self.grown, self.clean_steps = False, 0
        self._note(step, f"growth of step {grown_at} undone: the loss got worse")
        log.info("LRBackoff: the loss got worse after growing at step %d: factor %.6g -> %.6g for good", grown_at, f, before)

    # ------------------------------------------------------------------ spike detection (on the device)
    @torch.no_grad()
    def _test(self, loss: float | Tensor) -> _Deferred | None:
        """Test ``loss`` against the window, then add it; returns the agreed 0/1 flag (read back later)."""
        assert self.spike_zscore is not None  # only called with spike detection on
        x = scalar_loss(loss)
        window = self._window
        flag = None
        if window.filled >= self.min_history:
            median = window.values.nanmedian()
            mad = (window.values - median).abs().nanmedian()
            scale = torch.maximum(MAD_TO_STD * mad, REL_SCALE_FLOOR * median.abs())
            spike = torch.isfinite(x) & ((x - median) / scale > self.spike_zscore)
            flag = self.reduce(spike.float().reshape(1))
        window.push(x)
        self._seen += 1
        return flag if flag is None else _Deferred(flag)

    def spike_window(self) -> list[float]:
        """The finite losses of the spike window, oldest first (reads them back to the host)."""
        return self._window.tolist()

    # ------------------------------------------------------------------ hooks
    def attach(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> None:
        """Scale the learning rate of every step of these optimizers (once each; Lightning wrappers are unwrapped)."""
        if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
            optimizers = [cast(torch.optim.Optimizer, optimizers)]
        for opt in cast(Iterable[torch.optim.Optimizer], optimizers):
            opt = _unwrap(opt)
            if any(o is opt for o in self._optimizers):
                continue
            self._optimizers.append(opt)
            self._handles.append(opt.register_step_pre_hook(self._pre_step))
            self._handles.append(opt.register_step_post_hook(self._post_step))

    def detach(self) -> None:
        """Remove the hooks, putting back any ``lr`` a failed step left scaled."""
        self.restore_lrs()
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizers = [], []

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers the hooks are on."""
        return list(self._optimizers)

    def restore_lrs(self) -> None:
        """Put back the scheduled ``lr`` wherever a step raised between the hooks (its post-hook never ran)."""
        for opt in self._optimizers:
            self._restore(opt)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._inside:  # the previous step raised: its lr is still scaled
            self._restore(optimizer)
        f = self._factor
        if f == 1.0:
            self._inside[id(optimizer)] = (1.0, None, None)
            return
        # Save every group's value before scaling any: torch puts one `lr` tensor object in every group
        # when `lr=torch.tensor(...)` is the default, and that tensor must be scaled (and saved) once.
        groups: list[tuple[dict, Any, Any]] = []  # (group, its scheduled lr, the float written; None: tensor)
        tensors: dict[int, list[Any]] = {}  # id -> [tensor lr, its scheduled value, the value written]
        for group in optimizer.param_groups:
            lr: Any = group.get("lr")
            if not has_numeric_lr(group):  # no learning rate to scale (an optimizer that sets its own step size)
                groups.append((group, lr, _UNSCALED))
            elif isinstance(lr, Tensor):
                entry = tensors.get(id(lr))
                if entry is None:
                    entry = tensors[id(lr)] = [lr, lr.clone(), None]
                groups.append((group, entry[1], None))
            else:
                groups.append((group, lr, lr * f))
        for group, _, written in groups:
            if written is not None and written is not _UNSCALED:
                group["lr"] = written
        for entry in tensors.values():
            entry[0].mul_(f)
            entry[2] = entry[0].clone()
        self._inside[id(optimizer)] = (f, groups, list(tensors.values()))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(optimizer)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the scheduled lr of each group that still holds exactly the value the pre-hook wrote.

        Anything else was written since (inside the step: the closure, ``on_before_optimizer_step``, a
        scheduler; or ``optimizer.load_state_dict`` by a rollback) and is kept.
        """
        _, groups, tensors = self._inside.pop(id(optimizer), (1.0, None, None))
        if groups is None:
            return
        held: set[int] = set()  # the tensor lrs still in the groups that were scaled
        for group, (scaled, lr, written) in zip(optimizer.param_groups, groups):
            if group is not scaled:  # `optimizer.load_state_dict` ran inside the step (a rollback): keep its values
                continue
            current = group.get("lr")
            if written is _UNSCALED:
                continue
            if written is None:
                if isinstance(current, Tensor):
                    held.add(id(current))
            elif not isinstance(current, Tensor) and current == written:
                group["lr"] = lr
        for tensor, lr, written in tensors or ():
            if id(tensor) in held:  # once per tensor object; a value written in place since is kept (no host sync)
                tensor.copy_(torch.where(tensor == written, lr, tensor))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-backoff, as primitives (reads the spike window to the host)."""
        pending = None
        if self._pending is not None:
            step, clean, flag, superseded = self._pending
            pending = [step, clean, _read(flag), superseded]
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
            "spike_seen": self._seen,
            "last_spike": self._last_spike,
            "pending": pending,
            "tested": self.tested,
            "trial_losses": self._ring.tolist(),
            "trial": None if self._trial is None else {
                "before": _finite(self._trial[0]), "factor": self._trial[1], "step": self._trial[2]
            },
            "verdict": None if self._verdict is None else [_read(self._verdict[0]), self._verdict[1], self._verdict[2]],
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
        self._seen = int(state.get("spike_seen", self._seen))
        if "spike_window" in state:
            self._window.load(state["spike_window"])
        self.tested = bool(state.get("tested", self.tested))
        if "trial_losses" in state:
            self._ring.load(state["trial_losses"])
        trial = state.get("trial")
        if trial:
            self._trial = (torch.tensor([float(v) for v in trial["before"]]), float(trial["factor"]), int(trial["step"]))
        else:
            self._trial = None
        verdict = state.get("verdict")
        self._verdict = None if not verdict else (bool(verdict[0]), float(verdict[1]), int(verdict[2]))
        pending = state.get("pending", None)
        if pending is not None:
            pending = (int(pending[0]), bool(pending[1]), bool(pending[2]), bool(pending[3]) if len(pending) > 3 else False)
        self._pending = pending

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings and state; the hooks, the optimizers and the reducer are runtime links."""
        state = self.__dict__.copy()
        state.update(_optimizers=[], _handles=[], _inside={}, reduce=all_reduce_max)
        if self._pending is not None:
            step, clean, flag, superseded = self._pending
            state["_pending"] = (step, clean, _read(flag), superseded)
        if self._verdict is not None:
            flag, before, grown_at = self._verdict
            state["_verdict"] = (_read(flag), before, grown_at)
        return state


def _finite(x: Tensor) -> list[float]:
    return [v for v in x.tolist() if math.isfinite(v)]


class _LossRing:
    """The last ``size`` losses in a device tensor (NaN: empty or non-finite); writing one needs no host sync."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: Tensor = torch.full((size,), math.nan)
        self.count = 0  # losses written since the last clear

    @property
    def filled(self) -> int:
        return min(self.count, self.size)

    def push(self, x: Tensor) -> None:
        if self.values.device != x.device:
            self.values = self.values.to(x.device)
        self.values[self.count % self.size] = torch.where(torch.isfinite(x), x, math.nan)
        self.count += 1

    def clear(self) -> None:
        self.values.fill_(math.nan)
        self.count = 0

    def tolist(self) -> list[float]:
        """The finite losses, oldest first (reads them to the host)."""
        if not self.count:
            return []
        start = self.count % self.size if self.count >= self.size else 0
        return _finite(torch.roll(self.values, -start)[: self.filled])

    def load(self, values: list[float]) -> None:
        """Start again from ``values`` (oldest first; only the last ``size`` are kept)."""
        kept = [float(v) for v in values][-self.size :]
        self.values = torch.full((self.size,), math.nan, device=self.values.device)
        if kept:
            self.values[: len(kept)] = torch.tensor(kept, device=self.values.device)
        self.count = len(kept)


def _zscore(before: Tensor, after: Tensor) -> Tensor:
    """Welch's z of ``mean(after) - mean(before)`` over the finite values of each (0 with too few)."""
    stats = []
    for x in (before, after):
        ok = torch.isfinite(x)
        n = ok.sum().clamp_min(1)
        mean = torch.where(ok, x, 0.0).sum() / n
        var = torch.where(ok, (x - mean) ** 2, 0.0).sum() / (n - 1).clamp_min(1)
        stats.append((mean, var / n, ok.sum()))
    (mb, vb, nb), (ma, va, na) = stats
    z = (ma - mb) / (vb + va).sqrt().clamp_min(1e-12 * mb.abs().clamp_min(1e-30))
    return torch.where((nb >= TRIAL_MIN_LOSSES) & (na >= TRIAL_MIN_LOSSES), z, torch.zeros_like(z))


class _Deferred:
    """A device flag read back later without stalling: a non-blocking copy to the host on CUDA."""

    def __init__(self, flag: Tensor) -> None:
        self.event = None
        if flag.device.type == "cuda":
            self.value = flag.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = flag

    def get(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # recorded a step ago: long done
        return bool(self.value.item() > 0)


def _read(flag: Any) -> bool:
    if flag is None:
        return False
    if isinstance(flag, _Deferred):
        return flag.get()
    return bool(flag)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper such as Lightning's ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


_UNSCALED = object()  # the pre-hook's mark of a group without a numeric lr (left alone)


def has_numeric_lr(group: dict[str, Any]) -> bool:
    """Whether a param group has an ``lr`` the backoff can scale: a number (not a bool) or a tensor.

    >>> has_numeric_lr({"lr": 0.1}), has_numeric_lr({"lr": None}), has_numeric_lr({"step_size": 0.1})
    (True, False, False)
    """
    lr = group.get("lr")
    return isinstance(lr, Tensor) or (isinstance(lr, numbers.Real) and not isinstance(lr, bool))
