"""The Engine: lifecycle and introspection over the step loop and the model thread (the
request methods it inherits are in engine/requests.py)."""

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from engine.adapter_store import adapter_key
from engine.backbone import Backbone, packaged_backbone_dir
from engine.collector import freeze_startup_objects, release_startup_objects
from engine.config import EngineConfig
from engine.deletions import DeletionWatch
from engine.errors import EngineClosed, InputError, TenantNotFound
from engine.job import Job, MultiJob
from engine.listing import AdapterInfo, summarize
from engine.memory import pages_for_bytes
from engine.pending import Pending
from engine.requests import EngineRequests
from engine.stack import ServingStack, check_device, load_stack
from engine.step_loop import StepLoop
from engine.tenant_settings import scheduler_config
from registry import AdapterRecord, InvalidName, NotFound, Registry
from scheduler import Scheduler, TenantPolicy

log = logging.getLogger(__name__)


class _Unset:
    """``set_tenant_policy``'s policy when only fields are given."""


_UNSET = _Unset()


class Engine(EngineRequests):
    """Serve every tenant's classifiers from one frozen backbone.

    Use as ``async with Engine(config) as engine``. Public coroutines run on the event loop;
    forward passes and device page-ins run on one model thread, adapter loads from disk on
    loader threads, so a cold adapter never stalls other tenants' steps.
    """

    def __init__(self, config: EngineConfig) -> None:
        # every part below counts the pool in pages
        config = dataclasses.replace(config, adapter_pages=pool_pages(config))
        self.config = config
        self._model: ServingStack | None = None
        self._scheduler = Scheduler(scheduler_config(config))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-model")
        self._tokenize_executor = ThreadPoolExecutor(2, thread_name_prefix="graft-tokenize")
        self._pending: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._steps = StepLoop(
            config, self._scheduler, self._pending, self._executor, lambda: self._loaded
        )
        self._loop_task: asyncio.Task[None] | None = None
        self._settings_task: asyncio.Task[None] | None = None
        self._deletions_task: asyncio.Task[None] | None = None
        self._closed = False
        # start and close, one at a time: a close waits for a start under way, then undoes it
        self._lifecycle = asyncio.Lock()
        self._entered = False  # inside `async with`, which closes it at exit
        self._switch_interval: _SwitchInterval | None = None  # set while it runs
        self._froze_gc = False

    # lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        """Start (unless `start` ran already) and close at exit. Entered twice, the inner
        exit would close the engine under the outer block: refused."""
        if self._closed:
            raise EngineClosed("engine was closed; create a new Engine to serve again")
        if self._entered:
            raise RuntimeError("engine is already entered: use `async with engine` once")
        self._entered = True  # before the await: a second block entering meanwhile is refused
        try:
            await self.start()
        except BaseException:
            self._entered = False
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the backbone and open the registry; the step loop starts serving at once.
        Starting a running engine does nothing; a closed one cannot start again, nor one
        whose start failed (it is closed then, its threads and files released)."""
        async with self._lifecycle:
            if self._loop_task is not None:  # started meanwhile by a concurrent call
                return
            if self._closed:  # its threads are gone
                raise EngineClosed("engine was closed; create a new Engine to serve again")
            try:
                await self._start()
            except BaseException:  # a bad config: give back the threads and files it took
                self._closed = True
                await self._close()
                raise
            if self._closed:  # close() waits for this lock to undo what started
                raise EngineClosed("engine was closed while it started")

    async def _start(self) -> None:
        loading = self._executor.submit(load_stack, self.config, self._scheduler)
        try:
            self._model = await asyncio.wrap_future(loading)
        except asyncio.CancelledError:  # the model thread loads on: close what it opens
            loading.add_done_callback(_close_abandoned)
            raise
        self._model.settings.apply()
        if self.config.gc_freeze:
            freeze_startup_objects()
            self._froze_gc = True
        if self.config.switch_interval_ms is not None:
            self._switch_interval = _SwitchInterval(self.config.switch_interval_ms / 1000)
        self._loop_task = asyncio.create_task(self._steps.run(), name="graft-step-loop")
        self._settings_task = asyncio.create_task(
            self._model.settings.watch(self.config.settings_poll_s), name="graft-settings"
        )
        deletions = DeletionWatch(self._model.registry, self._forget_where)
        self._deletions_task = asyncio.create_task(
            deletions.watch(self.config.settings_poll_s), name="graft-deletions"
        )

    async def close(self) -> None:
        """Fail what is still waiting, stop the loop, release the threads. A start under way
        finishes first (requests see the engine closed meanwhile)."""
        self._closed = True
        async with self._lifecycle:
            await self._close()

    async def _close(self) -> None:
        try:
            for pending in list(self._pending.values()):
                pending.job.fail(EngineClosed("engine shut down"))
            for task in (self._loop_task, self._settings_task, self._deletions_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._loop_task = self._settings_task = self._deletions_task = None
            # a step or a load under way ends first: waited for on a thread, not on this
            # loop (cancelled meanwhile, that thread still releases everything)
            await asyncio.to_thread(self._release_threads_and_files)
        finally:  # the process's settings, even when the close itself is cancelled
            if self._froze_gc:
                release_startup_objects()
                self._froze_gc = False
            if self._switch_interval is not None:
                self._switch_interval.restore()
                self._switch_interval = None

    def _release_threads_and_files(self) -> None:
        self._executor.shutdown(wait=True)
        self._tokenize_executor.shutdown(wait=True)
        if self._model is not None:
            self._model.close()

    # introspection ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, not closed, and its event loop still runs (an ``asyncio.run`` that
        started it may have ended, leaving nothing to run its steps)."""
        task = self._loop_task
        if self._model is None or task is None or self._closed:
            return False
        return not task.get_loop().is_closed()

    def _check_serving(self) -> None:
        """Requests are taken on the event loop that started the engine, whose step loop
        answers them: from another loop, a job would wait on a future nobody wakes."""
        task = self._loop_task
        if self._model is None or task is None or self._closed:
            raise EngineClosed("engine is not running")
        serving = task.get_loop()
        if _running_loop() is not serving:
            # ``ready``'s last check, needed only here: a running loop is not closed
            if serving.is_closed():
                raise EngineClosed("engine is not running")
            raise RuntimeError(
                "this Engine serves on the event loop that started it; from another thread "
                "or loop, submit there (asyncio.run_coroutine_threadsafe(coro, that_loop))"
            )

    @property
    def _loaded(self) -> ServingStack:
        if self._model is None:
            raise EngineClosed("engine not started")
        return self._model

    @property
    def backbone(self) -> Backbone:
        return self._loaded.backbone

    @property
    def registry(self) -> Registry:
        self._check_open()
        return self._loaded.registry

    def _check_open(self) -> None:
        """EngineClosed once closed, rather than the closed registry's own error."""
        if self._closed:
            raise EngineClosed("engine is closed")

    @property
    def max_input_tokens(self) -> int:
        limit = self.backbone.max_tokens
        return min(limit, self.config.max_input_tokens or limit)

    def authenticate(self, api_key: str) -> str | None:
        """The tenant an API key belongs to, or None."""
        return self.registry.authenticate(api_key)

    def list_adapters(self, tenant: str, *, version: int | None = None) -> list[AdapterInfo]:
        """One entry per model name of the tenant: its latest version's details and
        residency, or ``version``'s (names without that version are left out)."""
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise InputError(f"version must be a positive integer, got {version!r}", "version")
        try:
            records = self.registry.list_adapters(tenant)
        except InvalidName as exc:
            raise InputError(str(exc), "tenant") from None
        except NotFound:  # a tenant removed while its key was in use has no models
            return []
        return summarize(records, self._loaded.store.residency, version=version)

    def forget(self, records: Iterable[AdapterRecord]) -> None:
        """Drop deleted versions' weights from this engine's memory: from the host tier now,
        and zeroed out of the device pool by the model thread before its next step; a version
        that in-flight requests hold goes once they finish. Call it with what
        ``registry.delete`` returned (the HTTP delete route does); from a thread other than the
        engine's event loop it is handed to that loop, which does it soon after. Without it,
        the engine finds the deletion within ``settings_poll_s`` (engine/deletions.py)."""
        keys = {adapter_key(record) for record in records}
        task = self._loop_task
        if task is not None and _running_loop() is not task.get_loop():
            with contextlib.suppress(RuntimeError):  # its loop closed: no engine to mind it
                task.get_loop().call_soon_threadsafe(self._forget_keys, keys)
                return
        self._forget_keys(keys)

    def _forget_keys(self, keys: set[str]) -> None:
        device = self._forget_where(keys.__contains__)
        if device is not None:
            device.add_done_callback(_log_failure)

    def _forget_where(self, matches: Callable[[str], bool]) -> "Future[None] | None":
        """The host tier's part now; the device pool's on the model thread, whose future is
        returned (None once that thread has shut down). The embedding cache is emptied whole:
        keyed by tenant name, not by version, it would keep a deleted tenant's texts, and a
        tenant created again under the name could time them. Deletions are rare; it refills."""
        store = self._loaded.store
        store.forget_where(matches)
        self._loaded.embeddings.clear()
        try:
            return self._executor.submit(store.forget_device_where, matches)
        except RuntimeError:  # the model thread has shut down
            return None

    def stats(self) -> dict[str, int]:
        """Counters for introspection and metrics: steps, rows, queues, adapter tiers, and
        the embedding cache (hits and misses count inputs of multi-model requests)."""
        counts = {
            "waiting_rows": self._scheduler.num_waiting,
            "requests_in_flight": len(self._pending),
        }
        if self._model is not None:
            counts.update(self._model.stats())
            counts["interludes"] = self._steps.num_interludes  # steps run inside a longer one
            counts["planned_ahead"] = self._steps.num_planned_ahead  # queued behind a running one
            counts["step_busy_us"] = self._steps.busy_us  # model thread in steps, microseconds
            counts["step_cpu_us"] = self._steps.cpu_us  # and on a core meanwhile
        return counts

    # requests --------------------------------------------------------------------------

    def set_tenant_policy(
        self, tenant: str, policy: TenantPolicy | None | _Unset = _UNSET, **changes: Any
    ) -> None:
        """Change one tenant's weight, step budget or queue bound now and in the registry.

        ``policy`` replaces the tenant's whole policy, a field left at TenantPolicy's default
        taking the server's (None: back to the defaults); ``changes`` (``weight=2``,
        ``max_tokens_per_step=None``...) change those fields alone, set as given, as
        ``graft tenants set`` does. Other engines on the same registry follow within
        ``settings_poll_s``. Raises TenantNotFound, InputError for a malformed name,
        ValueError for a bad value."""
        if (policy is _UNSET) == (not changes):
            given = "neither" if policy is _UNSET else "both"
            raise TypeError(
                "give a TenantPolicy (or None), or the fields to change, one of the two; "
                f"got {given}"
            )
        if not isinstance(policy, TenantPolicy | None | _Unset):
            raise TypeError(f"policy must be a TenantPolicy or None, got {type(policy).__name__}")
        self._check_open()
        try:
            if isinstance(policy, _Unset):
                self._loaded.settings.update(tenant, changes)
            else:
                self._loaded.settings.set(tenant, policy)
        except InvalidName as exc:
            raise InputError(str(exc), "tenant") from None
        except NotFound as exc:
            raise TenantNotFound(str(exc)) from None

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        """Per-tenant counters: admitted, rejected (429), overloaded (503), expired, run."""
        return {t: dataclasses.asdict(c) for t, c in self._scheduler.counters().items()}

    def _finish(self, job: Job | MultiJob) -> None:
        """A job ended (done, failed or cancelled): drop its waiting rows, unpin its adapter."""
        pending = self._pending.pop(job.request_id, None)
        if pending is None:
            return
        self._scheduler.abort(job.request_id)
        if self._model is not None:
            for key in pending.keys:
                self._model.store.unpin(key)


DEFAULT_CPU_POOL_PAGES = 1024


def pool_pages(config: EngineConfig) -> int:
    """The device pool's pages: what ``adapter_pool_bytes`` holds, else ``adapter_pages``,
    else 1,024 on the CPU and on CUDA what ``adapter_memory_fraction`` of the device's memory
    holds (a tenth of an H200 keeps ~11,000 rank-8 MiniLM adapters resident)."""
    num_bytes = config.adapter_pool_bytes
    if num_bytes is None:
        if config.adapter_pages is not None:
            return config.adapter_pages
        if not config.device.startswith("cuda"):
            return DEFAULT_CPU_POOL_PAGES
        check_device(config.device)  # a device this process cannot see, refused by name
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        num_bytes = int(total * config.adapter_memory_fraction)
    model_dir = config.backbone_dir or packaged_backbone_dir()
    return pages_for_bytes(num_bytes, model_dir, config.torch_dtype)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a thread without one
        return None


def _log_failure(done: "Future[None]") -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("forgetting deleted adapters failed", exc_info=done.exception())


def _close_abandoned(loading: "Future[ServingStack]") -> None:
    """What a start cancelled while loading opened, closed once the load ends."""
    if not loading.cancelled() and loading.exception() is None:
        loading.result().close()


class _SwitchInterval:
    """The interpreter's switch interval is the process's: while engines that set one run,
    the one started last applies, and the interval from before the first returns when the
    last of them closes (each engine restoring its own saved value would leave the wrong one
    when two overlap)."""

    _lock = threading.Lock()
    _active: list["_SwitchInterval"] = []
    _saved_s = 0.0

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        with _SwitchInterval._lock:
            if not _SwitchInterval._active:
                _SwitchInterval._saved_s = sys.getswitchinterval()
            _SwitchInterval._active.append(self)
            sys.setswitchinterval(interval_s)

    def restore(self) -> None:
        with _SwitchInterval._lock:
            active = _SwitchInterval._active
            if self in active:
                active.remove(self)
            sys.setswitchinterval(active[-1].interval_s if active else _SwitchInterval._saved_s)
