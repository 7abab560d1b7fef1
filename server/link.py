"""The link between front-end processes and the engine's process: ``graft serve --workers``.

Front ends do what needs no engine (HTTP, authentication, the body's checks, tokenizing) and
send each classify request here as token ids, over a unix socket in a private directory.
Frames are a 4-byte length and a msgpack message (msgspec). The engine's process admits,
runs and formats the answer with the routes' own code, so the bytes a client gets are those
one process would send; the front end only copies them out.
"""

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any, Protocol, cast

import msgspec
from aiohttp import web

from engine import Job, JobCancelled, MultiJob, Tokenized
from server.errors import ApiError, internal_error
from server.metrics import CLIENT_CLOSED, METRICS
from server.routes import ENGINE, finished_answer, submit, submit_nowait
from server.schemas import ClassifyRequest, encode

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30  # a request's texts and ids: the body limit bounds them well below
# closing, how long a peer has to read what is queued for it before the link is cut
CLOSE_GRACE_S = 2.0
# answers that may wait for a front end to read them (about 200,000 of a few hundred bytes),
# and how long past that it may read nothing before the engine cuts it off
MAX_BUFFERED_BYTES = 64 << 20
STALL_S = 5.0


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A front end listens: it sends this once, first."""

    pid: int


class Classify(msgspec.Struct, tag="classify", array_like=True):
    """One checked, authenticated, tokenized ``POST /v1/classify`` (not a stream)."""

    id: int  # the front end's, unique on its connection
    tenant: str
    request_id: str  # X-Request-ID, for the engine's log lines
    model: str | None
    models: tuple[str, ...] | None
    texts: tuple[str, ...]
    is_batch: bool
    truncate: bool
    timeout_s: float | None
    ids: tuple[tuple[int, ...], ...]
    truncated: tuple[bool, ...]


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client went away: drop the request's rows that have not run."""

    id: int


class Refused(msgspec.Struct, tag="refused", array_like=True):
    """A classify the front end answered itself (401, 413, 422...), for the engine's
    ``/metrics``, which would otherwise count only the requests handed over."""

    status: int
    seconds: float
    route: str = "/v1/classify"  # or "/v1/train": the routes a front end refuses itself


class Answer(msgspec.Struct, array_like=True):
    """The HTTP answer to one ``Classify``: written out by the front end as it is."""

    id: int
    status: int
    body: bytes
    headers: dict[str, str]


ToEngine = Hello | Classify | Cancel | Refused
_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_front = msgspec.msgpack.Decoder(Answer)


def frame(message: Any) -> bytes:
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


def decode_answer(payload: bytes) -> Answer:
    return _to_front.decode(payload)


class FrameSplitter:
    """Whole frames out of a byte stream's chunks, as they arrive: a busy front end's chunk
    holds many frames, and reading each through a stream reader's two awaits (and its
    buffer's wake-ups) was a tenth of the engine loop's time behind the front ends
    (``benchmarks.server_profile --hidden 64 --layers 2 --server-workers 1 --gil``)."""

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of a frame whose end has not arrived

    def feed(self, data: bytes) -> list[bytes | bytearray]:
        """The payloads of the frames that ``data`` completes, in order; ConnectionError
        for a frame declared over MAX_FRAME_BYTES."""
        if self._partial:
            self._partial += data
            buffer: bytes | bytearray = self._partial
        else:
            buffer = data
        payloads: list[bytes | bytearray] = []
        offset, end = 0, len(buffer)
        while end - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > MAX_FRAME_BYTES:
                raise ConnectionError(f"link frame of {size} bytes is over {MAX_FRAME_BYTES}")
            start = offset + _LENGTH.size
            if end - start < size:
                break
            payloads.append(buffer[start : start + size])  # a copy, bytes or bytearray
            offset = start + size
        if buffer is self._partial:
            del self._partial[:offset]
        else:
            self._partial += data[offset:]
        return payloads

    @property
    def inside_frame(self) -> bool:
        return bool(self._partial)


class FrameWriter:
    """Frames sent in one turn of the event loop leave in one write, one system call: a step
    answers many requests at once, and a busy front end hands over several.

    With ``max_buffered``, a peer that has read nothing for ``STALL_S`` while more than that
    many bytes wait for it is cut off, and what waits on the link fails as when the peer
    dies. A big queue alone is no sign: one answer may be tens of MB (256 inputs, 16 models,
    every label's score), and a reading peer takes it in a moment. The engine bounds its
    answers so (a stopped front end would otherwise hold them without end); a front end does
    not bound its requests, which are up to a body limit each and legitimately pile up while
    the engine's loop is busy."""

    def __init__(self, transport: asyncio.WriteTransport, max_buffered: int | None = None) -> None:
        self._transport = transport
        self._max_buffered = max_buffered
        self._pending: list[bytes] = []
        self._written = 0  # bytes handed to the transport
        self._sent = 0  # of those, what had left its buffer at the last check
        self._progress_s = time.monotonic()  # when the peer last read, as far as we know

    def send(self, message: Any) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame(message))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._transport.is_closing():
            return
        data = b"".join(pending)
        self._transport.write(data)
        self._written += len(data)
        if self._max_buffered is not None:
            self._check_progress()

    def _check_progress(self) -> None:
        assert self._max_buffered is not None
        queued = self._transport.get_write_buffer_size()
        sent, now = self._written - queued, time.monotonic()
        if queued <= self._max_buffered or sent != self._sent:
            self._sent, self._progress_s = sent, now
        elif now - self._progress_s > STALL_S:
            log.error(
                "link peer read nothing for %.1f s with %d bytes queued: cutting it off",
                now - self._progress_s,
                queued,
            )
            self._transport.abort()


class LinkServer:
    """The engine's end: serves every front end's connection on ``path``."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._server: asyncio.AbstractServer | None = None
        self.ready: set[int] = set()  # pids of the front ends that said hello
        self.num_answered = 0  # classify requests answered over the link
        self._hello = asyncio.Event()
        self._connections: set[_Connection] = set()

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path=path)

    async def wait_ready(self, count: int) -> None:
        while len(self.ready) < count:
            self._hello.clear()
            await self._hello.wait()

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop serving and close every connection once what is queued for it is sent; a
        front end that does not read it within ``grace_s`` is cut off."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()  # as at a front end's own close
        if not connections:
            return
        _, stuck = await asyncio.wait([c.lost for c in connections], timeout=grace_s)
        if stuck:
            for connection in connections:
                connection.abort()
            await asyncio.wait(stuck)

    def _receive(self, message: Any, connection: "_Connection") -> None:
        if isinstance(message, Classify):
            self._start(message, connection.out, connection.running)
        elif isinstance(message, Cancel):
            if (handle := connection.running.get(message.id)) is not None:
                handle.cancel()
        elif isinstance(message, Refused):
            if (state := self._app.get(METRICS)) is not None:
                state.observe_request("POST", message.route, message.status, message.seconds)
        else:
            self.ready.add(message.pid)
            self._hello.set()

    def _failed(self, message: Any, out: FrameWriter, exc: Exception) -> None:
        """A frame whose handling raised: logged, and a classify answered a 500, so that
        neither the front end's other requests (the link) nor its caller are lost."""
        log.error("handling a front end's %s failed", type(message).__name__, exc_info=exc)
        if isinstance(message, Classify):
            self._reply(message, out, *_error_answer(message, exc), time.perf_counter())

    def _start(
        self, message: Classify, out: FrameWriter, running: dict[int, "_Cancellable"]
    ) -> None:
        """Queue the request now and answer from its job's callback; only a request that must
        wait to be admitted (an adapter still on disk) gets a task. Making the task
        alone was 5% of the engine loop behind the front ends (server_profile)."""
        started = time.perf_counter()
        try:
            body, tokens = _request(message)
            job = submit_nowait(self._app[ENGINE], message.tenant, body, tokens)
        except Exception as exc:
            self._reply(message, out, *_error_answer(message, exc), started)
            return
        if job is None:
            admitting = asyncio.create_task(
                self._admit(message, body, tokens, out, started, running)
            )
            running[message.id] = admitting
            # a Cancel read in the same chunk cancels the task before its body runs, so its
            # end is counted here, not in an except clause the body may never reach
            admitting.add_done_callback(
                lambda task: self._admit_cancelled(task, message.id, started, running)
            )
        else:
            self._follow(message, body, job, out, started, running)

    async def _admit(
        self,
        message: Classify,
        body: ClassifyRequest,
        tokens: Tokenized,
        out: FrameWriter,
        started: float,
        running: dict[int, "_Cancellable"],
    ) -> None:
        """Wait for the adapters' load and admission, then answer as a request queued at once."""
        try:
            job = await submit(self._app[ENGINE], message.tenant, body, tokens)
        except Exception as exc:
            running.pop(message.id, None)
            self._reply(message, out, *_error_answer(message, exc), started)
            return
        self._follow(message, body, job, out, started, running)

    def _admit_cancelled(
        self, task: asyncio.Task, request_id: int, started: float, running: dict
    ) -> None:
        if task.cancelled():  # the client left (a Cancel frame, or the link closed)
            running.pop(request_id, None)
            self._observe(CLIENT_CLOSED, started)

    def _follow(
        self,
        message: Classify,
        body: ClassifyRequest,
        job: Job | MultiJob,
        out: FrameWriter,
        started: float,
        running: dict[int, "_Cancellable"],
    ) -> None:
        """Answer from the job's done callback; a Cancel frame or a closed link cancels it."""
        running[message.id] = job

        def answered() -> None:
            running.pop(message.id, None)
            try:
                payload, headers = finished_answer(job, body)
                answer = encode(payload)  # a callback's exception would only be logged
            except JobCancelled:  # the client left
                self._observe(CLIENT_CLOSED, started)
                return
            except Exception as exc:
                self._reply(message, out, *_error_answer(message, exc), started)
                return
            self._reply(message, out, 200, answer, headers, started)

        job.add_done_callback(answered)

    def _reply(
        self,
        message: Classify,
        out: FrameWriter,
        status: int,
        body: bytes,
        headers: dict[str, str],
        started: float,
    ) -> None:
        out.send(Answer(message.id, status, body, headers))
        self.num_answered += 1
        self._observe(status, started)

    def _observe(self, status: int, started: float) -> None:
        state = self._app.get(METRICS)
        if state is not None:  # counted as the engine's app counts its own routes
            state.observe_request("POST", "/v1/classify", status, time.perf_counter() - started)


class _Cancellable(Protocol):
    def cancel(self) -> Any: ...


class _Connection(asyncio.Protocol):
    """One front end's connection: frames are decoded and handled as their bytes arrive,
    in the turn that reads them. The requests it started are cancelled when it closes."""

    def __init__(self, server: LinkServer) -> None:
        self._server = server
        self._frames = FrameSplitter()
        self._transport: asyncio.Transport | None = None
        self.running: dict[int, _Cancellable] = {}  # a job, or the task awaiting admission
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.out: FrameWriter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here
        self._transport = cast(asyncio.Transport, transport)
        self.out = FrameWriter(self._transport, max_buffered=MAX_BUFFERED_BYTES)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._frames.feed(data):
                message = _to_engine.decode(payload)
                try:
                    self._server._receive(message, self)
                except (ConnectionError, msgspec.DecodeError):
                    raise
                except Exception as exc:  # that frame fails alone, not the whole link
                    self._server._failed(message, self.out, exc)
        except (ConnectionError, msgspec.DecodeError) as exc:
            log.error("front-end link broken: %s", exc)
            self.close()

    def eof_received(self) -> bool:
        if self._frames.inside_frame:
            log.error("front-end link broken: link closed inside a frame")
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in list(self.running.values()):
            handle.cancel()
        self.running.clear()
        self._server._connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.out.close()

    def abort(self) -> None:
        """Close now, dropping what the front end has not read."""
        if self._transport is not None:
            self._transport.abort()


def _request(message: Classify) -> tuple[ClassifyRequest, Tokenized]:
    body = ClassifyRequest(
        model=message.model,
        models=message.models,
        texts=message.texts,
        is_batch=message.is_batch,
        stream=False,
        truncate=message.truncate,
        timeout_s=message.timeout_s,
    )
    return body, Tokenized(ids=message.ids, truncated=message.truncated)


def _error_answer(message: Classify, exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    """A request's refusal or failure, as the routes would answer it."""
    if isinstance(exc, ApiError):
        return exc.status, encode(exc.body()), exc.headers
    log.error("request %s failed", message.request_id, exc_info=exc)
    error = internal_error()
    return error.status, encode(error.body()), error.headers


@contextlib.asynccontextmanager
async def link_server(app: web.Application, path: str):
    server = LinkServer(app)
    await server.start(path)
    try:
        yield server
    finally:
        await server.close()
