"""The manager's side of one worker process: spawn it, read its messages, answer, reap it.

The child's side is job_worker.py. Used only from the `JobManager`'s thread (which must outlive
the process, see `job_worker._die_with_parent`), except `kill`, which any thread may call.
"""

import signal
from multiprocessing.context import SpawnContext
from typing import Any

from training.job_worker import GO, STOP, WorkerSpec, run_worker


class WorkerProcess:
    """One spawned worker and its pipe, plus what the manager learned from it."""

    def __init__(self, context: SpawnContext, spec: WorkerSpec) -> None:
        self.job_id = spec.job_id
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=run_worker, args=(spec, theirs), name=f"graft-train-{spec.job_id[:8]}"
        )
        self._process.daemon = True
        self._process.start()
        theirs.close()
        self._is_conn_open = True
        self.is_cancel_requested = False  # cancel killed it: the job ends cancelled
        self.is_timed_out = False  # the manager killed it past max_job_seconds: it ends failed
        self.is_publishing = False  # it was told "go"; from here on cancel is refused
        self.outcome: dict[str, Any] | None = None  # its "done" or "failed" message

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def waitables(self) -> list[Any]:
        """What `multiprocessing.connection.wait` should watch: the exit, and new messages."""
        return [self._process.sentinel, *([self._conn] if self._is_conn_open else [])]

    def has_exited(self, ready: set[Any]) -> bool:
        return self._process.sentinel in ready

    def has_messages(self, ready: set[Any]) -> bool:
        return self._conn in ready

    def messages(self) -> list[dict[str, Any]]:
        """Every message sent so far; none once the pipe is closed."""
        received: list[dict[str, Any]] = []
        try:
            while self._is_conn_open and self._conn.poll():
                received.append(self._conn.recv())
        except (EOFError, OSError):
            self._is_conn_open = False
        return received

    def answer_publish(self) -> None:
        """Allow publishing unless cancelled; after "go" the job can no longer be cancelled."""
        self.is_publishing = not self.is_cancel_requested
        try:
            self._conn.send(GO if self.is_publishing else STOP)
        except OSError:
            self._is_conn_open = False

    def kill(self) -> None:
        self._process.kill()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the process to end; True when it has."""
        self._process.join(timeout_s)
        return not self._process.is_alive()

    def close(self) -> None:
        """After it ended: release the pipe."""
        self._conn.close()
        self._is_conn_open = False

    def exit_reason(self) -> str:
        code = self._process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"
