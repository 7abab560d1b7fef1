"""Request inputs to token ids: validation, tokenization, truncation."""

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from tokenizers import Tokenizer
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

    def _slow(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self._tokenizer(
            list(texts), add_special_tokens=True, truncation=False, verbose=False
        )
        return encoded["input_ids"]


def tokenize_inputs(
    encode: Callable[[Sequence[str]], list[list[int]]],
    texts: Sequence[str],
    *,
    max_tokens: int,
    truncate: bool,
    max_inputs: int,
) -> Tokenized:
    """Check and tokenize a request's texts (``encode``: a TextEncoder method); the field in
    each error says which text."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings; for one text, pass [text]", "input")
    if not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}", "input")
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
    ids: list[tuple[int, ...]] = []
    truncated: list[bool] = []
    for i, row in enumerate(encode(texts)):
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
        encoder.inline if is_small else encoder.pooled,
        texts,
        max_tokens=max_tokens,
        truncate=truncate,
        max_inputs=max_inputs,
    )
    if is_small:
        return work()
    return await asyncio.get_running_loop().run_in_executor(executor, work)


def check_tokenized(
    texts: Sequence[str], tokens: Tokenized, *, max_tokens: int, vocab_size: int
) -> Tokenized:
    """Token ids a caller computed (a front-end process): one row per text, none too long,
    every id in the vocabulary. An id past the embedding table would fail the whole step,
    other tenants' rows with it."""
    if len(tokens.ids) != len(texts) or len(tokens.truncated) != len(texts):
        raise InputError(f"tokens hold {len(tokens.ids)} rows for {len(texts)} texts", "input")
    for i, row in enumerate(tokens.ids):
        if not row or len(row) > max_tokens:
            raise InputError(
                f"input[{i}] has {len(row)} token ids; 1 to {max_tokens} allowed", f"input[{i}]"
            )
        if min(row) < 0 or max(row) >= vocab_size:
            raise InputError(
                f"input[{i}] has a token id outside the vocabulary (0 to {vocab_size - 1})",
                f"input[{i}]",
            )
    return tokens
