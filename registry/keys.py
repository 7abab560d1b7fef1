"""API keys: how they look, and the only form in which they are stored.

A key is "gk_" + 32 random bytes in URL-safe base64. The catalog keeps only the SHA-256 of a key:
the keys are high-entropy, so a plain (unsalted) hash is enough to make a leaked catalog useless
for authentication while keeping the lookup a single indexed query.
"""

import hashlib
import re
import secrets
from typing import TypeGuard

KEY_PREFIX = "gk_"
# Wider than what new_api_key makes, so longer keys can be issued later without breaking checks.
_WELL_FORMED_KEY = re.compile(r"gk_[A-Za-z0-9_-]{16,128}")


def new_api_key() -> str:
    """Return a fresh random API key; the caller shows it once and stores only its hash."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """Return the hex SHA-256 of `api_key`, the form kept in the catalog."""
    return hashlib.sha256(api_key.encode("ascii")).hexdigest()


def is_well_formed_key(api_key: object) -> TypeGuard[str]:
    """True if `api_key` could be a key we issued; never raises, whatever it is given."""
    return isinstance(api_key, str) and _WELL_FORMED_KEY.fullmatch(api_key) is not None
