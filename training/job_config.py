"""The job manager's configuration and the errors its callers handle (see jobs.py)."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class JobsConfig:
    jobs_dir: Path  # job directories (see job_store.py); one server manages it at a time
    registry_dir: Path  # the registry workers publish into
    backbone_dir: Path | None = None  # what workers load; None: the packaged backbone
    backbone_sha256: str | None = None  # pin: workers refuse other weights
    max_running: int = 1  # jobs training at once, server-wide
    max_jobs_per_tenant: int = 3  # unfinished (queued or running) jobs one tenant may have
    # finished jobs kept per tenant, newest first; older ones' records are removed
    finished_jobs_kept: int = 100
    worker_threads: int = 1  # torch threads per worker, so serving keeps its cores
    cancel_wait_s: float = 10.0  # how long `cancel` waits for the worker to end
    # a running job's worker is killed past this (jobs run one at a time server-wide, so
    # one tenant's endless job would hold every other tenant's); None: no limit
    max_job_seconds: float | None = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_running", "max_jobs_per_tenant", "worker_threads", "finished_jobs_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_job_seconds is not None and not self.max_job_seconds > 0:
            raise ValueError(f"max_job_seconds must be > 0 or None, got {self.max_job_seconds}")


class JobNotFound(LookupError):
    """No such job, or another tenant's (the same answer, so ids do not leak)."""


class JobConflict(RuntimeError):
    """The job cannot be cancelled: it is finished, or publishing its version."""


class TooManyJobs(RuntimeError):
    """The tenant has `max_jobs_per_tenant` unfinished jobs already."""


class UploadAbandoned(RuntimeError):
    """The caller gave up on an upload while it was checked: no job was made of it."""


class JobsUnavailable(RuntimeError):
    """The manager is not running (not started, closed, or another server holds the jobs)."""
