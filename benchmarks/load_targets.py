"""What a load test sends to: graft embedded, graft over HTTP, and the two baselines.

Every target answers ``send(tenant, model, texts) -> Outcome`` and ``counters()``; the open-loop
driver neither knows nor cares which one it drives. Kinds (``TARGET_KINDS``):

- ``embedded``: an ``Engine`` in this process and event loop;
- ``serve``: graft's HTTP server (``server.app.run_server``, what ``graft serve`` runs) on
  127.0.0.1, port 0, in a child process, driven by an aiohttp client (``server_process=False``:
  in a thread of this process with its own event loop);
- ``url``: an HTTP server already running elsewhere (graft, or ``benchmarks.peft_server``);
- ``backbone``: the ceiling: the bare backbone (``AutoModel``, mean pooling, one fixed head), no
  adapters, behind the same kind of dynamic batcher;
- ``peft``: ``benchmarks.peft_server`` over the same adapters, in a process like ``serve``.

Queue vs compute: the engine does not report per-request timings, so for ``embedded`` a
``StepClock`` wraps the engine's model-thread step (benchmark instrumentation reaching into
``Engine`` internals) and notes, per request id, when the first step that ran one of its rows
started and when the last one ended. A request's queue time is then "scheduled send to that
first step's start" (admission, tokenizing, adapter load from disk, waiting for earlier steps)
and its compute time "first step start to last step end" (device page-ins, the forward pass
and heads of every step it rode in, other requests' rows included). Over HTTP the request id
is not visible, so the clock only gives step counts and busy time.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from benchmarks.load_fleet import Fleet

TARGET_KINDS = ("embedded", "serve", "url", "backbone", "peft")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended, as the client saw it (times are ``time.perf_counter()``)."""

    status: int | str  # HTTP status (embedded errors mapped as the server maps them) or "error"
    done_s: float  # when the whole answer was in
    first_s: float | None = None  # when the first prediction arrived (embedded streams)
    step_span_s: tuple[float, float] | None = None  # first step start, last step end
    tokens: int | None = None  # tokens the model saw, special tokens included (200 only)
    error: str | None = None  # error type or exception class
    # a server's own account (graft's Server-Timing header): admission to its first step, and
    # first step start to last step end, in seconds
    server_timing_s: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class TargetOptions:
    """How to build a target; one object for every kind, each reads what it needs."""

    timeout_s: float | None = 5.0  # queue deadline sent with each request (None: none)
    threads: int | None = None  # torch intra-op threads
    device: str = "cpu"  # where every target's model runs: cpu or cuda[:n]
    dtype: str = "float32"  # every target's weights and activations: float32, bfloat16...
    quantize: str = "none"  # "int8": graft's and the bare backbone's Linear weights in int8
    backbone_dir: str | None = None  # every target's encoder (None: the packaged MiniLM)
    interlude_tokens: int | None = None  # graft's EngineConfig.interlude_tokens (None: default)
    switch_interval_ms: float | None = None  # graft's EngineConfig's (None: its default)
    lookahead_rows: int | None = None  # graft's EngineConfig.lookahead_rows (None: by device)
    # graft's EngineConfig.contended_batch_tokens ("auto": by device)
    contended_tokens: int | str | None = "auto"
    cuda_graphs: bool | None = None  # graft's EngineConfig.cuda_graphs (None: its default)
    plan_ahead: bool | None = None  # graft's EngineConfig.plan_ahead; None: its default
    adapter_pages: int = 1024  # graft's adapter pool, in rank-rows
    max_batch_rows: int = 128
    max_batch_tokens: int = 8192
    url: str | None = None  # for kind "url"
    keys: tuple[str, ...] = ()  # for kind "url": one API key per tenant
    connections: int = 1024  # client connection pool size (HTTP kinds)
    peft_max_wait_s: float = 0.002  # the PEFT batcher's collection window
    server_process: bool = True  # "serve" and "peft" in a child process (False: a thread)
    server_workers: int = 0  # graft's front-end processes (run_server's workers)
    driver_processes: int = 1  # processes sending an HTTP target's requests


class Target(Protocol):
    kind: str
    models: tuple[tuple[str, str], ...]  # (tenant, model as sent) per adapter index

    async def send(self, tenant: str, model: str, texts: Sequence[str]) -> Outcome: ...

    async def counters(self) -> dict[str, Any]: ...


class StepClock:
    """Times the engine's steps on its model thread; per request, the span its rows ran in."""

    def __init__(self, *, keeps_spans: bool) -> None:
        self._keeps_spans = keeps_spans
        self._spans: dict[int, list[float]] = {}
        self.num_steps = 0
        self.num_rows = 0
        self.busy_s = 0.0
        self._depth = 0  # steps running now on the model thread: 2 during an interlude

    def install(self, engine: Any) -> bool:
        """Wrap ``engine``'s model-thread step (device page-ins, forward, heads); False where
        the engine's insides have changed and there is nothing to wrap."""
        owner = getattr(engine, "_steps", None)  # the StepLoop
        step = getattr(owner, "_step", None)
        if step is None:
            return False

        def timed_step(batch: Any, token_ids: Any, *args: Any) -> Any:
            started = time.perf_counter()
            self._depth += 1  # an interlude runs inside its long step, on the same thread
            try:
                return step(batch, token_ids, *args)
            finally:
                self._depth -= 1
                self._note(batch, started, time.perf_counter(), nested=self._depth > 0)

        owner._step = timed_step  # the loop looks the method up at every step and interlude
        return True

    def _note(self, batch: Any, started_s: float, ended_s: float, *, nested: bool) -> None:
        self.num_steps += 1
        self.num_rows += len(batch.rows)
        if not nested:  # the enclosing step's time already holds an interlude's
            self.busy_s += ended_s - started_s
        if not self._keeps_spans:
            return
        for row in batch.rows:
            span = self._spans.setdefault(row.request_id, [started_s, ended_s])
            span[1] = ended_s

    def pop(self, request_id: int) -> tuple[float, float] | None:
        span = self._spans.pop(request_id, None)
        return (span[0], span[1]) if span else None

    def counters(self) -> dict[str, Any]:
        return {"steps": self.num_steps, "rows": self.num_rows, "busy_s": round(self.busy_s, 4)}


class EngineTarget:
    """graft's Engine in this event loop."""

    kind = "embedded"

    def __init__(self, engine: Any, fleet: Fleet, clock: StepClock | None, timeout_s) -> None:
        self._engine, self._clock, self._timeout_s = engine, clock, timeout_s
        self.models = fleet.models

    async def send(self, tenant: str, model: str, texts: Sequence[str]) -> Outcome:
        from engine import EngineError
        from server.errors import from_engine_error

        job, first_s, tokens = None, None, 0
        try:
            job = await self._engine.submit(
                tenant, model, list(texts), truncate=True, timeout_s=self._timeout_s
            )
            async for prediction in job.stream():
                first_s = first_s or time.perf_counter()
                tokens += prediction.num_tokens
        except EngineError as exc:
            self._span(job)
            status = from_engine_error(exc).status
            return Outcome(status, time.perf_counter(), first_s, error=type(exc).__name__)
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            self._span(job)
            raise
        return Outcome(200, time.perf_counter(), first_s, self._span(job), tokens)

    def _span(self, job: Any) -> tuple[float, float] | None:
        if job is None or self._clock is None:
            return None
        return self._clock.pop(job.request_id)

    async def counters(self) -> dict[str, Any]:
        return engine_counters(self._engine, self._clock)


class HttpTarget:
    """Any server speaking graft's ``POST /v1/classify``, through one aiohttp session."""

    def __init__(
        self,
        kind: str,
        session: Any,
        url: str,
        models: tuple[tuple[str, str], ...],
        keys: dict[str, str],
        timeout_s: float | None,
        counters: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.kind, self.models = kind, models
        self._session, self._url, self._keys = session, url.rstrip("/") + "/v1/classify", keys
        self._timeout_s, self._counters = timeout_s, counters

    async def send(self, tenant: str, model: str, texts: Sequence[str]) -> Outcome:
        import aiohttp

        body: dict[str, Any] = {"model": model, "input": list(texts), "truncate": True}
        if self._timeout_s is not None:
            body["timeout"] = self._timeout_s
        headers = {
            "Authorization": f"Bearer {self._keys[tenant]}",
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(
                self._url, data=msgspec.json.encode(body), headers=headers
            ) as response:
                payload = await response.read()
                done_s = time.perf_counter()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Outcome("error", time.perf_counter(), error=type(exc).__name__)
        try:
            answer = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return Outcome(status, done_s, error="undecodable answer")
        if status == 200:
            tokens = answer.get("usage", {}).get("tokens")
            timing = server_timing(response.headers.get("Server-Timing"))
            return Outcome(200, done_s, tokens=tokens, server_timing_s=timing)
        return Outcome(status, done_s, error=answer.get("error", {}).get("type"))

    async def counters(self) -> dict[str, Any]:
        return await self._counters() if self._counters else {}

    def spec(self, connections: int):
        """How another process opens this target (benchmarks/driver_pool.py)."""
        from benchmarks.driver_pool import HttpSpec

        url = self._url.removesuffix("/v1/classify")
        return HttpSpec(self.kind, url, self.models, self._keys, self._timeout_s, connections)


def server_timing(header: str | None) -> tuple[float, float] | None:
    """(queue, compute) in seconds from graft's ``Server-Timing: queue;dur=MS, compute;dur=MS``;
    None for a server that sends no such header (the PEFT baseline) or another shape of it."""
    durations: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        key, _, value = params.strip().partition("=")
        if key.strip() == "dur":
            try:
                durations[name.strip()] = float(value) / 1000
            except ValueError:
                return None
    if "queue" not in durations or "compute" not in durations:
        return None
    return durations["queue"], durations["compute"]


class BackboneTarget:
    """The ceiling: the backbone alone behind a continuous batcher, one head for every row."""

    kind = "backbone"

    def __init__(
        self, batcher: Any, tokenizer: Any, fleet: Fleet, max_tokens: int, tokenize_pool: Any
    ) -> None:
        self._batcher, self._tokenizer, self._max_tokens = batcher, tokenizer, max_tokens
        self._tokenize_pool = tokenize_pool  # off the event loop, as the engine tokenizes
        self.models = fleet.models

    async def send(self, tenant: str, model: str, texts: Sequence[str]) -> Outcome:
        def tokenize() -> list[list[int]]:
            out = self._tokenizer(list(texts), truncation=True, max_length=self._max_tokens)
            return out["input_ids"]

        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize_pool, tokenize)
        await self._batcher.run(ids, None)
        return Outcome(200, time.perf_counter(), tokens=sum(len(row) for row in ids))

    async def counters(self) -> dict[str, Any]:
        return self._batcher.counters()


def engine_counters(engine: Any, clock: StepClock | None) -> dict[str, Any]:
    counts: dict[str, Any] = dict(engine.stats())
    counts["tenants"] = engine.tenant_stats()
    if clock is not None:
        counts["step_clock"] = clock.counters()
    return counts


# building targets ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_target(kind: str, fleet: Fleet, options: TargetOptions) -> AsyncIterator[Target]:
    """Start a target over ``fleet`` (for ``url``: the models the keys list), stop it after."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"target must be one of {TARGET_KINDS}, got {kind!r}")
    _set_threads(options.threads)
    if kind == "embedded":
        async with _embedded(fleet, options) as target:
            yield target
    elif kind == "backbone":
        async with _backbone(fleet, options) as target:
            yield target
    else:
        from benchmarks.load_http import open_http_target

        async with open_http_target(kind, fleet, options) as target:
            yield target


def engine_config(fleet: Fleet, options: TargetOptions):
    from engine import EngineConfig

    return EngineConfig(
        registry_dir=fleet.registry_dir,
        backbone_dir=options.backbone_dir,
        adapter_pages=options.adapter_pages,
        max_batch_rows=options.max_batch_rows,
        max_batch_tokens=options.max_batch_tokens,
        num_threads=options.threads,
        device=options.device,
        dtype=options.dtype,
        quantize=options.quantize,
        interlude_tokens=options.interlude_tokens,
        lookahead_rows=options.lookahead_rows,
        contended_batch_tokens=options.contended_tokens,
        cuda_graphs=options.cuda_graphs,
        plan_ahead=options.plan_ahead,
        # unset: the engine's default interval, not None (which leaves Python's)
        **(
            {}
            if options.switch_interval_ms is None
            else {"switch_interval_ms": options.switch_interval_ms}
        ),
    )


@contextlib.asynccontextmanager
async def _embedded(fleet: Fleet, options: TargetOptions) -> AsyncIterator[Target]:
    from engine import Engine

    async with Engine(engine_config(fleet, options)) as engine:
        clock = StepClock(keeps_spans=True)
        yield EngineTarget(
            engine, fleet, clock if clock.install(engine) else None, options.timeout_s
        )


@contextlib.asynccontextmanager
async def _backbone(fleet: Fleet, options: TargetOptions) -> AsyncIterator[Target]:
    from benchmarks.batcher import MicroBatcher

    model, tokenizer, forward = await asyncio.get_running_loop().run_in_executor(
        None,
        _bare_backbone,
        options.device,
        options.dtype,
        options.quantize,
        options.backbone_dir,
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2, thread_name_prefix="bench-tokenize") as pool:
        async with MicroBatcher(
            forward,
            max_batch_rows=options.max_batch_rows,
            max_batch_tokens=options.max_batch_tokens,
            num_threads=engine_config(fleet, options).intra_op_threads,
        ) as batcher:
            max_tokens = model.config.max_position_embeddings
            yield BackboneTarget(batcher, tokenizer, fleet, max_tokens, pool)


def _bare_backbone(
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str = "none",
    backbone_dir: str | None = None,
):
    """The backbone (default: the packaged one) as plain ``transformers`` runs it, mean-pooled,
    one 2-label head;
    with ``quantize="int8"`` its Linear weights in int8 exactly as graft's (the ceiling moves
    with them)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.batcher import pad
    from engine import packaged_backbone_dir

    path = str(backbone_dir or packaged_backbone_dir())
    torch_dtype = getattr(torch, dtype)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    model = model.to(device).eval()
    if quantize != "none":
        from engine.quantize import check_quantize, quantize_linears_int8

        check_quantize(quantize, device, dtype)
        quantize_linears_int8(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    head = torch.nn.Linear(model.config.hidden_size, 2).to(device, torch_dtype)
    pad_id = tokenizer.pad_token_id or 0

    def forward(token_ids: list[Sequence[int]], adapters: list[str | None]):
        input_ids, mask = pad(token_ids, pad_id)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            states = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
            return torch.softmax(head(pooled).float(), dim=-1).cpu().numpy()

    return model, tokenizer, forward


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
