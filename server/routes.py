"""The routes: authenticate, validate, call the engine, format. No model math here."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from aiohttp import web

from engine import (
    Engine,
    EngineError,
    InputError,
    Job,
    JobCancelled,
    ModelNotFound,
    MultiJob,
    Tokenized,
)
from engine.admission import resolve_model
from registry import InvalidName, ModelRef, parse_model_ref
from server.errors import (
    AUTHENTICATION,
    INVALID_JSON,
    INVALID_REQUEST,
    NOT_FOUND,
    RETRY_AFTER_S,
    TOO_LARGE,
    UNAVAILABLE,
    ApiError,
    expect_within,
    from_engine_error,
    from_input_error,
    internal_error,
)
from server.schemas import (
    MULTI_MODEL,
    NDJSON,
    SINGLE_MODEL,
    AnswerFormat,
    ClassifyRequest,
    RequestInvalid,
    decode_json,
    json_response,
    ndjson_line,
    parse_classify,
)

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
# handler tasks of open NDJSON streams; shutdown cancels them (a stream may run for long)
STREAMS = web.AppKey("streams", set[asyncio.Task[Any]])

_CHALLENGE = 'Bearer realm="graft"'


# a classify body past the app's cap is refused before the client sends it
EXPECT_BODY = expect_within(lambda request: request.app[MAX_BODY_BYTES], "request body")


def add_routes(app: web.Application) -> None:
    app.router.add_routes(
        [
            web.get("/health", health),
            web.get("/ready", ready),
            web.get("/v1/adapters", list_adapters),
            web.get("/v1/adapters/{name}", get_adapter),
            web.get("/v1/adapters/{tenant}/{name}", get_adapter),  # as "acme/spam" in classify
            web.post("/v1/classify", classify, expect_handler=EXPECT_BODY),
        ]
    )


async def cancel_streams(app: web.Application) -> None:
    """``on_shutdown`` hook: end every open stream (each cancels its job on the way out)."""
    for task in list(app[STREAMS]):
        task.cancel()


# probes ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    """Liveness: answers while the process runs, whatever the engine's state."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 once the engine serves, 503 before start and after close."""
    engine = request.app[ENGINE]
    if not engine.ready:
        raise ApiError(
            503, UNAVAILABLE, "engine is not ready", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    backbone, config = engine.backbone, engine.config
    return json_response(
        {
            "status": "ready",
            "backbone": backbone.name,
            "backbone_sha256": backbone.sha256,
            # answers differ slightly between precisions: clients comparing scores can tell
            "dtype": config.dtype,
            "quantize": config.quantize,
        }
    )


# adapters --------------------------------------------------------------------------------


async def list_adapters(request: web.Request) -> web.Response:
    """The caller's own models, one entry per name."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    return json_response({"data": [info.to_dict() for info in engine.list_adapters(tenant)]})


async def get_adapter(request: web.Request) -> web.Response:
    """One of the caller's models, named as classify names it (``spam``, ``acme/spam``,
    ``spam@2``: a pinned version shows that version, promoted or not); another tenant's
    model is as absent as a missing one."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    ref, not_found = own_model_ref(request, tenant)
    for info in engine.list_adapters(tenant, version=ref.version):
        if info.name == ref.name:
            return json_response(info.to_dict())
    try:  # say why as classify does ("... version 2 was deleted"), where the registry knows
        resolve_model(engine.registry, tenant, f"{ref.name}" + _at(ref.version))
    except ModelNotFound as exc:
        raise from_engine_error(exc) from exc
    raise not_found


def _at(version: int | None) -> str:
    return "" if version is None else f"@{version}"


def own_model_ref(request: web.Request, tenant: str) -> tuple[ModelRef, ApiError]:
    """The route's ``{name}`` (or ``{tenant}/{name}``) as a reference to one of the caller's
    models, and the 404 to raise when it names none; another tenant's is that 404 too."""
    tenant_part = request.match_info.get("tenant")
    ref_text = request.match_info["name"]
    ref_text = ref_text if tenant_part is None else f"{tenant_part}/{ref_text}"
    not_found = ApiError(404, NOT_FOUND, f"model {ref_text!r} not found")
    try:
        ref = parse_model_ref(ref_text)
    except InvalidName:
        raise not_found from None
    if ref.tenant not in (None, tenant):
        raise not_found
    return ref, not_found


# classification --------------------------------------------------------------------------


async def classify(request: web.Request) -> web.StreamResponse:
    """Classify one text or a list with one model or several; JSON when done, or NDJSON
    lines as inputs complete."""
    engine = request.app[ENGINE]
    tenant = authenticate(request, engine)
    body = parse_body(await read_body(request))
    if body.stream:
        job = await submit(engine, tenant, body)
        return await _stream(request, job, SINGLE_MODEL if body.models is None else MULTI_MODEL)
    payload, headers = await answer_classify(engine, tenant, body)
    return json_response(payload, headers=headers)


async def answer_classify(
    engine: Engine, tenant: str, body: ClassifyRequest
) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON answer to a whole (not streamed) request, and its headers; raises ApiError."""
    job = await submit(engine, tenant, body)
    try:
        await job.wait()
    finally:
        job.cancel()  # a no-op when done; drops the rows still queued if the client left
    return finished_answer(job, body)


def submit_nowait(
    engine: Engine, tenant: str, body: ClassifyRequest, tokens: Tokenized
) -> Job | MultiJob | None:
    """``submit`` done now, for a request tokenized already: its job, or None where only
    awaiting ``submit`` will do (an adapter still on disk). Raises ApiError as
    ``answer_classify`` does; ``finished_answer`` formats the job once done."""
    texts = list(body.texts)
    try:
        if body.models is not None:
            return engine.submit_many_nowait(
                tenant, list(body.models), texts, tokens=tokens, timeout_s=body.timeout_s
            )
        assert body.model is not None  # parse_classify sets exactly one of the two
        return engine.submit_nowait(
            tenant, body.model, texts, tokens=tokens, timeout_s=body.timeout_s
        )
    except InputError as exc:
        raise from_input_error(exc, body.is_batch) from exc
    except EngineError as exc:
        raise from_engine_error(exc) from exc


def finished_answer(
    job: Job | MultiJob, body: ClassifyRequest
) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON answer of a finished job and its headers; raises ApiError for its error
    (and JobCancelled for a cancelled one: nobody is left to answer)."""
    answer = SINGLE_MODEL if body.models is None else MULTI_MODEL
    try:
        predictions = job.results_now()
    except JobCancelled:
        raise
    except EngineError as exc:
        raise from_engine_error(exc) from exc
    timings = job.timings()
    server_timing = (
        f"queue;dur={timings.queue_s * 1000:.2f}, compute;dur={timings.compute_s * 1000:.2f}"
    )
    return answer.body(job, predictions), {"Server-Timing": server_timing}


async def submit(
    engine: Engine, tenant: str, body: ClassifyRequest, tokens: Tokenized | None = None
) -> Job | MultiJob:
    """Admit the request (its adapters loaded, if need be); raises ApiError. ``tokens``: the
    texts' ids, where a front-end process tokenized them already."""
    texts = list(body.texts)
    options: dict[str, Any] = {
        "truncate": body.truncate,
        "timeout_s": body.timeout_s,
        "tokens": tokens,
    }
    try:
        if body.models is not None:
            return await engine.submit_many(tenant, list(body.models), texts, **options)
        assert body.model is not None  # parse_classify sets exactly one of the two
        return await engine.submit(tenant, body.model, texts, **options)
    except InputError as exc:
        raise from_input_error(exc, body.is_batch) from exc
    except EngineError as exc:
        raise from_engine_error(exc) from exc


async def _stream(
    request: web.Request, job: Job | MultiJob, answer: AnswerFormat
) -> web.StreamResponse:
    """Write one line per prediction as it completes, then a summary (or an error) line.

    The status is sent before the first row runs, so a failure midway can only be told in
    the last line; a stream without a ``done`` or ``error`` line was cut off.
    """
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None  # aiohttp runs every handler in a task
    streams.add(task)
    try:
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        await response.prepare(request)
        async with contextlib.aclosing(_ndjson_lines(job, answer)) as lines:
            async for line in lines:
                await response.write(line)
        await response.write_eof()
        return response
    finally:
        job.cancel()  # after a disconnect or shutdown: the rows not yet run never run
        streams.discard(task)


async def _ndjson_lines(job: Job | MultiJob, answer: AnswerFormat) -> AsyncIterator[bytes]:
    num_tokens = 0
    try:
        async for prediction in job.stream():
            num_tokens += prediction.num_tokens
            yield ndjson_line(answer.item(prediction))
    except EngineError as exc:
        yield ndjson_line(from_engine_error(exc).body())
        return
    except Exception:
        log.exception("stream of request %d failed", job.request_id)
        yield ndjson_line(internal_error().body())
        return
    yield ndjson_line(answer.summary(job, num_tokens))


# request parts ---------------------------------------------------------------------------


def bearer_key(request: web.Request) -> str | None:
    """The key of the request's ``Authorization: Bearer <key>``, or None. Sent twice, it is
    a 400: a front end and the engine behind it could each read a different one."""
    sent = request.headers.getall("Authorization", ())
    if len(sent) > 1:
        raise ApiError(400, INVALID_REQUEST, "send one Authorization header, not several")
    scheme, _, key = (sent[0] if sent else "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class KeyChecker(Protocol):
    def authenticate(self, api_key: str) -> str | None: ...


def authenticate(request: web.Request, engine: KeyChecker) -> str:
    """The tenant of the request's ``Authorization: Bearer <key>``; 401 otherwise."""
    key = bearer_key(request)
    if key is None:
        raise ApiError(
            401,
            AUTHENTICATION,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    tenant = engine.authenticate(key)
    if tenant is None:
        raise ApiError(
            401,
            AUTHENTICATION,
            "invalid API key",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    return tenant


async def read_body(request: web.Request) -> bytes:
    max_bytes = request.app[MAX_BODY_BYTES]
    too_large = ApiError(413, TOO_LARGE, f"request body is larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large  # refuse before reading a byte of it
    try:
        return await request.read()  # the app's client_max_size stops chunked bodies too
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


def parse_body(raw: bytes) -> ClassifyRequest:
    try:
        payload = decode_json(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, INVALID_JSON, f"request body is not valid JSON: {exc}") from None
    try:
        return parse_classify(payload)
    except RequestInvalid as exc:
        raise ApiError(422, INVALID_REQUEST, str(exc), field=exc.field) from None
