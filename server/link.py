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
from typing import Any, Protocol

import msgspec
from aiohttp import web

from engine import Job, MultiJob, Tokenized
from server.errors import ApiError, internal_error
from server.metrics import CLIENT_CLOSED, METRICS
from server.routes import ENGINE, finished_answer, submit, submit_nowait
from server.schemas import ClassifyRequest, encode

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30  # a request's texts and ids: the body limit bounds them well below


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


class Answer(msgspec.Struct, array_like=True):
    """The HTTP answer to one ``Classify``: written out by the front end as it is."""

    id: int
    status: int
    body: bytes
    headers: dict[str, str]


ToEngine = Hello | Classify | Cancel
_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_to_front = msgspec.msgpack.Decoder(Answer)


def frame(message: Any) -> bytes:
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or None at a clean end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("link closed inside a frame header") from None
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"link frame of {size} bytes is over {MAX_FRAME_BYTES}")
    return await reader.readexactly(size)


def decode_answer(payload: bytes) -> Answer:
    return _to_front.decode(payload)


class FrameWriter:
    """Frames sent in one turn of the event loop leave in one write, one system call: a step
    answers many requests at once, and a busy front end hands over several."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def send(self, message: Any) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame(message))

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._writer.is_closing():
            self._writer.write(b"".join(pending))


class LinkServer:
    """The engine's end: serves every front end's connection on ``path``."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._server: asyncio.Server | None = None
        self.ready: set[int] = set()  # pids of the front ends that said hello
        self.num_answered = 0  # classify requests answered over the link
        self._hello = asyncio.Event()
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=path)

    async def wait_ready(self, count: int) -> None:
        while len(self.ready) < count:
            self._hello.clear()
            await self._hello.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._connections.values():
            writer.close()  # its reader ends as at a front end's own close
        if self._connections:
            await asyncio.wait(list(self._connections))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = asyncio.current_task()
        assert connection is not None
        self._connections[connection] = writer
        running: dict[int, _Cancellable] = {}  # a job, or the task that awaits its admission
        out = FrameWriter(writer)
        try:
            while (payload := await read_frame(reader)) is not None:
                message = _to_engine.decode(payload)
                if isinstance(message, Classify):
                    self._start(message, out, running)
                elif isinstance(message, Cancel):
                    if (handle := running.get(message.id)) is not None:
                        handle.cancel()
                else:
                    self.ready.add(message.pid)
                    self._hello.set()
        except (ConnectionError, msgspec.DecodeError) as exc:
            log.error("front-end link broken: %s", exc)
        finally:
            for handle in list(running.values()):
                handle.cancel()
            out.close()
            self._connections.pop(connection, None)

    def _start(
        self, message: Classify, out: FrameWriter, running: dict[int, "_Cancellable"]
    ) -> None:
        """Queue the request now and answer from its job's callback; only a request that must
        wait to be admitted (an adapter still on disk) gets a task. Making the task
        alone was 5% of the engine loop behind the front ends (server_profile)."""
        started = time.perf_counter()
        body, tokens = _request(message)
        try:
            job = submit_nowait(self._app[ENGINE], message.tenant, body, tokens)
        except Exception as exc:
            self._reply(message, out, *_error_answer(message, exc), started)
            return
        if job is None:
            admitting = self._admit(message, body, tokens, out, started, running)
            running[message.id] = asyncio.create_task(admitting)
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
        except asyncio.CancelledError:  # the client left
            running.pop(message.id, None)
            self._observe(CLIENT_CLOSED, started)
            raise
        except Exception as exc:
            running.pop(message.id, None)
            self._reply(message, out, *_error_answer(message, exc), started)
            return
        self._follow(message, body, job, out, started, running)

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
            except asyncio.CancelledError:  # the client left
                self._observe(CLIENT_CLOSED, started)
                return
            except Exception as exc:
                self._reply(message, out, *_error_answer(message, exc), started)
                return
            self._reply(message, out, 200, encode(payload), headers, started)

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
            state.request_seconds.labels("POST", "/v1/classify", str(status)).observe(
                time.perf_counter() - started
            )


class _Cancellable(Protocol):
    def cancel(self) -> Any: ...


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
