"""Checking training uploads in a process of their own.

Reading and checking a 20 MB upload is seconds of Python work. On a thread of the server's
process it holds the interpreter lock against the event loop, and every request the process
answers waits behind it (benchmarks/upload_stall.py measures how long). The checker process
reads with data.py's rules, as before, and tokenizes with the `tokenizers` library from the
serving tokenizer's own definition, so it starts without torch or transformers. It runs at a
lower priority than serving, one upload at a time; one that dies is replaced, one that takes
too long is killed, and closing kills it rather than waiting for a check.
"""

import logging
import multiprocessing
import os
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from training.job_config import JobsUnavailable
from training.job_uploads import InvalidData, validate_upload
from training.validation import Tokenizer

log = logging.getLogger(__name__)

_NICENESS = 10  # added to the checker's niceness: serving comes first on a busy machine
CHECK_TIMEOUT_S = 600.0  # a 20 MB upload takes 6-8 s on the 2-core VM


class UploadChecker:
    """`check` validates an upload file as `validate_upload` does, in the checker process.

    Uploads are checked in this process instead when the tokenizer has no `tokenizers`
    definition (a slow, Python-only one) or this process may not start one (a daemonic
    process: benchmarks run servers so). Call `start` first and `close` last.
    """

    def __init__(self, tokenizer: Tokenizer, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self._tokenizer = tokenizer
        self._timeout_s = timeout_s
        self._definition = _definition(tokenizer)
        self._definition_file: Path | None = None
        self._worker: _Worker | None = None
        self._lock = threading.Lock()  # guards _worker and _is_closed, never held while waiting
        self._checking = threading.Lock()
        self._is_closed = False

    def start(self) -> None:
        """Start the checker process now, so that the first upload does not wait for it."""
        if self._definition is None:
            return
        if multiprocessing.current_process().daemon:
            log.info("checking training uploads in this process: a daemon has no children")
            self._definition = None
            return
        fd, name = tempfile.mkstemp(prefix="graft-tokenizer-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(self._definition)
        self._definition_file = Path(name)
        try:
            self._worker = self._new_worker()
        except (OSError, RuntimeError) as exc:  # no process to be had (a process limit, say)
            log.warning("checking training uploads in this process: %s", exc)
            self._definition = None

    def check(self, path: Path, source: str) -> dict[str, Any]:
        """The validation report of the file at `path`; InvalidData as `validate_upload`,
        JobsUnavailable when the checker died twice, timed out or was closed."""
        with self._checking:  # one at a time: neither the process nor a tokenizer is reentrant
            if self._definition is None:
                return validate_upload(path, source, self._tokenizer)
            for attempt in range(2):
                try:
                    worker = self._current_worker()
                except JobsUnavailable:  # closed (a RuntimeError too, not one to wrap)
                    raise
                except (OSError, RuntimeError) as exc:
                    raise JobsUnavailable(f"cannot start the upload checker: {exc}") from None
                try:
                    outcome = worker.call(str(path), source, self._timeout_s)
                except TimeoutError:
                    self._replace(worker)
                    raise JobsUnavailable(
                        f"checking the upload took over {self._timeout_s:g} s; it was stopped"
                    ) from None
                except (EOFError, OSError):  # killed (out of memory, say), or closed
                    self._replace(worker)
                    if attempt or self._is_closed:
                        raise JobsUnavailable("the upload checker stopped; try again") from None
                    log.warning("the upload checker process died; starting another")
                    continue
                if outcome[0] == "invalid":
                    _, message, rows, report = outcome
                    raise InvalidData(message, rows=rows, report=report)
                if outcome[0] == "error":
                    raise RuntimeError(f"checking the upload failed: {outcome[1]}")
                return outcome[1]
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Kill the checker process (a check in progress fails with JobsUnavailable); idempotent."""
        with self._lock:
            self._is_closed = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
        if self._definition_file is not None:
            self._definition_file.unlink(missing_ok=True)

    def _current_worker(self) -> "_Worker":
        with self._lock:
            if self._is_closed:
                raise JobsUnavailable("the upload checker is closed")
            if self._worker is None:
                self._worker = self._new_worker()
            return self._worker

    def _replace(self, failed: "_Worker") -> None:
        """Drop `failed`; the next check starts a fresh process."""
        failed.kill()
        with self._lock:
            if self._worker is failed:
                self._worker = None

    def _new_worker(self) -> "_Worker":
        assert self._definition_file is not None
        return _Worker.start(self._definition_file, self._tokenizer.unk_token_id)


class _Worker:
    """One checker process and the pipe to it; its arguments are small (a file's path), so
    starting it never blocks on a child that died before reading them.

    `kill` may come from any thread while `call` runs (a close, a timeout): it kills and reaps
    the process at once, and the pipe is closed by whichever of the two ends last, so that no
    thread reads a descriptor another has closed."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self._process, self._conn = process, conn
        self._lock = threading.Lock()
        self._is_in_call = False
        self._is_dead = False

    @classmethod
    def start(cls, definition_file: Path, unk_token_id: int | None) -> "_Worker":
        context = multiprocessing.get_context("spawn")
        conn, child_end = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(child_end, str(definition_file), unk_token_id),
            name="graft-upload-check",
            daemon=True,
        )
        process.start()
        child_end.close()
        return cls(process, conn)

    def call(self, path: str, source: str, timeout_s: float) -> tuple:
        """The reply; TimeoutError when none came whole within `timeout_s` (the process is
        then killed: a reply stopped halfway would block a bare read for good); EOFError when
        the process died or was killed."""
        with self._lock:
            if self._is_dead:
                raise EOFError
            self._is_in_call = True
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self._process.kill()  # ends the read below with EOFError

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        try:
            self._conn.send((path, source))
            return self._conn.recv()
        except (EOFError, OSError):
            if expired.is_set():
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._is_in_call = False
                if self._is_dead:
                    self._conn.close()

    def kill(self) -> None:
        with self._lock:
            if self._is_dead:
                return
            self._is_dead = True
            close_now = not self._is_in_call
        self._process.kill()
        self._process.join()
        if close_now:
            self._conn.close()


def _definition(tokenizer: Tokenizer) -> str | None:
    """The `tokenizers` JSON of a fast Hugging Face tokenizer, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else backend.to_str()


class _DefinedTokenizer:
    """A `tokenizers.Tokenizer` answering the calls validation makes, as the Hugging Face
    tokenizer it was defined from answers them (no special tokens, no truncation)."""

    def __init__(self, definition: str, unk_token_id: int | None) -> None:
        from tokenizers import Tokenizer as Defined

        self._tokenizer = Defined.from_str(definition)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.unk_token_id = unk_token_id

    def __call__(self, text: list[str], **kwargs: Any) -> dict[str, list[list[int]]]:
        encoded = self._tokenizer.encode_batch(text, add_special_tokens=False)
        return {"input_ids": [item.ids for item in encoded]}


def _child_main(conn: Connection, definition_file: str, unk_token_id: int | None) -> None:
    """Check uploads as the pipe asks, until it closes. Replies are ("ok", report),
    ("invalid", message, rows, report) (InvalidData's fields, which its pickling would lose)
    or ("error", description)."""
    os.nice(_NICENESS)
    tokenizer = _DefinedTokenizer(Path(definition_file).read_text("utf-8"), unk_token_id)
    while True:
        try:
            path, source = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", validate_upload(Path(path), source, tokenizer)))
        except InvalidData as exc:
            conn.send(("invalid", str(exc), exc.rows, exc.report))
        except Exception as exc:  # a bug: reported, and the process goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
