"""`JobManager`: training jobs for many tenants, each in its own worker process.

Policy: at most ``max_running`` jobs train at once and at most one per tenant; further jobs wait
in state ``queued`` and start in submission order as slots free up (a tenant's second job waits
for its first, but never holds back another tenant's). A tenant may have at most
``max_jobs_per_tenant`` unfinished jobs, uploads still being checked included; one more is
refused (`TooManyJobs`, HTTP 429), so one tenant cannot fill the disk or the queue.

States: queued → running → succeeded | failed | cancelled (queued → cancelled | failed too).
A job publishes only from its worker, only on success, and only while not cancelled (see
job_worker.py); a registry publish is atomic, so no state of a job leaves half a version.

Threads: one manager thread (job_thread.py) starts every worker (its life is tied to that
thread, see `_die_with_parent`), relays their messages to the store and reaps them, and cancels
the jobs of a deleted tenant (a tenant created again under its name never sees them). Public
methods may be
called from any thread; they are short, except `submit` (waits while the checker process,
upload_checker.py, validates the upload) and `cancel` (waits for the worker to end), which
callers on an event loop run in an executor.
"""

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any

from registry import Registry
from registry.fsio import make_private_dir
from training.config import TrainConfig
from training.job_config import (
    JobConflict,
    JobNotFound,
    JobsConfig,
    JobsUnavailable,
    TooManyJobs,
    UploadAbandoned,
)
from training.job_process import WorkerProcess, published_outcome
from training.job_store import (
    CANCELLED,
    QUEUED,
    RUNNING,
    STATES,
    JobRecord,
    JobStore,
    event,
    lock_jobs_dir,
    new_job_id,
)
from training.job_thread import ManagerThread, is_owner, state_event
from training.job_uploads import check_suffix
from training.upload_checker import UploadChecker
from training.validation import Tokenizer

log = logging.getLogger(__name__)

RESTART_ERROR = "interrupted by server restart"


class JobManager(ManagerThread):
    """Queues, runs and records training jobs; see the module docstring for the policy."""

    def __init__(self, config: JobsConfig, registry: Registry, tokenizer: Tokenizer) -> None:
        self._config = config
        self._registry = registry  # to find what a worker that died had published
        self._checker = UploadChecker(tokenizer)  # checks one upload at a time
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
        make_private_dir(self._config.jobs_dir)
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
        tenant_created_at: float | None = None,
        abandoned: Callable[[], bool] = lambda: False,
        room_held: bool = False,
    ) -> JobRecord:
        """Validate the upload and queue a job; raises InvalidData, TooManyJobs, and
        UploadAbandoned when ``abandoned()`` is true once the check is done (the client left
        meanwhile: a job it never got the id of would train, and with ``promote`` publish).

        An upload counts against the tenant's unfinished jobs while it is validated too, so
        one tenant cannot queue unbounded uploads for the validator, which all share.
        ``tenant_created_at``: the tenant's stamp when the caller was authenticated (read
        here, before the check, without it). Read after the check, a tenant deleted and made
        again meanwhile would own the old one's upload. ``room_held``: the caller took the
        upload's place (`take_upload_room`) before it read the body; given back here."""
        if not room_held:
            self.take_upload_room(tenant)
        try:
            if tenant_created_at is None:
                tenant_created_at = self._registry.tenant_created_at(tenant)
            record = self._check_and_queue(
                tenant, name, config, promote, data, filename, tenant_created_at, abandoned
            )
        finally:
            self.give_upload_room(tenant)
        log.info("queued training job %s (%s/%s)", record.id, tenant, name)
        self._wake()
        return record

    def _check_and_queue(
        self,
        tenant: str,
        name: str,
        config: TrainConfig,
        promote: bool,
        data: bytes,
        filename: str,
        tenant_created_at: float | None,
        abandoned: Callable[[], bool],
    ) -> JobRecord:
        store = self._require_store()
        data_file = "data" + check_suffix(filename)
        staging = store.stage(data, data_file)
        try:
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
                tenant_created_at=tenant_created_at,
            )
            with self._lock:
                if abandoned():
                    log.info("dropped an upload for %s/%s: its client left", tenant, name)
                    raise UploadAbandoned(f"the upload of {tenant}/{name} was abandoned")
                self._check_room(tenant, uploads_of_caller=1)
                store.create(staging, record, [event("report", report=report), state_event(QUEUED)])
                self._jobs[record.id] = record
        except BaseException:
            store.discard(staging)
            raise
        return record

    def take_upload_room(self, tenant: str) -> None:
        """Hold one of the tenant's places for unfinished jobs for an upload, from before a
        byte of its body is read (TooManyJobs, JobsUnavailable at once) until `submit` ends,
        which gives it back (`room_held`). Counted only once received, a tenant at its limit
        could hold 20 MiB of the server's memory per connection, sending bodies it would be
        refused."""
        with self._lock:
            self._check_room(tenant)
            self._uploading[tenant] = self._uploading.get(tenant, 0) + 1

    def give_upload_room(self, tenant: str) -> None:
        with self._lock:
            left = self._uploading.pop(tenant) - 1
            if left:
                self._uploading[tenant] = left

    def get(self, tenant: str, job_id: str) -> JobRecord:
        with self._lock:
            return self._owned(tenant, job_id)

    def list_jobs(self, tenant: str) -> list[JobRecord]:
        """The tenant's jobs, oldest first (not those of a deleted tenant of the same name)."""
        born = self._registry.tenant_created_at(tenant)
        with self._lock:
            return [r for r in self._jobs.values() if is_owner(r, tenant, born)]

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
            self._changed.wait_for(  # gone: its tenant was deleted meanwhile (_purge)
                lambda: job_id not in self._jobs or self._jobs[job_id].is_final,
                timeout=self._config.cancel_wait_s,
            )
            return self._jobs.get(job_id, record)

    def worker_pid(self, job_id: str) -> int | None:
        """The running job's worker process id (for operators and tests)."""
        with self._lock:
            worker = self._workers.get(job_id)
            return None if worker is None else worker.pid

    # helpers ---------------------------------------------------------------------------

    def _settle_orphan(self, record: JobRecord) -> None:
        """A job a dead server left queued or running: succeeded if its worker published before
        dying, else failed. Its worker died with that server (see `_die_with_parent`)."""
        published = published_outcome(self._registry, record) if record.state == RUNNING else None
        with self._lock:
            if published is not None:
                self._succeed(record, published)
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
                "being received or checked included), the limit; wait for one to finish or "
                "cancel one"
            )

    def _owned(self, tenant: str, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None or not is_owner(record, tenant, self._registry.tenant_created_at(tenant)):
            raise JobNotFound(f"training job {job_id!r} not found")
        return record

    def _require_store(self) -> JobStore:
        if self._store is None:
            raise JobsUnavailable("the training job manager is not started")
        return self._store

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_writer.send_bytes(b"w")
