"""Errors the engine raises to its callers (the server maps each to an HTTP status)."""


class EngineError(Exception):
    """Base of every error the engine reports about a request or an adapter."""


class ModelNotFound(EngineError):
    """No such model for this tenant (another tenant's model is reported the same way)."""


class AdapterFormatError(EngineError, ValueError):
    """An adapter's files are malformed or do not fit the backbone."""


class AdapterIncompatible(EngineError):
    """The adapter was trained on another backbone (base-model SHA-256 differs)."""


class InputError(EngineError, ValueError):
    """A request's input is unusable; ``field`` says where (e.g. ``input[3]``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class InputTooLong(InputError):
    """An input exceeds the backbone's maximum length and truncation was refused."""


class EngineOverloaded(EngineError):
    """No room to admit the request now (adapter memory pinned by in-flight work)."""


class EngineClosed(EngineError):
    """The engine is shutting down or not started."""
