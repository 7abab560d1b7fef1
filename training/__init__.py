"""Training: validate a tenant's labeled data, train LoRA + head on the frozen backbone."""

from training.config import TrainConfig
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
from training.metrics import classification_metrics
from training.trainer import TrainResult, train_adapter

__all__ = [
    "DATASETS",
    "DataError",
    "DataReport",
    "DatasetUnavailable",
    "Example",
    "TrainConfig",
    "TrainResult",
    "classification_metrics",
    "clean_examples",
    "deduplicate",
    "examples_from_records",
    "load_bbc_news",
    "load_examples",
    "load_sms_spam",
    "load_tweets",
    "raise_for_errors",
    "stratified_sample",
    "stratified_split",
    "train_adapter",
    "validate_examples",
    "write_csv",
]
