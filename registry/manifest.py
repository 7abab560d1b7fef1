"""graft's manifest: what a publisher must state about an adapter, and what the registry adds.

The publisher gives `labels`, `base_sha256` and `rank`, plus anything else it wants kept (metrics,
training-data statistics, warnings, a description of pooling and head...). The registry adds the
identity and content keys below and writes the whole thing as ``graft_manifest.json`` next to the
adapter's files. The manifest is strict JSON (no NaN or Infinity), so any client can read it.
"""

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from registry.errors import InvalidAdapter

MANIFEST_FILE = "graft_manifest.json"
# Keys the registry writes; values a publisher passes under these names are replaced.
ADDED_KEYS = ("tenant", "name", "version", "content_sha256", "created_at", "files")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ManifestFields:
    """The manifest values the catalog indexes, checked."""

    labels: tuple[str, ...]  # distinct, non-empty class labels
    base_sha256: str  # lowercase hex SHA-256 of the backbone weights
    rank: int  # >= 0


def is_sha256_hex(value: object) -> TypeGuard[str]:
    """True if `value` is a SHA-256 as `hexdigest()` writes it: 64 lowercase hex characters."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def check_manifest(manifest: Mapping[str, Any]) -> ManifestFields:
    """Check a publisher's manifest; raise InvalidAdapter naming the offending key."""
    if not isinstance(manifest, Mapping):
        raise InvalidAdapter(f"manifest must be a mapping, got {type(manifest).__name__}")
    for key, value in manifest.items():
        _check_json(key, value)
    for key in ("labels", "base_sha256", "rank"):
        if key not in manifest:
            raise InvalidAdapter(f"manifest is missing required key {key!r}")
    metrics = manifest.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise InvalidAdapter(f"manifest['metrics'] must be a mapping, got {type(metrics).__name__}")
    return ManifestFields(
        labels=_check_labels(manifest["labels"]),
        base_sha256=_check_base_sha256(manifest["base_sha256"]),
        rank=_check_rank(manifest["rank"]),
    )


def _check_json(key: object, value: object) -> None:
    if not isinstance(key, str):
        raise InvalidAdapter(f"manifest keys must be strings, got {key!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidAdapter(f"manifest[{key!r}] is not strict JSON: {error}") from None


def _check_labels(labels: object) -> tuple[str, ...]:
    if not isinstance(labels, list | tuple) or not labels:
        raise InvalidAdapter(f"manifest['labels'] must be a non-empty list, got {labels!r}")
    if not all(isinstance(label, str) and label.strip() for label in labels):  # "  " too
        raise InvalidAdapter(f"manifest['labels'] must hold non-blank strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise InvalidAdapter(f"manifest['labels'] must be distinct, got {labels!r}")
    for i, label in enumerate(labels):
        try:
            label.encode("utf-8")  # every answer names its labels in JSON
        except UnicodeEncodeError as exc:
            raise InvalidAdapter(
                f"manifest['labels'][{i}] holds an unpaired surrogate "
                f"(U+{ord(label[exc.start]):04X}) at character {exc.start}: not text"
            ) from None
    return tuple(labels)


def _check_base_sha256(value: object) -> str:
    if not is_sha256_hex(value):
        raise InvalidAdapter(f"manifest['base_sha256'] is not a lowercase hex SHA-256: {value!r}")
    return value


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidAdapter(f"manifest['rank'] must be an integer >= 0, got {rank!r}")
    return rank


def content_sha256(file_sha256: Mapping[str, str]) -> str:
    """Hash a version's content: SHA-256 over the sorted lines "name\\tsha256\\n"."""
    lines = sorted(f"{name}\t{digest}\n" for name, digest in file_sha256.items())
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def stored_manifest_text(manifest: Mapping[str, Any], **added: Any) -> str:
    """Return the JSON text of `manifest` plus the registry's keys (`ADDED_KEYS`, all required).

    The text is deterministic (sorted keys), so the catalog copy and the file are byte-identical.
    """
    if sorted(added) != sorted(ADDED_KEYS):
        raise ValueError(f"expected exactly the keys {ADDED_KEYS}, got {tuple(added)}")
    stored = {**manifest, **added}
    return json.dumps(stored, sort_keys=True, indent=2, allow_nan=False) + "\n"
