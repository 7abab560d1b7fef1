"""The registry's exceptions.

Every error the registry raises on purpose is a `RegistryError`, so a caller (the CLI, the server)
can report them uniformly. Errors caused by bad input are also `ValueError`s, so code that only
knows the standard library's convention still treats them as bad arguments.
"""


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class NotFound(RegistryError):
    """An unknown tenant, adapter or version; the message names what is missing."""


class AlreadyExists(RegistryError):
    """Creating something that exists already (a tenant)."""


class IntegrityError(RegistryError):
    """Stored bytes differ from their recorded SHA-256, or files were added, removed or replaced."""


class InvalidName(RegistryError, ValueError):
    """A tenant name, adapter name or model reference that breaks the naming rules."""


class InvalidAdapter(RegistryError, ValueError):
    """A publish refused before anything was stored: bad manifest, missing or unsafe files."""


class VersionInUse(RegistryError):
    """Deleting the version a name serves while other versions remain (promote another first)."""
