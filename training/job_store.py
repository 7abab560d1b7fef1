"""Training jobs on disk: one directory per job, so state survives the server that ran it.

Layout of the jobs root (by default ``<registry>/jobs``)::

    <id>/job.json       the job's current state (JobRecord), replaced atomically on every change
    <id>/events.ndjson  every event so far, one JSON object a line, appended in order
    <id>/data.<ext>     the uploaded examples exactly as sent (.csv, .tsv or .jsonl)
    <id>/model/         full mode only: the standalone model the job wrote

A job directory appears complete or not at all (it is staged under a dot-name and renamed).
Only the `JobManager` of one server writes here (it holds ``.lock``), and only from one thread
at a time; readers (event streams) may read concurrently, so every replacement is a rename.
"""

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.job_config import JobsUnavailable

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# event types that end a job's event stream
FINAL_EVENTS = frozenset({"done", "failed", "cancelled"})

_ID = re.compile(r"[0-9a-f]{32}")
_JOB_FILE = "job.json"
_EVENTS_FILE = "events.ndjson"
_REMOVING = ".removing-"


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A training job as stored and shown (``GET /v1/train/{id}``)."""

    id: str  # 32 hex digits, unguessable
    tenant: str  # owner; nobody else sees the job
    name: str  # adapter name the job publishes a version of
    mode: str  # head, lora or full
    promote: bool  # whether the new version becomes the name's latest
    state: str  # one of STATES
    source: str  # the upload's file name, as rows are named in messages
    data_file: str  # file name of the stored upload inside the job directory
    config: Mapping[str, Any]  # the TrainConfig fields the job trains with
    report: Mapping[str, Any]  # the validation report (DataReport.to_dict())
    created_at: float  # unix seconds
    started_at: float | None = None  # when a worker took it
    finished_at: float | None = None  # when it reached a final state
    progress: Mapping[str, Any] | None = None  # the latest epoch event
    metrics: Mapping[str, Any] | None = None  # held-out metrics of a succeeded job
    version: int | None = None  # the version a succeeded head/lora job registered
    error: str | None = None  # why a job failed
    # when its tenant was created, as the registry says (None in jobs stored before this was
    # kept): a tenant created again under the name has another time, whatever the clock did
    tenant_created_at: float | None = None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the API shows it."""
        out = dataclasses.asdict(self)
        del out["data_file"], out["tenant_created_at"]
        out["model"] = (
            f"{self.tenant}/{self.name}@{self.version}" if self.version is not None else None
        )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobRecord":
        """The record ``data`` holds; ValueError names a field of the wrong type (an edited
        file: one ``created_at`` of null stopped the server, sorting the jobs at start)."""
        names = {field.name for field in dataclasses.fields(cls)}
        record = cls(**{key: value for key, value in data.items() if key in names})
        for name, kind in _FIELD_TYPES.items():
            value = getattr(record, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name} is {value!r}")
        if record.state not in STATES:
            raise ValueError(f"state is {record.state!r}")
        return record


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
# what `from_dict` checks: what the manager sorts, compares and formats
_FIELD_TYPES: dict[str, tuple[type, ...] | type] = {
    "id": str,
    "tenant": str,
    "name": str,
    "state": str,
    "source": str,
    "data_file": str,
    "created_at": _NUMBER,
    "started_at": _OPTIONAL_NUMBER,
    "finished_at": _OPTIONAL_NUMBER,
    "tenant_created_at": _OPTIONAL_NUMBER,
    "version": (int, type(None)),
}


def new_job_id() -> str:
    return os.urandom(16).hex()


def is_job_id(value: str) -> bool:
    """True for a string shaped like a job id (so it is safe as a directory name)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


class JobStore:
    """Reads and writes job directories under `root` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._remove_partial_jobs()

    @property
    def root(self) -> Path:
        return self._root

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self._root / job_id

    def stage(self, data: bytes, data_file: str) -> Path:
        """A hidden directory holding the upload, to become a job with `create` (or be dropped
        with `discard`)."""
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self._root))
        _write_atomic(staging / data_file, data)
        return staging

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def create(self, staging: Path, record: JobRecord, first_events: list[dict[str, Any]]) -> None:
        """Turn `staging` into the job directory of `record`, with its first events."""
        _write_atomic(staging / _JOB_FILE, _job_json(record))
        lines = "".join(json.dumps(event) + "\n" for event in first_events)
        _write_atomic(staging / _EVENTS_FILE, lines.encode())
        os.rename(staging, self.job_dir(record.id))
        _fsync_dir(self._root)

    def save(self, record: JobRecord) -> None:
        _write_atomic(self.job_dir(record.id) / _JOB_FILE, _job_json(record))

    def load(self, job_id: str) -> JobRecord | None:
        """The stored job, or None when there is none with that id."""
        try:
            raw = (self.job_dir(job_id) / _JOB_FILE).read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        return JobRecord.from_dict(json.loads(raw))

    def all(self) -> Iterator[JobRecord]:
        """Every stored job, oldest first. A record that cannot be read (an empty or edited
        file: writes are atomic) is logged and left out, where it stopped the server."""
        records = []
        for entry in os.scandir(self._root):
            if not is_job_id(entry.name):
                continue
            try:
                record = self.load(entry.name)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning(
                    "training job %s: its record cannot be read, left out: %s", entry.name, exc
                )
                continue
            if record is not None:
                records.append(record)
        yield from sorted(records, key=lambda r: r.created_at)

    def append_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Append one event; a line is written whole, so readers see whole lines only
        (a reader ignores a last line without its newline)."""
        with open(self.job_dir(job_id) / _EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def read_events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        """Events number `start` onwards (0-based), in order."""
        try:
            text = (self.job_dir(job_id) / _EVENTS_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1].splitlines()
        return [json.loads(line) for line in complete[start:]]

    def remove(self, job_id: str) -> None:
        """Remove a job's directory: renamed out of the jobs first, so a crash halfway leaves
        no half job, only a leftover that the next start removes."""
        leftover = self._root / f"{_REMOVING}{job_id}"
        try:
            os.rename(self.job_dir(job_id), leftover)
        except FileNotFoundError:
            return
        shutil.rmtree(leftover, ignore_errors=True)

    def _remove_partial_jobs(self) -> None:
        """Staging directories left by a crash never became jobs, and removals it cut short
        were jobs no more: nothing refers to either."""
        for entry in os.scandir(self._root):
            partial = entry.name.startswith((".staging-", _REMOVING))
            if partial and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event as stored and streamed: its type, the time, then its fields."""
    return {"type": kind, "time": round(time.time(), 3), **fields}


def _job_json(record: JobRecord) -> bytes:
    return json.dumps(dataclasses.asdict(record), sort_keys=True).encode()


def _write_atomic(target: Path, data: bytes) -> None:
    """Write to a temp file beside `target`, fsync, rename over it: readers see old or new."""
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_jobs_dir(jobs_dir: Path) -> int:
    """Lock ``jobs_dir`` for one manager's life (the returned descriptor holds the lock);
    JobsUnavailable if a live server holds it already."""
    fd = os.open(jobs_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JobsUnavailable(f"another server manages the training jobs in {jobs_dir}") from None
    return fd
