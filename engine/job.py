"""A submitted request: its rows' results arrive one by one, in completion order."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer for one input text."""

    index: int  # position of the text in the request
    label: str  # the most probable label
    scores: Mapping[str, float]  # label -> probability, summing to 1
    truncated: bool  # the text was cut to the backbone's maximum length
    num_tokens: int  # tokens the model saw, special tokens included


@dataclass(frozen=True, slots=True)
class JobTimings:
    """Where a request's time went, in seconds (from the engine's monotonic clock)."""

    queue_s: float  # admission to the start of its first step (0 if no row ran)
    compute_s: float  # first step start to last step end, other rows of those steps included
    total_s: float  # admission to now, or to the last step's end once all rows are done


class Job:
    """Handle of one request inside the engine: await it, stream it, or cancel it.

    Invariant: each index is delivered at most once; after ``cancel`` or a failure nothing
    more is delivered.
    """

    def __init__(
        self,
        request_id: int,
        model: str,
        version: int,
        num_inputs: int,
        on_finish: Callable[["Job"], None],
    ) -> None:
        self.request_id = request_id
        self.model = model  # "tenant/name"
        self.version = version
        self.num_inputs = num_inputs
        self._on_finish = on_finish
        self._results: list[Prediction | None] = [None] * num_inputs
        self._num_done = 0
        self._stream: asyncio.Queue[Prediction | BaseException] = asyncio.Queue()
        self._finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finished.add_done_callback(_consume_exception)
        self._admitted_s = time.monotonic()
        self._first_step_s: float | None = None
        self._last_step_s: float | None = None

    @property
    def done(self) -> bool:
        return self._finished.done()

    def record_step(self, started_s: float, ended_s: float) -> None:
        """Note a step that ran some of this job's rows (monotonic seconds)."""
        if self._first_step_s is None:
            self._first_step_s = started_s
        self._last_step_s = ended_s

    def timings(self) -> JobTimings:
        end = self._last_step_s if self._finished.done() and self._last_step_s else time.monotonic()
        first = self._first_step_s
        return JobTimings(
            queue_s=(first - self._admitted_s) if first is not None else 0.0,
            compute_s=(self._last_step_s - first)
            if first is not None and self._last_step_s
            else 0.0,
            total_s=end - self._admitted_s,
        )

    async def results(self) -> list[Prediction]:
        """Every prediction in input order, once all are done (raises the job's error)."""
        await asyncio.shield(self._finished)
        return [r for r in self._results if r is not None]

    async def stream(self) -> AsyncIterator[Prediction]:
        """Predictions as they complete; raises the job's error if it fails midway."""
        for _ in range(self.num_inputs):
            item = await self._stream.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Drop the rows that have not run yet; a no-op once the job is finished."""
        if self._finished.done():
            return
        self._finished.set_exception(asyncio.CancelledError("job cancelled"))
        self._stream.put_nowait(asyncio.CancelledError("job cancelled"))
        self._on_finish(self)

    def deliver(self, prediction: Prediction) -> None:
        if self._finished.done() or self._results[prediction.index] is not None:
            return
        self._results[prediction.index] = prediction
        self._num_done += 1
        self._stream.put_nowait(prediction)
        if self._num_done == self.num_inputs:
            self._finished.set_result(None)
            self._on_finish(self)

    def fail(self, error: BaseException) -> None:
        if self._finished.done():
            return
        self._finished.set_exception(error)
        self._stream.put_nowait(error)
        self._on_finish(self)


def _consume_exception(future: asyncio.Future[None]) -> None:
    """Mark the error as seen so asyncio does not log it when nobody awaited the job."""
    if not future.cancelled():
        future.exception()
