"""The parts of the training recipe every mode shares: splits, schedule, weights, stopping."""

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine import Backbone
from training.config import TrainConfig
from training.data import Example, clean_examples, normalise_text
from training.datasets import stratified_sample, stratified_split


@dataclass(frozen=True, slots=True)
class Split:
    """The rows of one training run; no normalised text is on two sides."""

    train: list[Example]  # optimised on
    val: list[Example]  # early stopping only
    held_out: list[Example]  # the reported metrics
    labels: tuple[str, ...]  # sorted; the classifier's output order
    is_fixed_test: bool  # held_out was given by the caller, not split off


@dataclass(frozen=True, slots=True)
class Fitted:
    """What a mode's optimisation produced, evaluated on the held-out rows."""

    head: nn.Linear  # weight [C, H], bias [C], on mean-pooled last hidden states
    predictions: list[str]  # one label per split.held_out row
    epochs_run: int
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # lora: backbone linear name -> (A [r, in], B [out, r]); empty for head and full
    encoder: nn.Module | None = None  # full: the fine-tuned copy of the backbone


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite numbers: the learning rates are too
    high for this data. Nothing is published."""


_LOWER_RATES = (
    "lower the learning rates (TrainConfig lora_lr, head_lr, backbone_lr; "
    "graft train --lr, --head-lr, --backbone-lr)"
)


def finite_loss(loss: torch.Tensor, epoch: int, step: int) -> float:
    """``loss`` as a float, checked before the optimizer steps on it."""
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: the loss is {value} at epoch {epoch}, step {step}; {_LOWER_RATES}"
        )
    return value


def optimizer_step(optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
    """``optimizer.step()``, where an update too large for a float (Adam's at a learning
    rate of 1e38) is divergence too, not a RuntimeError from inside torch."""
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise TrainingDiverged(
            f"training diverged: the optimizer's update overflowed at epoch {epoch}, "
            f"step {step}; {_LOWER_RATES}"
        ) from None


def round_for_storage(weights: Sequence[torch.Tensor], config: TrainConfig) -> None:
    """Round ``weights`` in place to the ``weights_dtype`` they will be stored in, before the
    held-out evaluation, so that the reported metrics are the served model's. All or none: where
    one overflows float16, the version is stored (and evaluated) in float32 whole."""
    if config.weights_dtype == "float32":
        return
    with torch.no_grad():
        rounded = [w.detach().half() for w in weights]
        if all(bool(torch.isfinite(r).all()) for r in rounded):
            for w, r in zip(weights, rounded, strict=True):
                w.copy_(r)


def check_finite(fitted: Fitted) -> None:
    """Refuse to hand on weights holding NaN or infinity: served, they answer null scores
    under an arbitrary label. The loss check misses an optimizer step's own overflow."""
    tensors = {"the head's weight": fitted.head.weight, "the head's bias": fitted.head.bias}
    for name, (a, b) in fitted.factors.items():
        tensors |= {f"{name}'s LoRA A": a, f"{name}'s LoRA B": b}
    if fitted.encoder is not None:
        tensors |= {f"encoder {n}": p for n, p in fitted.encoder.named_parameters()}
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(
                f"training diverged: {name} holds NaN or infinity; {_LOWER_RATES}"
            )


def split_examples(
    examples: Sequence[Example],
    config: TrainConfig,
    test_examples: Sequence[Example] | None = None,
) -> Split:
    """De-duplicate first, then split, so that no test text leaks into training.

    With ``test_examples`` those (de-duplicated) rows are the held-out set and every training
    row whose text also occurs among them is dropped; otherwise ``eval_fraction`` is split off.
    """
    rows = clean_examples(examples)
    held_out: list[Example] = []
    if test_examples is not None:
        held_out = clean_examples(test_examples)
        if not held_out:
            raise ValueError("test_examples holds no non-empty text")
        test_texts = {normalise_text(e.text) for e in held_out}
        rows = [e for e in rows if normalise_text(e.text) not in test_texts]
    if config.max_examples is not None and len(rows) > config.max_examples:
        rows = stratified_sample(rows, config.max_examples, seed=config.seed)
    if test_examples is None:
        rows, held_out = stratified_split(rows, config.eval_fraction, seed=config.seed)
    train, val = stratified_split(rows, config.val_fraction, seed=config.seed + 1)
    if not (train and val and held_out):
        sample = (
            f" (max_examples={config.max_examples} sampled them)" if config.max_examples else ""
        )
        raise ValueError(
            f"too few rows to split{sample}: {len(train)} to train on, {len(val)} to validate, "
            f"{len(held_out)} held out, over {len({e.label for e in rows})} classes"
        )
    labels = tuple(sorted({e.label for e in train}))
    unseen = sorted({e.label for e in held_out} - set(labels))
    if unseen:
        raise ValueError(
            f"test labels {unseen} have no training rows (training has {list(labels)})"
        )
    return Split(train, val, held_out, labels, is_fixed_test=test_examples is not None)


def warmup_linear(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(
    rows: Sequence[Example], labels: tuple[str, ...], config: TrainConfig
) -> torch.Tensor | None:
    """Inverse class frequency, so a 1:10 imbalance does not teach 'always the big class'."""
    if not config.class_weighting:
        return None
    counts = Counter(e.label for e in rows)
    raw = [len(rows) / (len(labels) * max(1, counts[label])) for label in labels]
    return torch.tensor(raw, dtype=torch.float32)


def label_targets(rows: Sequence[Example], labels: tuple[str, ...]) -> torch.Tensor:
    """int64 [N] class indices in ``labels`` order."""
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[e.label] for e in rows], dtype=torch.long)


def encode(
    backbone: Backbone, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] padded to the longest text, cut at ``max_length``.

    The cut keeps the leading tokens and the closing special token, as the engine does.
    """
    enc = backbone.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def by_length(backbone: Backbone, rows: Sequence[Example], max_length: int) -> list[int]:
    """Row positions, shortest (in tokens, up to ``max_length``) first: batches taken in this
    order pad little, which matters for short, uneven texts such as SMS and tweets."""
    enc = backbone.tokenizer([e.text for e in rows], truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    return sorted(range(len(rows)), key=lengths.__getitem__)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] hidden states -> [B, H], the mean over real (unmasked) tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def epoch_batches(num_rows: int, batch_size: int, shuffler: random.Random) -> list[list[int]]:
    """Row indices of one epoch in shuffled mini-batches."""
    order = list(range(num_rows))
    shuffler.shuffle(order)
    return [order[start : start + batch_size] for start in range(0, num_rows, batch_size)]


class BestOnValidation:
    """Keeps the state of the best validation score and says when patience has run out.

    Scores are tuples compared in order, e.g. (macro-F1, -loss): on a validation split of a
    hundred rows F1 ties are common, and the tie-breaker keeps the better-fitted state. Patience
    counts epochs without a gain in the first element only, so a loss that keeps creeping down
    while F1 stands still does not train forever.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_score: tuple[float, ...] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._stale = 0

    def should_stop(
        self, score: tuple[float, ...], snapshot: Callable[[], dict[str, torch.Tensor]]
    ) -> bool:
        """Record an epoch's score; ``snapshot`` is called only on improvement."""
        best = self.best_score
        if best is None or score[0] > best[0]:
            self._stale = 0
        else:
            self._stale += 1
        if best is None or score > best:
            self.best_score, self.best_state = score, snapshot()
        return self._stale >= self.patience


def detached_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
