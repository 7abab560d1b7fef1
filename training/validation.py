"""Validating a customer's labeled examples: what is unwise to train on, by row number.

Readable data that is unwise to train on is summarised in a `DataReport` whose errors stop
training and whose warnings go into the adapter manifest (reading the rows is training/data.py).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from registry import shown
from training.data import DataError, Example, deduplicate, describe_rows, normalise_text

# Row numbers a report lists for each finding, and classes it names one by one; the counts
# stay whole. A report goes into every job record, event and answer: a 20 MB upload of one
# duplicated line listed 5 million rows, 40 MB a response (a review session's repro).
MAX_REPORT_ROWS = 50
MAX_NAMED_CLASSES = 20  # "class 'x' has 2 example(s)" errors before "and N more classes"
MAX_CLASSES = 10_000  # distinct labels a classifier may have; class_counts holds at most these
TOKENIZE_BATCH_SIZE = 256


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
    empty_rows: tuple[int, ...]  # the first MAX_REPORT_ROWS of their row numbers
    num_duplicates: int  # rows whose normalised text already appeared on an earlier row
    duplicate_rows: tuple[int, ...]  # the first MAX_REPORT_ROWS of their row numbers
    num_conflicting: int  # distinct duplicated texts that carry more than one label
    unk_token_rate: float  # unk tokens / all tokens over non-empty texts, 0..1
    unk_rows: tuple[int, ...]  # first MAX_REPORT_ROWS rows holding at least one unk token
    imbalance_ratio: float  # largest / smallest class count; 0.0 when there are no classes
    warnings: tuple[str, ...]  # worth reading, training still runs
    errors: tuple[str, ...]  # training refuses to run
    # the rows of classes too small to train on, ascending: the first MAX_REPORT_ROWS
    error_rows: tuple[int, ...]
    num_classes: int  # distinct labels; past MAX_CLASSES, class_counts keeps the largest

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
            f"classes: {self.num_classes}, imbalance {self.imbalance_ratio:.1f}x "
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


def _measure_tokens(
    examples: Sequence[Example], tokenizer: Tokenizer
) -> tuple[float, list[int], set[int]]:
    """(share of tokens that are the unk token, rows holding at least one, positions in
    ``examples`` of no token at all: texts such as "\u200b" that are not blank to ``strip``
    but that the tokenizer drops whole, which the model would see as empty)."""
    unk_id = tokenizer.unk_token_id  # None: byte-level vocabularies spell anything
    num_tokens = num_unk = 0
    unk_rows: list[int] = []
    tokenless: set[int] = set()
    for start in range(0, len(examples), TOKENIZE_BATCH_SIZE):
        batch = examples[start : start + TOKENIZE_BATCH_SIZE]
        encoded = tokenizer(
            [example.text for example in batch],
            add_special_tokens=False,
            truncation=False,
            verbose=False,  # long texts are fine here: we only count tokens
        )
        for offset, (example, ids) in enumerate(zip(batch, encoded["input_ids"], strict=True)):
            count = 0 if unk_id is None else sum(1 for token in ids if token == unk_id)
            num_tokens += len(ids)
            num_unk += count
            if count:
                unk_rows.append(example.row)
            if not ids:
                tokenless.add(start + offset)
    return (num_unk / num_tokens if num_tokens else 0.0), unk_rows, tokenless


def _class_errors(
    examples: Sequence[Example], every_row: Sequence[Example], min_per_class: int
) -> tuple[list[str], list[int]]:
    """The fatal problems and the rows of the classes they name. Judged on what training
    keeps (`clean_examples`, here ``examples``): a class of 20 copies of one text is one
    example, too few to split and train on, and a class whose texts are all empty (among
    ``every_row``) has none."""
    if not examples:
        num_rows = len(every_row)
        return ["no examples" if num_rows == 0 else f"all {num_rows} texts are empty"], []
    rows_by_label: dict[str, list[int]] = {}
    for example in deduplicate(examples):
        rows_by_label.setdefault(example.label, []).append(example.row)
    counts = Counter(example.label for example in examples)  # duplicates included
    empty_by_label: dict[str, list[int]] = {}  # labels none of whose texts is kept
    for example in every_row:
        if example.label not in counts:
            empty_by_label.setdefault(example.label, []).append(example.row)
    errors: list[str] = []
    error_rows: list[int] = []
    if len(counts) < 2:
        errors.append(f"only one class ({next(iter(counts))!r}); need at least 2")
    num_named = len(errors)
    for label in sorted(counts.keys() | empty_by_label.keys()):
        rows = rows_by_label.get(label, [])
        if len(rows) >= min_per_class:
            continue
        if label not in counts:  # every text of it is empty
            empty = empty_by_label[label]
            error_rows += empty
            verb = "is" if len(empty) == 1 else "are"
            errors.append(
                f"class {label!r} has no text to train on: its {describe_rows(empty)} {verb} empty"
            )
            continue
        error_rows += rows
        where = f" ({describe_rows(rows)})" if rows else ""
        has_copies = len(rows) < counts[label]
        count = f"{len(rows)} distinct example(s)" if has_copies else f"{len(rows)} example(s)"
        dropped = " once duplicate texts are dropped" if has_copies else ""
        errors.append(f"class {label!r} has {count}{where}{dropped}; need at least {min_per_class}")
    if len(errors) - num_named > MAX_NAMED_CLASSES:
        hidden = len(errors) - num_named - MAX_NAMED_CLASSES
        errors[num_named + MAX_NAMED_CLASSES :] = [
            f"and {hidden} more classes with too few examples"
        ]
    return errors, sorted(error_rows)


def _check_limits(min_per_class: int, max_unk_rate: float, max_imbalance: float) -> None:
    if min_per_class < 1 or not 0.0 <= max_unk_rate <= 1.0 or max_imbalance < 1.0:
        raise ValueError(
            "need min_examples_per_class >= 1, 0 <= max_unk_rate <= 1, max_imbalance_ratio >= 1; "
            f"got {min_per_class}, {max_unk_rate}, {max_imbalance}"
        )


@dataclass(frozen=True, slots=True)
class _FoundRows:
    """Every row of each finding, before a report keeps the first MAX_REPORT_ROWS: the
    warnings' "and N more" counts them all."""

    duplicates: Sequence[int]
    conflicts: Sequence[int]  # duplicated texts whose label contradicts the first
    empty: Sequence[int]
    unk: Sequence[int]


def _warnings(
    report: DataReport, rows: _FoundRows, max_unk_rate: float, max_imbalance: float
) -> list[str]:
    warnings = []
    if report.unk_token_rate > max_unk_rate:
        warnings.append(
            f"{report.unk_token_rate:.1%} of tokens are unknown to the model's tokenizer (limit "
            f"{max_unk_rate:.1%}); it cannot read parts of {describe_rows(rows.unk)}"
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
            f"{report.num_duplicates} duplicate text(s) ({describe_rows(rows.duplicates)});"
            " training keeps only the first occurrence"
        )
    if report.num_conflicting:
        warnings.append(
            f"{report.num_conflicting} duplicated text(s) carry different labels "
            f"({describe_rows(rows.conflicts)}); training keeps the first label"
        )
    if report.num_empty:
        named = describe_rows(rows.empty)
        warnings.append(f"{report.num_empty} empty text(s) ({named}) will be dropped")
    for group in _look_alike(report.class_counts):
        named = " and ".join(f"{shown(label)} ({report.class_counts[label]})" for label in group)
        warnings.append(
            f"labels {named} differ only in case, form or invisible characters; "
            "they train as separate classes"
        )
    return warnings


def _look_alike(labels: Iterable[str]) -> list[list[str]]:
    """Labels that read the same once case, Unicode form (NFKC) and invisible format
    characters (a zero-width space) are set aside: likely one class typed two ways."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        folded = unicodedata.normalize("NFKC", label).casefold()
        folded = "".join(c for c in folded if unicodedata.category(c) != "Cf").strip()
        groups.setdefault(folded, []).append(label)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def validate_examples(
    examples: Iterable[Example],
    tokenizer: Tokenizer,
    *,
    min_examples_per_class: int = 5,
    max_unk_rate: float = 0.02,
    max_imbalance_ratio: float = 10.0,
) -> DataReport:
    """Check examples against what LoRA training on ``tokenizer``'s backbone needs.

    Counts are over non-empty texts, duplicates included; the errors judge what training
    keeps, without duplicates. A text the tokenizer drops whole counts as empty, as it is
    (`empty_rows`), and training leaves it out too.
    """
    _check_limits(min_examples_per_class, max_unk_rate, max_imbalance_ratio)
    examples = list(examples)
    filled = [example for example in examples if example.text.strip()]
    unk_rate, unk_rows, tokenless = _measure_tokens(filled, tokenizer)
    filled = [example for i, example in enumerate(filled) if i not in tokenless]
    kept = {id(example) for example in filled}
    empty_rows = [example.row for example in examples if id(example) not in kept]
    all_counts = Counter(example.label for example in filled)
    class_counts = dict(sorted(all_counts.most_common(MAX_CLASSES)))
    duplicate_rows, conflict_rows, num_conflicting = _find_duplicates(filled)
    counts = all_counts.values()
    errors, error_rows = _class_errors(filled, examples, min_examples_per_class)
    if len(all_counts) > MAX_CLASSES:
        errors.insert(0, f"{len(all_counts)} distinct labels; at most {MAX_CLASSES} classes")
    report = DataReport(
        num_rows=len(examples),
        class_counts=class_counts,
        num_empty=len(empty_rows),
        empty_rows=tuple(empty_rows[:MAX_REPORT_ROWS]),
        num_duplicates=len(duplicate_rows),
        duplicate_rows=tuple(duplicate_rows[:MAX_REPORT_ROWS]),
        num_conflicting=num_conflicting,
        unk_token_rate=unk_rate,
        unk_rows=tuple(unk_rows[:MAX_REPORT_ROWS]),
        imbalance_ratio=max(counts) / min(counts) if counts else 0.0,
        warnings=(),
        errors=tuple(errors),
        error_rows=tuple(error_rows[:MAX_REPORT_ROWS]),
        num_classes=len(all_counts),
    )
    found = _FoundRows(duplicate_rows, conflict_rows, empty_rows, unk_rows)
    warnings = _warnings(report, found, max_unk_rate, max_imbalance_ratio)
    return replace(report, warnings=tuple(warnings))


def drop_tokenless(examples: Sequence[Example], tokenizer: Tokenizer) -> list[Example]:
    """The non-blank ``examples`` the tokenizer keeps something of, which is what training
    can learn from (`validate_examples` counts the rest as empty)."""
    filled = [example for example in examples if example.text.strip()]
    _, _, tokenless = _measure_tokens(filled, tokenizer)
    return [example for i, example in enumerate(filled) if i not in tokenless]


def raise_for_errors(report: DataReport, source: str) -> None:
    """Raise one DataError listing every fatal problem in ``report``; nothing if there is none."""
    if report.errors:
        problems = "\n".join(f"  - {error}" for error in report.errors)
        raise DataError(f"{source}: the data cannot be used for training:\n{problems}")
