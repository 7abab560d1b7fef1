"""The Engine: async front (admission, step loop) over a synchronous model thread."""

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapters import POOLING_CLS_POOLER, AdapterWeights, parse_adapter
from engine.backbone import Backbone, load_backbone
from engine.config import EngineConfig
from engine.errors import (
    AdapterFormatError,
    AdapterIncompatible,
    EngineClosed,
    EngineError,
    ModelNotFound,
)
from engine.inputs import Tokenized, tokenize_inputs
from engine.job import Job, Prediction
from engine.listing import AdapterInfo, summarize
from engine.lora_kernels import kernel_for
from engine.memory import AdapterMemory
from engine.runner import ModelRunner
from registry import (
    AdapterRecord,
    InvalidName,
    NotFound,
    Registry,
    RegistryError,
    parse_model_ref,
)
from scheduler import Row, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

# below this many characters, tokenizing costs less than the hop to a thread
_INLINE_TOKENIZE_CHARS = 4096


@dataclass(slots=True)
class _Pending:
    job: Job
    record: AdapterRecord
    tokens: Tokenized


class Engine:
    """Serve every tenant's classifiers from one frozen backbone.

    Use as ``async with Engine(config) as engine``. All public coroutines run on the event
    loop; model work (loading adapters, forward passes) runs on one worker thread.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._backbone: Backbone | None = None
        self._registry: Registry | None = None
        self._memory: AdapterMemory | None = None
        self._runner: ModelRunner | None = None
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_batch_tokens=config.max_batch_tokens, max_batch_rows=config.max_batch_rows
            )
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-model")
        self._tokenize_executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="graft-tokenize"
        )
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
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
        await loop.run_in_executor(self._executor, self._load)
        self._loop_task = asyncio.create_task(self._run(), name="graft-step-loop")

    def _load(self) -> None:
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
        memory = AdapterMemory(backbone, config.adapter_pages, config.device, config.torch_dtype)
        self._backbone, self._registry, self._memory = backbone, registry, memory
        kernel = kernel_for(config.lora_kernel, config.device)
        self._runner = ModelRunner(backbone, memory, config.device, kernel)
        log.info("backbone %s loaded (sha256 %s)", backbone.name, backbone.sha256[:12])

    async def close(self) -> None:
        """Fail what is still waiting, stop the loop, release the model thread."""
        self._closed = True
        for pending in list(self._pending.values()):
            pending.job.fail(EngineClosed("engine shut down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        self._executor.shutdown(wait=True)
        self._tokenize_executor.shutdown(wait=True)
        if self._registry is not None:
            self._registry.close()

    # introspection ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._runner is not None and self._loop_task is not None and not self._closed

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            raise EngineClosed("engine not started")
        return self._backbone

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise EngineClosed("engine not started")
        return self._registry

    @property
    def max_input_tokens(self) -> int:
        limit = self.backbone.max_tokens
        return min(limit, self.config.max_input_tokens or limit)

    def authenticate(self, api_key: str) -> str | None:
        """The tenant an API key belongs to, or None."""
        return self.registry.authenticate(api_key)

    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        """One entry per model name of the tenant, newest version first in ``versions``."""
        try:
            records = self.registry.list_adapters(tenant)
        except NotFound:  # a tenant removed while its key was in use has no models
            return []
        return summarize(records, self._residency)

    def stats(self) -> dict[str, int]:
        memory, runner = self._memory, self._runner
        return {
            "steps": runner.num_steps if runner else 0,
            "rows": runner.num_rows if runner else 0,
            "waiting_rows": self._scheduler.num_waiting,
            "requests_in_flight": len(self._pending),
            "adapter_loads": memory.num_loads if memory else 0,
            "adapter_evictions": memory.num_evictions if memory else 0,
            "adapter_pages_free": memory.num_free_pages if memory else 0,
        }

    def _residency(self, key: str) -> str:
        return "device" if self._memory is not None and self._memory.is_resident(key) else "disk"

    # requests --------------------------------------------------------------------------

    async def classify(
        self, tenant: str, model: str, texts: Sequence[str], *, truncate: bool = True
    ) -> list[Prediction]:
        """Classify ``texts`` with the tenant's model; one Prediction per text, in order."""
        job = await self.submit(tenant, model, texts, truncate=truncate)
        try:
            return await job.results()
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def submit(
        self, tenant: str, model: str, texts: Sequence[str], *, truncate: bool = True
    ) -> Job:
        """Admit a request: resolve the model, tokenize, pin the adapter, queue its rows.

        Raises ModelNotFound, InputError/InputTooLong, AdapterIncompatible, EngineOverloaded.
        """
        if not self.ready:
            raise EngineClosed("engine is not running")
        record = self._resolve(tenant, model)
        tokens = await self._tokenize(texts, truncate)
        key = _adapter_key(record)
        await self._pin(key, record)
        job = Job(
            next(self._ids),
            record.full_name,
            record.version,
            len(tokens.ids),
            on_finish=self._finish,
        )
        self._pending[job.request_id] = _Pending(job=job, record=record, tokens=tokens)
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
            or (sum(len(t) for t in texts if isinstance(t, str)) < _INLINE_TOKENIZE_CHARS)
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

    async def _pin(self, key: str, record: AdapterRecord) -> None:
        """Load (if needed) and pin the adapter; a caller that goes away mid-load unpins it."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._acquire, key, record)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._unpin_after(f, key))
            raise

    def _unpin_after(self, future: "asyncio.Future[None]", key: str) -> None:
        if not future.cancelled() and future.exception() is None and self._memory is not None:
            self._executor.submit(self._memory.release, key)

    def _acquire(self, key: str, record: AdapterRecord) -> None:
        assert self._memory is not None
        self._memory.acquire(key, lambda: self._read_adapter(record))

    def _read_adapter(self, record: AdapterRecord) -> AdapterWeights:
        """Disk to host: verify the content hash, check the base model, parse and validate."""
        backbone = self.backbone
        if record.base_sha256 != backbone.sha256:
            raise AdapterIncompatible(
                f"{record.full_name}@{record.version} was trained on base model "
                f"{record.base_sha256[:12]}, but this engine serves {backbone.sha256[:12]}"
            )
        try:
            verified = self.registry.read_verified(record)
        except RegistryError as exc:  # tampered or missing files: refuse, never serve them
            raise AdapterFormatError(str(exc)) from exc
        return parse_adapter(
            verified.files["adapter_config.json"],
            verified.files["adapter_model.safetensors"],
            tuple(record.labels),
            str(record.manifest.get("pooling", POOLING_CLS_POOLER)),
            backbone,
        )

    def _finish(self, job: Job) -> None:
        """A job ended (done, failed or cancelled): drop its waiting rows, unpin its adapter."""
        pending = self._pending.pop(job.request_id, None)
        if pending is None:
            return
        self._scheduler.abort(job.request_id)
        if self._memory is not None and not self._closed:
            key = _adapter_key(pending.record)
            asyncio.get_running_loop().run_in_executor(self._executor, self._memory.release, key)

    # the step loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._scheduler.plan(time.monotonic())
            if batch is None:
                self._work.clear()
                await self._work.wait()
                continue
            rows = [(self._pending.get(r.request_id), r) for r in batch.rows]
            token_ids = [p.tokens.ids[r.index] if p else [0] for p, r in rows]
            try:
                probs = await loop.run_in_executor(
                    self._executor,
                    self._runner.step,
                    batch,
                    token_ids,  # type: ignore[union-attr]
                )
            except Exception as exc:  # a failed step fails its rows, never the loop
                log.exception("model step failed")
                for pending, _ in rows:
                    if pending is not None:
                        pending.job.fail(EngineError(f"model step failed: {exc}"))
                continue
            for (pending, row), row_probs in zip(rows, probs, strict=True):
                if pending is not None:
                    pending.job.deliver(_prediction(pending, row.index, row_probs))


def _adapter_key(record: AdapterRecord) -> str:
    return f"{record.full_name}@{record.version}"


def _prediction(pending: _Pending, index: int, probs: np.ndarray) -> Prediction:
    labels = pending.record.labels
    return Prediction(
        index=index,
        label=labels[int(probs.argmax())],
        scores={label: float(p) for label, p in zip(labels, probs, strict=True)},
        truncated=pending.tokens.truncated[index],
        num_tokens=len(pending.tokens.ids[index]),
    )
