"""The zoo's scenarios: real-world NaN bugs, each produced by a small model's own code, run under ``recommended()``.

Shared by ``tests/zoo/test_zoo.py`` (the assertions) and ``benchmarks/zoo_scoreboard.py`` (the scoreboard).
Every scenario is seeded (model, data, loader order) and takes well under a second on one CPU core
(the GPT-2 one imports ``transformers``, a few seconds once).

Each model records, on the first forward pass of each batch (the real training step; bisection's
re-evaluations of the same batch come later and are not recorded), the inputs of the samples whose own
per-sample value turned non-finite: the ground truth the diagnosis's ``triggers`` are checked against.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_nan
from lightning_nan.core.errors import NonFiniteError
from lightning_nan.core.quarantine import Quarantine

HERE = Path(__file__).resolve()


def line_of(text: str) -> int:
    """The line of this file holding ``text`` (exactly one line must)."""
    hits = [n for n, line in enumerate(HERE.read_text().splitlines(), 1) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ harness


class Zoo(pl.LightningModule):
    """A LightningModule that records the inputs of the samples its own forward pass found failing."""

    lr = 0.05

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.failing: dict[tuple[int, int], torch.Tensor] = {}  # (epoch, batch_idx) -> inputs of failing samples
        self.losses: list[float] = []  # the loss of each real training step (first forward of each batch)

    def note(self, batch_idx: int, inputs: torch.Tensor, bad: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        key = (self.current_epoch, batch_idx)
        if key in self.failing:  # a re-evaluation of the same batch (bisection, localization)
            return
        self.failing[key] = inputs[bad.detach()].detach().clone()
        if loss is not None:
            self.losses.append(float(loss.detach()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@dataclass
class Result:
    """What one scenario's run left behind."""

    scenario: Scenario
    model: Zoo
    data: TensorDataset
    callbacks: list[Any]
    error: BaseException | None
    quarantine_path: Path
    seconds: float

    def callback(self, name: str) -> Any:
        return next((cb for cb in self.callbacks if type(cb).__name__ == name), None)

    @property
    def guard(self) -> Any:
        return self.callback("NaNGuard")

    @property
    def bisection(self) -> Any:
        return self.callback("BatchBisection")

    @property
    def backoff(self) -> Any:
        return self.callback("LRBackoff")

    @property
    def rollback(self) -> Any:
        return self.callback("CheckpointRollback")

    @property
    def incidents(self) -> list[Any]:
        return list(self.guard.incidents)

    @property
    def quarantined(self) -> set[int]:
        """The indices in the quarantine file."""
        return Quarantine(self.quarantine_path).indices()

    @property
    def forward_passes(self) -> int:
        return self.bisection.forward_passes if self.bisection is not None else 0

    @property
    def lr_cuts(self) -> list[dict[str, Any]]:
        """LRBackoff's changes that lowered the factor below 1."""
        return [h for h in self.backoff.history if h["factor"] < 1.0] if self.backoff is not None else []

    def truth(self, incident: Any) -> tuple[set[int], int]:
        """What the model's own first forward of ``incident``'s batch found: the data set indices whose inputs
        equal those of a failing sample (more than one for identical inputs, e.g. all-zero rows), and how
        many samples of the batch failed."""
        candidates, count = set(), 0
        table = self.data.tensors[self.scenario.truth_field].flatten(1).float()
        for b in incident.batch_idx or []:
            bad = self.model.failing.get((incident.epoch, b))
            if bad is None:
                continue
            count += len(bad)
            for row in bad.flatten(1).float():
                candidates.update((table == row).all(-1).nonzero().flatten().tolist())
        return candidates, count

    @property
    def survived(self) -> bool:
        """The run finished, or raised NonFiniteError where the scenario expects it to."""
        if self.scenario.raises:
            return isinstance(self.error, NonFiniteError)
        return self.error is None

    @property
    def diagnosed(self) -> str:
        """The cause of the first incident (``"-"`` when none)."""
        return self.incidents[0].cause if self.incidents else "-"

    @property
    def false_quarantines(self) -> set[int]:
        return self.quarantined - set(self.scenario.dirty)


@dataclass(frozen=True)
class Scenario:
    """One bug of the zoo. ``causes``: the accepted diagnoses (the first is the expected one); ``dirty``: the
    truly dirty indices (the exact quarantine expected); ``raises``: the run should end in NonFiniteError (an
    unsafe operation that recurs, a broken pipeline); ``truth_field``: the batch field ``Result.truth`` matches."""

    name: str
    bug: str
    causes: tuple[str, ...]
    build: Callable[[], tuple[Zoo, TensorDataset, dict[str, Any]]]
    dirty: frozenset[int] = frozenset()
    raises: bool = False
    truth_field: int = 0

    def run(self, root: str | Path, quiet: bool = True) -> Result:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        model, data, options = self.build()
        return fit(self, model, data, root, quiet=quiet, **options)


def fit(
    scenario: Scenario,
    model: Zoo,
    data: TensorDataset,
    root: Path,
    *,
    batch_size: int = 32,
    epochs: int = 1,
    max_steps: int = -1,
    shuffle: bool = True,
    extra_callbacks: tuple[Any, ...] = (),
    quiet: bool = True,
    **parts: Any,
) -> Result:
    """``trainer.fit`` under ``lightning_nan.recommended(norms=False, ...)``; NonFiniteError is caught and kept."""
    quarantine_path = root / "quarantine.jsonl"
    parts.setdefault("norms", False)
    parts["bisection"] = {"quarantine_path": quarantine_path, **parts.get("bisection", {})}
    callbacks = lightning_nan.recommended(**parts)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=[*callbacks, *extra_callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen(1))
    error = None
    start = time.perf_counter()
    out = io.StringIO()
    with warnings.catch_warnings(), (contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        try:
            trainer.fit(model, loader)
        except NonFiniteError as err:
            error = err
    return Result(scenario, model, data, callbacks, error, quarantine_path, time.perf_counter() - start)


def regression_data(n: int, features: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g) / math.sqrt(features)
    return x, x @ w + 0.1 * torch.randn(n, 1, generator=g)


class Regressor(Zoo):
    """A plain MLP regressor (MSE): the healthy model of the data and corruption scenarios."""

    def __init__(self, features: int = 8, hidden: int = 16, act: type[nn.Module] = nn.Tanh, dropout: float = 0.0,
                 lr: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, hidden), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, 1))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        per_sample = (self.net(x) - y).pow(2).squeeze(-1)
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


# ------------------------------------------------------------------------------------------------ 1. log(1 - sigmoid)


class SaturatingClassifier(Zoo):
    """Hand-written binary cross-entropy on a sharpened sigmoid: ``1 - sigmoid(z)`` is exactly 0 in float32
    for ``z > 16.6``, so a confidently wrong sample (an ordinary one, with a noisy label) hits ``log(0)``."""

    def __init__(self, sharpness: float = 20.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.sharpness = sharpness  # a temperature copied from a contrastive recipe

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        p = torch.sigmoid(self.sharpness * self.head(self.body(x))).squeeze(-1)
        per_sample = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))  # BUG: log(0) once p rounds to 1
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


def noisy_labels(n: int = 256, seed: int = 1) -> TensorDataset:
    g = gen(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = ((x @ w + 1.0 * torch.randn(n, generator=g)) > 0).float()
    return TensorDataset(x, y)


def build_log1m_sigmoid():
    return SaturatingClassifier(), noisy_labels(), dict(epochs=3)


# ------------------------------------------------------------------------------------------------ 2. sqrt(<0)


class SqrtGain(nn.Module):
    """A learned, input-dependent gain ``sqrt(lin(x))``: nothing keeps ``lin(x)`` positive."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)
        with torch.no_grad():
            self.lin.weight.normal_(0.0, 0.3, generator=gen(2))
            self.lin.bias.fill_(1.3)  # lin(x) < 0 for about 1.5% of the samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.lin(x))  # BUG: NaN where lin(x) < 0


class GainRegressor(Zoo):
    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Linear(8, 1)
        self.gain = SqrtGain()
        self.lr = 0.01

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        per_sample = (self.mean(x) * self.gain(x) - y).pow(2).squeeze(-1)
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


def build_sqrt_negative():
    x, y = regression_data(512, seed=3)
    return GainRegressor(), TensorDataset(x, y), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 3. fully masked attention row


class CausalAttention(nn.Module):
    """Causal self-attention that also hides padded keys: a left-padded sequence's first query sees only
    padding, its whole row of scores is -inf, and softmax returns NaN for it."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = h.shape[1]
        hidden = torch.ones(t, t, dtype=torch.bool).triu(1)[None] | pad[:, None, :]
        scores = scores.masked_fill(hidden, float("-inf"))
        att = torch.softmax(scores, dim=-1)  # BUG: a row with every key hidden is NaN
        return self.out(att @ v)


class SequenceRegressor(Zoo):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = CausalAttention(8)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, pad, y = batch
        h = self.attn(self.embed(x), pad)
        keep = (~pad).float()[..., None]
        pooled = (h * keep).sum(1) / keep.sum(1)  # mean over the real positions (NaN * 0 is still NaN)
        per_sample = (self.head(pooled) - y).pow(2).squeeze(-1)
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


def build_masked_attention():
    g = gen(4)
    n, t = 256, 6
    x = torch.randn(n, t, 4, generator=g)
    pad = torch.zeros(n, t, dtype=torch.bool)
    short = torch.randperm(n, generator=g)[:8]  # 3% of the sequences are shorter, left-padded
    for i, length in zip(short.tolist(), [3, 4, 5, 4, 5, 3, 5, 4]):
        pad[i, : t - length] = True
        x[i, : t - length] = 0.0
    y = x.mean(dim=(1, 2))[:, None]
    return SequenceRegressor(), TensorDataset(x, pad, y), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 4. x / ||x|| on zero rows


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)  # BUG: 0/0 for an empty document (F.normalize has an eps)


class DocumentClassifier(Zoo):
    def __init__(self) -> None:
        super().__init__()
        self.normalize = L2Normalize()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = 0.1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        per_sample = F.binary_cross_entropy_with_logits(self.net(self.normalize(x)).squeeze(-1), y, reduction="none")
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


def bag_of_words(n: int = 256, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    counts = torch.poisson(torch.full((n, 16), 0.8), generator=g)
    empty = torch.randperm(n, generator=g)[:7]  # documents that lost every word to the tokenizer's filters
    counts[empty] = 0.0
    y = (counts[:, :8].sum(-1) > counts[:, 8:].sum(-1)).float()
    return counts, y


def build_zero_norm():
    return DocumentClassifier(), TensorDataset(*bag_of_words()), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 5. sqrt'(0)


class PairNet(Zoo):
    """A Siamese contrastive loss on the Euclidean distance: for a pair of identical inputs the distance is
    exactly 0, the loss finite, and the gradient of sqrt at 0 makes every gradient NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x1, x2, y = batch
        a, b = self.encoder(x1), self.encoder(x2)
        d = torch.sqrt(((a - b) ** 2).sum(-1))  # BUG: d'(0) is infinite
        per_sample = y * d**2 + (1 - y) * F.relu(1.0 - d) ** 2
        self.note(batch_idx, x1, (x1 == x2).all(-1), per_sample.mean())
        return per_sample.mean()


def build_sqrt_grad():
    g = gen(6)
    n = 256
    x1 = torch.randn(n, 8, generator=g)
    y = (torch.rand(n, generator=g) < 0.5).float()
    x2 = torch.where(y[:, None] > 0, x1 + 0.3 * torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g))
    same = torch.randperm(n, generator=g)[:6]  # a pair of a sample with itself (duplicates in the pair list)
    x2[same], y[same] = x1[same], 1.0
    return PairNet(), TensorDataset(x1, x2, y), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 6. where(m, x, log(x))


class LogRates(nn.Module):
    """Log of learned per-feature rates of counts, "guarded" by torch.where: the forward pass is finite,
    but log's gradient at a zero count is 0/0 = NaN, and where passes it on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        rate = counts * self.scale
        return torch.where(rate > 0, torch.log(rate), torch.zeros_like(rate))  # BUG: the gradient trap


class CountRegressor(Zoo):
    def __init__(self) -> None:
        super().__init__()
        self.features = LogRates()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = 0.02

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        c, y = batch
        per_sample = (self.net(self.features(c)) - y).pow(2).squeeze(-1)
        self.note(batch_idx, c, (c == 0).any(-1), per_sample.mean())
        return per_sample.mean()


def build_where_log():
    g = gen(7)
    c = torch.poisson(torch.full((256, 4), 5.0), generator=g)  # P(some count is 0) is about 2.7%
    y = torch.log1p(c).mean(-1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=g)
    return CountRegressor(), TensorDataset(c, y), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 7. hand-written softmax


class CosineClassifier(Zoo):
    """Cosine-similarity logits at CLIP's scale 100, through a hand-written softmax: exp overflows float32
    above 88.7, i.e. for a sample whose embedding is within cos 0.887 of a class prototype."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.prototypes = nn.Parameter(torch.randn(3, 8))
        self.lr = 0.05

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = 100.0 * F.normalize(self.encoder(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        e = torch.exp(z)  # BUG: inf above 88.7 (use torch.softmax / logsumexp)
        p = e / e.sum(-1, keepdim=True)
        per_sample = (p - F.one_hot(y, 3).float()).pow(2).sum(-1)  # the Brier score
        self.note(batch_idx, x, ~torch.isfinite(per_sample), per_sample.mean())
        return per_sample.mean()


def build_softmax_overflow():
    g = gen(8)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3].argmax(-1)).long()
    return CosineClassifier(), TensorDataset(x, y), dict(epochs=2)


# ------------------------------------------------------------------------------------------------ 8-11. dirty data

NAN_SAMPLE, EXTREME_SAMPLE, DROPOUT_SAMPLE, BATCHSTAT_SAMPLE = 37, 90, 13, 50


def build_nan_sample():
    x, y = regression_data(128, seed=9)
    x[NAN_SAMPLE, 2] = float("nan")  # a missing value read as NaN
    return Regressor(), TensorDataset(x, y), dict(epochs=2, batch_size=16)


def build_extreme_sample():
    x, y = regression_data(128, seed=10)
    x[EXTREME_SAMPLE, :4] = 1e38  # a sentinel "missing" value of a float32 export: finite, near the limit
    return Regressor(act=nn.ReLU), TensorDataset(x, y), dict(epochs=2, batch_size=16)


def build_dropout_dirty():
    x, y = regression_data(128, seed=11)
    x[DROPOUT_SAMPLE, 5] = float("nan")
    return Regressor(hidden=32, dropout=0.1), TensorDataset(x, y), dict(epochs=2, batch_size=16)


class ScaleFreeRegressor(Zoo):
    """MSE divided by the batch's variance of the targets: not a per-sample sum (one sample alone: var is NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y) / y.var()
        self.note(batch_idx, x, ~torch.isfinite(x).all(-1), loss)
        return loss


def build_batchstat_dirty():
    x, y = regression_data(128, seed=12)
    x[BATCHSTAT_SAMPLE, 0] = float("nan")
    return ScaleFreeRegressor(), TensorDataset(x, y), dict(epochs=2, batch_size=16)


# ------------------------------------------------------------------------------------------------ 12. divergence


def build_divergence():
    x, y = regression_data(512, seed=13)
    model = Regressor(hidden=32, act=nn.ReLU, lr=1.5)  # far too large for SGD on this MLP
    return model, TensorDataset(x, y), dict(epochs=1, batch_size=16)


# ------------------------------------------------------------------------------------------------ 13. corruption


class FlipWeight(pl.Callback):
    """Silent data corruption: after optimizer step ``at`` one weight of the first layer becomes ``value``."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value, self.done = at, value, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and not self.done:
            self.done = True
            with torch.no_grad():
                pl_module.net[0].weight[3, 2] = self.value


CORRUPT_AT = 12


def build_corruption(value: float):
    def build():
        x, y = regression_data(512, seed=14)
        return Regressor(), TensorDataset(x, y), dict(epochs=1, batch_size=16, extra_callbacks=(FlipWeight(CORRUPT_AT, value),))

    return build


# ------------------------------------------------------------------------------------------------ 14. broken pipeline

CONSTANT_COLUMNS = (3, 6)


def build_broken_pipeline():
    x, y = regression_data(128, seed=15)
    x[:, list(CONSTANT_COLUMNS)] = 1.0  # a constant column (a unit, a version flag)
    x = (x - x.mean(0)) / x.std(0)  # standardised: 0/0 in the constant columns, for every sample
    return Regressor(), TensorDataset(x, y), dict(epochs=1, batch_size=32)


# ------------------------------------------------------------------------------------------------ 15. sporadic dirty sample

SPORADIC_BATCHES = (25, 75, 125, 175)
SPORADIC = frozenset(16 * b + 5 for b in SPORADIC_BATCHES)


def build_sporadic():
    x, y = regression_data(16 * 200, seed=16)
    for i in SPORADIC:
        x[i, 1] = float("nan")
    return Regressor(), TensorDataset(x, y), dict(epochs=1, batch_size=16, shuffle=False)


# ------------------------------------------------------------------------------------------------ 16. many dirty samples

MANY_DIRTY = frozenset(16 * b + (b % 16) for b in range(4, 30))  # one NaN sample in each of 26 batches in a row


def build_many_dirty():
    x, y = regression_data(16 * 40, seed=19)
    for i in MANY_DIRTY:
        x[i, 3] = float("inf")
    return Regressor(), TensorDataset(x, y), dict(epochs=2, batch_size=16, shuffle=False)


# ------------------------------------------------------------------------------------------------ 17. GPT-2


class TinyGPT2(Zoo):
    """A real Hugging Face GPT-2 from a tiny config (random weights, nothing downloaded) as a language model."""

    def __init__(self, lr: float = 50.0) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                            eos_token_id=0)
        self.gpt = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.gpt(input_ids=tokens, labels=tokens).loss
        self.note(batch_idx, tokens, torch.zeros(len(tokens), dtype=torch.bool), loss)
        return loss


def build_gpt2_divergence():
    g = gen(17)
    tokens = torch.randint(0, 64, (256, 16), generator=g)
    tokens[:, 1::2] = (tokens[:, ::2] + 1) % 64  # something to learn
    return TinyGPT2(lr=50.0), TensorDataset(tokens), dict(epochs=2, batch_size=16)


# ------------------------------------------------------------------------------------------------ the zoo

UNSAFE = ("unsafe_op",)
ZOO: list[Scenario] = [
    Scenario("log1m_sigmoid", "log(1 - sigmoid(z)) hits log(0) on a sharpened classifier head", UNSAFE,
             build_log1m_sigmoid, raises=True),
    Scenario("sqrt_negative", "sqrt(lin(x)) of a learned gain, negative for ~1.5% of ordinary samples", UNSAFE,
             build_sqrt_negative, raises=True),
    Scenario("masked_attention", "causal + left-padding mask hides a whole attention row: softmax(-inf...) = NaN",
             UNSAFE, build_masked_attention, raises=True),
    Scenario("zero_norm_div", "x / x.norm() on empty bag-of-words documents", UNSAFE, build_zero_norm, raises=True),
    Scenario("sqrt_grad_zero", "sqrt of a squared distance of identical pairs: finite loss, NaN gradient", UNSAFE,
             build_sqrt_grad, raises=True),
    Scenario("where_log_trap", "torch.where(rate > 0, log(rate), 0) at zero counts: finite loss, NaN gradient",
             UNSAFE, build_where_log, raises=True),
    Scenario("softmax_overflow", "hand-written softmax exp(z)/sum at logit scale 100 overflows", ("unsafe_op", "overflow"),
             build_softmax_overflow, raises=True),
    Scenario("nan_sample", "one sample with a NaN feature", ("dirty_data",), build_nan_sample, frozenset({NAN_SAMPLE})),
    Scenario("extreme_sample", "one sample holding 1e38 (finite, near float32's limit)", ("dirty_data",),
             build_extreme_sample, frozenset({EXTREME_SAMPLE})),
    Scenario("dropout_dirty", "dropout 0.1 in the model and one NaN sample", ("dirty_data",), build_dropout_dirty,
             frozenset({DROPOUT_SAMPLE})),
    Scenario("batchstat_dirty", "a loss divided by the batch's target variance and one NaN sample", ("dirty_data",),
             build_batchstat_dirty, frozenset({BATCHSTAT_SAMPLE})),
    Scenario("divergence", "an MLP at a far-too-large SGD learning rate", ("divergence",), build_divergence),
    Scenario("corruption_nan", f"a weight flipped to NaN after step {CORRUPT_AT} (silent data corruption)",
             ("corruption",), build_corruption(float("nan"))),
    Scenario("corruption_1e30", f"a weight flipped to 1e30 after step {CORRUPT_AT} (finite; tanh hides it from the loss)",
             ("corruption",), build_corruption(1e30)),
    Scenario("broken_pipeline", "standardised by a zero std: columns 3 and 6 NaN in every sample",
             ("broken_pipeline",), build_broken_pipeline, raises=True),
    Scenario("sporadic_dirty", "a NaN sample every 50 steps over 200 steps", ("dirty_data",), build_sporadic, SPORADIC),
    Scenario("many_dirty", "an Inf sample in each of 26 batches in a row (more than max_consecutive=20)",
             ("dirty_data",), build_many_dirty, MANY_DIRTY),
    Scenario("gpt2_divergence", "Hugging Face GPT-2 (tiny config) at SGD lr 50", ("divergence",),
             build_gpt2_divergence),
]
BY_NAME = {s.name: s for s in ZOO}
