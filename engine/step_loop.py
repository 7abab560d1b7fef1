"""The continuous-batching step loop, and short steps inside a long one.

Plans on the event loop, runs each step on the single model thread, delivers outputs back.

A step cannot be split by rows (one 512-token row is already a whole step on a CPU), but an
encoder can pause between two of its blocks. While a long step runs, the loop plans a short
batch of other tenants' rows (``Scheduler.plan_between``) and leaves it in an
``InterludeSlot``; the backbone's pause hook (``StepLora.between_layers``, before every
attention and feed-forward block) takes it and runs it as a complete nested step, then the
long step resumes where it paused. So a neighbour waits one block, not one step. At most one
interlude waits at a time, and none nests inside another.

With ``plan_ahead`` (on by default on CUDA), once as many rows wait as the running step holds,
the loop plans the next step and queues it on the model thread behind the running one: it
starts as that one ends, while the event loop delivers the last outputs, instead of after.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.errors import DeadlineExceeded, EngineError
from engine.interludes import InterludeSlot, interlude_budget, pages_left
from engine.pending import Pending, by_request
from engine.runner import BACKBONE_KEY, RowOutput
from engine.stack import ServingStack
from scheduler import Batch, Row, Scheduler

log = logging.getLogger(__name__)

# interludes run back to back at one pause point before the long step goes on
_MAX_INTERLUDES_PER_PAUSE = 4
# how long the loop waits before planning again after a failure of its own
_RETRY_S = 0.05
# the least time between two expiries by the deadline timer, which scans every waiting row
# (0.5 ms for 8,192 rows): distinct deadlines by the thousand a second would take the loop
_DEADLINE_GAP_S = 0.01


@dataclass(slots=True)
class Step:
    """One batch: planned on the event loop, run on the model thread, delivered back."""

    batch: Batch
    rows: list[tuple[Pending | None, Row]]  # (pending request or None if it went away, row)
    token_ids: list[Sequence[int]]
    keys: tuple[str, ...] = ()  # its adapters, held on the host from planning to delivery
    outputs: list[RowOutput] = field(default_factory=list)
    error: Exception | None = None
    started_s: float = 0.0
    ended_s: float = 0.0
    ran: "Future[list[RowOutput]] | None" = None  # its run, once queued on the model thread
    is_skipped: bool = False  # every request of it had ended before it began: never run


def _consume(step: "asyncio.Future[list[RowOutput]]") -> None:
    """Retrieve an abandoned step's outcome, so that its failure is not reported as unseen."""
    if not step.cancelled():
        step.exception()


class StepLoop:
    """Owns the order of steps; the Engine owns admission and the requests in ``pending``."""

    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        pending: dict[int, Pending],
        executor: ThreadPoolExecutor,
        stack: Callable[[], ServingStack],
    ) -> None:
        self._config = config
        self._scheduler = scheduler
        self._pending = pending
        self._executor = executor
        self._stack = stack
        self._work = asyncio.Event()
        self._arrived = asyncio.Event()  # rows arrived or an interlude finished mid-step
        self._interludes: InterludeSlot[Step] = InterludeSlot()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.num_interludes = 0
        # the next step, planned and queued on the model thread while the one before it runs
        # (_wait_planning_ahead): it starts the moment that one ends, not after the event loop
        # has delivered it and planned again. Set when enough rows wait to fill one
        self._ahead: tuple[Step, asyncio.Future[list[RowOutput]], int | None] | None = None
        self._plan_ahead_rows: int | None = None  # while a step runs: rows that warrant it
        self._queue_deep = asyncio.Event()
        self.num_planned_ahead = 0
        # wall time in steps, interludes inside them included: over a window, busy / window
        # is how loaded the model thread is (1.0: saturated)
        self.busy_us = 0
        # CPU time of the model thread in those steps: well below busy_us, the thread waited
        # in its steps (for the interpreter lock, or for a core other work had)
        self.cpu_us = 0
        # fires at the earliest waiting deadline: planning alone expired rows only between
        # steps, so a 50 ms timeout behind a long step was heard of when that step ended
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = math.inf

    def wake(self, deadline_s: float | None = None) -> None:
        """New rows are queued (the earliest of them due by ``deadline_s``): plan a step, or
        an interlude if a long step is running, or the next step ahead if the queue holds a
        step's worth."""
        self._work.set()
        self._arrived.set()
        self._wake_if_deep()
        if deadline_s is not None and deadline_s < self._deadline_at:
            self._arm_deadline(deadline_s)

    def _arm_deadline(self, at_s: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        delay = max(0.0, at_s - time.monotonic())
        self._deadline_at = at_s
        self._deadline_timer = asyncio.get_running_loop().call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        """Fail the rows whose deadline passed while they waited, then wait for the next."""
        self._deadline_timer, self._deadline_at = None, math.inf
        now = time.monotonic()
        try:
            self._expire(self._scheduler.expire(now))
            wait = self._scheduler.next_deadline_in(now)
        except Exception:  # the next plan expires them anyway
            log.exception("expiring late rows failed")
            return
        if wait is not None:  # each firing scans the queues: at most one per _DEADLINE_GAP_S
            self._arm_deadline(now + max(wait, _DEADLINE_GAP_S))

    async def run(self) -> None:
        """Forever: take the next batch, run it, deliver; cancelled when the engine closes."""
        self._event_loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self._next()
                except Exception:  # a planning slip: the queues wait a moment, not forever
                    log.exception("the step loop failed; it goes on")
                    await asyncio.sleep(_RETRY_S)
        finally:  # closing: steps planned but not begun never run, and let go of adapters
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer, self._deadline_at = None, math.inf
            if self._ahead is not None:
                (item, step, _), self._ahead = self._ahead, None
                step.add_done_callback(_consume)  # nobody awaits it now
                self._let_go_when_done(item)
            interlude = self._interludes.take()
            if interlude is not None:
                self._let_go_when_done(interlude)

    async def _next(self) -> None:
        """Run (or find running) the next step, and deliver it."""
        step: asyncio.Future[list[RowOutput]] | None = None
        budget: int | None = None
        if self._ahead is not None:
            (item, step, budget), self._ahead = self._ahead, None
        else:
            # an interlude planned during the last step that never reached a pause point
            # runs next: its rows already left the queues
            item = self._interludes.take()
            if item is None:
                plan = self._scheduler.plan(time.monotonic())
                self._expire(plan.expired)
                if plan.batch is None:
                    self._work.clear()
                    await self._wait_for_work()
                    return
                item = self._step_or_fail(plan.batch)
                if item is None:
                    return
        try:
            if step is None:
                step, budget = self._submit(item)
            item.outputs = await self._run_step(item, step, budget)
        except Exception as exc:  # a failed step fails its rows, never the loop
            item.error = exc
        except asyncio.CancelledError:  # closing: its requests fail, its holds go
            self._let_go_when_done(item)
            raise
        if item.started_s == 0.0:  # it never started on the model thread
            item.started_s = item.ended_s = time.monotonic()
        self.busy_us += round((item.ended_s - item.started_s) * 1e6)
        self._deliver(item)

    def _step_or_fail(self, batch: Batch) -> Step | None:
        """A planned batch as a step, holding its adapters; None, with its requests failed,
        when that cannot be made (its rows have left the queues: nobody else would answer)."""
        rows = [(self._pending.get(r.request_id), r) for r in batch.rows]
        try:
            token_ids = [p.tokens.ids[r.index] if p else (0,) for p, r in rows]
            keys = [key for key in dict.fromkeys(batch.seg_adapter) if key != BACKBONE_KEY]
            return Step(batch, rows, token_ids, self._stack().store.hold_for_step(keys))
        except Exception as exc:
            self._deliver(Step(batch, rows, [], error=exc))
            return None

    def _let_go_when_done(self, item: Step) -> None:
        """Closing: a step still queued never runs; one running lets go of its adapters' host
        holds once the model thread is done with it, not under it."""
        store = self._stack().store
        if item.ran is None:
            store.release_after_step(item.keys)
            return
        item.ran.cancel()  # nothing once it runs
        item.ran.add_done_callback(lambda _: store.release_after_step(item.keys))

    def _submit(self, item: Step) -> tuple["asyncio.Future[list[RowOutput]]", int | None]:
        """Queue a step on the model thread, with its interlude budget (None: no pauses)."""
        budget = interlude_budget(
            item.batch,
            self._config.interlude_budget_tokens,
            self._config.contended_budget_tokens,
            self._scheduler.packed_steps,
        )
        item.ran = self._executor.submit(self._timed_step, item, budget is not None)
        return asyncio.wrap_future(item.ran), budget

    async def _run_step(
        self, item: Step, step: "asyncio.Future[list[RowOutput]]", budget: int | None
    ) -> list[RowOutput]:
        """Wait for a step on the model thread; while a long one runs, keep an interlude of
        other tenants' short rows ready for its next pause point."""
        if budget is None:
            return await self._wait_planning_ahead(item, step)
        pages = pages_left(item.batch, self._config.adapter_pages)
        while True:
            self._arrived.clear()
            if self._interludes.is_empty:
                self._plan_interlude(item.batch, budget, pages)
            arrived = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait((step, arrived), return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrived.cancel()
            if step.done():
                return step.result()

    def _plan_interlude(self, running: Batch, budget: int, pages: int) -> None:
        """Leave a short step of other tenants' rows in the slot, if any can run; a failure
        here is logged, never blamed on the running step."""
        try:
            plan = self._scheduler.plan_between(time.monotonic(), running, budget, pages)
            self._expire(plan.expired)
        except Exception:
            log.exception("planning an interlude failed")
            return
        interlude = None if plan.batch is None else self._step_or_fail(plan.batch)
        if interlude is not None:
            self._interludes.offer(interlude)

    async def _wait_planning_ahead(
        self, item: Step, step: "asyncio.Future[list[RowOutput]]"
    ) -> list[RowOutput]:
        """Wait for a step; once as many rows wait as it runs, plan the next one and queue it
        on the model thread behind it. A queue that deep means the model thread is what rows
        wait for, so its gap between steps (delivering, planning, handing over) is the time
        to save; a shallower one is left to gather more rows for a step planned at the end."""
        if not self._config.uses_plan_ahead or self._ahead is not None:
            return await step
        self._plan_ahead_rows = max(1, len(item.batch.rows))
        self._queue_deep.clear()
        self._wake_if_deep()
        deep = asyncio.ensure_future(self._queue_deep.wait())
        try:
            await asyncio.wait((step, deep), return_when=asyncio.FIRST_COMPLETED)
        finally:
            deep.cancel()
            self._plan_ahead_rows = None
        if not step.done() and self._interludes.is_empty:
            self._plan_ahead()
        return await step

    def _plan_ahead(self) -> None:
        """Plan the next step and queue it; a failure here fails that step's rows alone, never
        the step that is running."""
        try:
            plan = self._scheduler.plan(time.monotonic())
            self._expire(plan.expired)
        except Exception:  # the running step is not to blame: the loop plans again later
            log.exception("planning a step ahead failed")
            return
        ahead = None if plan.batch is None else self._step_or_fail(plan.batch)
        if ahead is None:
            return
        try:
            self._ahead = (ahead, *self._submit(ahead))
        except Exception as exc:  # its rows fail, and nothing else
            ahead.error = exc
            self._deliver(ahead)
            return
        self.num_planned_ahead += 1

    def _wake_if_deep(self) -> None:
        wanted = self._plan_ahead_rows
        if wanted is not None and self._scheduler.num_waiting >= wanted:
            self._queue_deep.set()

    def _deliver(self, item: Step) -> None:
        """Event loop: hand a finished step's outputs (or its failure) to its requests."""
        try:
            self._hand_over(item)
        finally:
            try:
                self._stack().store.release_after_step(item.keys)
            except Exception:  # a bookkeeping slip must not stop the step loop
                log.exception("letting go of a step's adapters failed")

    def _hand_over(self, item: Step) -> None:
        if item.error is not None:
            log.error("model step failed", exc_info=item.error)
            for pending, _ in item.rows:
                if pending is not None:
                    pending.job.fail(EngineError(f"model step failed: {item.error}"))
            return
        if item.is_skipped:
            return
        self._scheduler.record_step(len(item.batch.rows), item.ended_s - item.started_s)
        for pending in {id(p): p for p, _ in item.rows if p is not None}.values():
            pending.job.record_step(item.started_s, item.ended_s)
        for part in by_request(item.rows, item.outputs):
            try:
                part.pending.deliver(part.rows, part.outputs)
            except Exception as exc:  # that request fails alone; the loop and the rest go on
                log.exception("answering request %s failed", part.pending.job.request_id)
                with contextlib.suppress(Exception):
                    part.pending.job.fail(EngineError(f"its answer could not be made: {exc}"))

    async def _wait_for_work(self) -> None:
        """Sleep until a request arrives, or until the earliest waiting deadline passes."""
        timeout = self._scheduler.next_deadline_in(time.monotonic())
        if timeout is None:
            await self._work.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout)

    def _expire(self, rows: Sequence[Row]) -> None:
        for row in rows:
            pending = self._pending.get(row.request_id)
            if pending is not None:
                message = f"request timed out before input[{row.index}] could start"
                pending.job.fail(DeadlineExceeded(message))

    def _timed_step(self, item: Step, interleave: bool) -> list[RowOutput]:
        """Model thread: a top-level step (interludes nested in it included), its wall
        time on this thread and its CPU."""
        item.started_s = time.monotonic()
        # a step queued ahead waits a whole step to begin: its requests may all have been
        # cancelled or failed meanwhile, and their rows are not worth a step
        if all(p is None or p.job.done for p, _ in item.rows):
            item.is_skipped = True
            item.ended_s = item.started_s
            return []
        started_ns = time.thread_time_ns()
        try:
            return self._step(item.batch, item.token_ids, interleave)
        finally:
            self.cpu_us += (time.thread_time_ns() - started_ns) // 1000
            item.ended_s = time.monotonic()

    def _step(
        self, batch: Batch, token_ids: list[Sequence[int]], interleave: bool = False
    ) -> list[RowOutput]:
        """Model thread: page the batch's adapters in, run the step, let them go."""
        model = self._stack()
        keys = [key for key in batch.seg_adapter if key != BACKBONE_KEY]  # bare rows need none
        model.store.acquire_device(keys)
        state = model.backbone.lora_state
        state.between_layers = self._between_layers if interleave else None
        try:
            return model.runner.step(batch, token_ids)
        finally:
            state.between_layers = None
            model.store.release_device(keys)

    def _between_layers(self) -> None:
        """Model thread, at a pause point of a long step: run waiting interludes whole.

        The loop plans the next interlude while one runs, so requests that arrived meanwhile
        go right after it, up to ``_MAX_INTERLUDES_PER_PAUSE`` before the long step resumes.
        """
        state = self._stack().backbone.lora_state
        resume = state.between_layers
        for _ in range(_MAX_INTERLUDES_PER_PAUSE):
            item = self._interludes.take()
            if item is None:
                return
            self.num_interludes += 1
            item.started_s = time.monotonic()
            try:
                item.outputs = self._step(item.batch, item.token_ids)  # clears between_layers
            except Exception as exc:  # fails the interlude's rows, never the long step
                item.error = exc
            finally:
                state.between_layers = resume
            item.ended_s = time.monotonic()
            assert self._event_loop is not None
            self._event_loop.call_soon_threadsafe(self._interlude_done, item)

    def _interlude_done(self, item: Step) -> None:
        self._deliver(item)
        self._arrived.set()  # room for the next interlude
