"""Reading and validating a customer's labeled examples (about a thousand ``text,label`` rows).

Every problem is reported by row number, all at once, so one round of fixes is enough: unreadable
rows stop loading (`DataError`); readable data that is unwise to train on is summarised in a
`DataReport` whose errors stop training and whose warnings go into the adapter manifest.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MAX_NAMED_ROWS = 10  # row numbers spelled out in one message before "and N more"
MAX_UNK_ROWS = 50  # rows with unknown tokens kept in a report
TOKENIZE_BATCH_SIZE = 256


@dataclass(frozen=True, slots=True)
class Example:
    """One labeled text, remembering where it came from so every message can point at it."""

    text: str  # as written by the customer; may be empty (validation reports it)
    label: str  # class name, surrounding whitespace stripped
    row: int  # 1-based data row in the source (header excluded); the line number for JSONL


class DataError(ValueError):
    """The data cannot be used; the message names the source and the offending rows."""

    def __init__(self, message: str, *, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = tuple(rows)  # every offending row number, for callers that build their own UI

    @classmethod
    def for_unreadable_rows(cls, source: str, problems: Sequence[tuple[int, str]]) -> DataError:
        """One error for all unreadable rows: ``problems`` holds (row, reason) pairs."""
        shown = "; ".join(f"row {row}: {reason}" for row, reason in problems[:MAX_NAMED_ROWS])
        hidden = len(problems) - MAX_NAMED_ROWS
        more = f"; and {hidden} more" if hidden > 0 else ""
        noun = "row" if len(problems) == 1 else "rows"
        message = f"{source}: {len(problems)} unreadable {noun}: {shown}{more}"
        return cls(message, rows=[row for row, _ in problems])


class _BadRow(Exception):
    """A row that cannot become an Example; the message is the reason shown to the customer."""


def describe_rows(rows: Sequence[int], limit: int = MAX_NAMED_ROWS) -> str:
    """'rows 3, 5 and 12 more' -- short enough for one line of a message."""
    noun = "row" if len(rows) == 1 else "rows"
    shown = ", ".join(str(row) for row in rows[:limit])
    hidden = len(rows) - limit
    return f"{noun} {shown} and {hidden} more" if hidden > 0 else f"{noun} {shown}"


def normalise_text(text: str) -> str:
    """The identity of a text for duplicate detection: case and spacing do not make it new."""
    return " ".join(text.split()).casefold()


def decode_bytes(raw: bytes, source: str = "input") -> str:
    """UTF-8 (a BOM is dropped), else latin-1, which accepts any byte sequence.

    Spreadsheets on Windows still export cp1252/latin-1, and refusing those files helps nobody.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.info("%s is not valid UTF-8; reading it as latin-1", source)
        return raw.decode("latin-1")


def deduplicate(examples: Iterable[Example]) -> list[Example]:
    """The first example of every normalised text (so also its first label), in order."""
    unique: dict[str, Example] = {}
    for example in examples:
        unique.setdefault(normalise_text(example.text), example)
    return list(unique.values())


def clean_examples(examples: Iterable[Example]) -> list[Example]:
    """What training uses: no empty texts, no duplicate texts (first occurrence wins), in order."""
    return deduplicate(example for example in examples if example.text.strip())


def _example_from(record: Any, row: int) -> Example:
    """The checks every source shares; raises _BadRow with a reason the customer can act on."""
    if not isinstance(record, Mapping):
        raise _BadRow(f"expected an object with 'text' and 'label', got {type(record).__name__}")
    missing = [key for key in ("text", "label") if record.get(key) is None]
    if missing:
        raise _BadRow("missing " + " and ".join(f"'{key}'" for key in missing))
    text = record["text"]
    if not isinstance(text, str):
        raise _BadRow(f"'text' must be a string, not {type(text).__name__}")
    label = record["label"]
    if not isinstance(label, str | int):  # ints and bools are common in JSON exports
        raise _BadRow(f"'label' must be a string or an integer, not {type(label).__name__}")
    if not str(label).strip():
        raise _BadRow("empty 'label'")
    return Example(text=text, label=str(label).strip(), row=row)


def _collect(numbered: Iterable[tuple[int, Any]], source: str) -> list[Example]:
    """Examples from (row, record) pairs (a record may be a _BadRow), or one DataError."""
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    for row, record in numbered:
        try:
            if isinstance(record, _BadRow):
                raise record
            examples.append(_example_from(record, row))
        except _BadRow as bad:
            problems.append((row, str(bad)))
    if problems:
        raise DataError.for_unreadable_rows(source, problems)
    return examples


def examples_from_records(
    records: Iterable[Mapping[str, Any]], *, source: str = "input"
) -> list[Example]:
    """In-memory rows (e.g. an HTTP upload) with the same checks as files; rows count from 1."""
    return _collect(enumerate(records, start=1), source)


def _column_index(header: list[str], source: str) -> tuple[int, int]:
    names = [name.strip().casefold() for name in header]
    missing = [column for column in ("text", "label") if column not in names]
    if missing:
        found = ", ".join(repr(name) for name in header) or "nothing"
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; the header row must name "
            f"'text' and 'label' columns (found {found})"
        )
    return names.index("text"), names.index("label")


def _delimited_records(text: str, delimiter: str, source: str) -> Iterable[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{source}: the file is empty; expected a header row with text,label")
        text_at, label_at = _column_index(header, source)
        # Blank lines are skipped but keep their number, so later rows still match the file.
        for row, cells in enumerate(reader, start=1):
            if not cells:
                continue
            if len(cells) != len(header):
                yield row, _BadRow(f"expected {len(header)} columns, found {len(cells)}")
            else:
                yield row, {"text": cells[text_at], "label": cells[label_at]}
    except csv.Error as error:
        raise DataError(f"{source}: cannot parse near line {reader.line_num}: {error}") from error


def _jsonl_records(text: str, source: str) -> Iterable[tuple[int, Any]]:
    # split("\n"), not splitlines(): U+2028 and friends may legally sit inside JSON strings.
    for row, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as error:
            yield row, _BadRow(f"malformed JSON ({error.msg} at column {error.colno})")


_READERS: Mapping[str, Callable[[str, str], Iterable[tuple[int, Any]]]] = MappingProxyType(
    {
        ".csv": lambda text, source: _delimited_records(text, ",", source),
        ".tsv": lambda text, source: _delimited_records(text, "\t", source),
        ".jsonl": _jsonl_records,
        ".ndjson": _jsonl_records,
    }
)


def load_examples(path: str | Path) -> list[Example]:
    """Read labeled examples from .csv, .tsv (header with text and label columns) or .jsonl.

    Raises DataError for a missing file, an unknown extension, missing columns, or unreadable
    rows (all of them named in one message). Empty texts are kept: validation reports them.
    """
    path = Path(path)
    source = str(path)
    read = _READERS.get(path.suffix.lower())
    if read is None:
        kinds = ", ".join(_READERS)
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use {kinds}")
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    examples = _collect(read(decode_bytes(path.read_bytes(), source), source), source)
    logger.debug("loaded %d examples from %s", len(examples), source)
    return examples


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that validation uses."""

    unk_token_id: int | None

    def __call__(self, text: list[str], **kwargs: Any) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class DataReport:
    """What validation found. Errors stop training; warnings go into the adapter manifest."""

    num_rows: int  # examples read, empty ones included
    class_counts: Mapping[str, int]  # label -> non-empty examples, sorted by label
    num_empty: int  # rows whose text is empty or whitespace; training drops them
    empty_rows: tuple[int, ...]  # their row numbers
    num_duplicates: int  # rows whose normalised text already appeared on an earlier row
    duplicate_rows: tuple[int, ...]  # their row numbers
    num_conflicting: int  # distinct duplicated texts that carry more than one label
    unk_token_rate: float  # unk tokens / all tokens over non-empty texts, 0..1
    unk_rows: tuple[int, ...]  # first MAX_UNK_ROWS rows holding at least one unk token
    imbalance_ratio: float  # largest / smallest class count; 0.0 when there are no classes
    warnings: tuple[str, ...]  # worth reading, training still runs
    errors: tuple[str, ...]  # training refuses to run

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists) for the adapter manifest."""
        out = {field.name: getattr(self, field.name) for field in fields(self)}
        out["class_counts"] = dict(self.class_counts)
        return {name: list(v) if isinstance(v, tuple) else v for name, v in out.items()}

    def format(self) -> str:
        """Multi-line summary for the CLI."""
        total = sum(self.class_counts.values()) or 1
        width = max((len(label) for label in self.class_counts), default=0)
        lines = [
            f"rows: {self.num_rows}",
            f"classes: {len(self.class_counts)}, imbalance {self.imbalance_ratio:.1f}x "
            "(largest / smallest)",
        ]
        lines += [
            f"  {label:<{width}}  {count:>7}  {100 * count / total:5.1f}%"
            for label, count in self.class_counts.items()
        ]
        lines.append(
            f"duplicates: {self.num_duplicates} rows, {self.num_conflicting} texts with "
            "conflicting labels"
        )
        lines.append(f"empty rows: {self.num_empty}")
        lines.append(f"unknown tokens: {self.unk_token_rate:.2%} of tokens")
        lines += [f"warning: {warning}" for warning in self.warnings]
        lines += [f"error: {error}" for error in self.errors]
        return "\n".join(lines)


def _find_duplicates(examples: Sequence[Example]) -> tuple[list[int], list[int], int]:
    """(duplicate rows, rows whose label contradicts the first occurrence, conflicting texts)."""
    first_label: dict[str, str] = {}
    duplicate_rows: list[int] = []
    conflict_rows: list[int] = []
    conflicting_texts: set[str] = set()
    for example in examples:
        key = normalise_text(example.text)
        if key not in first_label:
            first_label[key] = example.label
            continue
        duplicate_rows.append(example.row)
        if example.label != first_label[key]:
            conflict_rows.append(example.row)
            conflicting_texts.add(key)
    return duplicate_rows, conflict_rows, len(conflicting_texts)


def _measure_unk(examples: Sequence[Example], tokenizer: Tokenizer) -> tuple[float, list[int]]:
    """(share of tokens that are the unk token, rows holding at least one)."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:  # byte-level vocabularies can spell anything
        return 0.0, []
    num_tokens = num_unk = 0
    unk_rows: list[int] = []
    for start in range(0, len(examples), TOKENIZE_BATCH_SIZE):
        batch = examples[start : start + TOKENIZE_BATCH_SIZE]
        encoded = tokenizer(
            [example.text for example in batch],
            add_special_tokens=False,
            truncation=False,
            verbose=False,  # long texts are fine here: we only count tokens
        )
        for example, ids in zip(batch, encoded["input_ids"], strict=True):
            count = sum(1 for token in ids if token == unk_id)
            num_tokens += len(ids)
            num_unk += count
            if count:
                unk_rows.append(example.row)
    return (num_unk / num_tokens if num_tokens else 0.0), unk_rows


def _class_errors(examples: Sequence[Example], num_rows: int, min_per_class: int) -> list[str]:
    if not examples:
        return ["no examples" if num_rows == 0 else f"all {num_rows} texts are empty"]
    rows_by_label: dict[str, list[int]] = {}
    for example in examples:
        rows_by_label.setdefault(example.label, []).append(example.row)
    errors = []
    if len(rows_by_label) < 2:
        errors.append(f"only one class ({next(iter(rows_by_label))!r}); need at least 2")
    for label, rows in sorted(rows_by_label.items()):
        if len(rows) < min_per_class:
            errors.append(
                f"class {label!r} has {len(rows)} example(s) ({describe_rows(rows)}); "
                f"need at least {min_per_class}"
            )
    return errors


def _check_limits(min_per_class: int, max_unk_rate: float, max_imbalance: float) -> None:
    if min_per_class < 1 or not 0.0 <= max_unk_rate <= 1.0 or max_imbalance < 1.0:
        raise ValueError(
            "need min_examples_per_class >= 1, 0 <= max_unk_rate <= 1, max_imbalance_ratio >= 1; "
            f"got {min_per_class}, {max_unk_rate}, {max_imbalance}"
        )


def _warnings(
    report: DataReport, conflict_rows: list[int], max_unk_rate: float, max_imbalance: float
) -> list[str]:
    warnings = []
    if report.unk_token_rate > max_unk_rate:
        warnings.append(
            f"{report.unk_token_rate:.1%} of tokens are unknown to the model's tokenizer (limit "
            f"{max_unk_rate:.1%}); it cannot read parts of {describe_rows(report.unk_rows)}"
        )
    if report.imbalance_ratio > max_imbalance:
        counts = report.class_counts
        big, small = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
        warnings.append(
            f"classes are imbalanced {report.imbalance_ratio:.1f}x (limit {max_imbalance:g}x): "
            f"{big!r} has {counts[big]} examples, {small!r} has {counts[small]}"
        )
    if report.num_duplicates:
        warnings.append(
            f"{report.num_duplicates} duplicate text(s) ({describe_rows(report.duplicate_rows)});"
            " training keeps only the first occurrence"
        )
    if report.num_conflicting:
        warnings.append(
            f"{report.num_conflicting} duplicated text(s) carry different labels "
            f"({describe_rows(conflict_rows)}); training keeps the first label"
        )
    if report.num_empty:
        rows = describe_rows(report.empty_rows)
        warnings.append(f"{report.num_empty} empty text(s) ({rows}) will be dropped")
    return warnings


def validate_examples(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    *,
    min_examples_per_class: int = 5,
    max_unk_rate: float = 0.02,
    max_imbalance_ratio: float = 10.0,
) -> DataReport:
    """Check examples against what LoRA training on ``tokenizer``'s backbone needs.

    Counts are over non-empty texts; duplicates still count towards their class here.
    """
    _check_limits(min_examples_per_class, max_unk_rate, max_imbalance_ratio)
    examples = list(examples)
    filled = [example for example in examples if example.text.strip()]
    empty_rows = tuple(example.row for example in examples if not example.text.strip())
    class_counts = dict(sorted(Counter(example.label for example in filled).items()))
    duplicate_rows, conflict_rows, num_conflicting = _find_duplicates(filled)
    unk_rate, unk_rows = _measure_unk(filled, tokenizer)
    counts = class_counts.values()
    report = DataReport(
        num_rows=len(examples),
        class_counts=class_counts,
        num_empty=len(empty_rows),
        empty_rows=empty_rows,
        num_duplicates=len(duplicate_rows),
        duplicate_rows=tuple(duplicate_rows),
        num_conflicting=num_conflicting,
        unk_token_rate=unk_rate,
        unk_rows=tuple(unk_rows[:MAX_UNK_ROWS]),
        imbalance_ratio=max(counts) / min(counts) if counts else 0.0,
        warnings=(),
        errors=tuple(_class_errors(filled, len(examples), min_examples_per_class)),
    )
    warnings = _warnings(report, conflict_rows, max_unk_rate, max_imbalance_ratio)
    return replace(report, warnings=tuple(warnings))


def raise_for_errors(report: DataReport, source: str) -> None:
    """Raise one DataError listing every fatal problem in ``report``; nothing if there is none."""
    if report.errors:
        problems = "\n".join(f"  - {error}" for error in report.errors)
        raise DataError(f"{source}: the data cannot be used for training:\n{problems}")
