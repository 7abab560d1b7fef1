"""Host-tier pins taken at admission: a request's adapters stay parsed in host memory until it
ends, and a caller that goes away while they load leaves no pin behind."""

import asyncio
from collections.abc import Sequence

from engine.adapter_store import AdapterStore, unpin_if_pinned
from registry import AdapterRecord


async def pin(store: AdapterStore, record: AdapterRecord) -> str:
    """Host-pin one adapter (loading it if cold); returns its key."""
    key = store.pin_if_resident(record)
    if key is not None:  # warm: no task to make, no loop iteration to wait for
        return key
    pinning = asyncio.ensure_future(store.pin(record))
    try:
        return await asyncio.shield(pinning)
    except asyncio.CancelledError:
        pinning.add_done_callback(unpin_if_pinned(store))
        raise


async def pin_all(store: AdapterStore, records: Sequence[AdapterRecord]) -> list[str]:
    """Host-pin every adapter (cold ones load in parallel); on failure none stays pinned."""
    pins = [asyncio.ensure_future(pin(store, record)) for record in records]
    try:
        return list(await asyncio.gather(*pins))
    except BaseException:
        for task in pins:  # those that pinned, now or once their load ends, are let go
            task.add_done_callback(unpin_if_pinned(store))
        raise


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
