"""graft's adapter registry: tenants, API keys, base models and immutable adapter versions.

Metadata lives in SQLite, blobs on the local file system; writes are atomic and every load
verifies the content hashes of what it reads. Weights are safetensors only; nothing is ever
unpickled.
"""

from registry.errors import (
    AlreadyExists,
    IntegrityError,
    InvalidAdapter,
    InvalidName,
    NotFound,
    RegistryError,
    VersionInUse,
)
from registry.formats import safetensors_header
from registry.names import ModelRef, parse_model_ref, shown, validate_name
from registry.records import AdapterRecord, PublishItem, VerifiedFiles
from registry.registry import Registry

__all__ = [
    "AdapterRecord",
    "AlreadyExists",
    "IntegrityError",
    "InvalidAdapter",
    "InvalidName",
    "ModelRef",
    "NotFound",
    "PublishItem",
    "Registry",
    "RegistryError",
    "VerifiedFiles",
    "VersionInUse",
    "parse_model_ref",
    "safetensors_header",
    "shown",
    "validate_name",
]
