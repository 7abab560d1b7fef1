"""The front ends' link to the engine's process: frames split and joined as bytes arrive."""

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

import server.link as link_module
from server.frontend import EngineLink
from server.link import (
    MAX_FRAME_BYTES,
    Answer,
    Cancel,
    Classify,
    FrameSplitter,
    Hello,
    LinkServer,
    _to_engine,
    decode_answer,
    frame,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The server runs on uvloop, the tests' own loop is asyncio's: both must serve."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 30))


MESSAGES = [Hello(7), Cancel(3), Hello(123456), Cancel(0)]
STREAM = b"".join(frame(message) for message in MESSAGES)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_frames_cut_anywhere_come_out_whole_and_in_order(cut: int) -> None:
    splitter = FrameSplitter()
    payloads = splitter.feed(STREAM[:cut])
    assert splitter.inside_frame == (cut not in _frame_ends())
    payloads += splitter.feed(STREAM[cut:])
    assert [_to_engine.decode(p) for p in payloads] == MESSAGES
    assert not splitter.inside_frame


def _frame_ends() -> set[int]:
    ends, end = set(), 0
    for message in MESSAGES:
        end += len(frame(message))
        ends.add(end)
    return ends


def test_frames_arriving_a_byte_at_a_time_come_out_whole() -> None:
    splitter = FrameSplitter()
    payloads = [p for i in range(len(STREAM)) for p in splitter.feed(STREAM[i : i + 1])]
    assert [_to_engine.decode(p) for p in payloads] == MESSAGES


def test_a_frame_declared_over_the_limit_is_refused_before_it_arrives() -> None:
    with pytest.raises(ConnectionError, match="over"):
        FrameSplitter().feed(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"\x00")


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_engine_end_reads_hellos_cut_mid_frame(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        link = LinkServer(web.Application())
        await link.start(str(tmp_path / "link.sock"))
        reader, writer = await _open(str(tmp_path / "link.sock"))
        data = frame(Hello(41)) + frame(Hello(42))
        for part in (data[:3], data[3:9], data[9:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)
        await asyncio.wait_for(link.wait_ready(2), 5)
        assert link.ready == {41, 42}
        await link.close()  # with the connection still open
        assert await reader.read() == b""  # closed from the engine's end
        writer.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "garbage",
    [struct.pack(">I", 3) + b"\xc1\xc1\xc1", struct.pack(">I", MAX_FRAME_BYTES + 1)],
    ids=["not msgpack", "over the limit"],
)
def test_the_engine_end_closes_a_link_that_sends_garbage(
    loop: str, garbage: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        link = LinkServer(web.Application())
        await link.start(str(tmp_path / "link.sock"))
        reader, writer = await _open(str(tmp_path / "link.sock"))
        writer.write(frame(Hello(5)))
        await asyncio.wait_for(link.wait_ready(1), 5)
        writer.write(garbage)
        assert await reader.read() == b""
        writer.close()
        await link.close()

    with caplog.at_level(logging.ERROR, logger="server.link"):
        _run(loop, main)
    assert "front-end link broken" in caplog.text


def _answer(key: int) -> bytes:
    return frame(Answer(key, 200, b'{"ok": %d}' % key, {"X-Request-ID": f"r{key}"}))


@pytest.mark.parametrize("loop", LOOPS)
def test_the_front_end_gets_each_answer_however_the_bytes_are_cut(
    loop: str, tmp_path: Path
) -> None:
    """A fake engine answers three calls out of order, in chunks that cut frames apart."""

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        splitter, calls = FrameSplitter(), []
        while len(calls) < 4:  # the hello and three calls
            calls += [_to_engine.decode(p) for p in splitter.feed(await reader.read(1 << 16))]
        assert isinstance(calls[0], Hello) and calls[0].pid == os.getpid()
        keys = [call.id for call in calls[1:] if isinstance(call, Classify)]
        data = b"".join(_answer(key) for key in reversed(keys))
        for start in range(0, len(data), 5):
            writer.write(data[start : start + 5])
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(engine, path=str(tmp_path / "link.sock"))
        link = await EngineLink.connect(str(tmp_path / "link.sock"))
        link.hello()
        answers = await asyncio.gather(*(link.call(**_fields(i)) for i in range(3)))
        assert [a.body for a in answers] == [b'{"ok": %d}' % a.id for a in answers]
        assert sorted(a.id for a in answers) == [0, 1, 2]
        await asyncio.wait_for(link.closed.wait(), 5)  # the engine closed the link
        with pytest.raises(ConnectionError, match="closed the link"):
            await link.call(**_fields(3))
        await link.close()
        server.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_calls_waiting_when_the_engine_dies_mid_frame_fail_with_a_connection_error(
    loop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(_answer(0)[:7])  # half an answer, then the process is gone
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(engine, path=str(tmp_path / "link.sock"))
        link = await EngineLink.connect(str(tmp_path / "link.sock"))
        with pytest.raises(ConnectionError, match="closed the link"):
            await link.call(**_fields(0))
        await link.close()
        server.close()

    with caplog.at_level(logging.ERROR, logger="server.frontend"):
        _run(loop, main)
    assert "inside a frame" in caplog.text


def _fields(i: int) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "request_id": f"r{i}",
        "model": "spam",
        "models": None,
        "texts": (f"text {i}",),
        "is_batch": False,
        "truncate": True,
        "timeout_s": None,
        "ids": ((101, 2000 + i, 102),),
        "truncated": (False,),
    }


@pytest.mark.parametrize("loop", LOOPS)
def test_closing_cuts_off_a_front_end_that_stopped_reading(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        link = LinkServer(web.Application())
        await link.start(str(tmp_path / "link.sock"))
        _, writer = await _open(str(tmp_path / "link.sock"))  # never reads its answers
        writer.write(frame(Hello(1)))
        await asyncio.wait_for(link.wait_ready(1), 5)
        (connection,) = link._connections
        for i in range(64):
            connection.out.send(Answer(i, 200, b"x" * 65536, {}))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(link.close(grace_s=0.2), 10)
        assert time.monotonic() - started < 5 and not link._connections
        writer.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_closing_cuts_off_an_engine_that_stopped_reading_and_fails_its_calls(
    loop: str, tmp_path: Path
) -> None:
    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)  # a stuck loop: reads nothing

    async def main() -> None:
        server = await asyncio.start_unix_server(engine, path=str(tmp_path / "link.sock"))
        link = await EngineLink.connect(str(tmp_path / "link.sock"))
        big = {**_fields(0), "texts": ("x" * 65536,)}
        calls = [asyncio.create_task(link.call(**big)) for _ in range(64)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(link.close(grace_s=0.2), 10)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results), results[:3]
        server.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_front_end_that_stops_reading_is_cut_off_past_the_buffer_bound(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its queued answers would otherwise grow without end while the engine keeps serving."""
    monkeypatch.setattr(link_module, "MAX_BUFFERED_BYTES", 1 << 20)
    monkeypatch.setattr(link_module, "STALL_S", 0.1)

    async def main() -> None:
        link = LinkServer(web.Application())
        await link.start(str(tmp_path / "link.sock"))
        reader, writer = await _open(str(tmp_path / "link.sock"))  # never reads, for now
        writer.write(frame(Hello(1)))
        await asyncio.wait_for(link.wait_ready(1), 5)
        (connection,) = link._connections
        for turn in range(100):
            if connection.lost.done():
                break
            for i in range(16):
                connection.out.send(Answer(turn * 16 + i, 200, b"x" * 16384, {}))
            await asyncio.sleep(0.01)
        assert connection.lost.done() and not link._connections
        assert turn * 16 * 16384 < 12 << 20  # cut once stalled past the bound, not at the end
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 16):  # what was sent before the cut, then the end
                pass
        writer.close()
        await link.close()

    with caplog.at_level(logging.ERROR, logger="server.link"):
        _run(loop, main)
    assert "read nothing" in caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_one_answer_far_over_the_bound_reaches_a_front_end_that_reads(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer may be tens of MB (256 inputs x 16 models x every label): no sign of a
    stopped front end, however far it is over the bound."""
    monkeypatch.setattr(link_module, "MAX_BUFFERED_BYTES", 1 << 20)
    monkeypatch.setattr(link_module, "STALL_S", 0.1)

    async def main() -> None:
        link = LinkServer(web.Application())
        await link.start(str(tmp_path / "link.sock"))
        reader, writer = await _open(str(tmp_path / "link.sock"))
        writer.write(frame(Hello(1)))
        await asyncio.wait_for(link.wait_ready(1), 5)
        (connection,) = link._connections
        connection.out.send(Answer(7, 200, b"x" * (8 << 20), {}))
        splitter, payloads = FrameSplitter(), []
        while not payloads:
            await asyncio.sleep(0.005)  # a reader a little slower than the writer
            payloads += splitter.feed(await reader.read(1 << 20))
        assert decode_answer(payloads[0]).id == 7 and not connection.lost.done()
        writer.close()
        await link.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_front_end_never_cuts_its_link_for_requests_piling_up(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests up to a body limit each wait while the engine's loop is busy: no bound."""
    monkeypatch.setattr(link_module, "MAX_BUFFERED_BYTES", 1 << 20)

    async def main() -> None:
        go = asyncio.Event()

        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await go.wait()  # busy, then reads everything
            splitter, calls = FrameSplitter(), []
            while len(calls) < 32:
                calls += [_to_engine.decode(p) for p in splitter.feed(await reader.read(1 << 20))]
            writer.write(b"".join(_answer(call.id) for call in calls))
            await writer.drain()

        server = await asyncio.start_unix_server(engine, path=str(tmp_path / "link.sock"))
        link = await EngineLink.connect(str(tmp_path / "link.sock"))
        big = {**_fields(0), "texts": ("x" * (256 << 10),)}  # 8 MiB in all, over the bound
        calls = [asyncio.create_task(link.call(**big)) for _ in range(32)]
        await asyncio.sleep(0.1)
        assert not link.closed.is_set()
        go.set()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert sorted(a.id for a in answers) == list(range(32))
        await link.close(grace_s=0.5)
        server.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_frame_whose_handling_fails_is_answered_and_the_link_lives_on(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """An exception out of a frame's handling used to end the whole link: every request of
    that front end was cancelled, and the one at fault never answered."""
    failing = [True]
    start = LinkServer._start

    def start_once_failing(self, message, out, running) -> None:
        if failing.pop() if failing else False:
            raise RuntimeError("a slip while starting it")
        start(self, message, out, running)

    monkeypatch.setattr(LinkServer, "_start", start_once_failing)

    def classify(key: int) -> bytes:
        return frame(
            Classify(
                key, "acme", f"r{key}", "m", None, ("hi",), False, True, None, ((1,),), (False,)
            )
        )

    async def main() -> None:
        link = LinkServer(web.Application())  # no engine: a started request fails with a 500
        await link.start(str(tmp_path / "link.sock"))
        reader, writer = await _open(str(tmp_path / "link.sock"))
        writer.write(frame(Hello(5)) + classify(1) + classify(2))
        splitter, answers = FrameSplitter(), []
        while len(answers) < 2:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, "the engine closed the link"
            answers += [decode_answer(payload) for payload in splitter.feed(chunk)]
        assert [(a.id, a.status) for a in answers] == [(1, 500), (2, 500)]
        writer.close()
        await link.close()

    with caplog.at_level(logging.ERROR, logger="server.link"):
        _run(loop, main)
    assert "handling a front end's Classify failed" in caplog.text
    assert "front-end link broken" not in caplog.text
