"""What crosses the registry's package line: one adapter to publish, and the registry's answers.

The answers are what a stored adapter version is and its verified bytes (the engine loads from
them, the server lists them). All are frozen. The mappings inside the answers are plain dicts
parsed fresh from the catalog for each record, so they stay JSON-serialisable; treat them as
read-only.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class PublishItem:
    """One adapter for `Registry.publish_many`: the arguments `Registry.publish` takes.

    Nothing is checked on construction; `publish_many` checks every item before copying anything.
    """

    tenant: str  # an existing tenant
    name: str  # adapter name; repeated names in one batch get consecutive versions
    source_dir: Path | str  # flat directory with adapter_config.json, adapter_model.safetensors...
    manifest: Mapping[str, Any]  # labels, base_sha256, rank, plus anything to keep (metrics...)
    promote: bool = True  # move the name's latest pointer to the new version
    # the tenant's stamp (`Registry.tenant_created_at`) as the caller knew it: a tenant deleted
    # and created again since is refused (NotFound) in the commit's transaction; None: any
    tenant_created_at: float | None = None


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """One immutable adapter version as recorded in the catalog.

    Two records are equal when every field but `is_latest` is (a version stays the same version
    when the pointer moves); the hash uses only the identity and the content hash, so records can
    key dicts and sets.
    """

    tenant: str  # owning tenant
    name: str  # adapter name, unique within the tenant
    version: int  # 1, 2, 3... per (tenant, name)
    content_sha256: str  # hex; SHA-256 over the sorted "file\tsha256\n" lines, manifest excluded
    base_sha256: str  # hex SHA-256 of the backbone weights this adapter was trained on
    rank: int  # max LoRA rank over target modules; 0 for a head-only model
    labels: tuple[str, ...]  # class labels, in head output order
    size_bytes: int  # total bytes of the version's content files (the manifest excluded)
    metrics: Mapping[str, Any]  # manifest["metrics"], {} if absent
    manifest: Mapping[str, Any]  # the full stored manifest, exactly as written to disk
    path: Path  # absolute path of the version directory
    created_at: float  # unix seconds when the version was published
    # the name's latest pointer named this version when the record was read
    is_latest: bool = field(default=False, compare=False)

    def __hash__(self) -> int:
        return hash((self.tenant, self.name, self.version, self.content_sha256))

    @property
    def full_name(self) -> str:
        """ "tenant/name", the model's address without a version."""
        return f"{self.tenant}/{self.name}"

    @property
    def ref(self) -> str:
        """ "tenant/name@version", the pinned address of exactly this version."""
        return f"{self.tenant}/{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class VerifiedFiles:
    """The bytes of one version, each file checked against its recorded SHA-256.

    Callers parse these bytes rather than re-reading the files, so what they use is exactly what
    was verified.
    """

    record: AdapterRecord  # the version the files belong to
    # file name -> bytes, every content file (the manifest excluded); writable, so tensors can be
    # viewed in place
    files: Mapping[str, bytearray]
