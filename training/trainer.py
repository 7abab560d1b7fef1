"""One entry point for the three transfer-learning modes: validate, split, fit, evaluate, publish.

``head`` and ``lora`` publish the next registry version (a head model has rank 0 and no LoRA
weights); ``full`` writes a standalone model directory and never touches the registry.
"""

import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import POOLING_MEAN, Backbone
from engine.peft_io import WEIGHTS_FILE, write_peft_adapter
from registry import AdapterRecord, NotFound, Registry, validate_name
from training.config import TrainConfig
from training.data import Example
from training.full_model import check_output_dir, fit_full, write_full_model
from training.head_only import fit_head
from training.lora_model import fit_lora
from training.metrics import classification_metrics
from training.progress import OnEvent
from training.recipe import Fitted, Split, check_finite, split_examples
from training.validation import DataReport, drop_tokenless, raise_for_errors, validate_examples

log = logging.getLogger(__name__)

Fitter = Callable[[Backbone, Split, TrainConfig, bool, OnEvent | None], Fitted]
_FITTERS: dict[str, Fitter] = {"head": fit_head, "lora": fit_lora, "full": fit_full}


@dataclass(frozen=True, slots=True)
class TrainResult:
    mode: str  # head, lora or full
    record: AdapterRecord | None  # the registered version (head, lora); None for full
    model_dir: Path | None  # full: the standalone model directory; None otherwise
    metrics: dict[str, Any]  # held-out accuracy, macro_f1, per-class f1
    train_seconds: float  # wall time of embedding/optimisation and the held-out evaluation
    adapter_bytes: int  # adapter_model.safetensors (head only: just the head); full: the dir
    report: DataReport  # the validation report of the input data
    epochs_run: int
    num_train: int  # rows optimised on (validation and held-out rows excluded)


def train_adapter(
    backbone: Backbone,
    registry: Registry | None,
    tenant: str,
    name: str,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    source: str = "data",
    progress: bool = True,
    on_report: Callable[[DataReport], None] | None = None,
    test_examples: Sequence[Example] | None = None,
    output_dir: Path | None = None,
    on_event: OnEvent | None = None,
) -> TrainResult:
    """Validate, split, train in ``config.mode``, evaluate on the held-out rows, publish.

    ``test_examples``, when given, is the held-out set (training rows with the same text are
    dropped) instead of an ``eval_fraction`` split. ``output_dir`` is where full mode writes its
    model directory (required there, ignored otherwise); ``registry`` may be None in full mode.
    Validation runs before any training; fatal problems raise DataError naming rows. A failure
    at any point publishes nothing. ``on_event`` gets one dict per epoch (progress.epoch_event).
    """
    if config.mode != "full":  # full mode registers nothing: its directory may be any name
        validate_name("adapter", name)
    if config.max_length > backbone.max_tokens:  # the position embeddings end there
        raise ValueError(
            f"max_length must be at most {backbone.max_tokens}, the longest input "
            f"{backbone.name} takes; got {config.max_length}"
        )
    destination = _destination(config, registry, tenant, output_dir)
    report = validate_examples(examples, backbone.tokenizer)
    if on_report is not None:
        on_report(report)
    raise_for_errors(report, source)
    if report.num_empty > sum(not example.text.strip() for example in examples):
        examples = drop_tokenless(examples, backbone.tokenizer)  # clean_examples keeps them
    split = split_examples(examples, config, test_examples)
    started = time.perf_counter()
    fitted = _FITTERS[config.mode](backbone, split, config, progress, on_event)
    check_finite(fitted)
    gold = [e.label for e in split.held_out]
    metrics = classification_metrics(gold, fitted.predictions, split.labels)
    train_seconds = time.perf_counter() - started
    training = _training_summary(backbone, config, split, fitted.epochs_run, train_seconds)
    record, model_dir = None, None
    if isinstance(destination, Path):
        extra = {"metrics": metrics, "data": report.to_dict(), "training": training}
        num_bytes = write_full_model(
            destination, backbone, fitted, split.labels, config.max_length, extra
        )
        model_dir = destination
    else:
        record = _publish(
            destination, backbone, tenant, name, fitted, split, report, metrics, config, training
        )
        num_bytes = int(record.manifest["adapter_bytes"])
    return TrainResult(
        mode=config.mode,
        record=record,
        model_dir=model_dir,
        metrics=metrics,
        train_seconds=train_seconds,
        adapter_bytes=num_bytes,
        report=report,
        epochs_run=fitted.epochs_run,
        num_train=len(split.train),
    )


def _destination(
    config: TrainConfig, registry: Registry | None, tenant: str, output_dir: Path | None
) -> Registry | Path:
    """Where the result goes, checked before any work: the registry, or full mode's directory."""
    if config.mode == "full":
        return check_output_dir(output_dir)
    if registry is None:
        raise ValueError(f"mode {config.mode!r} publishes to a registry: pass one")
    if not registry.has_tenant(tenant):
        raise NotFound(f"tenant {tenant!r} does not exist (graft tenants create {tenant})")
    return registry


def _write_weights(
    staging: Path, backbone: Backbone, fitted: Fitted, rank: int, config: TrainConfig
) -> str | None:
    """The PEFT files in ``config.weights_dtype``; float32 where a weight overflows float16,
    and then a warning for the manifest (None otherwise)."""
    write = functools.partial(
        write_peft_adapter,
        staging,
        backbone,
        fitted.factors,
        rank=rank,
        alpha=config.alpha,
        head_weight=fitted.head.weight,
        head_bias=fitted.head.bias,
    )
    if config.weights_dtype == "float32":
        write(dtype=torch.float32)
        return None
    try:
        write(dtype=torch.float16)
    except ValueError as exc:
        warning = f"weights stored as float32, not float16: {exc}"
        log.warning("%s", warning)
        write(dtype=torch.float32)
        return warning
    return None


def _training_summary(
    backbone: Backbone, config: TrainConfig, split: Split, epochs_run: int, train_seconds: float
) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "config": {field: getattr(config, field) for field in config.__slots__},
        "train_examples": len(split.train),
        "val_examples": len(split.val),
        "eval_examples": len(split.held_out),
        "eval_max_tokens": config.eval_length(backbone.max_tokens),  # as the model is served
        "fixed_test_set": split.is_fixed_test,
        "epochs_run": epochs_run,
        "train_seconds": round(train_seconds, 3),
    }


def _publish(
    registry: Registry,
    backbone: Backbone,
    tenant: str,
    name: str,
    fitted: Fitted,
    split: Split,
    report: DataReport,
    metrics: dict[str, Any],
    config: TrainConfig,
    training: dict[str, Any],
) -> AdapterRecord:
    """Stage the PEFT files, the held-out rows and the manifest; the registry publishes atomically.

    A head-mode model is a PEFT directory with no LoRA factors (rank 0): the engine serves it on
    the bare backbone and it takes no page of the adapter pool.
    """
    rank = config.rank if fitted.factors else 0
    staging = Path(tempfile.mkdtemp(prefix="graft-train-"))
    try:
        dtype_warning = _write_weights(staging, backbone, fitted, rank, config)
        with (staging / "eval.jsonl").open("w", encoding="utf-8") as f:
            for e in split.held_out:
                f.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")
        manifest = {
            "mode": config.mode,
            "labels": list(split.labels),
            "base_sha256": backbone.sha256,
            "base_model": backbone.name,
            "rank": rank,
            "pooling": POOLING_MEAN,
            "source": "graft-train",
            "target_modules": list(fitted.factors),
            "metrics": metrics,
            "data": report.to_dict(),
            "warnings": [*report.warnings, *([dtype_warning] if dtype_warning else [])],
            "training": training,
            "adapter_bytes": (staging / WEIGHTS_FILE).stat().st_size,
        }
        return registry.publish(tenant, name, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
