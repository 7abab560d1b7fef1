"""Request inputs to token ids: validation, tokenization, truncation."""

import array
import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer
from transformers import PreTrainedTokenizerBase

from engine.errors import InputError, InputTooLong


@dataclass(frozen=True, slots=True)
class Tokenized:
    ids: tuple[tuple[int, ...], ...]  # per text, special tokens included, at most max_tokens
    truncated: tuple[bool, ...]  # per text, whether it was cut


class TextEncoder:
    """Token ids of whole texts, special tokens included: never truncated, never padded.

    The Hugging Face call goes through the Rust core's ``encode_batch``, which hands even
    one text to the tokenizers library's worker pool: with both cores busy (the model thread
    holds one), that hand-off waited up to 4 ms for a core, and small requests tokenize on
    the event loop. ``inline`` encodes text by text on the calling thread instead (holding
    the interpreter lock, ~50 us for an SMS); ``pooled`` keeps the worker pool, which releases
    the lock, for large requests off the event loop. The core is a private copy, so no
    caller's truncation or padding settings leak in or out. Slow (Python) tokenizers keep
    the Hugging Face call for both.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        # a text encoded to no more ids than these holds nothing the model reads
        self.num_special_ids = tokenizer.num_special_tokens_to_add(pair=False)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._core: Tokenizer | None = None
        if getattr(tokenizer, "is_fast", False) and isinstance(backend, Tokenizer):
            try:
                core = Tokenizer.from_str(backend.to_str())
            except Exception:  # a component that does not serialize: keep the HF call
                return
            core.no_truncation()
            core.no_padding()
            self._core = core

    @property
    def is_fast(self) -> bool:
        return self._core is not None

    def inline(self, texts: Sequence[str]) -> list[list[int]]:
        if self._core is None:
            return self._slow(texts)
        return [self._core.encode(text, add_special_tokens=True).ids for text in texts]

    def pooled(self, texts: Sequence[str]) -> list[list[int]]:
        if self._core is None:
            return self._slow(texts)
        return [e.ids for e in self._core.encode_batch(list(texts), add_special_tokens=True)]

    def bounded(
        self, texts: Sequence[str], max_tokens: int, *, pooled: bool
    ) -> list[tuple[list[int], bool]]:
        """Per text, its ids and whether they come from a prefix of it (`leading_ids`).

        A text far longer than the model reads is encoded from a prefix: a tenant's 4 MB
        document (truncated anyway) cost 2.6 s of a core, and the model reads 512 tokens.
        """
        limit = max_tokens * _CHARS_PER_TOKEN
        if self._core is None or all(len(text) <= limit for text in texts):
            return [(row, False) for row in (self.pooled if pooled else self.inline)(texts)]
        heads = [text[:limit] for text in texts]
        if pooled:
            encodings = self._core.encode_batch(heads, add_special_tokens=True)
        else:
            encodings = [self._core.encode(head, add_special_tokens=True) for head in heads]
        rows: list[tuple[list[int], bool]] = []
        for text, encoding in zip(texts, encodings, strict=True):
            if len(text) <= limit:
                rows.append((encoding.ids, False))
            else:
                rows.append(self._leading(text, encoding, limit, max_tokens))
        return rows

    def _leading(
        self, text: str, encoding: Encoding, chars: int, max_tokens: int
    ) -> tuple[list[int], bool]:
        """``text``'s ids from the shortest prefix, growing 4x, that shows `leading_ids`."""
        assert self._core is not None
        while True:
            ids = leading_ids(encoding, max_tokens)
            if ids is not None:
                return ids, True
            chars *= 4
            if chars >= len(text):
                return self._core.encode(text, add_special_tokens=True).ids, False
            encoding = self._core.encode(text[:chars], add_special_tokens=True)

    def _slow(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._tokenizer(
            list(texts), add_special_tokens=True, truncation=False, verbose=False
        )
        return encoded["input_ids"]


# the first prefix of a long text holds this many characters per token the model reads;
# English averages about 4 a token, and `TextEncoder._leading` grows a prefix that falls short
_CHARS_PER_TOKEN = 8


def leading_ids(encoding: Encoding, max_tokens: int) -> list[int] | None:
    """A prefix's ids when they show that the whole text holds more than ``max_tokens``
    tokens and start as its own do; None when the prefix is too short to tell.

    The tokenizer's model runs on each word of the pre-tokenizer by itself, so every word
    but the prefix's last (which the cut may have split) encodes as in the whole text. The
    ids returned run past ``max_tokens`` and end with the closing special token; truncation
    keeps only positions before ``max_tokens - 1``, which these whole words fill.
    """
    words = encoding.word_ids
    last = max((word for word in words if word is not None), default=None)
    whole = sum(1 for word in words if word is not None and word != last)
    return encoding.ids if whole >= max_tokens else None


def tokenize_inputs(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    max_tokens: int,
    truncate: bool,
    max_inputs: int,
    pooled: bool = False,
) -> Tokenized:
    """Check and tokenize a request's texts (``pooled``: on the tokenizer's worker pool, for
    large requests off the event loop); the field in each error says which text."""
    _check_list(texts, max_inputs)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"input[{i}] must be a string, got {type(text).__name__}", f"input[{i}]"
            )
        if not text.strip():
            raise InputError(f"input[{i}] is empty", f"input[{i}]")
    try:
        encoded = encoder.bounded(texts, max_tokens, pooled=pooled)
    except TypeError:  # tokenizers take only text that UTF-8 can carry
        _refuse_unpaired_surrogates(texts)
        raise
    ids: list[tuple[int, ...]] = []
    truncated: list[bool] = []
    for i, (row, is_prefix) in enumerate(encoded):
        if len(row) <= encoder.num_special_ids:  # "\u200b" or "\x00": dropped by tokenizers
            raise InputError(
                f"input[{i}] has no tokens: every character of it is one the tokenizer drops",
                f"input[{i}]",
            )
        if len(row) <= max_tokens:
            ids.append(tuple(row))
            truncated.append(False)
            continue
        if not truncate:
            count = f"more than {max_tokens}" if is_prefix else str(len(row))
            raise InputTooLong(
                f"input[{i}] has {count} tokens; the model takes at most {max_tokens} "
                '(send "truncate": true to cut it)',
                f"input[{i}]",
            )
        # keep the leading tokens and the closing special token ([SEP] / </s>)
        ids.append(tuple(row[: max_tokens - 1]) + (row[-1],))
        truncated.append(True)
    return Tokenized(ids=tuple(ids), truncated=tuple(truncated))


def _is_int_row(row: object) -> bool:
    """A tuple or list of ints. ``array`` checks the items in C (a float or a str fails it):
    under a microsecond for a short text."""
    if not isinstance(row, tuple | list):
        return False
    try:
        array.array("q", row)
    except (TypeError, OverflowError):
        return False
    return True


def _refuse_unpaired_surrogates(texts: Sequence[str]) -> None:
    """InputError naming the first text that holds a lone UTF-16 surrogate. A Python string
    may hold one (so may JSON's ``\\ud800`` escape, as Python's json module reads it); it is
    not a character, and neither UTF-8 nor a tokenizer takes it."""
    for i, text in enumerate(texts):
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(text[error.start])
            raise InputError(
                f"input[{i}] holds an unpaired surrogate (U+{code:04X}) at character "
                f"{error.start}: not Unicode text",
                f"input[{i}]",
            ) from None


# below this many characters, tokenizing costs less than the hop to a thread
INLINE_TOKENIZE_CHARS = 4096


async def tokenize_request(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    max_tokens: int,
    truncate: bool,
    max_inputs: int,
    executor: Executor | None,
) -> Tokenized:
    """``tokenize_inputs`` for a server: small requests inline, large ones on ``executor``'s
    thread, off the event loop."""
    is_small = (
        isinstance(texts, str)
        or not isinstance(texts, Sequence)
        or sum(len(t) for t in texts if isinstance(t, str)) < INLINE_TOKENIZE_CHARS
    )
    work = functools.partial(
        tokenize_inputs,
        encoder,
        texts,
        max_tokens=max_tokens,
        truncate=truncate,
        max_inputs=max_inputs,
        pooled=not is_small,
    )
    if is_small:
        return work()
    return await asyncio.get_running_loop().run_in_executor(executor, work)


def _check_list(texts: Sequence[str], max_inputs: int) -> None:
    if type(texts) is not list and type(texts) is not tuple:  # the ABC check costs ~1 us
        if isinstance(texts, str):
            raise InputError("texts must be a list of strings; for one text, pass [text]", "input")
        if isinstance(texts, bytes | bytearray) or not isinstance(texts, Sequence):
            raise InputError(
                f"texts must be a list of strings, got {type(texts).__name__}", "input"
            )
    if not texts:
        raise InputError("input is empty: give at least one text", "input")
    if len(texts) > max_inputs:
        raise InputError(f"input has {len(texts)} texts; at most {max_inputs} per request", "input")


def check_tokenized(
    texts: Sequence[str], tokens: Tokenized, *, max_tokens: int, vocab_size: int, max_inputs: int
) -> Tokenized:
    """Token ids a caller computed (a front-end process): as many texts as tokenizing allows
    (at least one: a job of none would never end), one row per text, none too long, every id
    in the vocabulary. An id past the embedding table would fail the whole step, other
    tenants' rows with it. The rows checked are copies (tuples): a list the caller changed
    after submitting would otherwise reach the step unchecked."""
    _check_list(texts, max_inputs)
    if not isinstance(tokens, Tokenized):
        raise InputError(f"tokens must be a Tokenized, got {type(tokens).__name__}", "tokens")
    rows, truncated = tuple(tokens.ids), tokens.truncated
    if type(truncated) is not tuple or not set(map(type, truncated)) <= {bool}:
        truncated = tuple(map(bool, truncated))
    if len(rows) != len(texts) or len(truncated) != len(texts):
        raise InputError(f"tokens hold {len(rows)} rows for {len(texts)} texts", "input")
    checked = []
    is_copy = rows is not tokens.ids or truncated is not tokens.truncated
    for i, row in enumerate(rows):
        if not _is_int_row(row):
            raise InputError(f"input[{i}]: token ids must be a list of ints", f"input[{i}]")
        if type(row) is not tuple:
            row, is_copy = tuple(row), True
        checked.append(row)
        if not row or len(row) > max_tokens:
            raise InputError(
                f"input[{i}] has {len(row)} token ids; 1 to {max_tokens} allowed", f"input[{i}]"
            )
        if min(row) < 0 or max(row) >= vocab_size:
            raise InputError(
                f"input[{i}] has a token id outside the vocabulary (0 to {vocab_size - 1})",
                f"input[{i}]",
            )
    if not is_copy:  # tuples already (a front end's, decoded): nothing to copy
        return tokens
    return Tokenized(ids=tuple(checked), truncated=truncated)
