"""Tenant and adapter names, and model references such as ``acme/spam@3``.

Names become directory names under the registry root, so the rules keep a name from ever meaning a
different path: lowercase letters, digits, ``_ . -``, at most 64 characters, starting with a letter
or digit, never containing ``..``. Lowercase only, so that two names never collide on a
case-insensitive file system.
"""

import functools
import re
from dataclasses import dataclass

from registry.errors import InvalidName

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# Versions are stored as SQLite INTEGERs (signed 64-bit); 18 digits always fits.
_VERSION = re.compile(r"[0-9]{1,18}")
_KINDS = ("tenant", "adapter")
_SHOWN_CHARS = 80  # of a refused value, in an error message


def shown(value: object) -> str:
    """``repr(value)`` cut to a readable length: errors echo what they refuse, and a 4 MB
    model name, echoed whole at three levels, once made a 12 MB error answer."""
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


def validate_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid `kind` ("tenant" or "adapter") name, else raise InvalidName.

    The message names the kind and the rejected value, so it can be shown to the user as is.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if not isinstance(value, str):
        raise InvalidName(f"{kind} name must be a string, got {type(value).__name__}")
    if _NAME.fullmatch(value) is None or ".." in value:
        raise InvalidName(
            f"invalid {kind} name {shown(value)}: use 1 to 64 lowercase letters, digits, '_', "
            "'.' or '-', starting with a letter or digit, without '..'"
        )
    return value


def is_valid_name(kind: str, value: str) -> bool:
    """True if `value` is a valid `kind` name; never raises for any value."""
    try:
        validate_name(kind, value)
    except InvalidName:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed model reference: ``[tenant/]name[@version]``."""

    tenant: str | None  # None when the reference had no "tenant/" prefix
    name: str  # adapter name, validated
    version: int | None  # positive version number; None means the latest version

    def __str__(self) -> str:
        prefix = "" if self.tenant is None else f"{self.tenant}/"
        suffix = "" if self.version is None else f"@{self.version}"
        return f"{prefix}{self.name}{suffix}"


def parse_model_ref(ref: str) -> ModelRef:
    """Parse "spam", "spam@3", "acme/spam" or "acme/spam@3"; raise InvalidName on anything else."""
    if not isinstance(ref, str) or not ref:
        raise InvalidName(f"model reference must be a non-empty string, got {shown(ref)}")
    return _parse_model_ref(str(ref))


@functools.lru_cache(maxsize=4096)  # every request parses its model's; errors are not kept
def _parse_model_ref(ref: str) -> ModelRef:
    path, has_version, version_text = ref.partition("@")
    if path.count("/") > 1:
        raise InvalidName(f"invalid model reference {shown(ref)}: expected [tenant/]name[@version]")
    tenant, _, name = path.rpartition("/")
    try:
        return ModelRef(
            tenant=validate_name("tenant", tenant) if "/" in path else None,
            name=validate_name("adapter", name),
            version=_parse_version(version_text) if has_version else None,
        )
    except InvalidName as error:
        raise InvalidName(f"invalid model reference {shown(ref)}: {error}") from None


def _parse_version(text: str) -> int:
    if _VERSION.fullmatch(text) is None or int(text) == 0:
        raise InvalidName(f"version must be a positive integer, got {shown(text)}")
    return int(text)
