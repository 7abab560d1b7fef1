"""Every error the HTTP API answers with: one JSON shape, and the one table of engine errors.

The body is always ``{"error": {"type": ..., "message": ..., "field": ...}}``; ``field`` is
present only when the error is about one request field (``"model"``, ``"input[2]"``).
"""

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import HttpVersion11, hdrs, web

from engine import (
    AdapterFormatError,
    AdapterIncompatible,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    InputError,
    InputTooLong,
    ModelNotFound,
    TenantBusy,
)
from server.request_ids import request_id
from server.schemas import json_response

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what an overloaded or stopping server asks clients to wait

# error types, one per status class a client may want to branch on
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
AUTHENTICATION = "authentication"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
TOO_LARGE = "too_large"
ADAPTER_INCOMPATIBLE = "adapter_incompatible"
ADAPTER_INVALID = "adapter_invalid"
CONFLICT = "conflict"  # the state forbids it now: a finished job, the version a name serves
OVERLOADED = "overloaded"
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

# (engine error, HTTP status, error type); the first matching row wins, so subclasses go first
_ENGINE_ERRORS: tuple[tuple[type[EngineError], int, str], ...] = (
    (ModelNotFound, 404, NOT_FOUND),
    (InputTooLong, 413, TOO_LARGE),
    (InputError, 422, INVALID_REQUEST),
    (AdapterIncompatible, 409, ADAPTER_INCOMPATIBLE),
    (AdapterFormatError, 409, ADAPTER_INVALID),
    (TenantBusy, 429, RATE_LIMITED),
    (DeadlineExceeded, 504, TIMEOUT),
    (EngineOverloaded, 503, OVERLOADED),
    (EngineClosed, 503, UNAVAILABLE),
    (EngineError, 500, INTERNAL),
)

# aiohttp's own HTTP exceptions (router, body limit) by status
_HTTP_TYPES = {400: INVALID_REQUEST, 404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 413: TOO_LARGE}


def as_text(value: str) -> str:
    """``value`` with any lone surrogate written as its escape (``\\udcff``): encodable."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class ApiError(Exception):
    """An error answer, raised anywhere below a handler and rendered by ``error_middleware``."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        # a header's bytes that are not UTF-8 arrive as lone surrogates, which JSON cannot
        # carry: an answer echoing one (a part's name) failed to encode into a bare 500
        message = as_text(message)
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.field = None if field is None else as_text(field)
        self.headers = dict(headers or {})
        self.close = close  # the connection ends after the answer: its stream is not trusted

    def body(self) -> dict[str, dict[str, str]]:
        error = {"type": self.error_type, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    def response(self) -> web.Response:
        response = json_response(self.body(), status=self.status, headers=self.headers)
        if self.close:
            response.force_close()
        return response


def from_engine_error(exc: EngineError, field: str | None = None) -> ApiError:
    """The HTTP answer for an engine error; ``field`` overrides the engine's field name."""
    status, error_type = next((s, t) for cls, s, t in _ENGINE_ERRORS if isinstance(exc, cls))
    if field is None and isinstance(exc, InputError):
        field = exc.field
    headers = None
    if status in (429, 503):
        retry_after = getattr(exc, "retry_after_s", RETRY_AFTER_S)
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    if status == 500:
        log.error("engine error: %s", exc)
    return ApiError(status, error_type, str(exc), field=field, headers=headers)


def from_input_error(exc: InputError, is_batch: bool) -> ApiError:
    """An engine's refusal of a classify's input, in the request's own terms: the engine
    names every text ``input[i]``, but a request that sent one string knows it as ``input``."""
    error = from_engine_error(exc)
    if not is_batch and exc.field == "input[0]":
        error.field = "input"
        if error.message.startswith("input[0]"):
            error.message = "input" + error.message.removeprefix("input[0]")
    return error


def internal_error() -> ApiError:
    return ApiError(500, INTERNAL, "internal server error")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (no route, wrong method...) in the API's error shape."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    error_type = _HTTP_TYPES.get(exc.status, INVALID_REQUEST if exc.status < 500 else INTERNAL)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
    elif isinstance(exc, web.HTTPNotFound):
        message = f"no route for {request.method} {request.path}"
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        message = exc.text or exc.reason  # aiohttp's names the limit in bytes
    else:
        message = exc.reason
    return ApiError(exc.status, error_type, message, headers=headers)


def _unreadable_body(request: web.Request, exc: web.RequestPayloadError) -> web.Response:
    """A 400 that closes the connection: past a body that failed to decode, the stream's next
    bytes cannot be trusted to start a request, and aiohttp would otherwise read on in it."""
    request.content.feed_eof()  # no lingering read of the rest (it re-raises the error)
    reason = getattr(exc.__cause__, "message", None) or str(exc)
    message = f"request body could not be read: {reason}"
    return ApiError(400, INVALID_REQUEST, message, close=True).response()


# the codings served: aiohttp decodes one of them before the handler reads. It would decode
# br and zstd too where their libraries happen to be installed, on the event loop, so those
# are refused here (without the libraries aiohttp refuses them first, in plain text)
_DECODED_CODINGS = frozenset(["identity", "gzip", "deflate"])


def _check_content_coding(request: web.Request) -> None:
    """Refuse a body in a coding aiohttp left undecoded (an unknown one, or several stacked),
    which would otherwise be read as if it were plain. An empty header and ``identity`` (once
    or more) mean plain."""
    codings = request.headers.getall(hdrs.CONTENT_ENCODING, ())
    named = [c.strip().lower() for value in codings for c in value.split(",")]
    if all(c in ("", "identity") for c in named):
        return
    if len(codings) == 1 and codings[0].strip().lower() in _DECODED_CODINGS:
        return
    sent = ", ".join(codings)
    message = f"Content-Encoding {sent!r} is not supported: send the body as gzip, deflate or plain"
    headers = {"Accept-Encoding": "gzip, deflate"}  # RFC 7694: the codings a request may use
    raise ApiError(415, INVALID_REQUEST, message, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


# called with each request an ``Expect`` handler refuses, which no middleware sees: the
# metrics (or a front end's link to them) count it there
EXPECT_REFUSED = web.AppKey("expect_refused", Callable[[web.Request, int], None])


def expect_within(
    max_bytes: Callable[[web.Request], int], what: str, field: str | None = None
) -> ExpectHandler:
    """A route's ``Expect: 100-continue`` answer: a body whose Content-Length is past the
    cap gets its 413 before the client sends it (curl waits so for uploads over 1 MB), not
    after. Runs ahead of the middlewares, so it renders its own JSON."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        limit, length = max_bytes(request), request.content_length
        if length is not None and length > limit:
            message = f"{what} is larger than {limit} bytes"
            return _refused(request, ApiError(413, TOO_LARGE, message, field=field, close=True))
        expectation = request.headers.get(hdrs.EXPECT, "")
        if request.version != HttpVersion11:  # RFC 9110: an HTTP/1.0 expectation is ignored
            return None
        if expectation.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own: the answer's size starts here
            return None
        message = f"unsupported Expect header {expectation[:80]!r}: only 100-continue"
        return _refused(request, ApiError(417, INVALID_REQUEST, message, close=True))

    return expect


def _refused(request: web.Request, error: ApiError) -> web.Response:
    count = request.app.get(EXPECT_REFUSED)
    if count is not None:
        count(request, error.status)
    return error.response()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as the JSON error body; log what nobody anticipated."""
    try:
        if request.body_exists:
            _check_content_coding(request)
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc).response()
    except EngineError as exc:
        return from_engine_error(exc).response()
    except web.RequestPayloadError as exc:  # a body aiohttp could not decode (bad gzip...)
        return _unreadable_body(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception(
            "unhandled error in %s %s (request %s)",
            request.method,
            request.path,
            request_id(request),
        )
        return internal_error().response()
