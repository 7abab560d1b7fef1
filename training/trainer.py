"""Train a LoRA adapter plus head on a tenant's examples and register it."""

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine import POOLING_MEAN, Backbone
from engine.peft_io import WEIGHTS_FILE, write_peft_adapter
from registry import AdapterRecord, NotFound, Registry, validate_name
from training.config import TrainConfig
from training.data import DataReport, Example, clean_examples, raise_for_errors, validate_examples
from training.datasets import stratified_sample, stratified_split
from training.lora_model import TrainableLora, select_targets
from training.metrics import classification_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainResult:
    record: AdapterRecord  # the registered version
    metrics: dict[str, Any]  # held-out accuracy, macro_f1, per-class f1
    train_seconds: float  # wall time of the optimisation loop and evaluation
    adapter_bytes: int  # size of adapter_model.safetensors
    report: DataReport  # the validation report of the input data
    epochs_run: int


def train_adapter(
    backbone: Backbone,
    registry: Registry,
    tenant: str,
    name: str,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    source: str = "data",
    progress: bool = True,
    on_report: Callable[[DataReport], None] | None = None,
) -> TrainResult:
    """Validate, split, train, evaluate on the held-out split, publish the next version.

    Validation runs before any training; fatal problems raise DataError naming rows.
    A failure at any point publishes nothing.
    """
    validate_name("adapter", name)
    if not registry.has_tenant(tenant):
        raise NotFound(f"tenant {tenant!r} does not exist (graft tenants create {tenant})")
    report = validate_examples(examples, backbone.tokenizer)
    if on_report is not None:
        on_report(report)
    raise_for_errors(report, source)
    rows = clean_examples(examples)
    if config.max_examples is not None and len(rows) > config.max_examples:
        rows = stratified_sample(rows, config.max_examples, seed=config.seed)
    rest, held_out = stratified_split(rows, config.eval_fraction, seed=config.seed)
    train_rows, val_rows = stratified_split(rest, config.val_fraction, seed=config.seed + 1)
    labels = tuple(sorted({e.label for e in rows}))
    started = time.perf_counter()
    model, epochs_run = _fit(backbone, train_rows, val_rows, labels, config, progress)
    metrics = classification_metrics(
        [e.label for e in held_out], _predict(model, backbone, held_out, labels, config), labels
    )
    train_seconds = time.perf_counter() - started
    record = _publish(
        registry,
        backbone,
        tenant,
        name,
        model,
        labels,
        held_out,
        report,
        metrics,
        config,
        train_seconds,
        epochs_run,
        len(train_rows),
    )
    return TrainResult(
        record=record,
        metrics=metrics,
        train_seconds=train_seconds,
        adapter_bytes=int(record.manifest["adapter_bytes"]),
        report=report,
        epochs_run=epochs_run,
    )


def _fit(
    backbone: Backbone,
    train_rows: list[Example],
    val_rows: list[Example],
    labels: tuple[str, ...],
    config: TrainConfig,
    progress: bool,
) -> tuple[TrainableLora, int]:
    generator = torch.Generator().manual_seed(config.seed)
    targets = select_targets(backbone, config.targets)
    model = TrainableLora(backbone, targets, config.rank, config.alpha, len(labels), generator)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.a) + list(model.b_t), "lr": config.lora_lr},
            {"params": model.head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    schedule = _warmup_linear(optimizer, steps_per_epoch * config.epochs, config.warmup_fraction)
    loss_fn = torch.nn.CrossEntropyLoss(weight=_class_weights(train_rows, labels, config))
    index = {label: i for i, label in enumerate(labels)}
    shuffler = random.Random(config.seed)
    best_f1, best_state, stale, epochs_run = -1.0, None, 0, 0
    bar = tqdm(
        total=steps_per_epoch * config.epochs,
        disable=not progress,
        unit="step",
        desc="training",
        leave=True,
    )
    for epoch in range(config.epochs):
        order = list(train_rows)
        shuffler.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            ids, mask = _encode(backbone, [e.text for e in chunk], config.max_length)
            target = torch.tensor([index[e.label] for e in chunk])
            loss = loss_fn(model(ids, mask), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        epochs_run = epoch + 1
        val_f1 = classification_metrics(
            [e.label for e in val_rows], _predict(model, backbone, val_rows, labels, config), labels
        )["macro_f1"]
        bar.set_postfix(epoch=epoch + 1, val_f1=f"{val_f1:.3f}")
        if val_f1 > best_f1:
            best_f1, stale = val_f1, 0
            best_state = {
                k: v.detach().clone()
                for k, v in model.state_dict().items()
                if not k.startswith("backbone")
            }
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return model, epochs_run


def _warmup_linear(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float):
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _class_weights(rows: list[Example], labels: tuple[str, ...], config: TrainConfig):
    if not config.class_weighting:
        return None
    counts = Counter(e.label for e in rows)
    raw = [len(rows) / (len(labels) * max(1, counts[label])) for label in labels]
    return torch.tensor(raw, dtype=torch.float32)


def _encode(backbone: Backbone, texts: list[str], max_length: int):
    enc = backbone.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _predict(
    model: TrainableLora,
    backbone: Backbone,
    rows: list[Example],
    labels: tuple[str, ...],
    config: TrainConfig,
    batch_size: int = 64,
) -> list[str]:
    predicted: list[str] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = _encode(
            backbone, [e.text for e in rows[start : start + batch_size]], config.max_length
        )
        predicted += [labels[i] for i in model(ids, mask).argmax(dim=-1).tolist()]
    return predicted


def _publish(
    registry: Registry,
    backbone: Backbone,
    tenant: str,
    name: str,
    model: TrainableLora,
    labels: tuple[str, ...],
    held_out: list[Example],
    report: DataReport,
    metrics: dict[str, Any],
    config: TrainConfig,
    train_seconds: float,
    epochs_run: int,
    num_train: int,
) -> AdapterRecord:
    staging = Path(tempfile.mkdtemp(prefix="graft-train-"))
    try:
        write_peft_adapter(
            staging,
            backbone,
            model.lora_factors(),
            rank=config.rank,
            alpha=config.alpha,
            head_weight=model.head.weight,
            head_bias=model.head.bias,
        )
        with (staging / "eval.jsonl").open("w", encoding="utf-8") as f:
            for e in held_out:
                f.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")
        manifest = {
            "labels": list(labels),
            "base_sha256": backbone.sha256,
            "base_model": backbone.name,
            "rank": config.rank,
            "pooling": POOLING_MEAN,
            "source": "graft-train",
            "target_modules": model.targets,
            "metrics": metrics,
            "data": report.to_dict(),
            "warnings": list(report.warnings),
            "training": {
                "config": _config_dict(config),
                "train_examples": num_train,
                "eval_examples": len(held_out),
                "epochs_run": epochs_run,
                "train_seconds": round(train_seconds, 3),
            },
            "adapter_bytes": (staging / WEIGHTS_FILE).stat().st_size,
        }
        return registry.publish(tenant, name, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {field: getattr(config, field) for field in config.__slots__}
