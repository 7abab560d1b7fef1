"""The engine: one frozen backbone, many tenants' adapters, mixed batches.

Public API: ``Engine``, ``EngineConfig``, ``Prediction``, ``Job``, the multi-model
``MultiJob`` / ``MultiPrediction`` / ``ModelPrediction``, ``AdapterInfo``, the errors,
and the adapter helpers training and the CLI build on (``load_backbone``, ``import_peft``,
``write_peft_adapter``).
"""

from engine.adapters import POOLING_CLS_POOLER, POOLING_MEAN, AdapterWeights, parse_adapter
from engine.backbone import Backbone, load_backbone, packaged_backbone_dir, weights_sha256
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import (
    AdapterFormatError,
    AdapterIncompatible,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    InputError,
    InputTooLong,
    JobCancelled,
    ModelNotFound,
    TenantBusy,
    TenantNotFound,
)
from engine.inputs import TextEncoder, Tokenized, tokenize_request
from engine.job import (
    Job,
    JobTimings,
    ModelPrediction,
    ModelVersion,
    MultiJob,
    MultiPrediction,
    Prediction,
)
from engine.listing import AdapterInfo
from engine.lora import LoraStepPlan
from engine.peft_io import import_peft, write_peft_adapter
from scheduler import TenantPolicy

__all__ = [
    "POOLING_CLS_POOLER",
    "POOLING_MEAN",
    "AdapterFormatError",
    "AdapterIncompatible",
    "AdapterInfo",
    "DeadlineExceeded",
    "AdapterWeights",
    "Backbone",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineOverloaded",
    "InputError",
    "InputTooLong",
    "JobCancelled",
    "Job",
    "JobTimings",
    "LoraStepPlan",
    "ModelNotFound",
    "ModelPrediction",
    "ModelVersion",
    "MultiJob",
    "MultiPrediction",
    "Prediction",
    "TenantBusy",
    "TenantNotFound",
    "TextEncoder",
    "Tokenized",
    "TenantPolicy",
    "import_peft",
    "load_backbone",
    "packaged_backbone_dir",
    "parse_adapter",
    "weights_sha256",
    "tokenize_request",
    "write_peft_adapter",
]
