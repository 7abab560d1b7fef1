"""A job's stream, however late it starts: every prediction once, then the job's error."""

import asyncio
import gc

import pytest

from engine import EngineError, JobCancelled
from engine.job import Job, Prediction


def _job(num_inputs: int, finished: list[Job]) -> Job:
    return Job(1, "acme/m", 1, num_inputs, on_finish=finished.append)


def _prediction(index: int) -> Prediction:
    return Prediction(index, "a", {"a": 1.0}, truncated=False, num_tokens=3)


async def _rest(stream, seen: list[Prediction] | None = None) -> list[Prediction]:
    seen = [] if seen is None else seen
    async for prediction in stream:
        seen.append(prediction)
    return seen


async def test_a_stream_started_late_replays_what_was_delivered_first() -> None:
    finished: list[Job] = []
    job = _job(3, finished)
    job.deliver(_prediction(2))
    stream = job.stream()
    assert (await asyncio.wait_for(anext(stream), 5)).index == 2  # no wait: replayed
    job.deliver(_prediction(0))
    job.deliver(_prediction(0))  # delivered twice: kept once
    job.deliver(_prediction(1))
    assert [p.index for p in await asyncio.wait_for(_rest(stream), 5)] == [0, 1]
    assert [p.index for p in await job.results()] == [0, 1, 2]
    assert finished == [job]


async def test_a_stream_started_after_a_failure_yields_then_raises() -> None:
    job = _job(3, [])
    job.deliver(_prediction(1))
    job.fail(RuntimeError("step failed"))
    seen: list[Prediction] = []
    with pytest.raises(RuntimeError, match="step failed"):
        await asyncio.wait_for(_rest(job.stream(), seen), 5)
    assert [p.index for p in seen] == [1]


async def test_cancelling_ends_a_stream_that_waits() -> None:
    job = _job(2, [])
    waiting = asyncio.create_task(anext(job.stream()))
    await asyncio.sleep(0)  # the stream waits for its first prediction
    job.cancel()
    with pytest.raises(JobCancelled):
        await waiting
    with pytest.raises(JobCancelled):
        await job.results()
    assert not waiting.cancelled()  # the task awaiting it failed, it was not cancelled


async def test_a_failed_job_that_nobody_awaits_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for end in ("fail", "cancel"):
        job = _job(2, [])
        if end == "fail":
            job.fail(RuntimeError("step failed"))
        else:
            job.cancel()
        del job
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_cancelling_inside_a_stream_is_an_engine_error_the_loop_can_catch() -> None:
    """A consumer that has seen enough cancels; asyncio's CancelledError there made its own
    task look cancelled, past every ``except Exception``."""
    job = _job(3, [])
    job.deliver(_prediction(0))
    seen = []

    async def consume() -> str:
        try:
            async for prediction in job.stream():
                seen.append(prediction.index)
                job.cancel()
        except EngineError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ended"

    assert await consume() == "JobCancelled: job cancelled" and seen == [0]
    with pytest.raises(JobCancelled):
        job.results_now()


async def test_a_job_awaited_from_another_loop_is_refused_not_left_hanging() -> None:
    """Its stream's queue and its future belong to the engine's loop, which wakes only its
    own waiters: from another thread's loop, stream() and wait() hung."""
    job = _job(2, [])

    def elsewhere() -> list[str]:
        async def each() -> list[str]:
            said = []
            for attempt in (job.results(), job.wait(), anext(job.stream())):
                try:
                    await asyncio.wait_for(attempt, 5)
                except RuntimeError as exc:
                    said.append(str(exc))
            return said

        return asyncio.run(each())

    said = await asyncio.wait_for(asyncio.to_thread(elsewhere), 10)
    assert len(said) == 3 and all("engine's event loop" in s for s in said), said
    job.deliver(_prediction(0))
    job.deliver(_prediction(1))

    def read_finished() -> list[int]:
        async def read() -> list[int]:
            await job.wait()
            streamed = [p.index async for p in job.stream()]
            return [p.index for p in await job.results()] + streamed

        return asyncio.run(read())

    assert await asyncio.wait_for(asyncio.to_thread(read_finished), 10) == [0, 1, 0, 1]
