"""The Engine: async front (admission, step loop) over a synchronous model thread."""

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from engine.admission import admit, deadline_for, queue_rows, resolve_model
from engine.backbone import Backbone, packaged_backbone_dir
from engine.collector import freeze_startup_objects, release_startup_objects
from engine.config import EngineConfig
from engine.errors import EngineClosed
from engine.inputs import Tokenized, check_tokenized, tokenize_request
from engine.job import Job, MultiJob, MultiPrediction, Prediction
from engine.listing import AdapterInfo, summarize
from engine.memory import pages_for_bytes
from engine.multi import (
    MultiPending,
    check_queue_bound,
    check_rank_fits,
    model_slots,
    resolve_models,
    rows_per_text,
)
from engine.pending import Pending, SinglePending
from engine.pinning import pin, pin_all
from engine.stack import ServingStack, load_stack
from engine.step_loop import StepLoop
from engine.tenant_settings import scheduler_config
from registry import AdapterRecord, NotFound, Registry
from scheduler import Scheduler, TenantPolicy

log = logging.getLogger(__name__)


class Engine:
    """Serve every tenant's classifiers from one frozen backbone.

    Use as ``async with Engine(config) as engine``. Public coroutines run on the event loop;
    forward passes and device page-ins run on one model thread, adapter loads from disk on
    loader threads, so a cold adapter never stalls other tenants' steps.
    """

    def __init__(self, config: EngineConfig) -> None:
        if config.adapter_pool_bytes is not None:  # every part below counts the pool in pages
            model_dir = config.backbone_dir or packaged_backbone_dir()
            pages = pages_for_bytes(config.adapter_pool_bytes, model_dir, config.torch_dtype)
            config = dataclasses.replace(config, adapter_pages=pages)
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
        self._closed = False
        self._saved_switch_interval: float | None = None  # to restore at close
        self._froze_gc = False

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
        self._model = await loop.run_in_executor(
            self._executor, load_stack, self.config, self._scheduler
        )
        self._model.settings.apply()
        if self.config.gc_freeze:
            freeze_startup_objects()
            self._froze_gc = True
        if self.config.switch_interval_ms is not None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.config.switch_interval_ms / 1000)
        self._loop_task = asyncio.create_task(self._steps.run(), name="graft-step-loop")
        self._settings_task = asyncio.create_task(
            self._model.settings.watch(self.config.settings_poll_s), name="graft-settings"
        )

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
        if self._froze_gc:
            release_startup_objects()
            self._froze_gc = False
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    # introspection ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._model is not None and self._loop_task is not None and not self._closed

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
        """Counters for introspection and metrics: steps, rows, queues, adapter tiers, and
        the embedding cache (hits and misses count inputs of multi-model requests)."""
        counts = {
            "waiting_rows": self._scheduler.num_waiting,
            "requests_in_flight": len(self._pending),
        }
        if self._model is not None:
            counts.update(self._model.stats())
            counts["interludes"] = self._steps.num_interludes  # steps run inside a longer one
            counts["step_busy_us"] = self._steps.busy_us  # model thread in steps, microseconds
            counts["step_cpu_us"] = self._steps.cpu_us  # and on a core meanwhile
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
        return await _results(job)

    async def submit(
        self,
        tenant: str,
        model: str,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
        tokens: Tokenized | None = None,
    ) -> Job:
        """Admit a request: resolve the model, check the queues, tokenize, pin, queue its rows.

        Admission runs before tokenizing, so refusing a flood costs next to nothing. The
        resolved version is fixed here: a newer version published meanwhile never mixes into
        this request. ``timeout_s`` (capped by ``max_timeout_s``) bounds how long its rows may
        wait to start. ``tokens``: the texts' ids, tokenized already (by a front-end process,
        with this engine's limits), checked here rather than computed. Raises ModelNotFound,
        TenantBusy, EngineOverloaded, InputError / InputTooLong, AdapterIncompatible,
        AdapterFormatError, EngineClosed.
        """
        if not self.ready:
            raise EngineClosed("engine is not running")
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        record = resolve_model(self.registry, tenant, model)
        check_rank_fits(record, self.config.adapter_pages)
        reserved = admit(self._scheduler, tenant, texts)
        try:
            tokens = await self._tokenize(texts, truncate, tokens)
            key = await pin(self._loaded.store, record)
        except BaseException:
            self._scheduler.release(tenant, reserved)  # its rows will never be queued
            raise
        return self._queue(tenant, record, key, tokens, deadline_s)

    def submit_nowait(
        self,
        tenant: str,
        model: str,
        texts: Sequence[str],
        *,
        tokens: Tokenized,
        timeout_s: float | None = None,
    ) -> Job | None:
        """``submit`` for texts tokenized already, done now: the Job, or None (nothing done)
        when the model's adapter must first be loaded, which only ``await submit`` waits for.

        Raises as ``submit`` does, in the same order. A caller that needs no task to await
        the admission saves one per request (front ends' handed-over requests do this).
        """
        if not self.ready:
            raise EngineClosed("engine is not running")
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        record = resolve_model(self.registry, tenant, model)
        check_rank_fits(record, self.config.adapter_pages)
        store = self._loaded.store
        key = store.pin_if_resident(record)
        if key is None:
            return None
        try:
            reserved = admit(self._scheduler, tenant, texts)
            try:
                tokens = self._check_tokens(texts, tokens)
            except BaseException:
                self._scheduler.release(tenant, reserved)
                raise
        except BaseException:
            store.unpin(key)
            raise
        return self._queue(tenant, record, key, tokens, deadline_s)

    def _queue(
        self,
        tenant: str,
        record: AdapterRecord,
        key: str,
        tokens: Tokenized,
        deadline_s: float | None,
    ) -> Job:
        """An admitted, tokenized and pinned request: its Job, and its rows in the queues."""
        job = Job(next(self._ids), record.full_name, record.version, len(tokens.ids), self._finish)
        self._pending[job.request_id] = SinglePending(
            job=job, record=record, keys=(key,), tokens=tokens
        )
        queue_rows(self._scheduler, job.request_id, tenant, key, record.rank, tokens, deadline_s)
        self._steps.wake()
        return job

    async def classify_many(
        self,
        tenant: str,
        models: Sequence[str],
        texts: Sequence[str],
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
    ) -> list[MultiPrediction]:
        """Classify ``texts`` with every model of ``models``; one MultiPrediction per text, in
        order, each holding one answer per model in ``models`` order. Each answer equals what
        ``classify`` gives for that model alone."""
        job = await self.submit_many(tenant, models, texts, truncate=truncate, timeout_s=timeout_s)
        return await _results(job)

    async def submit_many(
        self,
        tenant: str,
        models: Sequence[str],
        texts: Sequence[str],
        *,
        truncate: bool = True,
        timeout_s: float | None = None,
        tokens: Tokenized | None = None,
    ) -> MultiJob:
        """Admit a multi-model request (``submit``'s contract, every model at once).

        Every model is resolved first, so an unknown one (ModelNotFound) or a model listed
        twice (InputError on ``models[i]``) fails the request before anything is computed.
        Head-only models share one bare-backbone row per text, or none when the tenant's
        embedding cache holds the text's pooled outputs; each LoRA model adds a row per text.
        """
        if not self.ready:
            raise EngineClosed("engine is not running")
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        records = resolve_models(
            models,
            functools.partial(resolve_model, self.registry, tenant),
            max_models=self.config.max_models_per_request,
            adapter_pages=self.config.adapter_pages,
        )
        per_text = rows_per_text(records)
        check_queue_bound(texts, per_text, self._scheduler.policy(tenant).max_queued_rows)
        reserved = admit(self._scheduler, tenant, texts, rows_per_text=per_text)
        try:
            tokens = await self._tokenize(texts, truncate, tokens)
            keys = await pin_all(self._loaded.store, records)
        except BaseException:
            self._scheduler.release(tenant, reserved)
            raise
        model = self._loaded
        slots = model_slots(records, keys, model.host.get)
        job = MultiJob(
            next(self._ids),
            [slot.version for slot in slots],
            tokens.truncated,
            [len(ids) for ids in tokens.ids],
            on_finish=self._finish,
        )
        pending = MultiPending(
            job,
            tokens,
            slots,
            model.embeddings,
            tenant=tenant,
            backbone_sha256=self.backbone.sha256,
        )
        self._pending[job.request_id] = pending
        pending.serve_cached()  # may finish the job: then no row is left to queue
        rows = [] if job.done else pending.rows(time.monotonic(), deadline_s)
        for row in rows:
            self._scheduler.add(row)
        self._scheduler.release(tenant, max(0, reserved - len(rows)))
        self._steps.wake()
        return job

    async def _tokenize(
        self, texts: Sequence[str], truncate: bool, tokens: Tokenized | None
    ) -> Tokenized:
        if tokens is not None:
            return self._check_tokens(texts, tokens)
        return await tokenize_request(
            self.backbone.encoder,
            texts,
            max_tokens=self.max_input_tokens,
            truncate=truncate,
            max_inputs=self.config.max_inputs_per_request,
            executor=self._tokenize_executor,
        )

    def _check_tokens(self, texts: Sequence[str], tokens: Tokenized) -> Tokenized:
        return check_tokenized(
            texts, tokens, max_tokens=self.max_input_tokens, vocab_size=self.backbone.vocab_size
        )

    def _finish(self, job: Job | MultiJob) -> None:
        """A job ended (done, failed or cancelled): drop its waiting rows, unpin its adapter."""
        pending = self._pending.pop(job.request_id, None)
        if pending is None:
            return
        self._scheduler.abort(job.request_id)
        if self._model is not None:
            for key in pending.keys:
                self._model.store.unpin(key)


async def _results(job: Job | MultiJob):
    """The job's answers; a caller that goes away cancels the job, so its rows never run."""
    try:
        return await job.results()
    except asyncio.CancelledError:
        job.cancel()
        raise
