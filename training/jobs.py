"""`JobManager`: training jobs for many tenants, each in its own worker process.

Policy: at most ``max_running`` jobs train at once and at most one per tenant; further jobs wait
in state ``queued`` and start in submission order as slots free up (a tenant's second job waits
for its first, but never holds back another tenant's). A tenant may have at most
``max_jobs_per_tenant`` unfinished jobs, uploads still being checked included; one more is
refused (`TooManyJobs`, HTTP 429), so one tenant cannot fill the disk or the queue.

States: queued → running → succeeded | failed | cancelled (queued → cancelled | failed too).
A job publishes only from its worker, only on success, and only while not cancelled (see
job_worker.py); a registry publish is atomic, so no state of a job leaves half a version.

Threads: one manager thread starts every worker (the worker's life is tied to that thread, see
`_die_with_parent`), relays their messages to the store and reaps them. Public methods may be
called from any thread; they are short, except `submit` (waits while the checker process,
upload_checker.py, validates the upload) and `cancel` (waits for the worker to end), which
callers on an event loop run in an executor.
"""

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Any

from registry import Registry
from training.config import TrainConfig
from training.job_config import JobConflict, JobNotFound, JobsConfig, JobsUnavailable, TooManyJobs
from training.job_process import WorkerProcess, published_version, worker_spec
from training.job_store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    JobRecord,
    JobStore,
    event,
    lock_jobs_dir,
    new_job_id,
)
from training.job_uploads import check_suffix
from training.upload_checker import UploadChecker
from training.validation import Tokenizer

log = logging.getLogger(__name__)

_WAKE_EVERY_S = 1.0  # the manager thread's longest sleep (it is woken for new work anyway)
RESTART_ERROR = "interrupted by server restart"
SHUTDOWN_ERROR = "interrupted by server shutdown"


class JobManager:
    """Queues, runs and records training jobs; see the module docstring for the policy."""

    def __init__(self, config: JobsConfig, registry: Registry, tokenizer: Tokenizer) -> None:
        self._config = config
        self._registry = registry  # to find what a worker that died had published
        self._checker = UploadChecker(tokenizer)  # validation's own: not reentrant
        self._validate_lock = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job changed state
        self._context = get_context("spawn")
        self._store: JobStore | None = None
        self._jobs: dict[str, JobRecord] = {}  # every job, by id
        self._workers: dict[str, WorkerProcess] = {}  # running jobs, by id
        self._uploading: dict[str, int] = {}  # uploads being validated, by tenant
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._wake_reader, self._wake_writer = self._context.Pipe(duplex=False)

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Take the jobs directory, settle jobs a dead server left, start the manager thread.

        Raises JobsUnavailable when another live server manages the same directory.
        """
        self._config.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_jobs_dir(self._config.jobs_dir)
        self._store = JobStore(self._config.jobs_dir)
        for record in self._store.all():
            self._jobs[record.id] = record
            if not record.is_final:
                self._settle_orphan(record)
        self._checker.start()
        self._thread = threading.Thread(target=self._run, name="graft-train-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop: workers are killed (one already publishing may finish first), unfinished jobs
        are marked failed, the directory is released. Idempotent."""
        with self._lock:
            self._is_stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join()
        self._checker.close()
        self._wake_reader.close()
        self._wake_writer.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._is_stopping

    # requests --------------------------------------------------------------------------

    def submit(
        self,
        tenant: str,
        name: str,
        config: TrainConfig,
        *,
        promote: bool,
        data: bytes,
        filename: str,
    ) -> JobRecord:
        """Validate the upload and queue a job; raises InvalidData, TooManyJobs.

        An upload counts against the tenant's unfinished jobs while it is validated too, so
        one tenant cannot queue unbounded uploads for the validator, which all share."""
        store = self._require_store()
        data_file = "data" + check_suffix(filename)
        with self._counted_upload(tenant):
            staging = store.stage(data, data_file)
            try:
                with self._validate_lock:
                    report = self._checker.check(staging / data_file, filename)
                record = JobRecord(
                    id=new_job_id(),
                    tenant=tenant,
                    name=name,
                    mode=config.mode,
                    promote=promote,
                    state=QUEUED,
                    source=filename,
                    data_file=data_file,
                    config={field: getattr(config, field) for field in config.__slots__},
                    report=report,
                    created_at=time.time(),
                )
                with self._lock:
                    self._check_room(tenant, uploads_of_caller=1)
                    store.create(staging, record, [event("report", report=report), _state(QUEUED)])
                    self._jobs[record.id] = record
            except BaseException:
                store.discard(staging)
                raise
        log.info("queued training job %s (%s/%s)", record.id, tenant, name)
        self._wake()
        return record

    @contextlib.contextmanager
    def _counted_upload(self, tenant: str) -> Iterator[None]:
        with self._lock:
            self._check_room(tenant)
            self._uploading[tenant] = self._uploading.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._uploading.pop(tenant) - 1
                if left:
                    self._uploading[tenant] = left

    def get(self, tenant: str, job_id: str) -> JobRecord:
        with self._lock:
            return self._owned(tenant, job_id)

    def list_jobs(self, tenant: str) -> list[JobRecord]:
        """The tenant's jobs, oldest first."""
        with self._lock:
            return [r for r in self._jobs.values() if r.tenant == tenant]

    def state_counts(self) -> dict[str, int]:
        """Every job this server knows, counted by state (each state present, maybe 0)."""
        counts = dict.fromkeys(STATES, 0)
        with self._lock:
            for record in self._jobs.values():
                counts[record.state] += 1
        return counts

    def events(self, tenant: str, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The job's events from number `start` (0-based) on."""
        self.get(tenant, job_id)
        return self._require_store().read_events(job_id, start)

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a queued or running job and return it once final; nothing gets published.

        Raises JobConflict for a finished job or one already publishing its version.
        """
        with self._lock:
            record = self._owned(tenant, job_id)
            if record.is_final:
                raise JobConflict(f"training job {job_id} is already {record.state}")
            worker = self._workers.get(job_id)
            if worker is None:
                return self._finish(record, CANCELLED, event("cancelled"))
            if worker.is_publishing:
                raise JobConflict(f"training job {job_id} is publishing; too late to cancel")
            worker.is_cancel_requested = True
            worker.kill()
            self._changed.wait_for(
                lambda: self._jobs[job_id].is_final, timeout=self._config.cancel_wait_s
            )
            return self._jobs[job_id]

    def worker_pid(self, job_id: str) -> int | None:
        """The running job's worker process id (for operators and tests)."""
        with self._lock:
            worker = self._workers.get(job_id)
            return None if worker is None else worker.pid

    # the manager thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                try:
                    self._turn()
                except Exception:  # no file handles for a worker, say: the next turn retries
                    log.exception("a turn of the training job manager failed; going on")
                    time.sleep(_WAKE_EVERY_S)
        finally:
            self._stop_all()

    def _turn(self) -> None:
        self._dispatch()
        self._enforce_time_limit()
        with self._lock:
            workers = list(self._workers.values())
        waitables = [self._wake_reader, *(w for worker in workers for w in worker.waitables)]
        ready = set(wait(waitables, timeout=_WAKE_EVERY_S))
        while self._wake_reader.poll():
            self._wake_reader.recv_bytes()
        for worker in workers:
            if worker.has_messages(ready):
                self._relay(worker)
            if worker.has_exited(ready):
                self._reap(worker)

    def _dispatch(self) -> None:
        """Start queued jobs, oldest first, while slots are free (one per tenant)."""
        with self._lock:
            busy = {self._jobs[job_id].tenant for job_id in self._workers}
            for record in sorted(self._jobs.values(), key=lambda r: r.created_at):
                if len(self._workers) >= self._config.max_running or self._is_stopping:
                    return
                if record.state == QUEUED and record.tenant not in busy:
                    job_dir = self._require_store().job_dir(record.id)
                    spec = worker_spec(record, job_dir, self._config)
                    self._workers[record.id] = WorkerProcess(self._context, spec)
                    busy.add(record.tenant)
                    started = replace(record, state=RUNNING, started_at=time.time())
                    self._update(started, _state(RUNNING))
                    log.info(
                        "training job %s runs in process %s",
                        record.id,
                        self._workers[record.id].pid,
                    )

    def _enforce_time_limit(self) -> None:
        """Kill workers past ``max_job_seconds`` (not one publishing); `_settle` fails them."""
        limit, now = self._config.max_job_seconds, time.time()
        if limit is None:
            return
        with self._lock:
            for job_id, worker in self._workers.items():
                if worker.time_out(self._jobs[job_id].started_at, limit, now):
                    log.warning("training job %s ran past %g s; killed it", job_id, limit)

    def _relay(self, worker: WorkerProcess) -> None:
        """Record the worker's progress and answer its request to publish."""
        for message in worker.messages():
            kind = message.get("type")
            with self._lock:
                record = self._jobs[worker.job_id]
                if kind == "epoch":
                    info = {k: v for k, v in message.items() if k != "type"}
                    self._update(replace(record, progress=info), event("epoch", **info))
                elif kind == "publish":
                    worker.answer_publish()
                elif kind in ("done", "failed"):
                    worker.outcome = message

    def _reap(self, worker: WorkerProcess) -> None:
        """The worker process ended: record how its job ended."""
        self._relay(worker)
        worker.join()
        worker.close()
        with self._lock:
            del self._workers[worker.job_id]
            try:
                self._settle(worker, worker.exit_reason())
            except Exception:  # the registry, asked what it published: the job still ends
                log.exception("training job %s: settling it failed", worker.job_id)
                self._fail(self._jobs[worker.job_id], "the server lost track of this job")

    def _settle(self, worker: WorkerProcess, exit_reason: str) -> None:
        record = self._jobs[worker.job_id]
        outcome = worker.outcome or {}
        if outcome.get("type") == "done":
            self._succeed(record, outcome)
        elif worker.is_cancel_requested:
            self._finish(record, CANCELLED, event("cancelled"))
        elif worker.is_timed_out:
            limit = self._config.max_job_seconds
            self._fail(
                record, f"training ran past the server's limit of {limit:g} s; nothing published"
            )
        elif outcome.get("type") == "failed":
            self._fail(record, str(outcome.get("error")))
        else:  # it died; if it had leave to publish, the registry says whether it did
            version = published_version(self._registry, record) if worker.is_publishing else None
            if version is None:
                self._fail(record, f"the training worker died ({exit_reason}); nothing published")
            else:
                self._succeed(record, {"version": version})

    def _stop_all(self) -> None:
        """Shutdown: kill workers (letting a publishing one finish), fail unfinished jobs."""
        with self._lock:
            self._is_stopping = True
            workers = list(self._workers.values())
            for worker in workers:
                if not worker.is_publishing:
                    worker.kill()
        for worker in workers:
            if not worker.join(self._config.cancel_wait_s):
                worker.kill()
                worker.join()
            self._relay(worker)
            worker.close()
        with self._lock:
            for worker in workers:
                self._settle(worker, SHUTDOWN_ERROR)
            self._workers.clear()
            for record in list(self._jobs.values()):
                if record.state == QUEUED:
                    self._fail(record, SHUTDOWN_ERROR)

    # state changes (under the lock) ----------------------------------------------------

    def _succeed(self, record: JobRecord, outcome: dict[str, Any]) -> None:
        details = {k: outcome.get(k) for k in ("version", "metrics", "epochs_run", "train_seconds")}
        model = None if details["version"] is None else f"{record.tenant}/{record.name}"
        finished = replace(record, metrics=outcome.get("metrics"), version=details["version"])
        self._finish(finished, SUCCEEDED, event("done", state=SUCCEEDED, model=model, **details))

    def _fail(self, record: JobRecord, error: str) -> None:
        self._finish(replace(record, error=error), FAILED, event("failed", error=error))

    def _finish(self, record: JobRecord, state: str, final_event: dict[str, Any]) -> JobRecord:
        finished = replace(record, state=state, finished_at=time.time())
        self._update(finished, final_event)
        log.info("training job %s %s", record.id, state)
        return finished

    def _update(self, record: JobRecord, new_event: dict[str, Any]) -> None:
        # in memory first: a disk refusing the write (full) loses it only across a restart
        self._jobs[record.id] = record
        self._changed.notify_all()
        store = self._require_store()
        try:
            store.save(record)
            store.append_event(record.id, new_event)
        except OSError:
            log.exception("training job %s: could not store its %s", record.id, new_event["type"])

    # helpers ---------------------------------------------------------------------------

    def _settle_orphan(self, record: JobRecord) -> None:
        """A job a dead server left queued or running: succeeded if its worker published before
        dying, else failed. Its worker died with that server (see `_die_with_parent`)."""
        version = published_version(self._registry, record) if record.state == RUNNING else None
        with self._lock:
            if version is not None:
                self._succeed(record, {"version": version})
            else:
                self._fail(record, RESTART_ERROR)

    def _check_room(self, tenant: str, uploads_of_caller: int = 0) -> None:
        if not self.is_running:
            raise JobsUnavailable("training jobs are not running on this server")
        num_open = sum(1 for r in self._jobs.values() if r.tenant == tenant and not r.is_final)
        num_open += self._uploading.get(tenant, 0) - uploads_of_caller
        if num_open >= self._config.max_jobs_per_tenant:
            raise TooManyJobs(
                f"tenant {tenant!r} has {num_open} unfinished training jobs (uploads still "
                "being checked included), the limit; wait for one to finish or cancel one"
            )

    def _owned(self, tenant: str, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None or record.tenant != tenant:
            raise JobNotFound(f"training job {job_id!r} not found")
        return record

    def _require_store(self) -> JobStore:
        if self._store is None:
            raise JobsUnavailable("the training job manager is not started")
        return self._store

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_writer.send_bytes(b"w")


def _state(state: str) -> dict[str, Any]:
    return event("state", state=state)
