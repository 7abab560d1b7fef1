"""The Engine's request methods: admit, tokenize, pin, queue; and await or stream answers.

A part of ``Engine`` (it inherits them), kept apart so each file stays one subject: the
engine's lifecycle and introspection there, the path of every request here.
"""

import asyncio
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from engine.admission import admit, deadline_for, queue_rows, resolve_model
from engine.backbone import Backbone
from engine.config import EngineConfig
from engine.errors import EngineClosed, InputError
from engine.inputs import Tokenized, check_tokenized, tokenize_request
from engine.job import Job, MultiJob, MultiPrediction, Prediction
from engine.multi import (
    check_rank_fits,
    model_slots,
    multi_request,
    resolve_models,
    rows_per_text,
)
from engine.pending import Pending, SinglePending
from engine.pinning import pin, pin_all, pin_all_if_resident
from engine.stack import ServingStack
from engine.step_loop import StepLoop
from registry import AdapterRecord, Registry
from scheduler import Scheduler


class EngineRequests:
    """What every request goes through; ``Engine`` holds the state named below."""

    config: EngineConfig
    ready: bool
    registry: Registry
    backbone: Backbone
    max_input_tokens: int
    _loaded: ServingStack
    _scheduler: Scheduler
    _pending: dict[int, Pending]
    _ids: "itertools.count[int]"
    _steps: StepLoop
    _tokenize_executor: ThreadPoolExecutor
    _finish: Callable[[Job | MultiJob], None]  # a job ended: drop its rows, unpin
    _check_serving: Callable[[], None]  # EngineClosed / RuntimeError unless this loop serves

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
        self._check_serving()
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        record = resolve_model(self.registry, tenant, model)
        check_rank_fits(record, self.config.adapter_pages)
        reserved = admit(self._scheduler, tenant, texts)
        try:
            tokens = await self._tokenize(texts, truncate, tokens)
            key = await pin(self._loaded.store, record, deadline_s)
        except BaseException:
            self._scheduler.release(tenant, reserved)  # its rows will never be queued
            raise
        self._refuse_if_closed(tenant, reserved, [key])
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
        self._check_serving()
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        record = resolve_model(self.registry, tenant, model)
        check_rank_fits(record, self.config.adapter_pages)
        key = self._loaded.store.pin_if_resident(record)
        if key is None:
            return None
        _, tokens = self._admit_pinned(tenant, texts, tokens, [key])
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
        self._steps.wake(deadline_s)
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
        self._check_serving()
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        generation = self._loaded.embeddings.generation  # before a deletion can clear it
        records, per_text = self._resolve_many(tenant, models, texts)
        reserved = admit(self._scheduler, tenant, texts, rows_per_text=per_text)
        try:
            tokens = await self._tokenize(texts, truncate, tokens)
            keys = await pin_all(self._loaded.store, records, deadline_s)
        except BaseException:
            self._scheduler.release(tenant, reserved)
            raise
        self._refuse_if_closed(tenant, reserved, keys)
        return self._queue_many(tenant, records, keys, tokens, reserved, deadline_s, generation)

    def submit_many_nowait(
        self,
        tenant: str,
        models: Sequence[str],
        texts: Sequence[str],
        *,
        tokens: Tokenized,
        timeout_s: float | None = None,
    ) -> MultiJob | None:
        """``submit_nowait`` for several models: the MultiJob, or None (nothing done) when
        one of their adapters must first be loaded. Raises as ``submit_many`` does."""
        self._check_serving()
        deadline_s = deadline_for(timeout_s, self.config.max_timeout_s)
        records, per_text = self._resolve_many(tenant, models, texts)
        keys = pin_all_if_resident(self._loaded.store, records)
        if keys is None:
            return None
        reserved, tokens = self._admit_pinned(tenant, texts, tokens, keys, per_text)
        generation = self._loaded.embeddings.generation  # nothing awaited since resolving
        return self._queue_many(tenant, records, keys, tokens, reserved, deadline_s, generation)

    def _refuse_if_closed(self, tenant: str, reserved: int, keys: Sequence[str]) -> None:
        """The engine closed while this request tokenized or waited for its adapter: close
        failed the jobs it knew of, and no step will run again, so queue nothing."""
        if self.ready:
            return
        for key in keys:
            self._loaded.store.unpin(key)
        self._scheduler.release(tenant, reserved)
        raise EngineClosed("engine shut down")

    def _admit_pinned(
        self,
        tenant: str,
        texts: Sequence[str],
        tokens: Tokenized,
        keys: Sequence[str],
        rows_per_text: int = 1,
    ) -> tuple[int, Tokenized]:
        """Reserve queue room and check the ids of a request whose adapters are pinned
        (``keys``): the rows reserved and the checked ids. A refusal gives both back."""
        try:
            reserved = admit(self._scheduler, tenant, texts, rows_per_text=rows_per_text)
            try:
                return reserved, self._check_tokens(texts, tokens)
            except BaseException:
                self._scheduler.release(tenant, reserved)
                raise
        except BaseException:
            for key in keys:
                self._loaded.store.unpin(key)
            raise

    def _resolve_many(
        self, tenant: str, models: Sequence[str], texts: Sequence[str]
    ) -> tuple[list[AdapterRecord], int]:
        records = resolve_models(
            models,
            functools.partial(resolve_model, self.registry, tenant),
            max_models=self.config.max_models_per_request,
            adapter_pages=self.config.adapter_pages,
        )
        return records, rows_per_text(records)

    def _queue_many(
        self,
        tenant: str,
        records: list[AdapterRecord],
        keys: list[str],
        tokens: Tokenized,
        reserved: int,
        deadline_s: float | None,
        cache_generation: int,
    ) -> MultiJob:
        model = self._loaded
        job, pending = multi_request(
            next(self._ids),
            model_slots(records, keys, model.host.get),
            tokens,
            model.embeddings,
            tenant=tenant,
            backbone_sha256=self.backbone.sha256,
            on_finish=self._finish,
            cache_generation=cache_generation,
        )
        self._pending[job.request_id] = pending
        pending.serve_cached()  # may finish the job: then no row is left to queue
        rows = [] if job.done else pending.rows(time.monotonic(), deadline_s)
        for row in rows:
            self._scheduler.add(row)
        self._scheduler.release(tenant, max(0, reserved - len(rows)))
        self._steps.wake(deadline_s)
        return job

    async def _tokenize(
        self, texts: Sequence[str], truncate: bool, tokens: Tokenized | None
    ) -> Tokenized:
        if tokens is not None:
            return self._check_tokens(texts, tokens)
        if not isinstance(truncate, bool):  # "no" would read as true
            raise InputError(f"truncate must be True or False, got {truncate!r}", "truncate")
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
            texts,
            tokens,
            max_tokens=self.max_input_tokens,
            vocab_size=self.backbone.vocab_size,
            max_inputs=self.config.max_inputs_per_request,
        )


async def _results(job: Job | MultiJob):
    """The job's answers; a caller that goes away cancels the job, so its rows never run."""
    try:
        return await job.results()
    except asyncio.CancelledError:
        job.cancel()
        raise
