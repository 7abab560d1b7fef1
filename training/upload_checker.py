"""Checking training uploads in a process of their own.

Reading and checking a 20 MB upload is a second or more of Python work. On a thread of the
server's process it holds the interpreter lock against the event loop, and every request the
process answers waits behind it (benchmarks/upload_stall.py measures how long). The checker
process reads with data.py's rules, as before, and tokenizes with the `tokenizers` library from
the serving tokenizer's own definition, so it starts without torch or transformers. It runs at
a lower priority than serving, and one upload at a time.
"""

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from training.job_config import JobsUnavailable
from training.job_uploads import InvalidData, validate_upload
from training.validation import Tokenizer

log = logging.getLogger(__name__)

_NICENESS = 10  # added to the checker's niceness: serving comes first on a busy machine


class UploadChecker:
    """`check` validates an upload file as `validate_upload` does, in the checker process.

    A tokenizer without a `tokenizers` definition (a slow, Python-only one) is used in this
    process instead, as before. Call `start` first and `close` last.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._definition = _definition(tokenizer)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the checker process now, so that the first upload does not wait for it.

        A daemonic process (a server a benchmark runs) may not have children, and a process
        that cannot be started is logged: uploads are then checked in this process.
        """
        if self._definition is None:
            return
        if multiprocessing.current_process().daemon:
            log.info("checking training uploads in this process: a daemon has no children")
            self._definition = None
            return
        try:
            self._pool = self._new_pool()
        except (OSError, RuntimeError) as exc:
            log.warning("checking training uploads in this process: %s", exc)
            self._definition = None

    def check(self, path: Path, source: str) -> dict[str, Any]:
        """The validation report of the file at `path`; InvalidData as `validate_upload`."""
        if self._definition is None:
            return validate_upload(path, source, self._tokenizer)
        for attempt in range(2):
            pool = self._current_pool()
            try:
                outcome = pool.submit(_check_in_child, str(path), source).result()
            except BrokenProcessPool:  # killed (out of memory, say): a fresh one, once
                log.warning("the upload checker process died; starting another")
                self._replace(pool)
                if attempt:
                    raise JobsUnavailable("the upload checker died twice; try again") from None
                continue
            if outcome[0] == "invalid":
                _, message, rows, report = outcome
                raise InvalidData(message, rows=rows, report=report)
            return outcome[1]
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the checker process; idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                raise JobsUnavailable("the upload checker is not running")
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=get_context("spawn"),
            initializer=_start_child,
            initargs=(self._definition, self._tokenizer.unk_token_id),
        )
        pool.submit(os.getpid)  # start the process now rather than with the first upload
        return pool


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


_child_tokenizer: _DefinedTokenizer | None = None


def _start_child(definition: str, unk_token_id: int | None) -> None:
    global _child_tokenizer
    os.nice(_NICENESS)
    _child_tokenizer = _DefinedTokenizer(definition, unk_token_id)


def _check_in_child(path: str, source: str) -> tuple:
    """("ok", report) or ("invalid", message, rows, report): InvalidData's fields, which its
    own pickling would lose."""
    assert _child_tokenizer is not None
    try:
        return ("ok", validate_upload(Path(path), source, _child_tokenizer))
    except InvalidData as exc:
        return ("invalid", str(exc), exc.rows, exc.report)
