"""Training: validate a tenant's labeled data, train a head, LoRA + head, or a full model."""

from training.config import MODES, TrainConfig
from training.data import (
    DataError,
    DataReport,
    Example,
    clean_examples,
    examples_from_records,
    load_examples,
    raise_for_errors,
    validate_examples,
)
from training.datasets import (
    DATASETS,
    DatasetUnavailable,
    deduplicate,
    load_bbc_news,
    load_sms_spam,
    load_tweets,
    stratified_sample,
    stratified_split,
    write_csv,
)
from training.full_model import FullModel, load_full_model
from training.metrics import classification_metrics
from training.trainer import TrainResult, train_adapter

__all__ = [
    "DATASETS",
    "MODES",
    "DataError",
    "DataReport",
    "DatasetUnavailable",
    "Example",
    "FullModel",
    "TrainConfig",
    "TrainResult",
    "classification_metrics",
    "clean_examples",
    "deduplicate",
    "examples_from_records",
    "load_bbc_news",
    "load_examples",
    "load_full_model",
    "load_sms_spam",
    "load_tweets",
    "raise_for_errors",
    "stratified_sample",
    "stratified_split",
    "train_adapter",
    "validate_examples",
    "write_csv",
]
