"""The engine's door: deadlines and queue-bound checks, before any work is spent."""

import time
from collections.abc import Sequence

from engine.errors import EngineOverloaded, InputError, ModelNotFound, TenantBusy
from engine.inputs import Tokenized
from registry import AdapterRecord, InvalidName, NotFound, Registry, parse_model_ref, shown
from scheduler import Row, Scheduler


def deadline_for(timeout_s: float | None, max_timeout_s: float) -> float:
    """The monotonic time by which a request's rows must start. A request naming no timeout
    gets the server's cap too: otherwise, under overload, its rows could wait for ever."""
    if timeout_s is None:
        return time.monotonic() + max_timeout_s
    is_number = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not is_number or not timeout_s > 0:
        raise InputError(
            f"timeout must be a positive number of seconds, got {timeout_s!r}", "timeout"
        )
    return time.monotonic() + float(min(timeout_s, max_timeout_s))  # ints past float's range too


def admit(scheduler: Scheduler, tenant: str, texts: Sequence[str], rows_per_text: int = 1) -> int:
    """Reserve queue room for the request's rows (``rows_per_text`` each: several for a
    multi-model request), or refuse: InputError when they could never fit the tenant's queue,
    TenantBusy (429) when the tenant's own queue is full, EngineOverloaded (503) when all are.
    Returns the rows reserved; the caller releases them if it fails before queueing."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        return 0  # tokenize_inputs names the type error
    num_rows = len(texts) * rows_per_text
    tenant_bound = scheduler.policy(tenant).max_queued_rows
    bound, whose = min((tenant_bound, "this tenant"), (scheduler.max_queued_rows, "the server"))
    _check_queue_bound(len(texts), rows_per_text, bound, whose)
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


def _check_queue_bound(num_texts: int, per_text: int, max_queued_rows: int, whose: str) -> None:
    """Refuse (422, not 429 or 503) a request whose rows could never fit the tenant's queue
    or the server's: either would tell its client to retry what can never be admitted."""
    num_rows = num_texts * per_text
    if num_rows <= max_queued_rows:
        return
    rows = (
        f"{num_texts} inputs"
        if per_text == 1
        else f"{num_texts} inputs x {per_text} rows each (one per LoRA model, one shared by "
        f"head-only models) = {num_rows} rows"
    )
    raise InputError(
        f"{rows}, more than the {max_queued_rows} {whose} may queue; split the request",
        "input",
    )


def resolve_model(registry: Registry, tenant: str, model: str) -> AdapterRecord:
    """The version of ``model`` ("name", "name@3", "tenant/name") this request will run;
    ModelNotFound for anything not the tenant's, so names of others are never confirmed."""
    try:
        ref = parse_model_ref(model)
    except InvalidName as exc:
        raise ModelNotFound(f"model {shown(model)} not found ({exc})") from exc
    if ref.tenant is not None and ref.tenant != tenant:
        raise ModelNotFound(f"model {shown(model)} not found")
    try:
        return registry.resolve(tenant, ref.name, ref.version)
    except InvalidName as exc:  # the tenant's name (the model's was parsed above)
        raise ModelNotFound(f"model {shown(model)} not found ({exc})") from exc
    except NotFound as exc:
        reason = str(exc)
        if reason.endswith(" not found"):  # no such name (or tenant): nothing more to say
            raise ModelNotFound(f"model {shown(model)} not found") from exc
        # the caller's own name without that version, or with none promoted: say which
        raise ModelNotFound(f"model {shown(model)} not found: {reason}") from exc


def queue_rows(
    scheduler: Scheduler,
    request_id: int,
    tenant: str,
    adapter_key: str,
    rank: int,
    tokens: Tokenized,
    deadline_s: float | None,
) -> None:
    """Queue one row per text of an admitted single-model request."""
    now = time.monotonic()
    for index, ids in enumerate(tokens.ids):
        scheduler.add(
            Row(
                request_id=request_id,
                index=index,
                tenant=tenant,
                adapter_key=adapter_key,
                num_tokens=len(ids),
                arrival_s=now,
                num_pages=rank,
                deadline_s=deadline_s,
            )
        )
