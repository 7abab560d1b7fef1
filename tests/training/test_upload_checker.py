"""The upload checker process: the same reports and errors as checking in this process."""

import copy
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine import Backbone
from training import load_sms_spam
from training.job_config import JobsUnavailable
from training.job_uploads import InvalidData, validate_upload
from training.upload_checker import UploadChecker, _DefinedTokenizer, _Worker

SMALL = (
    [f"win cash {i}" for i in range(6)] + [f"see you {i}" for i in range(6)],
    ["s"] * 6 + ["h"] * 6,
)
ODD_TEXTS = ["\u200b", "café ☕ 🎉 naïve", "ÆØÅ 東京 ١٢٣", "x" * 3000, "\x00 tab\tend", "  "]


def _write_upload(path: Path, texts: list[str], labels: list[str]) -> Path:
    rows = (json.dumps({"text": t, "label": label}) for t, label in zip(texts, labels, strict=True))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_defined_tokenizer_counts_as_the_hugging_face_one(backbone: Backbone) -> None:
    tokenizer = backbone.tokenizer
    defined = _DefinedTokenizer(tokenizer.backend_tokenizer.to_str(), tokenizer.unk_token_id)
    texts = [example.text for example in load_sms_spam()[:500]] + ODD_TEXTS
    options = {"add_special_tokens": False, "truncation": False, "verbose": False}
    assert defined(texts, **options)["input_ids"] == tokenizer(texts, **options)["input_ids"]
    assert defined.unk_token_id == tokenizer.unk_token_id


@pytest.fixture
def checker(backbone: Backbone):
    started = UploadChecker(copy.deepcopy(backbone.tokenizer))
    started.start()
    yield started
    started.close()


def test_reports_and_refusals_equal_those_made_here(
    checker: UploadChecker, backbone: Backbone, tmp_path: Path
) -> None:
    sms = load_sms_spam()[:300]
    texts = [e.text for e in sms] + ODD_TEXTS + [sms[0].text]  # a duplicate, odd rows
    labels = [e.label for e in sms] + ["ham"] * (len(ODD_TEXTS) + 1)
    upload = _write_upload(tmp_path / "ok.jsonl", texts, labels)
    here = validate_upload(upload, "mine.jsonl", backbone.tokenizer)
    assert checker.check(upload, "mine.jsonl") == here
    assert here["num_rows"] == len(texts) and here["warnings"]

    one_class = _write_upload(tmp_path / "bad.jsonl", ["a", "b", "c"], ["ham"] * 3)
    with pytest.raises(InvalidData, match="mine.jsonl: .*only one class") as caught:
        checker.check(one_class, "mine.jsonl")
    assert caught.value.report["num_rows"] == 3 and caught.value.rows
    unreadable = tmp_path / "bad.csv"
    unreadable.write_text("text,label\nhello,ham\nonly one column\n")
    with pytest.raises(InvalidData, match="1 unreadable row") as caught:
        checker.check(unreadable, "mine.csv")
    assert caught.value.rows == (2,) and str(tmp_path) not in str(caught.value)


def test_a_checker_process_that_dies_is_replaced(checker: UploadChecker, tmp_path: Path) -> None:
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)
    first = checker.check(upload, "a.jsonl")
    pid = checker._worker._process.pid
    os.kill(pid, signal.SIGKILL)
    assert checker.check(upload, "a.jsonl") == first
    assert checker._worker._process.pid != pid


def test_a_stuck_check_times_out_and_a_close_does_not_wait(backbone, tmp_path) -> None:
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)
    checker = UploadChecker(copy.deepcopy(backbone.tokenizer), timeout_s=2.0)
    checker.start()
    first = checker.check(upload, "a.jsonl")
    os.kill(checker._worker._process.pid, signal.SIGSTOP)  # hung, as a stuck check would be
    with pytest.raises(JobsUnavailable, match="took over 2 s; it was stopped"):
        checker.check(upload, "a.jsonl")
    assert checker.check(upload, "a.jsonl") == first  # a fresh process
    os.kill(checker._worker._process.pid, signal.SIGSTOP)
    failed: list[BaseException] = []

    def check_in_thread() -> None:
        try:
            checker.check(upload, "a.jsonl")
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=check_in_thread)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    checker.close()  # kills the stuck process instead of waiting for it
    thread.join(10)
    assert time.monotonic() - started < 1.5 and isinstance(failed[0], JobsUnavailable)
    with pytest.raises(JobsUnavailable, match="^the upload checker is closed$"):
        checker.check(upload, "a.jsonl")


def test_a_checker_that_cannot_start_is_an_error_not_a_hang(backbone, tmp_path) -> None:
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)
    checker = UploadChecker(copy.deepcopy(backbone.tokenizer))
    checker.start()
    checker._definition_file.write_text("not a tokenizer")  # every new process dies starting
    os.kill(checker._worker._process.pid, signal.SIGKILL)
    with pytest.raises(JobsUnavailable, match="the upload checker stopped"):
        checker.check(upload, "a.jsonl")
    checker.close()


def test_a_tokenizer_without_a_definition_is_used_here(backbone: Backbone, tmp_path) -> None:
    class Slow:  # a Python-only tokenizer: nothing to hand to another process
        unk_token_id = backbone.tokenizer.unk_token_id

        def __call__(self, text, **kwargs):
            return backbone.tokenizer(text, **kwargs)

    checker = UploadChecker(Slow())
    checker.start()
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)
    assert checker.check(upload, "a.jsonl")["num_rows"] == 12 and checker._worker is None
    checker.close()


def _check_as_a_daemon(tokenizer, path: Path, results) -> None:
    checker = UploadChecker(tokenizer)
    checker.start()  # a daemonic process may not start children
    results.put((checker.check(path, "a.jsonl")["num_rows"], checker._worker is None))
    checker.close()


def test_a_daemonic_server_process_checks_uploads_itself(backbone: Backbone, tmp_path) -> None:
    """Benchmarks run servers as daemonic processes, which may not have children."""
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    args = (copy.deepcopy(backbone.tokenizer), upload, results)
    daemon = context.Process(target=_check_as_a_daemon, args=args, daemon=True)
    daemon.start()
    assert results.get(timeout=60) == (12, True)
    daemon.join(60)


def _half_a_reply(conn) -> None:
    """A checker stopped halfway through its reply: a length header, then nothing."""
    conn.recv()
    os.write(conn.fileno(), (1 << 20).to_bytes(4, "big") + b"partial")
    time.sleep(60)


def test_a_reply_stopped_halfway_times_out_too() -> None:
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_half_a_reply, args=(child_end,), daemon=True)
    process.start()
    child_end.close()
    worker = _Worker(process, parent_end)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        worker.call("upload.jsonl", "a.jsonl", timeout_s=1.0)
    assert time.monotonic() - started < 5
    process.join(5)
    assert process.exitcode == -signal.SIGKILL  # killed by the timeout


def test_no_checker_process_to_be_had(backbone, tmp_path, monkeypatch) -> None:
    upload = _write_upload(tmp_path / "ok.jsonl", *SMALL)

    def refuse(*args) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(_Worker, "start", refuse)
    at_start = UploadChecker(copy.deepcopy(backbone.tokenizer))
    at_start.start()  # checks in this process instead
    assert at_start.check(upload, "a.jsonl")["num_rows"] == 12 and at_start._worker is None
    at_start.close()
    monkeypatch.undo()
    later = UploadChecker(copy.deepcopy(backbone.tokenizer))
    later.start()
    os.kill(later._worker._process.pid, signal.SIGKILL)
    monkeypatch.setattr(_Worker, "start", refuse)
    with pytest.raises(JobsUnavailable, match="cannot start the upload checker"):
        later.check(upload, "a.jsonl")
    later.close()
