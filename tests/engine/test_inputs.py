"""The serving tokenizer: the same ids as the Hugging Face call, whatever state that call leaves."""

import pytest

from engine.errors import InputError, InputTooLong
from engine.inputs import TextEncoder, Tokenized, check_tokenized, tokenize_inputs

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "  leading and trailing spaces\t\n",
    "Ünïcödé, accents: café naïve résumé; CJK 東京 and emoji 🙂👍🏽",
    "a literal [SEP] and [CLS] and [MASK] inside the text",
    "UPPER lower MiXeD 12345 3.14159 e-mail@example.com http://example.com/a?b=c",
    "word " * 700,  # far past the model's 512 tokens: the encoder never truncates
    "x",
]


def _reference(backbone, texts):
    encoded = backbone.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return encoded["input_ids"]


def test_inline_and_pooled_match_the_hugging_face_call(backbone) -> None:
    encoder = TextEncoder(backbone.tokenizer)
    assert encoder.is_fast
    expected = _reference(backbone, TEXTS)
    assert encoder.inline(TEXTS) == expected
    assert encoder.pooled(TEXTS) == expected
    assert len(expected[5]) > 700  # the long text came back whole


def test_another_callers_truncation_and_padding_do_not_leak_in(backbone) -> None:
    encoder = TextEncoder(backbone.tokenizer)
    before = encoder.inline(TEXTS)
    # the Hugging Face call sets its Rust core's truncation and padding on every call
    backbone.tokenizer(TEXTS, truncation=True, max_length=8, padding="max_length")
    assert encoder.inline(TEXTS) == before
    assert encoder.pooled(TEXTS) == before
    assert all(len(ids) > 8 for ids in encoder.inline(TEXTS[:1]))


class _SlowTokenizer:
    """A tokenizer without a Rust core: one id per character, [101] and [102] around."""

    is_fast = False

    def __call__(self, texts, **kwargs):
        assert kwargs == {"add_special_tokens": True, "truncation": False, "verbose": False}
        return {"input_ids": [[101, *(ord(c) for c in text), 102] for text in texts]}

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 4 if pair else 2


def test_a_slow_tokenizer_keeps_its_own_call() -> None:
    encoder = TextEncoder(_SlowTokenizer())
    assert not encoder.is_fast
    assert encoder.inline(["ab"]) == encoder.pooled(["ab"]) == [[101, 97, 98, 102]]


def test_tokenize_inputs_truncates_or_refuses_by_request(backbone) -> None:
    encoder = TextEncoder(backbone.tokenizer)
    long_text = "word " * 40
    out = tokenize_inputs(encoder, ["hi", long_text], max_tokens=16, truncate=True, max_inputs=4)
    assert out.truncated == (False, True)
    assert len(out.ids[1]) == 16
    assert out.ids[1][-1] == backbone.tokenizer.sep_token_id  # the closing token is kept
    with pytest.raises(InputTooLong) as err:
        tokenize_inputs(encoder, ["hi", long_text], max_tokens=16, truncate=False, max_inputs=4)
    assert err.value.field == "input[1]"
    with pytest.raises(InputError) as err:
        tokenize_inputs(encoder, ["hi", "  "], max_tokens=16, truncate=True, max_inputs=4)
    assert err.value.field == "input[1]"
    # one str is a sequence of characters: refused, saying what to pass instead
    with pytest.raises(InputError, match=r"for one text, pass \[text\]"):
        tokenize_inputs(encoder, "hi", max_tokens=16, truncate=True, max_inputs=4)
    with pytest.raises(InputError, match="got generator"):
        texts = (t for t in ["hi"])
        tokenize_inputs(encoder, texts, max_tokens=16, truncate=True, max_inputs=4)


@pytest.mark.parametrize("pooled", [False, True])
def test_a_text_that_is_not_unicode_is_named(backbone, pooled) -> None:
    """Half a surrogate pair: Python strings hold it, tokenizers refuse it (a TypeError)."""
    encoder = TextEncoder(backbone.tokenizer)
    texts = ["fine", "café 🙂", "caf\u00e9 \ud83d and more"]
    with pytest.raises(
        InputError, match=r"input\[2\] holds an unpaired surrogate \(U\+D83D\) at character 5"
    ) as err:
        tokenize_inputs(encoder, texts, max_tokens=16, truncate=True, max_inputs=4, pooled=pooled)
    assert err.value.field == "input[2]"
    ok = tokenize_inputs(encoder, texts[:2], max_tokens=16, truncate=True, max_inputs=4)
    assert len(ok.ids) == 2


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("text", ["\u200b", "\x00", "\ufeff\u2060", " \u200b\t"])
def test_a_text_the_tokenizer_drops_whole_is_refused(backbone, text: str, pooled) -> None:
    """Not blank to ``str.strip``, yet nothing the model reads: answering it would classify
    the special tokens alone."""
    encoder = TextEncoder(backbone.tokenizer)
    with pytest.raises(InputError, match=r"input\[1\] has no tokens") as err:
        tokenize_inputs(
            encoder, ["fine", text], max_tokens=16, truncate=True, max_inputs=4, pooled=pooled
        )
    assert err.value.field == "input[1]"
    kept = tokenize_inputs(encoder, ["\u200bhi"], max_tokens=16, truncate=True, max_inputs=4)
    assert len(kept.ids[0]) == encoder.num_special_ids + 1


def test_a_core_that_does_not_serialize_keeps_the_hugging_face_call(backbone, monkeypatch) -> None:
    import engine.inputs

    def refuse(_text):
        raise Exception("custom pre-tokenizer")

    monkeypatch.setattr(engine.inputs.Tokenizer, "from_str", staticmethod(refuse))
    encoder = TextEncoder(backbone.tokenizer)
    assert not encoder.is_fast
    assert encoder.inline(TEXTS[:2]) == _reference(backbone, TEXTS[:2])


def _checked(texts, ids, truncated):
    return check_tokenized(
        texts, Tokenized(ids=ids, truncated=truncated), max_tokens=8, vocab_size=1000, max_inputs=4
    )


def test_checked_token_ids_are_tuples_the_caller_cannot_change() -> None:
    """Lists are copied, so a caller's later change never reaches the step unchecked; flags
    are booleans, as the answers' ``truncated`` field promises."""
    row = [101, 7, 102]
    checked = _checked(["a"], [row], [1])
    row.append(10_000)
    assert checked == Tokenized(ids=((101, 7, 102),), truncated=(True,))
    assert type(checked.truncated[0]) is bool
    given = Tokenized(ids=((101, 102),), truncated=(False,))
    assert _checked(("a",), given.ids, given.truncated) == given  # a front end's, as decoded


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ("ab", r"for one text, pass \[text\]"),
        (b"ab", "got bytes"),
        ({"a"}, "got set"),
        ((t for t in ["a"]), "got generator"),
        ([], "input is empty"),
        (["a"] * 5, "at most 4 per request"),
    ],
)
def test_texts_beside_token_ids_must_be_a_list(texts, message: str) -> None:
    with pytest.raises(InputError, match=message):
        _checked(texts, ((101, 102),), (False,))
