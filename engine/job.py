"""A submitted request: its rows' results arrive one by one, in completion order."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from engine.errors import JobCancelled


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


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A model of a multi-model request, resolved once at admission."""

    model: str  # "tenant/name"
    version: int


@dataclass(frozen=True, slots=True)
class ModelPrediction:
    """One model's answer for one input of a multi-model request."""

    model: str  # "tenant/name"
    version: int
    label: str  # the most probable label
    scores: Mapping[str, float]  # label -> probability, summing to 1


@dataclass(frozen=True, slots=True)
class MultiPrediction:
    """Every requested model's answer for one input text."""

    index: int  # position of the text in the request
    results: tuple[ModelPrediction, ...]  # one per requested model, in request order
    truncated: bool  # the text was cut to the backbone's maximum length
    num_tokens: int  # tokens the model saw, special tokens included


class _Indexed(Protocol):
    @property
    def index(self) -> int: ...


ItemT = TypeVar("ItemT", bound=_Indexed)


class BaseJob(Generic[ItemT]):
    """Delivery, streaming, cancellation and timings shared by every kind of job.

    Invariant: each index is delivered at most once; after ``cancel`` or a failure nothing
    more is delivered.
    """

    def __init__(
        self, request_id: int, num_inputs: int, on_finish: Callable[["BaseJob[ItemT]"], None]
    ) -> None:
        self.request_id = request_id
        self.num_inputs = num_inputs
        self._on_finish = on_finish
        self._results: list[ItemT | None] = [None] * num_inputs
        self._num_done = 0
        # one queue per stream(), made by it: most callers await results(), and a queue per
        # job cost 3% of the engine loop (server_profile)
        self._streams: list[asyncio.Queue[ItemT | BaseException]] = []
        self._delivered: list[ItemT] = []  # in completion order, for a stream started late
        self._error: BaseException | None = None
        self._finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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

    async def results(self) -> list[ItemT]:
        """Every prediction in input order, once all are done (raises the job's error)."""
        self._check_loop()
        await asyncio.shield(self._finished)
        return [r for r in self._results if r is not None]

    async def wait(self) -> None:
        """Until the job is done, failed or cancelled; ``results_now`` then tells which."""
        self._check_loop()
        if not self._finished.done():
            await asyncio.wait((self._finished,))

    def results_now(self) -> list[ItemT]:
        """``results()`` of a finished job, without awaiting: raises the job's error, or
        InvalidStateError while it runs."""
        self._finished.result()
        return [r for r in self._results if r is not None]

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the event loop once the job is done, failed or cancelled:
        an answer sent from there needs no task awaiting each job."""
        self._finished.add_done_callback(lambda _: callback())

    async def stream(self) -> AsyncIterator[ItemT]:
        """Predictions as they complete; raises the job's error if it fails midway. Each
        call streams every prediction, those delivered before it started first."""
        self._check_loop()
        queue: asyncio.Queue[ItemT | BaseException] = asyncio.Queue()
        for delivered in self._delivered:
            queue.put_nowait(delivered)
        if self._error is not None:
            queue.put_nowait(self._error)
        self._streams.append(queue)
        for _ in range(self.num_inputs):
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _check_loop(self) -> None:
        """A job is delivered on the engine's event loop: awaited from another while it
        runs, its waiter was woken by nobody (the caller hung, or waited for its own
        timeout). A finished job is read from anywhere, as before."""
        if self._finished.done():
            return
        if asyncio.get_running_loop() is not self._finished.get_loop():
            raise RuntimeError(
                "this job is answered on the engine's event loop; await it there "
                "(asyncio.run_coroutine_threadsafe(job.results(), that_loop))"
            )

    def cancel(self) -> None:
        """Drop the rows that have not run yet; a no-op once the job is finished. Its
        results and streams then raise JobCancelled."""
        if self._finished.done():
            return
        self._set_error(JobCancelled("job cancelled"))
        self._end_stream(JobCancelled("job cancelled"))
        self._on_finish(self)

    def deliver(self, item: ItemT) -> None:
        if self._finished.done() or self._results[item.index] is not None:
            return
        self._results[item.index] = item
        self._num_done += 1
        self._delivered.append(item)
        for queue in self._streams:
            queue.put_nowait(item)
        if self._num_done == self.num_inputs:
            self._finished.set_result(None)
            self._on_finish(self)

    def fail(self, error: BaseException) -> None:
        if self._finished.done():
            return
        self._set_error(error)
        self._end_stream(error)
        self._on_finish(self)

    def _set_error(self, error: BaseException) -> None:
        self._finished.set_exception(error)
        # seen now, so asyncio does not log it when nobody awaits the job: a done callback
        # for this cost every job a trip through the event loop
        self._finished.exception()

    def _end_stream(self, error: BaseException) -> None:
        self._error = error
        for queue in self._streams:
            queue.put_nowait(error)


class Job(BaseJob[Prediction]):
    """Handle of one single-model request inside the engine: await it, stream it, or cancel it."""

    def __init__(
        self,
        request_id: int,
        model: str,
        version: int,
        num_inputs: int,
        on_finish: Callable[["Job"], None],
    ) -> None:
        super().__init__(request_id, num_inputs, on_finish)  # type: ignore[arg-type]
        self.model = model  # "tenant/name"
        self.version = version


class MultiJob(BaseJob[MultiPrediction]):
    """Handle of a multi-model request: one MultiPrediction per input, once every model
    answered it (their answers arrive separately: LoRA rows and shared backbone rows)."""

    def __init__(
        self,
        request_id: int,
        models: Sequence[ModelVersion],
        truncated: Sequence[bool],
        num_tokens: Sequence[int],
        on_finish: Callable[["MultiJob"], None],
    ) -> None:
        super().__init__(request_id, len(num_tokens), on_finish)  # type: ignore[arg-type]
        self.models = tuple(models)  # in request order
        self._truncated = tuple(truncated)
        self._num_tokens = tuple(num_tokens)
        self._partial: list[list[ModelPrediction | None] | None] = [
            [None] * len(self.models) for _ in self._num_tokens
        ]

    def deliver_result(self, index: int, slot: int, result: ModelPrediction) -> None:
        """Model ``slot``'s answer for input ``index``; the input is delivered once all are in."""
        partial = self._partial[index]
        if self.done or partial is None:
            return
        partial[slot] = result
        if any(r is None for r in partial):
            return
        self._partial[index] = None
        self.deliver(
            MultiPrediction(
                index=index,
                results=tuple(r for r in partial if r is not None),
                truncated=self._truncated[index],
                num_tokens=self._num_tokens[index],
            )
        )
