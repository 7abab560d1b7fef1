"""Training: validate a tenant's labeled data, train a head, LoRA + head, or a full model.

The names that need torch (training itself) load on first use, so that a process that only
reads and checks data (the server's upload checker, training/upload_checker.py) starts without
torch and transformers.
"""

import importlib
from typing import TYPE_CHECKING, Any

from training.config import MODES, WEIGHTS_DTYPES, TrainConfig
from training.data import DataError, Example, clean_examples, examples_from_records, load_examples
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
from training.job_config import (
    JobConflict,
    JobNotFound,
    JobsConfig,
    JobsUnavailable,
    TooManyJobs,
    UploadAbandoned,
)
from training.job_store import FINAL_EVENTS, JobRecord, is_job_id
from training.job_uploads import InvalidData
from training.jobs import JobManager
from training.metrics import classification_metrics
from training.validation import DataReport, raise_for_errors, validate_examples

if TYPE_CHECKING:
    from training.full_model import FullModel, load_full_model
    from training.recipe import TrainingDiverged
    from training.trainer import TrainResult, train_adapter

_NEEDS_TORCH = {
    "FullModel": "training.full_model",
    "load_full_model": "training.full_model",
    "TrainingDiverged": "training.recipe",
    "TrainResult": "training.trainer",
    "train_adapter": "training.trainer",
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


__all__ = [
    "DATASETS",
    "FINAL_EVENTS",
    "MODES",
    "WEIGHTS_DTYPES",
    "DataError",
    "DataReport",
    "DatasetUnavailable",
    "Example",
    "FullModel",
    "InvalidData",
    "JobConflict",
    "JobManager",
    "JobNotFound",
    "JobRecord",
    "JobsConfig",
    "JobsUnavailable",
    "TrainConfig",
    "TooManyJobs",
    "UploadAbandoned",
    "TrainResult",
    "TrainingDiverged",
    "classification_metrics",
    "clean_examples",
    "deduplicate",
    "examples_from_records",
    "is_job_id",
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
