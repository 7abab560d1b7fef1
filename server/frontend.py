"""A front-end process of ``graft serve --workers N``: the HTTP edge, without the model.

One process's event loop bounded the server on a GPU (RESULTS: HTTP at 0.49x the embedded
engine), and most of its time went to work that needs no engine: HTTP parsing and writing,
authentication, the body's checks, tokenizing. Each front end does that work on the shared
port (SO_REUSEPORT spreads connections over them) and hands ``POST /v1/classify`` to the
engine's process as token ids over the link (server/link.py). Every other route, and streams,
go to the engine's own app on a private unix socket, unchanged.

Started by ``server.workers``: ``python -m server.frontend CONFIG_JSON``.
"""

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict
from transformers import AutoTokenizer
from yarl import URL

from engine import InputError, TextEncoder, tokenize_request
from registry import Registry
from server.errors import (
    EXPECT_REFUSED,
    RETRY_AFTER_S,
    UNAVAILABLE,
    ApiError,
    Handler,
    error_middleware,
    expect_within,
    from_input_error,
)
from server.link import (
    CLOSE_GRACE_S,
    Answer,
    Cancel,
    Classify,
    FrameSplitter,
    FrameWriter,
    Hello,
    Refused,
    decode_answer,
)
from server.metrics import CLIENT_CLOSED
from server.quiet_log import quiet_malformed_requests
from server.request_ids import REQUEST_ID_HEADER, add_request_id, request_id
from server.routes import EXPECT_BODY, MAX_BODY_BYTES, authenticate, parse_body, read_body
from server.train_upload import upload_too_large

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0  # how long unfinished (non-stream) requests may take at shutdown
# headers of one connection, not of the message: a proxy never forwards them
_HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ]
)
# request headers that no longer hold once aiohttp has decoded the body (gzip, deflate):
# the proxy forwards the decoded bytes
_DECODED = frozenset(["content-encoding"])
_HANDED_OVER = web.RequestKey("handed_over", bool)  # answered in the engine's process
_ENGINE_ORIGIN = "http://graft-engine"  # any host: the connector dials the unix socket


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
    host: str
    port: int
    link_path: str  # the engine's link (server/link.py)
    engine_path: str  # the engine's own app, for every other route
    registry_dir: str
    backbone_dir: str  # its tokenizer
    max_input_tokens: int
    max_inputs: int
    max_body_bytes: int
    max_upload_bytes: int | None = None  # POST /v1/train's cap; None: the engine trains none
    log_level: int = logging.WARNING  # the engine's process's


class EngineLink(asyncio.Protocol):
    """This process's connection to the engine's: one call per classify request. Answers
    are decoded as their bytes arrive (server/link.py's FrameSplitter says why)."""

    def __init__(self) -> None:
        self._frames = FrameSplitter()
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self.closed = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._out: FrameWriter

    @classmethod
    async def connect(cls, path: str) -> "EngineLink":
        _, link = await asyncio.get_running_loop().create_unix_connection(cls, path)
        return link

    def hello(self) -> None:
        self._out.send(Hello(os.getpid()))

    def refused(self, status: int, seconds: float, route: str = "/v1/classify") -> None:
        """Tell the engine's ``/metrics`` of a request to ``route`` answered here."""
        if not self.closed.is_set():
            self._out.send(Refused(status, seconds, route))

    async def call(self, **fields: Any) -> Answer:
        if self.closed.is_set():
            raise ConnectionError("the engine's process closed the link")
        key = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[key] = answer
        try:  # a frame that cannot be sent leaves no waiter behind
            self._out.send(Classify(id=key, **fields))
            return await answer
        except asyncio.CancelledError:
            if not self.closed.is_set():
                self._out.send(Cancel(key))
            raise
        finally:
            self._waiting.pop(key, None)

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Close once what is queued is sent; an engine that does not read it within
        ``grace_s`` is cut off, and the calls still waiting fail with ConnectionError."""
        if not self.closed.is_set():
            self._out.close()
        try:
            await asyncio.wait_for(self.closed.wait(), grace_s)
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            await self.closed.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here
        self._transport = cast(asyncio.Transport, transport)
        self._out = FrameWriter(self._transport)

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._frames.feed(data):
                answer = decode_answer(payload)
                waiting = self._waiting.get(answer.id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except (ConnectionError, msgspec.DecodeError) as exc:
            log.error("engine link broken: %s", exc)
            if self._transport is not None:
                self._transport.close()

    def eof_received(self) -> bool:
        if self._frames.inside_frame:
            log.error("engine link broken: link closed inside a frame")
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(ConnectionError("the engine's process closed the link"))


@dataclasses.dataclass
class Front:
    config: FrontendConfig
    registry: Registry
    encoder: TextEncoder
    link: EngineLink
    session: aiohttp.ClientSession


FRONT = web.AppKey("front", Front)


def create_frontend_app(front: Front) -> web.Application:
    app = web.Application(
        client_max_size=front.config.max_body_bytes,
        middlewares=[_count_refusals, error_middleware],
    )
    app[FRONT] = front
    app[MAX_BODY_BYTES] = front.config.max_body_bytes
    app[EXPECT_REFUSED] = _count_expect_refusal
    app.router.add_post("/v1/classify", classify, expect_handler=EXPECT_BODY)
    if front.config.max_upload_bytes is not None:  # refused here, before the upload is sent
        app.router.add_post("/v1/train", proxy_upload, expect_handler=_EXPECT_UPLOAD)
    app.router.add_route("*", "/{tail:.*}", proxy, expect_handler=_EXPECT_ANY)
    app.on_response_prepare.append(add_request_id)
    quiet_malformed_requests()
    return app


# the engine's own Expect answers, given here: proxied, a 413 came after the whole upload
_EXPECT_UPLOAD = expect_within(
    lambda request: request.app[FRONT].config.max_upload_bytes or 0, "upload", field="file"
)
_EXPECT_ANY = expect_within(lambda request: sys.maxsize, "request body")  # JSON 417s
_COUNTED_HERE = frozenset(["/v1/classify", "/v1/train"])  # POSTs a front end may refuse


@web.middleware
async def _count_refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A classify or upload refused here is counted in the engine's ``/metrics`` as it would
    be were it served there: the requests handed over (or proxied) the engine counts."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):  # the client left first
        _count_here(request, CLIENT_CLOSED, started)
        raise
    _count_here(request, response.status, started)
    return response


def _count_here(request: web.Request, status: int, started: float) -> None:
    if request.get(_HANDED_OVER) is None and _is_counted_here(request):
        elapsed = time.perf_counter() - started
        request.app[FRONT].link.refused(status, elapsed, request.path)


def _count_expect_refusal(request: web.Request, status: int) -> None:
    if _is_counted_here(request):
        request.app[FRONT].link.refused(status, 0.0, request.path)


def _is_counted_here(request: web.Request) -> bool:
    return request.method == "POST" and request.path in _COUNTED_HERE


async def proxy_upload(request: web.Request) -> web.StreamResponse:
    """``POST /v1/train``, proxied once its declared size is within the cap: the proxy sends
    the body on chunked, so the engine could refuse it only once it had read the cap."""
    cap = request.app[FRONT].config.max_upload_bytes
    if cap is not None and request.content_length is not None and request.content_length > cap:
        raise upload_too_large(cap)
    return await proxy(request)


async def classify(request: web.Request) -> web.StreamResponse:
    """Check and tokenize here; admit, run and format in the engine's process."""
    front = request.app[FRONT]
    tenant = authenticate(request, front.registry)
    raw = await read_body(request)
    body = parse_body(raw)
    if body.stream:
        return await proxy(request, raw)
    try:
        tokens = await tokenize_request(
            front.encoder,
            body.texts,
            max_tokens=front.config.max_input_tokens,
            truncate=body.truncate,
            max_inputs=front.config.max_inputs,
            executor=None,
        )
    except InputError as exc:
        raise from_input_error(exc, body.is_batch) from exc
    request[_HANDED_OVER] = True
    try:
        answer = await front.link.call(
            tenant=tenant,
            request_id=request_id(request),
            model=body.model,
            models=body.models,
            texts=body.texts,
            is_batch=body.is_batch,
            truncate=body.truncate,
            timeout_s=body.timeout_s,
            ids=tokens.ids,
            truncated=tokens.truncated,
        )
    except ConnectionError:
        raise _unavailable() from None
    return web.Response(
        status=answer.status,
        body=answer.body,
        headers=answer.headers,
        content_type="application/json",
    )


async def proxy(request: web.Request, body: bytes | None = None) -> web.StreamResponse:
    """The request as the engine's own app answers it, streamed back as it comes."""
    request[_HANDED_OVER] = True  # counted there, whatever the answer
    session = request.app[FRONT].session
    headers = CIMultiDict(  # a header sent twice is forwarded twice, as the client sent it
        (k, v)
        for k, v in request.headers.items()
        if k.lower() not in _HOP_BY_HOP and k.lower() not in _DECODED
    )
    headers[REQUEST_ID_HEADER] = request_id(request)  # one id in both processes' logs
    unreadable: list[web.RequestPayloadError] = []
    data: Any = body
    if body is None and request.body_exists:
        data = _read_through(request, unreadable)
    url = URL(_ENGINE_ORIGIN + request.rel_url.raw_path_qs, encoded=True)
    response = web.StreamResponse()
    try:
        async with session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            response.set_status(upstream.status, upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            if "close" in upstream.headers.get("Connection", "").lower():
                response.force_close()  # the engine no longer trusts the client's stream
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except aiohttp.ClientError:
        if unreadable:  # the client's body, not the engine, failed: the middleware's 400
            raise unreadable[0]  # noqa: B904 (keeps its cause: the decoding error)
        if not response.prepared:
            raise _unavailable() from None
        log.warning("engine's answer to %s %s cut off", request.method, request.path)
        if request.transport is not None:  # no final chunk: the client sees the body cut off
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def _read_through(
    request: web.Request, unreadable: list[web.RequestPayloadError]
) -> AsyncIterator[bytes]:
    """The request's body as it arrives, noting a body that cannot be decoded (bad gzip)."""
    try:
        async for chunk in request.content.iter_any():
            yield chunk
    except web.RequestPayloadError as exc:
        unreadable.append(exc)
        raise


def _unavailable() -> ApiError:
    message = "the engine's process is not reachable"
    return ApiError(503, UNAVAILABLE, message, headers={"Retry-After": str(RETRY_AFTER_S)})


async def open_front(config: FrontendConfig) -> Front:
    registry = Registry(config.registry_dir)
    tokenizer = AutoTokenizer.from_pretrained(config.backbone_dir, local_files_only=True)
    link = await EngineLink.connect(config.link_path)
    session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=config.engine_path, limit=0),
        timeout=aiohttp.ClientTimeout(total=None),  # streams and uploads take their time
        auto_decompress=False,  # bodies pass through as the engine's app sent them
    )
    return Front(config, registry, TextEncoder(tokenizer), link, session)


async def serve_frontend(config: FrontendConfig) -> None:
    """Serve until SIGTERM/SIGINT or the engine's process goes; then finish what is open."""
    front = await open_front(config)
    runner = web.AppRunner(
        create_frontend_app(front), handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    stop = asyncio.Event()
    # only the engine's process stops a front end (SIGTERM), after which it still answers
    # what is open; Ctrl-C reaches the whole process group, and the engine's process handles it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await web.TCPSite(runner, config.host, config.port, reuse_port=True).start()
        front.link.hello()
        ends = [asyncio.create_task(stop.wait()), asyncio.create_task(front.link.closed.wait())]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        for task in ends:
            task.cancel()
    finally:
        await runner.cleanup()
        await front.session.close()
        await front.link.close()
        front.registry.close()


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = FrontendConfig(**json.loads(argv[0]))
    logging.basicConfig(
        level=config.log_level, format=f"%(levelname)s front-end {os.getpid()}: %(message)s"
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_frontend(config))
    else:
        uvloop.run(serve_frontend(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
