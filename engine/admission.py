"""The engine's door: deadlines and queue-bound checks, before any work is spent."""

import time
from collections.abc import Sequence

from engine.errors import EngineOverloaded, InputError, TenantBusy
from scheduler import Scheduler


def deadline_for(timeout_s: float | None, max_timeout_s: float) -> float | None:
    """The monotonic time by which a request's rows must start, or None for no limit."""
    if timeout_s is None:
        return None
    is_number = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not is_number or not timeout_s > 0:
        raise InputError(
            f"timeout must be a positive number of seconds, got {timeout_s!r}", "timeout"
        )
    return time.monotonic() + min(float(timeout_s), max_timeout_s)


def admit(scheduler: Scheduler, tenant: str, texts: Sequence[str], rows_per_text: int = 1) -> int:
    """Reserve queue room for the request's rows (``rows_per_text`` each: several for a
    multi-model request), or refuse: TenantBusy (429) when the tenant's own queue is full,
    EngineOverloaded (503) when all are. Returns the rows reserved; the caller releases them
    if it fails before queueing."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        return 0  # tokenize_inputs names the type error
    num_rows = len(texts) * rows_per_text
    admission = scheduler.admit(tenant, num_rows)
    if admission.is_admitted:
        return num_rows
    if admission.reason == "tenant":
        raise TenantBusy(
            f"too many queued inputs for tenant {tenant!r}; retry in "
            f"{admission.retry_after_s:.0f} s",
            retry_after_s=admission.retry_after_s,
        )
    raise EngineOverloaded(
        f"server queues are full; retry in {admission.retry_after_s:.0f} s",
        retry_after_s=admission.retry_after_s,
    )
