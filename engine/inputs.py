"""Request inputs to token ids: validation, tokenization, truncation."""

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from engine.errors import InputError, InputTooLong


@dataclass(frozen=True, slots=True)
class Tokenized:
    ids: tuple[tuple[int, ...], ...]  # per text, special tokens included, at most max_tokens
    truncated: tuple[bool, ...]  # per text, whether it was cut


def tokenize_inputs(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int,
    truncate: bool,
    max_inputs: int,
) -> Tokenized:
    """Check and tokenize a request's texts; the field in each error says which text."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError("input must be a string or a list of strings", "input")
    if not texts:
        raise InputError("input is empty: give at least one text", "input")
    if len(texts) > max_inputs:
        raise InputError(f"input has {len(texts)} texts; at most {max_inputs} per request", "input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"input[{i}] must be a string, got {type(text).__name__}", f"input[{i}]"
            )
        if not text.strip():
            raise InputError(f"input[{i}] is empty", f"input[{i}]")
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    ids: list[tuple[int, ...]] = []
    truncated: list[bool] = []
    for i, row in enumerate(encoded["input_ids"]):
        if len(row) <= max_tokens:
            ids.append(tuple(row))
            truncated.append(False)
            continue
        if not truncate:
            raise InputTooLong(
                f"input[{i}] has {len(row)} tokens; the model takes at most {max_tokens} "
                '(send "truncate": true to cut it)',
                f"input[{i}]",
            )
        # keep the leading tokens and the closing special token ([SEP] / </s>)
        ids.append(tuple(row[: max_tokens - 1]) + (row[-1],))
        truncated.append(True)
    return Tokenized(ids=tuple(ids), truncated=tuple(truncated))
