"""GradientClipping: the Lightning callback around :class:`~lightning_nan.core.clipping.GradientClipper`."""

from __future__ import annotations

from typing import Any

import torch

from lightning_nan.callbacks._namespace import check_namespace
from lightning_nan.callbacks._shared_grads import step_grads
from lightning_nan.callbacks._trainer import log_metrics, partitions_state, starts_afresh, strategy_is
from lightning_nan.callbacks._types import TrainerLike, log_every_n_steps
from lightning_nan.core.clipping import (
    DEFAULT,
    DefaultType,
    GradientClipper,
    agc_refused,
    final_layer_parameters,
    refuse_other_methods,
)
from lightning_nan.core.events import RestoredOnRollback
from lightning_nan.core.sharding import is_sharded
from lightning_nan.core.step_grads import HeldGrads, StepGrads
from lightning_nan.core.validate import boolean, integer


# CheckpointRollback restores the statistics with the weights (a blow-up's norms must not stay in
# AutoClip's or ZClip's history). Registered, not derived: the written-out classes keep (Base, Callback).
@RestoredOnRollback.register
class GradientClippingBase:
    """Clip gradients with one of five methods, NaN-proof, reusing the guard's gradient norms.

    ``method``: ``"norm"`` (``max_norm``, ``norm_type``; the same result as
    ``Trainer(gradient_clip_val=max_norm)`` for float32 gradients), ``"value"`` (``clip_value``), ``"autoclip"``
    (``percentile=10``, ``window=1000``), ``"agc"`` (``clip_factor=0.01``, ``eps=1e-3``;
    ``exclude_final_layer=True`` leaves the last ``nn.Linear`` unclipped, as the paper does) or
    ``"zclip"`` (``alpha=0.97``, ``z_thresh=2.5``, ``warmup=25``, ``max_norm=1.0`` caps every step, the
    warm-up's included, as the reference ``zclip`` package's ``max_grad_norm``; ``None``: no cap).

    Runs in ``on_before_optimizer_step``: after AMP unscaling, after the guard's decision (a
    skipped step is not clipped and never enters AutoClip's or ZClip's statistics), in automatic and
    manual optimization alike (in manual optimization ``opt.step()`` triggers it: call nothing else,
    in particular not ``self.clip_gradients``), for every optimizer. Under DDP the gradients are
    already all-reduced, so every rank clips by the same global norm; with sharded parameters (FSDP,
    ``fully_shard`` under ``ModelParallelStrategy``) each rank clips its shards by the norm over all
    ranks (one ``all_reduce`` per step; ``"agc"`` is refused there, its units are split). Refuses a
    Trainer that also sets ``gradient_clip_val``. A non-finite total norm never scales finite
    gradients into NaN.

    Logged through the trainer's loggers every ``log_every_n_steps`` (default: the Trainer's):

    ==============================  =================================================
    key                             value
    ==============================  =================================================
    ``grad_clip/total_norm``        total gradient norm before clipping
    ``grad_clip/threshold``         the norm clipped to (norm, autoclip, zclip)
    ``grad_clip/coef``              the factor applied to the gradients (1: none)
    ``grad_clip/clipped_units``     fraction of units clipped (agc)
    ==============================  =================================================

    Example:
        >>> import torch, pytorch_lightning as pl, tempfile
        >>> from lightning_nan import GradientClipping
        >>> class Model(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.layer(batch[0]).pow(2).mean() * 1e3
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
        >>> clip = GradientClipping("autoclip", percentile=10)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[clip], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(Model(), loader)
        >>> float(clip.last["coef"]) < 1.0  # the second step was clipped to the first step's norm
        True
    """

    def __init__(
        self,
        method: str = "norm",
        *,
        max_norm: float | None | DefaultType = DEFAULT,
        norm_type: float = 2.0,
        clip_value: float | None = None,
        percentile: float = 10.0,
        window: int = 1000,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude_final_layer: bool = True,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        log_every_n_steps: int | None = None,
    ) -> None:
        integer("log_every_n_steps", log_every_n_steps, low=1, optional=True, hint="None: the Trainer's")
        boolean("exclude_final_layer", exclude_final_layer)
        super().__init__()
        self.clipper = GradientClipper(
            method,
            max_norm=max_norm,
            norm_type=norm_type,
            clip_value=clip_value,
            percentile=percentile,
            window=window,
            clip_factor=clip_factor,
            eps=eps,
            alpha=alpha,
            z_thresh=z_thresh,
            warmup=warmup,
        )
        if method != "agc":
            refuse_other_methods(method, {"exclude_final_layer": exclude_final_layer}, {"exclude_final_layer": True})
        self.exclude_final_layer = exclude_final_layer
        self.log_every_n_steps = log_every_n_steps
        #: The device tensors of the last clipping step (``total_norm``, ``threshold``, ``coef``, ...).
        self.last: dict[str, torch.Tensor] = {}
        self._bound_holds = False
        self._grads = HeldGrads()  # the gradient norms, when this callback computed them (no guard)

    @property
    def method(self) -> str:
        return self.clipper.method

    def setup(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        check_namespace(self, trainer)
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"GradientClipping({self.method!r}) replaces Trainer(gradient_clip_val={trainer.gradient_clip_val}): "
                "remove `gradient_clip_val` (and `gradient_clip_algorithm`) from the Trainer, or remove the callback."
            )
        if starts_afresh(trainer):  # a new run: an earlier fit's norms are not this model's (a resume loads its own)
            self.clipper.reset()
            self.last = {}
        excluded = final_layer_parameters(pl_module) if self.method == "agc" and self.exclude_final_layer else []
        self.clipper.exclude = {id(p) for p in excluded}
        self.clipper.sharded = strategy_is(trainer, "FSDPStrategy")  # FSDP1: flat shards
        # The guard's host bound on the total norm holds where every rank holds whole gradients.
        self._bound_holds = not partitions_state(trainer)
        if self.method == "agc" and self.clipper.sharded:
            raise agc_refused(type(trainer.strategy).__name__)

    def on_fit_start(self, trainer: TrainerLike, pl_module: Any) -> None:
        if self.method == "agc" and is_sharded(list(pl_module.parameters())):  # sharded in configure_model (FSDP2)
            raise agc_refused(type(trainer.strategy).__name__)

    def on_before_optimizer_step(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        grads = step_grads(trainer, pl_module, optimizer, self._grads)
        if grads.skipped or not grads.params:
            return
        self.last = self.clipper.clip_(grads.params, grads.norms, grads.norm_bound if self._bound_holds else None).as_dict()
        every = self.log_every_n_steps or log_every_n_steps(trainer)
        if self.last and trainer.global_step % every == 0 and trainer.loggers:
            values = torch.stack([v.float().reshape(()) for v in self.last.values()]).tolist()
            log_metrics(trainer, {f"grad_clip/{k}": v for k, v in zip(self.last, values)})

    def step_grads(self, trainer: TrainerLike, pl_module: Any, optimizer: torch.optim.Optimizer) -> StepGrads | None:
        """The step's gradient norms if this callback computed them (no guard in the Trainer), else ``None``."""
        return self._grads.get(optimizer, trainer.global_step)

    def teardown(self, trainer: TrainerLike, pl_module: Any, stage: str) -> None:
        self._grads.clear()  # let go of the parameters

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rule": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) == self.method:
            self.clipper.load_state_dict(state_dict.get("rule", {}))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
