"""Training over HTTP.

``POST /v1/train`` validates the upload and queues a job for the caller's tenant (see
train_upload.py for the body); ``GET /v1/train[/{id}]`` shows jobs, ``GET /v1/train/{id}/events``
streams their events (NDJSON, or SSE with ``Accept: text/event-stream``), ``DELETE
/v1/train/{id}`` cancels one. Jobs run in worker processes owned by a `JobManager`
(training/jobs.py) that lives as long as the app.
"""

import asyncio
import contextlib
import copy
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from engine import EngineError
from registry import InvalidName, validate_name
from server.errors import (
    CONFLICT,
    INVALID_REQUEST,
    NOT_FOUND,
    RATE_LIMITED,
    RETRY_AFTER_S,
    UNAVAILABLE,
    ApiError,
    expect_within,
)
from server.routes import ENGINE, STREAMS, authenticate
from server.schemas import NDJSON, json_response, ndjson_line
from server.train_upload import parse_options, read_upload
from training import (
    FINAL_EVENTS,
    InvalidData,
    JobConflict,
    JobManager,
    JobNotFound,
    JobRecord,
    JobsConfig,
    JobsUnavailable,
    TooManyJobs,
    is_job_id,
)

log = logging.getLogger(__name__)

INVALID_DATA = "invalid_data"
SSE = "text/event-stream"
UPLOAD_THREADS = 32  # uploads in their tenants' limits at once; most wait for the validator
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TrainServiceConfig:
    """Training-over-HTTP settings, given to ``create_app``."""

    max_upload_bytes: int = 20 * 1024 * 1024  # a POST /v1/train body; larger is 413
    max_running: int = 1  # jobs training at once (each takes worker_threads cores)
    max_jobs_per_tenant: int = 3  # unfinished jobs per tenant before 429
    worker_threads: int = 1  # torch threads of each worker process
    jobs_dir: Path | None = None  # job state and uploads; None: <registry>/jobs
    events_poll_s: float = 0.25  # how often an event stream looks for new events
    max_job_seconds: float | None = 3600.0  # a running job fails past this; None: no limit

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes}")
        for name in ("max_running", "max_jobs_per_tenant", "worker_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.events_poll_s > 0:
            raise ValueError(f"events_poll_s must be > 0, got {self.events_poll_s}")


@dataclass(slots=True)
class _Training:
    """The app's job manager, set while the app runs (None before start, or when unavailable)."""

    config: TrainServiceConfig
    manager: JobManager | None = None
    unavailable: str = "training jobs are not running on this server"
    # uploads are checked one at a time (JobManager.submit) on threads of their own, so that
    # uploads waiting their turn hold none of the threads promote and rollback run on; enough
    # threads that each upload starts at once and counts against its tenant's limit (429)
    uploads: ThreadPoolExecutor | None = None


TRAINING = web.AppKey("training", _Training)
# an upload past the cap is refused before the client sends it
_EXPECT_UPLOAD = expect_within(
    lambda request: request.app[TRAINING].config.max_upload_bytes, "upload", field="file"
)


def add_train_routes(app: web.Application, config: TrainServiceConfig) -> None:
    """Register the routes, and the job manager's start and stop with the app's lifecycle."""
    app[TRAINING] = _Training(config)
    app.router.add_routes(
        [
            web.post("/v1/train", start_job, expect_handler=_EXPECT_UPLOAD),
            web.get("/v1/train", list_jobs),
            web.get("/v1/train/{id}", get_job),
            web.delete("/v1/train/{id}", cancel_job),
            web.get("/v1/train/{id}/events", job_events),
        ]
    )
    app.cleanup_ctx.append(_run_job_manager)


async def _run_job_manager(app: web.Application) -> AsyncIterator[None]:
    training = app[TRAINING]
    try:
        manager = _new_manager(app)
        await _in_thread(manager.start)
    except (JobsUnavailable, EngineError) as exc:
        log.warning("training over HTTP is off: %s", exc)
        training.unavailable = f"training jobs are unavailable: {exc}"
        yield
        return
    training.manager = manager
    training.uploads = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="graft-train-upload")
    try:
        yield
    finally:
        training.manager = None
        await _in_thread(manager.close)
        await _in_thread(training.uploads.shutdown)
        training.uploads = None


def _new_manager(app: web.Application) -> JobManager:
    engine, config = app[ENGINE], app[TRAINING].config
    registry_dir = Path(engine.config.registry_dir)
    jobs = JobsConfig(
        jobs_dir=config.jobs_dir or registry_dir / "jobs",
        registry_dir=registry_dir,
        backbone_dir=engine.config.backbone_dir,
        backbone_sha256=engine.backbone.sha256,
        max_running=config.max_running,
        max_jobs_per_tenant=config.max_jobs_per_tenant,
        worker_threads=config.worker_threads,
        max_job_seconds=config.max_job_seconds,
    )
    # validation gets its own tokenizer: a fast tokenizer is not safe to share across threads
    return JobManager(jobs, engine.registry, copy.deepcopy(engine.backbone.tokenizer))


# jobs ------------------------------------------------------------------------------------


async def start_job(request: web.Request) -> web.Response:
    """Validate the upload; 202 with the job's id and the validation report."""
    manager, tenant = _manager_and_tenant(request)
    # the tenant as authenticated: one deleted and made again during the upload never owns it
    born = request.app[ENGINE].registry.tenant_created_at(tenant)
    with _api_errors():  # a 429 before a byte of the body is read
        manager.take_upload_room(tenant)
    gone = threading.Event()
    try:
        submit = await _job_to_submit(request, manager, tenant, born, gone)
    except BaseException:  # refused before submit, which gives the place back once it ran
        manager.give_upload_room(tenant)
        raise
    try:
        record = await _call(submit, request.app[TRAINING].uploads)
    except asyncio.CancelledError:  # the client left: the check goes on, but makes no job
        gone.set()
        raise
    body = {"id": record.id, "state": record.state, "report": record.report}
    return json_response(body, status=202, headers={"Location": f"/v1/train/{record.id}"})


async def _job_to_submit(
    request: web.Request,
    manager: JobManager,
    tenant: str,
    born: float | None,
    gone: threading.Event,
) -> Callable[[], JobRecord]:
    """The upload read and its options checked: the call that checks and queues it."""
    upload = await read_upload(request, request.app[TRAINING].config.max_upload_bytes)
    job = parse_options(upload.options)
    try:
        validate_name("adapter", job.name)
    except InvalidName as exc:
        raise ApiError(422, INVALID_REQUEST, str(exc), field="name") from None
    longest = request.app[ENGINE].backbone.max_tokens
    if job.config.max_length > longest:  # the worker would fail it only once it ran
        message = f"max_length must be at most {longest}, the backbone's longest input"
        raise ApiError(422, INVALID_REQUEST, message, field="max_length")
    # the held-out rows are read as this server will read them (its engine's max_input_tokens)
    config = dataclasses.replace(job.config, eval_max_tokens=request.app[ENGINE].max_input_tokens)
    return functools.partial(
        manager.submit,
        tenant,
        job.name,
        config,
        promote=job.promote,
        data=upload.data,
        filename=upload.filename,
        tenant_created_at=born,
        abandoned=gone.is_set,
        room_held=True,
    )


async def list_jobs(request: web.Request) -> web.Response:
    manager, tenant = _manager_and_tenant(request)
    return json_response({"data": [record.to_dict() for record in manager.list_jobs(tenant)]})


async def get_job(request: web.Request) -> web.Response:
    manager, tenant = _manager_and_tenant(request)
    return json_response(_job(manager, tenant, request).to_dict())


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued or running job (its worker is killed; nothing is published)."""
    manager, tenant = _manager_and_tenant(request)
    job_id = _job(manager, tenant, request).id
    record = await _call(functools.partial(manager.cancel, tenant, job_id))
    return json_response(record.to_dict())


async def job_events(request: web.Request) -> web.StreamResponse:
    """Every event of the job so far, then new ones as they happen, until the final one."""
    manager, tenant = _manager_and_tenant(request)
    job_id = _job(manager, tenant, request).id
    is_sse = SSE in request.headers.get("Accept", "")
    start = _last_event_id(request) + 1 if is_sse else 0
    response = web.StreamResponse(
        headers={"Content-Type": SSE if is_sse else NDJSON, "Cache-Control": "no-cache"}
    )
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None  # aiohttp runs every handler in a task
    streams.add(task)
    try:
        await response.prepare(request)
        poll_s = request.app[TRAINING].config.events_poll_s
        async for number, item in _follow(manager, tenant, job_id, start, poll_s):
            await response.write(_sse(number, item) if is_sse else ndjson_line(item))
        await response.write_eof()
        return response
    finally:
        streams.discard(task)


async def _follow(
    manager: JobManager, tenant: str, job_id: str, start: int, poll_s: float
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(number, event) pairs from `start` on, ending after the job's final event, or once
    the job is no longer the tenant's (the tenant was deleted: the stream ends, not fails)."""
    number = start
    while True:
        try:
            is_final = manager.get(tenant, job_id).is_final  # before the events: none missed
            events = manager.events(tenant, job_id, number)
        except (JobNotFound, FileNotFoundError):  # its directory removed with the tenant
            return
        for item in events:
            yield number, item
            number += 1
            if item["type"] in FINAL_EVENTS:
                return
        if is_final:
            return
        await asyncio.sleep(poll_s)


# request parts ---------------------------------------------------------------------------


def _manager_and_tenant(request: web.Request) -> tuple[JobManager, str]:
    tenant = authenticate(request, request.app[ENGINE])
    training = request.app[TRAINING]
    if training.manager is None or not training.manager.is_running:
        raise ApiError(
            503, UNAVAILABLE, training.unavailable, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    return training.manager, tenant


def _job(manager: JobManager, tenant: str, request: web.Request) -> JobRecord:
    job_id = request.match_info["id"]
    if not is_job_id(job_id):
        raise ApiError(404, NOT_FOUND, f"training job {job_id!r} not found")
    try:
        return manager.get(tenant, job_id)
    except JobNotFound as exc:
        raise ApiError(404, NOT_FOUND, str(exc)) from None


async def _call(call: Callable[[], T], executor: Executor | None = None) -> T:
    """Run a blocking manager call in a thread; its errors as API errors."""
    with _api_errors():
        result = await _in_thread(call, executor)
    return result


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """The job manager's errors as API errors."""
    try:
        yield
    except InvalidData as exc:
        raise _DataRejected(exc) from None
    except JobNotFound as exc:
        raise ApiError(404, NOT_FOUND, str(exc)) from None
    except JobConflict as exc:
        raise ApiError(409, CONFLICT, str(exc)) from None
    except TooManyJobs as exc:
        headers = {"Retry-After": "60"}  # jobs take minutes; asking sooner is pointless
        raise ApiError(429, RATE_LIMITED, str(exc), headers=headers) from None
    except JobsUnavailable as exc:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        raise ApiError(503, UNAVAILABLE, str(exc), headers=headers) from None


async def _in_thread(call: Callable[[], T], executor: Executor | None = None) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, call)


class _DataRejected(ApiError):
    """422 for data that cannot be trained on: the rows at fault, and the report when the rows
    could be read."""

    def __init__(self, exc: InvalidData) -> None:
        super().__init__(422, INVALID_DATA, str(exc), field="file")
        self.rows = list(exc.rows)
        self.report = exc.report

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = super().body()
        body["error"]["rows"] = self.rows
        if self.report is not None:
            body["error"]["report"] = self.report
        return body


def _last_event_id(request: web.Request) -> int:
    """SSE reconnects send the last id they saw; the stream resumes after it."""
    value = request.headers.get("Last-Event-ID", "").strip()
    # ASCII digits only: "²" is a digit to isdigit() and not to int(); ids are small numbers
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else -1


def _sse(number: int, item: dict[str, Any]) -> bytes:
    data = ndjson_line(item).rstrip(b"\n")  # JSON never holds a raw newline
    return f"id: {number}\nevent: {item['type']}\ndata: ".encode() + data + b"\n\n"
