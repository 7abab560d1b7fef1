"""Host-tier pins taken at admission: a request's adapters stay parsed in host memory until it
ends, and a caller that goes away while they load leaves no pin behind."""

import asyncio
import time
from collections.abc import Sequence

from engine.adapter_store import AdapterStore, unpin_if_pinned
from engine.errors import AdapterFormatError, AdapterIncompatible, DeadlineExceeded
from registry import AdapterRecord


async def pin(store: AdapterStore, record: AdapterRecord, deadline_s: float | None = None) -> str:
    """Host-pin one adapter (loading it if cold); returns its key. A load that has not ended
    by ``deadline_s`` (monotonic) is DeadlineExceeded: the request's timeout covers it too."""
    key = store.pin_if_resident(record)
    if key is not None:  # warm: no task to make, no loop iteration to wait for
        return key
    pinning = asyncio.ensure_future(store.pin(record))
    timeout = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
    try:
        await asyncio.wait([pinning], timeout=timeout)
        if not pinning.done():
            raise DeadlineExceeded(f"request timed out while model {record.full_name} loaded")
    except BaseException:  # cancelled, or too late: the store drops a load nobody else
        pinning.cancel()  # waits for, and a pin taken meanwhile is let go
        pinning.add_done_callback(unpin_if_pinned(store))
        raise
    return pinning.result()


async def pin_all(
    store: AdapterStore, records: Sequence[AdapterRecord], deadline_s: float | None = None
) -> list[str]:
    """Host-pin every adapter (cold ones load in parallel); on failure none stays pinned.
    An adapter that cannot be served is named with its place (``models[i]``): of up to 16
    models, the caller must learn which one to fix."""
    pins = [
        asyncio.ensure_future(_pin_placed(store, record, deadline_s, i))
        for i, record in enumerate(records)
    ]
    try:
        return list(await asyncio.gather(*pins))
    except BaseException:
        for task in pins:  # those that pinned, now or once their load ends, are let go
            task.cancel()
            task.add_done_callback(unpin_if_pinned(store))
        raise


async def _pin_placed(
    store: AdapterStore, record: AdapterRecord, deadline_s: float | None, position: int
) -> str:
    try:
        return await pin(store, record, deadline_s)
    except (AdapterFormatError, AdapterIncompatible) as exc:
        name, text = f"{record.full_name}@{record.version}", str(exc)
        placed = f"{name} (models[{position}])"
        rest = text[len(name) :] if text.startswith(name) else f": {text}"
        raise type(exc)(placed + rest) from exc


def pin_all_if_resident(store: AdapterStore, records: Sequence[AdapterRecord]) -> list[str] | None:
    """Host-pin every adapter if the host tier holds them all; else None, nothing pinned (and
    no hit counted: the caller's ``pin_all`` counts this request's hits and misses)."""
    if not all(store.holds(record) for record in records):
        return None
    keys: list[str] = []
    for record in records:
        key = store.pin_if_resident(record)
        if key is None:
            for pinned in keys:
                store.unpin(pinned)
            return None
        keys.append(key)
    return keys
