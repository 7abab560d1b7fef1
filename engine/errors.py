"""Errors the engine raises to its callers (the server maps each to an HTTP status)."""


class EngineError(Exception):
    """Base of every error the engine reports about a request or an adapter."""


class ModelNotFound(EngineError):
    """No such model for this tenant (another tenant's model is reported the same way)."""


class TenantNotFound(EngineError, LookupError):
    """No such tenant (a tenant's settings were changed before it was created)."""


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
    """No room to admit the request now: every queue is full (HTTP 503)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantBusy(EngineError):
    """This tenant's own queue is full; others are still served (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    """The request could not start before its deadline and was never run (HTTP 504)."""


class EngineClosed(EngineError):
    """The engine is shutting down or not started."""


class JobCancelled(EngineError):
    """The job was cancelled (``job.cancel()``): what its results and streams raise then.
    Not asyncio's CancelledError, which would make the awaiting task look cancelled itself."""
