"""Reading a customer's labeled examples (about a thousand ``text,label`` rows).

Every problem is reported by row number, all at once, so one round of fixes is enough: unreadable
rows stop loading (`DataError`); readable data that is unwise to train on is summarised by
training/validation.py in a `DataReport`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

MAX_NAMED_ROWS = 10  # row numbers spelled out in one message before "and N more"


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
    """The identity of a text for duplicate detection: case, spacing, composed or decomposed
    accents and invisible format characters do not make it new. A text written once composed
    (NFC) and once decomposed (NFD) tokenizes alike, and sat on both sides of a held-out
    split."""
    if not text.isascii():  # NFC, not NFKC: "m²" and "m2" tokenize apart
        text = unicodedata.normalize("NFC", text)
        text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(text.split()).casefold()


def decode_bytes(raw: bytes, source: str = "input") -> str:
    """UTF-16 when the bytes start with its byte-order mark (Excel's "Unicode text"
    export), else UTF-8 (a BOM is dropped), else cp1252, else latin-1, which accepts any byte
    sequence; a UTF-8 file with lines of another encoding, line by line (`_mixed_lines`).

    Spreadsheets on Windows still export cp1252, and refusing those files helps nobody. Read
    as latin-1, its quotes, dashes and euro sign (0x80-0x9F) became control characters the
    tokenizer drops; latin-1 proper has no printable character there to lose.
    """
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass  # a latin-1 file that happens to start with those two bytes
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.info("%s is not valid UTF-8", source)
    mixed = _mixed_lines(raw, source)
    if mixed is not None:
        return mixed
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        logger.info("%s is not valid cp1252", source)
    return raw.decode("latin-1")  # cp1252 leaves five bytes undefined


# characters a UTF-8 file holds that cp1252 bytes seldom make by chance: Latin-1's accented
# letters (two bytes led by C2 or C3, "Ã©" read as cp1252) and anything of three bytes or more.
# Two-byte ones from U+0100 on are what cp1252 pairs such as "ß…" (DF 85: NKo) decode to.
_UTF8_EVIDENCE = re.compile("[\u0080-\u00ff\u0800-\ud7ff\ue000-\U0010ffff]")
_LINE_BREAK = re.compile(rb"(\r\n|\r|\n)")


def _mixed_lines(raw: bytes, source: str) -> str | None:
    """A file of UTF-8 lines and lines UTF-8 cannot hold (a row pasted from a cp1252 file),
    decoded line by line; None where the lines showing UTF-8 are no more than the others (a
    cp1252 file, whose accented capital before a symbol can make a valid pair by chance).
    Decoded whole as cp1252, its UTF-8 rows' accents became mojibake, labels included
    (négatif: nÃ©gatif), and trained so silently. Called on bytes that are not UTF-8."""
    parts = _LINE_BREAK.split(raw.removeprefix(codecs.BOM_UTF8))
    lines: list[str | None] = []  # None: not UTF-8
    for part in parts[::2]:  # lines at even places, their breaks between
        try:
            lines.append(part.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    stray = lines.count(None)
    if sum(1 for line in lines if line and _UTF8_EVIDENCE.search(line)) <= stray:
        return None
    for index, line in enumerate(lines):
        if line is None:
            part = parts[2 * index]
            try:
                lines[index] = part.decode("cp1252")
            except UnicodeDecodeError:
                lines[index] = part.decode("latin-1")
    parts[::2] = lines
    parts[1::2] = [part.decode("ascii") for part in parts[1::2]]
    logger.warning("%s: %d line(s) are not UTF-8, read as cp1252 (or latin-1)", source, stray)
    return "".join(parts)


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
    for key, value in (("text", text), ("label", str(label))):
        _refuse_unpaired_surrogate(key, value)
    return Example(text=text, label=str(label).strip(), row=row)


def _refuse_unpaired_surrogate(key: str, value: str) -> None:
    """A JSON ``\\ud800`` escape without its pair reads as a lone surrogate: not a character,
    and nothing downstream (the tokenizer, UTF-8, the manifest) takes it."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        raise _BadRow(
            f"'{key}' holds an unpaired surrogate (U+{code:04X}) at character {error.start}"
        ) from None


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
    for column in ("text", "label"):
        if names.count(column) > 1:
            raise DataError(f"{source}: the header names {column!r} more than once")
    return names.index("text"), names.index("label")


def _csv_delimiter(text: str) -> str:
    """',' unless the header row has no comma and a semicolon: spreadsheets in locales that
    write decimal commas save "CSV" with semicolons."""
    end = text.find("\n")
    header = text if end < 0 else text[:end]  # not split(): that copies the whole file
    return ";" if "," not in header and ";" in header else ","


# csv's default cap on one field is 128 KiB: a long document (truncated at training anyway)
# would fail the whole file. The file's own size is what bounds a field.
_MAX_FIELD_CHARS = 2**31 - 1


def _delimited_records(text: str, delimiter: str, source: str) -> Iterable[tuple[int, Any]]:
    if csv.field_size_limit() < _MAX_FIELD_CHARS:
        csv.field_size_limit(_MAX_FIELD_CHARS)  # process-wide, and only ever raised
    # TSV has no quoting: a text's opening quote read as CSV's swallowed the lines up to the
    # next quote, rows and all, and dropped the quote marks of `"Great" product`
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # strict: an unclosed quote swallowed the rows after it into one text, trained on silently
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{source}: the file is empty; expected a header row with text,label")
        text_at, label_at = _column_index(header, source)
    except csv.Error as error:
        raise DataError(f"{source}: cannot parse near line {reader.line_num}: {error}") from error
    # Blank lines are skipped but keep their number, so later rows still match the file.
    row = 0
    while True:
        row += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # strict: a stray quote, named by its row; reading goes on
            yield row, _BadRow(f"{error} (near line {reader.line_num}; quote a text with quotes)")
            continue
        if not cells:
            continue
        if len(cells) != len(header):
            yield row, _BadRow(f"expected {len(header)} columns, found {len(cells)}")
        else:
            yield row, {"text": cells[text_at], "label": cells[label_at]}


def _jsonl_records(text: str, source: str) -> Iterable[tuple[int, Any]]:
    # split("\n"), not splitlines(): U+2028 and friends may legally sit inside JSON strings.
    for row, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_Object)
        except json.JSONDecodeError as error:
            record = _BadRow(f"malformed JSON ({error.msg} at column {error.colno})")
        except RecursionError:
            record = _BadRow("malformed JSON (arrays or objects nested too deeply)")
        except ValueError as error:  # e.g. an integer past Python's 4,300-digit limit
            record = _BadRow(f"malformed JSON ({error})")
        if isinstance(record, _Object) and record.twice is not None:
            record = _BadRow(f"{record.twice!r} is given twice")
        yield row, record


class _Object(dict):
    """A JSON object that remembers a key it was given twice (json.loads keeps the last
    value, silently): a row's own, not one inside a value its reader ignores."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.twice: str | None = None
        if len(self) != len(pairs):
            seen: set[str] = set()
            self.twice = next(key for key, _ in pairs if key in seen or seen.add(key))


_READERS: Mapping[str, Callable[[str, str], Iterable[tuple[int, Any]]]] = MappingProxyType(
    {
        ".csv": lambda text, source: _delimited_records(text, _csv_delimiter(text), source),
        ".tsv": lambda text, source: _delimited_records(text, "\t", source),
        ".jsonl": _jsonl_records,
        ".ndjson": _jsonl_records,
    }
)
DATA_SUFFIXES = tuple(_READERS)  # the file types read, by name


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
