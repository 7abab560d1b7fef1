"""Checking an uploaded examples file before a job is queued, with data.py's rules."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.data import DATA_SUFFIXES, DataError, load_examples
from training.validation import Tokenizer, validate_examples

UPLOAD_SUFFIXES = DATA_SUFFIXES  # what graft train reads, .ndjson too


class InvalidData(ValueError):
    """The upload cannot be trained on; `rows` names offending rows where known."""

    def __init__(self, message: str, *, rows: Sequence[int] = (), report: Any = None) -> None:
        super().__init__(message)
        self.rows = tuple(rows)  # row numbers as data.py counts them (header excluded)
        self.report = report  # the validation report (a dict) when the rows could be read


def check_suffix(filename: str) -> str:
    """The upload's format suffix; InvalidData for a format load_examples cannot read."""
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        kinds = ", ".join(UPLOAD_SUFFIXES)
        raise InvalidData(f"{filename}: unsupported file type {suffix!r}; use {kinds}")
    return suffix


def validate_upload(path: Path, source: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """The validation report (DataReport.to_dict()) of the upload stored at `path`.

    Raises InvalidData naming the rows for unreadable rows and for fatal problems (too few
    classes or examples per class). Messages say `source` (the tenant's file name), never
    the server's path.
    """
    try:
        examples = load_examples(path)
    except DataError as exc:
        raise InvalidData(str(exc).replace(str(path), source), rows=exc.rows) from None
    report = validate_examples(examples, tokenizer)
    if report.errors:
        problems = "; ".join(report.errors)
        raise InvalidData(
            f"{source}: the data cannot be used for training: {problems}",
            rows=report.error_rows,
            report=report.to_dict(),
        )
    return report.to_dict()
