"""The Engine: async front (admission, step loop) over a synchronous model thread."""

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapter_store import AdapterStore, check_pool_fits, unpin_if_pinned
from engine.admission import admit, deadline_for
from engine.backbone import Backbone, load_backbone
from engine.config import EngineConfig
from engine.errors import (
    AdapterIncompatible,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    ModelNotFound,
)
from engine.host_cache import HostCache
from engine.inputs import Tokenized, tokenize_inputs
from engine.job import Job, Prediction
from engine.listing import AdapterInfo, summarize
from engine.lora_kernels import kernel_for
from engine.memory import AdapterMemory
from engine.runner import ModelRunner
from engine.tenant_settings import TenantSettings, scheduler_config
from registry import AdapterRecord, InvalidName, NotFound, Registry, parse_model_ref
from scheduler import Batch, Row, Scheduler, TenantPolicy

log = logging.getLogger(__name__)

# below this many characters, tokenizing costs less than the hop to a thread
_INLINE_TOKENIZE_CHARS = 4096


@dataclass(slots=True)
class _Pending:
    job: Job
    record: AdapterRecord
    key: str  # the adapter's resolved identity, pinned in the host tier while pending
    tokens: Tokenized


@dataclass(slots=True)
class _Model:
    """What start() loads; None before, so nothing half-built is ever reachable."""

    backbone: Backbone
    registry: Registry
    memory: AdapterMemory
    store: AdapterStore
    runner: ModelRunner
    settings: TenantSettings


class Engine:
    """Serve every tenant's classifiers from one frozen backbone.

    Use as ``async with Engine(config) as engine``. Public coroutines run on the event loop;
    forward passes and device page-ins run on one model thread, adapter loads from disk on
    loader threads, so a cold adapter never stalls other tenants' steps.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._model: _Model | None = None
        self._scheduler = Scheduler(scheduler_config(config))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-model")
        self._tokenize_executor = ThreadPoolExecutor(2, thread_name_prefix="graft-tokenize")
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._settings_task: asyncio.Task[None] | None = None
        self._closed = False

    # lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the backbone and open the registry; the step loop starts serving at once."""
        if self._loop_task is not None:
            return
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)
        self._model.settings.apply()
        self._loop_task = asyncio.create_task(self._run(), name="graft-step-loop")
        self._settings_task = asyncio.create_task(
            self._model.settings.watch(self.config.settings_poll_s), name="graft-settings"
        )

    def _load(self) -> _Model:
        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        backbone = load_backbone(
            config.backbone_dir,
            device=config.device,
            dtype=config.torch_dtype,
            expected_sha256=config.backbone_sha256,
        )
        registry = Registry(config.registry_dir)
        registry.register_base(backbone.sha256, backbone.name)
        check_pool_fits(registry, backbone.sha256, config.adapter_pages)
        memory = AdapterMemory(backbone, config.adapter_pages, config.device, config.torch_dtype)
        store = AdapterStore(
            registry,
            backbone,
            memory,
            HostCache(config.host_cache_bytes),
            max_loads_in_flight=config.max_loads_in_flight,
            pin_host_memory=config.device.startswith("cuda"),
        )
        kernel = kernel_for(config.lora_kernel, config.device)
        runner = ModelRunner(backbone, memory, config.device, kernel)
        log.info("backbone %s loaded (sha256 %s)", backbone.name, backbone.sha256[:12])
        settings = TenantSettings(registry, self._scheduler, self._scheduler.default_policy)
        return _Model(backbone, registry, memory, store, runner, settings)

    async def close(self) -> None:
        """Fail what is still waiting, stop the loop, release the threads."""
        self._closed = True
        for pending in list(self._pending.values()):
            pending.job.fail(EngineClosed("engine shut down"))
        for task in (self._loop_task, self._settings_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._settings_task = None
        self._executor.shutdown(wait=True)
        self._tokenize_executor.shutdown(wait=True)
        if self._model is not None:
            self._model.store.close()
            self._model.registry.close()

    # introspection ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._model is not None and self._loop_task is not None and not self._closed

    @property
    def _loaded(self) -> _Model:
        if self._model is None:
            raise EngineClosed("engine not started")
        return self._model

    @property
    def backbone(self) -> Backbone:
        return self._loaded.backbone

    @property
    def registry(self) -> Registry:
        return self._loaded.registry

    @property
    def max_input_tokens(self) -> int:
        limit = self.backbone.max_tokens
        return min(limit, self.config.max_input_tokens or limit)

    def authenticate(self, api_key: str) -> str | None:
        """The tenant an API key belongs to, or None."""
        return self.registry.authenticate(api_key)

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        """One entry per model name of the tenant, with residency of its latest version."""
        try:
            records = self.registry.list_adapters(tenant)
        except NotFound:  # a tenant removed while its key was in use has no models
            return []
        return summarize(records, self._loaded.store.residency)

    def stats(self) -> dict[str, int]:
        """Counters for introspection and metrics: steps, rows, queues, adapter tiers."""
        counts = {
            "waiting_rows": self._scheduler.num_waiting,
            "requests_in_flight": len(self._pending),
        }
        if self._model is not None:
            counts["steps"] = self._model.runner.num_steps
            counts["rows"] = self._model.runner.num_rows
            counts.update(self._model.store.stats())
        return counts

    # requests --------------------------------------------------------------------------

    def set_tenant_policy(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Change one tenant's weight, step budget or queue bound now and in the registry
        (None: back to the defaults). Other engines on the same registry follow within
        ``settings_poll_s``."""
        self._loaded.settings.set(tenant, policy)

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        """Per-tenant counters: admitted, rejected (429), overloaded (503), expired, run."""
        return {t: dataclasses.asdict(c) for t, c in self._scheduler.counters().items()}

    async def classify(
        self,
        tenant: str,
        model: str,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
    ) -> list[Prediction]:
        """Classify ``texts`` with the tenant's model; one Prediction per text, in order."""
        job = await self.submit(tenant, model, texts, truncate=truncate, timeout_s=timeout_s)
        try:
            return await job.results()
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def submit(
        self,
        tenant: str,
        model: str,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
    ) -> Job:
        """Admit a request: resolve the model, check the queues, tokenize, pin, queue its rows.

        Admission runs before tokenizing, so refusing a flood costs next to nothing. The
        resolved version is fixed here: a newer version published meanwhile never mixes into
        this request. ``timeout_s`` (capped by ``max_timeout_s``) bounds how long its rows may
        wait to start. Raises ModelNotFound, TenantBusy, EngineOverloaded, InputError /
        InputTooLong, AdapterIncompatible, AdapterFormatError, EngineClosed.
        """
        if not self.ready:
            raise EngineClosed("engine is not running")
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        record = self._resolve(tenant, model)
        if record.rank > self.config.adapter_pages:
            raise AdapterIncompatible(
                f"{record.full_name}@{record.version} has rank {record.rank}; this engine's "
                f"adapter pool holds {self.config.adapter_pages} pages"
            )
        reserved = admit(self._scheduler, tenant, texts)
        try:
            tokens = await self._tokenize(texts, truncate)
            key = await self._pin(record)
        except BaseException:
            self._scheduler.release(tenant, reserved)  # its rows will never be queued
            raise
        job = Job(
            next(self._ids),
            record.full_name,
            record.version,
            len(tokens.ids),
            on_finish=self._finish,
        )
        self._pending[job.request_id] = _Pending(job=job, record=record, key=key, tokens=tokens)
        now = time.monotonic()
        for index, ids in enumerate(tokens.ids):
            self._scheduler.add(
                Row(
                    request_id=job.request_id,
                    index=index,
                    tenant=tenant,
                    adapter_key=key,
                    num_tokens=len(ids),
                    arrival_s=now,
                    num_pages=record.rank,
                    deadline_s=deadline_s,
                )
            )
        self._work.set()
        return job

    async def _tokenize(self, texts: Sequence[str], truncate: bool) -> Tokenized:
        """Small requests tokenize inline; large ones on a helper thread, off the event loop."""
        work = functools.partial(
            tokenize_inputs,
            self.backbone.tokenizer,
            texts,
            max_tokens=self.max_input_tokens,
            truncate=truncate,
            max_inputs=self.config.max_inputs_per_request,
        )
        is_small = (
            isinstance(texts, str)
            or not isinstance(texts, Sequence)
            or sum(len(t) for t in texts if isinstance(t, str)) < _INLINE_TOKENIZE_CHARS
        )
        if is_small:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_executor, work)

    def _resolve(self, tenant: str, model: str) -> AdapterRecord:
        try:
            ref = parse_model_ref(model)
        except InvalidName as exc:
            raise ModelNotFound(f"model {model!r} not found ({exc})") from exc
        if ref.tenant is not None and ref.tenant != tenant:
            raise ModelNotFound(f"model {model!r} not found")
        try:
            return self.registry.resolve(tenant, ref.name, ref.version)
        except NotFound as exc:
            raise ModelNotFound(f"model {model!r} not found") from exc

    async def _pin(self, record: AdapterRecord) -> str:
        """Host-pin the adapter; a caller that goes away mid-load leaves no pin behind."""
        store = self._loaded.store
        pinning = asyncio.ensure_future(store.pin(record))
        try:
            return await asyncio.shield(pinning)
        except asyncio.CancelledError:
            pinning.add_done_callback(unpin_if_pinned(store))
            raise

    def _finish(self, job: Job) -> None:
        """A job ended (done, failed or cancelled): drop its waiting rows, unpin its adapter."""
        pending = self._pending.pop(job.request_id, None)
        if pending is None:
            return
        self._scheduler.abort(job.request_id)
        if self._model is not None:
            self._model.store.unpin(pending.key)

    # the step loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._scheduler.plan(time.monotonic())
            self._expire(plan.expired)
            batch = plan.batch
            if batch is None:
                self._work.clear()
                await self._wait_for_work()
                continue
            rows = [(self._pending.get(r.request_id), r) for r in batch.rows]
            token_ids = [p.tokens.ids[r.index] if p else (0,) for p, r in rows]
            started = time.monotonic()
            try:
                probs = await loop.run_in_executor(self._executor, self._step, batch, token_ids)
            except Exception as exc:  # a failed step fails its rows, never the loop
                log.exception("model step failed")
                for pending, _ in rows:
                    if pending is not None:
                        pending.job.fail(EngineError(f"model step failed: {exc}"))
                continue
            ended = time.monotonic()
            self._scheduler.record_step(len(batch.rows), ended - started)
            for pending in {id(p): p for p, _ in rows if p is not None}.values():
                pending.job.record_step(started, ended)
            for (pending, row), row_probs in zip(rows, probs, strict=True):
                if pending is not None:
                    pending.job.deliver(_prediction(pending, row.index, row_probs))

    async def _wait_for_work(self) -> None:
        """Sleep until a request arrives, or until the earliest waiting deadline passes."""
        timeout = self._scheduler.next_deadline_in(time.monotonic())
        if timeout is None:
            await self._work.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout)

    def _expire(self, rows: Sequence[Row]) -> None:
        for row in rows:
            pending = self._pending.get(row.request_id)
            if pending is not None:
                message = f"request timed out before input[{row.index}] could start"
                pending.job.fail(DeadlineExceeded(message))

    def _step(self, batch: Batch, token_ids: list[Sequence[int]]) -> list[np.ndarray]:
        """Model thread: page the batch's adapters in, run the step, let them go."""
        model = self._loaded
        model.store.acquire_device(batch.seg_adapter)
        try:
            return model.runner.step(batch, token_ids)
        finally:
            model.store.release_device(batch.seg_adapter)


def _prediction(pending: _Pending, index: int, probs: np.ndarray) -> Prediction:
    labels = pending.record.labels
    return Prediction(
        index=index,
        label=labels[int(probs.argmax())],
        scores={label: float(p) for label, p in zip(labels, probs, strict=True)},
        truncated=pending.tokens.truncated[index],
        num_tokens=len(pending.tokens.ids[index]),
    )
