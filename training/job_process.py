"""The manager's side of one worker process: spawn it, read its messages, answer, reap it.

The child's side is job_worker.py. Used only from the `JobManager`'s thread (which must outlive
the process, see `job_worker._die_with_parent`), except `kill`, which any thread may call.
"""

import os
import signal
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

from registry import NotFound, Registry
from training.config import TrainConfig
from training.job_config import JobsConfig
from training.job_store import JobRecord
from training.job_worker import GO, MODEL_DIR, STOP, WorkerSpec, run_worker


def worker_spec(record: JobRecord, job_dir: Path, config: JobsConfig) -> WorkerSpec:
    """What the worker of ``record`` (stored in ``job_dir``) needs."""
    # JSON turned tuples into lists; TrainConfig wants its tuples back
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.config.items()}
    train_config = TrainConfig(**fields)
    return WorkerSpec(
        job_id=record.id,
        tenant=record.tenant,
        name=record.name,
        data_path=job_dir / record.data_file,
        source=record.source,
        config=train_config,
        promote=record.promote,
        tenant_created_at=record.tenant_created_at,
        registry_dir=Path(config.registry_dir),
        backbone_dir=config.backbone_dir,
        backbone_sha256=config.backbone_sha256,
        num_threads=config.worker_threads,
        output_dir=job_dir / MODEL_DIR if train_config.mode == "full" else None,
        parent_pid=os.getpid(),
    )


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

    def time_out(self, started_at: float | None, limit_s: float, now: float) -> bool:
        """Kill it if it has run past ``limit_s`` (not while publishing: its version is
        nearly in); whether it was killed now."""
        if started_at is None or now - started_at <= limit_s:
            return False
        if self.is_publishing or self.is_timed_out:
            return False
        self.is_timed_out = True
        self.kill()
        return True

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


def published_outcome(registry: Registry, record: JobRecord) -> dict[str, Any] | None:
    """What the job's worker published (its manifest names the job), as its outcome would
    have said it, or None: how a worker that died with leave to publish, or a server that
    died under it, ended. The manifest keeps the metrics, so such a job still shows them."""
    try:
        versions = registry.list_adapters(record.tenant)
    except NotFound:
        return None
    for version in versions:
        manifest = version.manifest
        if version.name == record.name and manifest.get("training_job") == record.id:
            training = manifest.get("training")
            training = training if isinstance(training, dict) else {}
            return {
                "version": version.version,
                "metrics": manifest.get("metrics"),
                "epochs_run": training.get("epochs_run"),
                "train_seconds": training.get("train_seconds"),
            }
    return None
