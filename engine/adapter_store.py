"""Adapters across the three tiers: registry on disk → host cache → device page pool.

Loads from disk run on their own threads (bounded), shared by every request that needs the
same adapter while it loads; the step loop keeps batching other tenants meanwhile. Page-in
to the device pool happens on the model thread at the start of the step that needs it.
"""

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.adapters import POOLING_CLS_POOLER, AdapterWeights, parse_adapter
from engine.backbone import Backbone
from engine.errors import AdapterFormatError, AdapterIncompatible, EngineClosed, ModelNotFound
from engine.host_cache import HostCache
from engine.loaders import TenantLoaders
from engine.memory import AdapterMemory
from engine.peft_io import CONFIG_FILE, WEIGHTS_FILE
from registry import AdapterRecord, NotFound, Registry, RegistryError

_LOADER_NICENESS = 10  # added to a loader thread's niceness
# what serving reads of a version: not its held-out rows (eval.jsonl), often the larger file
_SERVED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# how long a forget also catches loads that start after it (see AdapterStore._recent_forgets)
_RECENT_FORGETS_S = 60.0


@dataclass(slots=True, eq=False)
class _Load:
    """One adapter's read from disk, shared by the requests waiting for it."""

    landed: "asyncio.Future[AdapterWeights]"  # the read, as the event loop sees it
    read: concurrent.futures.Future  # on the loader threads: cancellable while queued
    num_waiting: int = 0


def adapter_key(record: AdapterRecord) -> str:
    """The identity the scheduler and memory use: a resolved, immutable version."""
    return f"{record.full_name}@{record.version}"


class AdapterStore:
    """Owns the host tier and the loader threads; drives the device pool's page-ins."""

    def __init__(
        self,
        registry: Registry,
        backbone: Backbone,
        memory: AdapterMemory,
        host: HostCache,
        *,
        max_loads_in_flight: int,
        pin_host_memory: bool,
    ) -> None:
        if max_loads_in_flight < 1:
            raise ValueError(f"max_loads_in_flight must be >= 1, got {max_loads_in_flight}")
        self._registry = registry
        self._backbone = backbone
        self._memory = memory
        self._host = host
        self._pin_host_memory = pin_host_memory
        self._loaders = TenantLoaders(max_loads_in_flight, _loader_thread_setup)
        self._loading: dict[str, _Load] = {}
        # the forgets of the last _RECENT_FORGETS_S (monotonic time, matcher): a load of a
        # version they match that lands meanwhile is dropped at its last unpin. That covers a
        # load under way at the forget, and one a request that resolved the version before
        # its delete starts after it, while another process has yet to remove its files
        self._recent_forgets: deque[tuple[float, Callable[[str], bool]]] = deque()
        self.num_disk_loads = 0
        self.disk_bytes_read = 0
        self._closed = False  # set (on any thread) before queued loads are cancelled

    def close(self) -> None:
        self._closed = True
        self._loaders.shutdown(cancel_futures=True)

    # event-loop side --------------------------------------------------------------------

    async def pin(self, record: AdapterRecord) -> str:
        """Make the adapter host-resident (loading it if needed) and pin it there.

        Concurrent callers for one cold adapter share a single load; one still queued when
        its last caller is cancelled is dropped unread. Raises AdapterIncompatible or
        AdapterFormatError when the stored adapter cannot be served.
        """
        key = adapter_key(record)
        if self._host.pin_if_present(key, count_miss=True):
            return key
        load = self._loading.get(key)
        if load is not None and load.landed.done() and not _succeeded(load.landed):
            load = None  # failed, and not yet dropped by _landed: never shared after the fact
        if load is None:
            load = self._start_load(key, record)
        load.num_waiting += 1
        try:
            weights = await asyncio.shield(load.landed)
        except asyncio.CancelledError:
            # a cancelled load, not a cancelled caller, means the engine closed
            if load.landed.cancelled() and self._closed:
                raise EngineClosed("engine shut down") from None
            if load.num_waiting == 1:  # the last waiter leaves
                self._unwanted(key, load)
            raise
        finally:
            load.num_waiting -= 1
        self._put(key, load, weights, keep_pin=True)
        return key

    def _put(self, key: str, load: _Load, weights: AdapterWeights, *, keep_pin: bool) -> None:
        """A finished load onto the host, pinned for its caller or not. In one go, with no
        await between: a forget always finds the key on the host or still loading, never
        between the two (a finished load leaves _loading only here)."""
        self._host.put_pinned(key, weights)
        self._stop_loading(key, load)
        if self._forgotten_lately(key):
            self._host.forget(key)
        if not keep_pin:
            self._host.unpin(key)

    def _unwanted(self, key: str, load: _Load) -> None:
        """Nobody waits for ``load`` any more: a read still queued is dropped unread; one that
        ran is kept on the host (unpinned, evictable), so that a request retrying with a
        timeout shorter than the read finds it there, instead of reading the disk again."""
        if not load.landed.done():
            if load.read.cancel():  # no thread had started it
                load.landed.cancel()
                self._stop_loading(key, load)
        elif _succeeded(load.landed) and self._loading.get(key) is load:
            self._put(key, load, load.landed.result(), keep_pin=False)

    def _start_load(self, key: str, record: AdapterRecord) -> _Load:
        try:
            read = self._loaders.submit(record.tenant, lambda: self.read(record))
        except RuntimeError:  # the loaders have shut down
            if self._closed:
                raise EngineClosed("engine shut down") from None
            raise
        load = _Load(asyncio.wrap_future(read), read)
        self._loading[key] = load
        load.landed.add_done_callback(lambda _, k=key, d=load: self._landed(k, d))
        return load

    def _landed(self, key: str, load: _Load) -> None:
        """A load ended. A failed one is dropped now, never to be shared again; a finished
        one waits for its waiters to put it on the host, or goes there now if none is left."""
        if not _succeeded(load.landed):
            self._stop_loading(key, load)
        elif not load.num_waiting:
            self._unwanted(key, load)

    def _stop_loading(self, key: str, load: _Load) -> None:
        if self._loading.get(key) is load:
            del self._loading[key]

    def forget_where(self, matches: Callable[[str], bool]) -> None:
        """Drop the deleted versions ``matches`` accepts from the host tier, now or at their
        last unpin, and those still loading once they land (event loop). The device pool's
        copies are the model thread's to drop: ``forget_device_where``."""
        now = time.monotonic()
        self._recent_forgets.append((now, matches))
        while self._recent_forgets[0][0] < now - _RECENT_FORGETS_S:
            self._recent_forgets.popleft()
        for key in filter(matches, self._host.keys()):  # a copy: forget may drop entries
            self._host.forget(key)

    def _forgotten_lately(self, key: str) -> bool:
        horizon = time.monotonic() - _RECENT_FORGETS_S
        return any(at >= horizon and matches(key) for at, matches in self._recent_forgets)

    def pin_if_resident(self, record: AdapterRecord) -> str | None:
        """Pin the adapter and return its key if the host tier holds it; else None, nothing
        pinned and no miss counted (``pin`` counts it). The warm path of ``pin``, without a
        task or a trip through the event loop."""
        key = adapter_key(record)
        return key if self._host.pin_if_present(key) else None

    def holds(self, record: AdapterRecord) -> bool:
        """Whether the host tier holds the adapter, counted neither a hit nor a miss."""
        return adapter_key(record) in self._host

    def _deleted_or_invalid(self, record: AdapterRecord, error: RegistryError) -> Exception:
        """A version deleted while this load read it is a 404, as it is for later requests."""
        try:
            self._registry.resolve(record.tenant, record.name, record.version)
        except NotFound as gone:
            return ModelNotFound(f"model {record.full_name}@{record.version} not found: {gone}")
        except RegistryError:
            pass
        return AdapterFormatError(str(error))

    def unpin(self, key: str) -> None:
        self._host.unpin(key)

    def hold_for_step(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Pin a planned step's adapters on the host until it is delivered (returns those
        pinned, every one in practice: its requests hold them): a request cancelled meanwhile
        lets go of its own pins, and its rows still run in the step."""
        return self._host.pin_present(keys)

    def release_after_step(self, keys: Sequence[str]) -> None:
        self._host.unpin_all(keys)

    # loader threads ----------------------------------------------------------------------

    def read(self, record: AdapterRecord) -> AdapterWeights:
        """Disk to host: check the base model, verify the hashes of the files serving reads, parse
        and validate."""
        backbone = self._backbone
        if record.base_sha256 != backbone.sha256:
            raise AdapterIncompatible(
                f"{record.full_name}@{record.version} was trained on base model "
                f"{record.base_sha256[:12]}, but this engine serves {backbone.sha256[:12]}"
            )
        try:
            verified = self._registry.read_verified(record, _SERVED_FILES)
        except RegistryError as exc:  # tampered or missing files: refuse, never serve them
            raise self._deleted_or_invalid(record, exc) from exc
        weights = parse_adapter(
            verified.files[CONFIG_FILE],
            verified.files[WEIGHTS_FILE],
            tuple(record.labels),
            str(record.manifest.get("pooling", POOLING_CLS_POOLER)),
            backbone,
            record.manifest.get("head_activation"),
        )
        if weights.rank > record.rank:  # the pool's pages are budgeted from the manifest
            raise AdapterFormatError(
                f"{record.full_name}@{record.version}: its weights have rank {weights.rank}, "
                f"its manifest says {record.rank}"
            )
        self.num_disk_loads += 1
        self.disk_bytes_read += sum(len(b) for b in verified.files.values())
        # laid out as pool rows here, off the model thread: a page-in is then one copy
        return self._memory.pack(weights, pin=self._pin_host_memory)

    # model thread ------------------------------------------------------------------------

    def acquire_device(self, keys: Sequence[str]) -> None:
        """Page the step's adapters into the device pool and hold them for the step."""
        acquired: list[str] = []
        try:
            for key in keys:
                loads = self._memory.num_loads
                resident = self._memory.acquire(key, lambda k=key: self._host.get(k))
                acquired.append(key)
                # paged in just now, of a deleted version a request still holds: it goes at
                # its last release (asked on page-ins only, not on every step's hits)
                if self._memory.num_loads != loads and self._host.is_forgotten(key):
                    resident.forgotten = True
        except BaseException:
            self.release_device(acquired)
            raise

    def release_device(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._memory.release(key)

    def forget_device_where(self, matches: Callable[[str], bool]) -> None:
        self._memory.forget([key for key in self._memory.resident_keys() if matches(key)])

    # introspection -----------------------------------------------------------------------

    def residency(self, key: str) -> str:
        if self._memory.is_resident(key):
            return "device"
        if key in self._host:
            return "host"
        return "disk"

    def stats(self) -> dict[str, int]:
        memory, host = self._memory, self._host
        return {
            "adapter_disk_loads": self.num_disk_loads,
            "adapter_disk_bytes_read": self.disk_bytes_read,
            "adapter_loads_in_flight": sum(not d.landed.done() for d in self._loading.values()),
            "adapter_host_hits": host.num_hits,
            "adapter_host_misses": host.num_misses,
            "adapter_host_evictions": host.num_evictions,
            "adapter_host_entries": len(host),
            "adapter_host_bytes": host.num_bytes,
            "adapter_device_hits": memory.num_hits,
            "adapter_device_loads": memory.num_loads,
            "adapter_device_evictions": memory.num_evictions,
            "adapter_device_resident": memory.num_resident,
            "adapter_device_bytes": memory.resident_bytes,
            "adapter_pages_free": memory.num_free_pages,
        }


def check_pool_fits(
    dependents: Sequence[AdapterRecord], num_pages: int, page_bytes: int, pool_bytes: int | None
) -> None:
    """Refuse to start when a registered adapter for this backbone could never be paged in,
    naming the setting the operator gave (``pool_bytes``: adapter_pool_bytes, if given)."""
    largest = max(dependents, key=lambda r: r.rank, default=None)
    if largest is None or largest.rank <= num_pages:
        return
    needs = f"{largest.full_name}@{largest.version} (rank {largest.rank} needs {largest.rank} pages"
    if pool_bytes is None:
        raise ValueError(f"adapter_pages={num_pages} cannot hold {needs}); raise adapter_pages")
    raise ValueError(
        f"adapter_pool_bytes={pool_bytes} ({num_pages} pages of {page_bytes} bytes) cannot "
        f"hold {needs}, {largest.rank * page_bytes} bytes); raise adapter_pool_bytes"
    )


def _loader_thread_setup() -> None:
    """A loader thread runs torch on one thread, and at a lower CPU priority.

    One thread: each thread that runs torch in parallel keeps an OpenMP team of its own, and
    once the process holds more of those workers than cores, GNU OpenMP stops letting them
    spin between parallel regions, so every op of the model thread must wake its workers.
    With loaders on one thread, a 32-row step on two intra-op threads took 79-81 ms against
    143-151 on one, on the 2-core VM (benchmarks/RESULTS.md, "One OpenMP team"). torch
    also applies the count to threads that first run it later: there too one team is best.

    Priority (Linux keeps niceness per thread): when cores are short, the model thread,
    serving warm tenants, runs first and cold loads wait."""
    torch.set_num_threads(1)
    if not (hasattr(os, "getpriority") and hasattr(threading, "get_native_id")):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):  # not permitted here: loads keep their priority
        niceness = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, niceness + _LOADER_NICENESS))


def _succeeded(future: asyncio.Future) -> bool:
    return not future.cancelled() and future.exception() is None


def unpin_if_pinned(store: AdapterStore):
    def callback(future: "asyncio.Future[str]") -> None:
        if _succeeded(future):
            store.unpin(future.result())

    return callback


__all__ = ["AdapterStore", "adapter_key"]
