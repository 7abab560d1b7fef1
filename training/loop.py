"""The epoch loop of the modes that run the backbone every step (lora and full)."""

import random
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from engine import Backbone
from training.config import TrainConfig
from training.data import Example
from training.metrics import classification_metrics
from training.progress import OnEvent, epoch_event
from training.recipe import (
    BestOnValidation,
    Split,
    by_length,
    class_weights,
    encode,
    epoch_batches,
    finite_loss,
    label_targets,
    optimizer_step,
    warmup_linear,
)

PREDICT_BATCH_ROWS = 64


def run_epochs(
    model: nn.Module,
    param_groups: Iterable[dict],
    backbone: Backbone,
    split: Split,
    config: TrainConfig,
    *,
    snapshot: Callable[[], dict[str, torch.Tensor]],
    progress: bool,
    desc: str,
    on_event: OnEvent | None = None,
) -> int:
    """Train ``model`` (input_ids, attention_mask [B, T] -> logits [B, C]) for up to
    ``config.epochs``, keeping the best state on the validation split.

    ``snapshot`` returns the trainable state worth restoring; the best one is loaded back
    (non-strict, so a snapshot may leave frozen weights out). ``on_event`` gets
    `progress.epoch_event` after each epoch. Returns the epochs run.
    """
    optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(split.train) // config.batch_size)
    schedule = warmup_linear(optimizer, steps_per_epoch * config.epochs, config.warmup_fraction)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(split.train, split.labels, config))
    targets = label_targets(split.train, split.labels)
    shuffler = random.Random(config.seed)
    stopper = BestOnValidation(config.patience)
    epochs_run = 0
    total = steps_per_epoch * config.epochs
    bar = tqdm(total=total, disable=not progress, unit="step", desc=desc, leave=True)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        loss_sum, num_batches = 0.0, 0
        for batch in epoch_batches(len(split.train), config.batch_size, shuffler):
            texts = [split.train[i].text for i in batch]
            ids, mask = encode(backbone, texts, config.max_length)
            loss = loss_fn(model(ids, mask), targets[batch])
            value = finite_loss(loss, epoch + 1, num_batches + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(optimizer, epoch + 1, num_batches + 1)
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
            loss_sum, num_batches = loss_sum + value, num_batches + 1
        epochs_run = epoch + 1
        val_f1, val_loss = _validate(model, backbone, split, loss_fn, config.max_length)
        bar.set_postfix(epoch=epoch + 1, val_f1=f"{val_f1:.3f}")
        if on_event is not None:
            elapsed_s = time.perf_counter() - started
            mean_loss = loss_sum / max(1, num_batches)
            on_event(epoch_event(epochs_run, config.epochs, mean_loss, val_f1, elapsed_s))
        if stopper.should_stop((val_f1, -val_loss), snapshot):
            break
    bar.close()
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state, strict=False)
    model.eval()
    return epochs_run


def _validate(
    model: nn.Module, backbone: Backbone, split: Split, loss_fn: nn.Module, max_length: int
) -> tuple[float, float]:
    """(macro-F1, loss) on the validation split; the loss breaks F1 ties between epochs."""
    logits = predict_logits(model, backbone, split.val, max_length)
    predicted = [split.labels[i] for i in logits.argmax(dim=-1).tolist()]
    val_f1 = classification_metrics([e.label for e in split.val], predicted, split.labels)
    val_loss = float(loss_fn(logits, label_targets(split.val, split.labels)))
    return val_f1["macro_f1"], val_loss


def predict_labels(
    model: nn.Module,
    backbone: Backbone,
    rows: list[Example],
    labels: tuple[str, ...],
    max_length: int,
) -> list[str]:
    """The label of each row, in eval mode (no dropout)."""
    logits = predict_logits(model, backbone, rows, max_length)
    return [labels[i] for i in logits.argmax(dim=-1).tolist()]


@torch.no_grad()
def predict_logits(
    model: nn.Module, backbone: Backbone, rows: list[Example], max_length: int
) -> torch.Tensor:
    """float32 [N, C] logits in row order, in eval mode (no dropout), batched by length."""
    was_training = model.training
    model.eval()
    logits: torch.Tensor | None = None
    order = by_length(backbone, rows, max_length)
    for start in range(0, len(order), PREDICT_BATCH_ROWS):
        chunk = order[start : start + PREDICT_BATCH_ROWS]
        ids, mask = encode(backbone, [rows[i].text for i in chunk], max_length)
        out = model(ids, mask).float()
        if logits is None:
            logits = torch.empty(len(rows), out.shape[1])
        logits[chunk] = out
    model.train(was_training)
    if logits is None:
        raise ValueError("no rows to predict")
    return logits
