"""Training: validate a tenant's labeled data, train a head, LoRA + head, or a full model."""

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
from training.full_model import FullModel, load_full_model
from training.job_config import JobConflict, JobNotFound, JobsConfig, JobsUnavailable, TooManyJobs
from training.job_store import FINAL_EVENTS, JobRecord, is_job_id
from training.job_uploads import InvalidData
from training.jobs import JobManager
from training.metrics import classification_metrics
from training.recipe import TrainingDiverged
from training.trainer import TrainResult, train_adapter
from training.validation import DataReport, raise_for_errors, validate_examples

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
