"""The `JobManager`'s own thread: it starts every worker, relays their messages to the job
store, enforces the time limit, cancels the jobs of deleted tenants and settles how each job
ended. `JobManager` (jobs.py) inherits these methods; they run on that thread alone, apart
from the state changes, which every caller makes under the manager's lock.
"""

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.context import SpawnContext
from typing import Any

from registry import Registry
from training.job_config import JobsConfig
from training.job_process import WorkerProcess, published_outcome, worker_spec
from training.job_store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    event,
)
from training.job_worker import MODEL_DIR, SCRATCH_DIR

log = logging.getLogger(__name__)

_WAKE_EVERY_S = 1.0  # the manager thread's longest sleep (it is woken for new work anyway)
_PURGE_EVERY_S = 5.0  # how often stopped jobs of deleted tenants are looked for
SHUTDOWN_ERROR = "interrupted by server shutdown"
_ORPHANED = "its tenant was deleted"


class ManagerThread:
    """The manager thread's methods over the state `JobManager` sets up."""

    _config: JobsConfig
    _registry: Registry
    _lock: threading.Lock
    _changed: threading.Condition
    _context: SpawnContext
    _jobs: dict[str, JobRecord]
    _workers: dict[str, WorkerProcess]
    _is_stopping: bool
    _next_purge_at = 0.0  # time.monotonic(): the first turn looks at once

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
        self._cancel_orphans()
        if time.monotonic() >= self._next_purge_at:
            self._purge()
            self._next_purge_at = time.monotonic() + _PURGE_EVERY_S
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
                    self._update(started, state_event(RUNNING))
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
                    born = self._registry.tenant_created_at(record.tenant)
                    if is_owner(record, record.tenant, born):
                        worker.answer_publish()
                    else:  # deleted since the last turn looked
                        worker.is_cancel_requested = True
                        worker.kill()
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
        elif outcome.get("type") == "failed" and not self._is_orphan(record):
            self._fail(record, str(outcome.get("error")))  # kept over a cancel come too late
        elif outcome.get("type") == "failed":  # the registry refused: its tenant is gone
            self._finish(record, CANCELLED, event("cancelled", reason=_ORPHANED))
        elif worker.is_cancel_requested:
            self._finish(record, CANCELLED, event("cancelled"))
        elif worker.is_timed_out:
            limit = self._config.max_job_seconds
            self._fail(
                record, f"training ran past the server's limit of {limit:g} s; nothing published"
            )
        else:  # it died; if it had leave to publish, the registry says whether it did
            published = published_outcome(self._registry, record) if worker.is_publishing else None
            if published is None:
                self._fail(record, f"the training worker died ({exit_reason}); nothing published")
            else:
                self._succeed(record, published)

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

    def _is_orphan(self, record: JobRecord) -> bool:
        return not is_owner(record, record.tenant, self._registry.tenant_created_at(record.tenant))

    def _cancel_orphans(self) -> None:
        """Cancel the unfinished jobs whose tenant was deleted (or deleted and created again):
        they must not run on, nor publish into a new tenant of the same name."""
        with self._lock:
            for record in [r for r in self._jobs.values() if not r.is_final]:
                if not self._is_orphan(record):
                    continue
                worker = self._workers.get(record.id)
                if worker is None:
                    self._finish(record, CANCELLED, event("cancelled", reason=_ORPHANED))
                elif not worker.is_publishing and not worker.is_cancel_requested:
                    log.info("training job %s: %s; killing its worker", record.id, _ORPHANED)
                    worker.is_cancel_requested = True
                    worker.kill()

    def _purge(self) -> None:
        """Remove the stopped jobs of deleted tenants, directories and all: the upload, the
        events and a full-mode model are that tenant's data, and nobody can ask for them.
        Past ``finished_jobs_kept`` finished jobs a tenant, the oldest go too: a tenant
        submitting and cancelling in a loop grew the directory and every listing."""
        born: dict[str, float | None] = {}
        with self._lock:
            gone = []
            kept: dict[str, list[JobRecord]] = {}
            for record in list(self._jobs.values()):
                if not record.is_final or record.id in self._workers:
                    continue
                if record.tenant not in born:
                    born[record.tenant] = self._registry.tenant_created_at(record.tenant)
                if not is_owner(record, record.tenant, born[record.tenant]):
                    gone.append(record.id)
                elif not (record.mode == "full" and record.state == SUCCEEDED):
                    # a full job's model is the operator's to take away (README): kept
                    kept.setdefault(record.tenant, []).append(record)
            for records in kept.values():
                records.sort(key=lambda r: r.finished_at or 0.0, reverse=True)
                gone += [r.id for r in records[self._config.finished_jobs_kept :]]
            for job_id in gone:
                del self._jobs[job_id]
            if gone:
                self._changed.notify_all()  # a cancel waiting on one of them returns
        store = self._require_store()
        for job_id in gone:
            try:
                store.remove(job_id)
            except OSError:  # left for the next start, which finds it orphaned again
                log.exception("training job %s: removing its directory failed", job_id)
                continue
            log.info("training job %s removed (its tenant's gone, or it is an old one)", job_id)

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
        self._drop_scratch(finished)
        log.info("training job %s %s", record.id, state)
        return finished

    def _drop_scratch(self, record: JobRecord) -> None:
        """A finished job keeps its record and events (and a full-mode job its model), not its
        upload (up to the upload cap: cancelled jobs filled the disk) nor its worker's scratch
        files, which a killed worker (cancel, time limit) leaves: the held-out texts, the
        weights, a full model half written."""
        job_dir = self._require_store().job_dir(record.id)
        with contextlib.suppress(OSError):
            (job_dir / record.data_file).unlink(missing_ok=True)
        shutil.rmtree(job_dir / SCRATCH_DIR, ignore_errors=True)
        for staged in job_dir.glob(f".{MODEL_DIR}-*"):  # a full model being written (19 MB)
            shutil.rmtree(staged, ignore_errors=True)

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


def is_owner(record: JobRecord, tenant: str, born: float | None) -> bool:
    """Whether `tenant`, created at `born` (None: it does not exist), owns the job: the same
    tenant the job was submitted by, not one created again under its name since."""
    if record.tenant != tenant or born is None:
        return False
    if record.tenant_created_at is not None:  # immune to the clock stepping back
        return record.tenant_created_at == born
    return born <= record.created_at  # a job stored before submissions kept the time


def state_event(state: str) -> dict[str, Any]:
    return event("state", state=state)
