"""A tiny dynamic batcher for the baselines: the bare backbone and the PEFT server.

Requests queue their token ids; one loop takes whole requests into a batch (up to a row and a
padded-token budget, as the engine's scheduler does), runs one forward pass on one worker
thread, and hands each request its rows. ``max_wait_s`` 0 takes whatever is waiting when the
model frees up (continuous batching, as graft); a few milliseconds is the classic "collect,
then run" batcher of simple servers. No fairness, no admission control, no deadlines.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# token ids per row and the adapter name per row (None: no adapter) -> probabilities [rows, labels]
Forward = Callable[[list[Sequence[int]], list[str | None]], np.ndarray]


@dataclass(slots=True)
class _Waiting:
    token_ids: list[Sequence[int]]  # one entry per input text
    adapter: str | None  # adapter of every row of the request
    done: asyncio.Future = field(repr=False)  # resolves to np.ndarray [rows, labels]


def _use_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)


class MicroBatcher:
    """Batches requests for ``forward``; use as ``async with MicroBatcher(...) as batcher``."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_rows: int = 128,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.0,
        num_threads: int | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_batch_tokens < 1 or max_wait_s < 0:
            raise ValueError("batch limits must be >= 1 and max_wait_s >= 0")
        self._forward = forward
        self._max_rows = max_batch_rows
        self._max_tokens = max_batch_tokens
        self._max_wait_s = max_wait_s
        self._queue: deque[_Waiting] = deque()
        self._work = asyncio.Event()
        # its own intra-op threads, as many as graft's model thread takes (``num_threads``:
        # EngineConfig.intra_op_threads): started from a load generator kept serial, the
        # baselines ran on one thread where graft ran on every core, up to 1.8x apart
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="bench-model", initializer=_use_threads, initargs=(num_threads,)
        )
        self._task: asyncio.Task[None] | None = None
        self.num_steps = 0
        self.num_rows = 0
        self.busy_s = 0.0

    async def __aenter__(self) -> "MicroBatcher":
        self._task = asyncio.create_task(self._run(), name="bench-batcher")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._queue:
            if not waiting.done.done():
                waiting.done.set_exception(RuntimeError("batcher closed"))
        self._executor.shutdown(wait=True)

    def counters(self) -> dict[str, float]:
        """Steps, rows and seconds of model time so far (the load test's footer reads them)."""
        return {"steps": self.num_steps, "rows": self.num_rows, "busy_s": round(self.busy_s, 4)}

    async def run(self, token_ids: list[Sequence[int]], adapter: str | None) -> np.ndarray:
        """Probabilities ``[len(token_ids), labels]`` for one request."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(token_ids, adapter, done))
        self._work.set()
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._work.clear()
                await self._work.wait()
                if self._max_wait_s:
                    await asyncio.sleep(self._max_wait_s)
            batch = self._take()
            if not batch:
                continue
            ids = [row for w in batch for row in w.token_ids]
            adapters = [w.adapter for w in batch for _ in w.token_ids]
            started = loop.time()
            try:
                probs = await loop.run_in_executor(self._executor, self._forward, ids, adapters)
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for w in batch:
                    if not w.done.done():
                        w.done.set_exception(exc)
                continue
            self.busy_s += loop.time() - started
            self.num_steps += 1
            self.num_rows += len(ids)
            row = 0
            for w in batch:
                if not w.done.done():  # the caller may have gone away
                    w.done.set_result(probs[row : row + len(w.token_ids)])
                row += len(w.token_ids)

    def _take(self) -> list[_Waiting]:
        """Whole requests, oldest first, while rows and padded tokens stay within budget."""
        batch: list[_Waiting] = []
        rows, longest = 0, 0
        while self._queue:
            w = self._queue[0]
            if w.done.done():  # cancelled while waiting
                self._queue.popleft()
                continue
            new_rows = rows + len(w.token_ids)
            new_longest = max([longest, *(len(ids) for ids in w.token_ids)])
            fits = new_rows <= self._max_rows and new_rows * new_longest <= self._max_tokens
            if batch and not fits:
                break
            batch.append(self._queue.popleft())
            rows, longest = new_rows, new_longest
        return batch


def pad(token_ids: Sequence[Sequence[int]], pad_id: int):
    """``input_ids`` and ``attention_mask`` int64 tensors ``[rows, longest]``, right-padded."""
    import torch

    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, ids in enumerate(token_ids):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, mask
