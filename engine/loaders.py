"""Loader threads for cold adapters, taking queued loads tenant by tenant.

A ``ThreadPoolExecutor`` runs its queue first in, first out: a tenant cycling through hundreds
of cold adapters put every other tenant's cold start behind its whole backlog. Here each
tenant has its own queue and a free thread takes from the tenant served least recently, so
another tenant's load waits for at most one load per thread. A load still queued can be
cancelled (its ``Future.cancel()``), which the store does once no request waits for it.
"""

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_Work = tuple[Future, Callable[[], Any]]


class TenantLoaders:
    """Up to ``num_threads`` threads (started as work arrives), fed tenant by tenant."""

    def __init__(
        self, num_threads: int, initializer: Callable[[], None], name: str = "graft-load"
    ) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._num_threads, self._initializer, self._name = num_threads, initializer, name
        self._queues: dict[str, deque[_Work]] = {}
        # tenant: the number of its latest load taken (one int per tenant ever served)
        self._last_served: dict[str, int] = {}
        self._num_taken = 0
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._num_queued = self._num_idle = self._num_running = 0
        self._is_shut_down = False

    def submit(self, tenant: str, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` as one of ``tenant``'s loads; RuntimeError once shut down (as an
        executor raises)."""
        future: Future = Future()
        with self._cond:
            if self._is_shut_down:
                raise RuntimeError("cannot schedule new loads after shutdown")
            self._queues.setdefault(tenant, deque()).append((future, fn))
            self._num_queued += 1
            if self._num_queued > self._num_idle and len(self._threads) < self._num_threads:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
        return future

    @property
    def num_running(self) -> int:
        return self._num_running

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Stop taking loads and wait for the threads: queued loads are cancelled, or, without
        ``cancel_futures``, run first."""
        with self._cond:
            self._is_shut_down = True
            if cancel_futures:
                for queue in self._queues.values():
                    for future, _ in queue:
                        future.cancel()
                self._queues.clear()
                self._num_queued = 0
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _take(self) -> _Work | None:
        """The next tenant's oldest load still wanted, or None once shut down and drained."""
        with self._cond:
            while True:
                while self._queues:
                    tenant = min(self._queues, key=lambda t: self._last_served.get(t, -1))
                    queue = self._queues[tenant]
                    work = queue.popleft()
                    self._num_queued -= 1
                    if not queue:
                        del self._queues[tenant]
                    if not work[0].set_running_or_notify_cancel():  # cancelled while queued:
                        continue  # no turn taken
                    self._num_taken += 1
                    self._last_served[tenant] = self._num_taken
                    self._num_running += 1
                    return work
                if self._is_shut_down:
                    return None
                self._num_idle += 1
                self._cond.wait()
                self._num_idle -= 1

    def _work(self) -> None:
        self._initializer()
        while (work := self._take()) is not None:
            future, fn = work
            try:
                result = fn()
            except BaseException as exc:  # as an executor does: the caller hears of it
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._cond:
                    self._num_running -= 1
            del work, future, fn  # no reference to a result kept while idle


__all__ = ["TenantLoaders"]
