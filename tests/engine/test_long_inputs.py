"""A long text is encoded from a prefix: the ids the model reads, and whether the text was
cut, are exactly what encoding all of it gives, for WordPiece, byte-level BPE and
SentencePiece-style tokenizers."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from engine.errors import InputTooLong
from engine.inputs import _CHARS_PER_TOKEN, TextEncoder, tokenize_inputs
from training import load_bbc_news

SPECIALS = ["<unk>", "<s>", "</s>"]


def _trained(model, trainer, pre_tokenizer, corpus: list[str]) -> PreTrainedTokenizerFast:
    core = Tokenizer(model)
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizer
    core.train_from_iterator(corpus, trainer)
    bos, eos = core.token_to_id("<s>"), core.token_to_id("</s>")
    core.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


@pytest.fixture(scope="module")
def news() -> list[str]:
    return [e.text for e in load_bbc_news(max_chars=20_000)[::40]]


@pytest.fixture(scope="module")
def encoders(backbone, news) -> dict[str, TextEncoder]:
    bpe = _trained(
        models.BPE(unk_token="<unk>"),
        trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        news,
    )
    unigram = _trained(
        models.Unigram(),
        trainers.UnigramTrainer(vocab_size=2000, special_tokens=SPECIALS, unk_token="<unk>"),
        pre_tokenizers.Metaspace(),
        news,
    )
    return {
        "wordpiece": TextEncoder(backbone.tokenizer),
        "byte-level bpe": TextEncoder(bpe),
        "metaspace unigram": TextEncoder(unigram),
    }


def _awkward(seed: int) -> str:
    """Runs of spaces, words with no break for pages, CJK, emoji, combining marks."""
    rng = random.Random(seed)
    pieces = ["word", "   ", "\t\n", "東京タワー", "🙂👍🏽", "e\u0301", "!!??", "x" * 300, "ab-cd"]
    return "".join(rng.choice(pieces) for _ in range(3000))


def _as_served(row: list[int], max_tokens: int) -> tuple[list[int], bool]:
    return (row, False) if len(row) <= max_tokens else (row[: max_tokens - 1] + row[-1:], True)


def _cut_inside_a_word(max_tokens: int) -> str:
    """A word the first prefix cuts after 100 characters: WordPiece splits those into
    ~50 pieces, but the whole 300-character word is one [UNK]. The words before it hold
    max_tokens - 20 tokens, so the pieces fall where the model reads: only a prefix that
    leaves its last word out gets this text right."""
    before = max_tokens * _CHARS_PER_TOKEN - 100  # characters before the cut word
    tokens = max(0, max_tokens - 20)  # one per word below: "government " or "a "
    long_words = min(tokens, max(0, (before - 2 * tokens) // 9))
    words = "government " * long_words + "a " * (tokens - long_words)
    assert len(words) <= before
    return words.ljust(before) + "x" * 300 + " tail" * 100


@pytest.mark.parametrize("max_tokens", [16, 128, 512])
def test_prefix_encoding_equals_the_whole_texts(encoders, news, max_tokens) -> None:
    texts = [*news, *(_awkward(seed) for seed in range(6)), "y" * 50_000, "short text"]
    texts.append(_cut_inside_a_word(max_tokens))
    for name, encoder in encoders.items():
        whole = [_as_served(row, max_tokens) for row in encoder.inline(texts)]
        for pooled in (False, True):
            got = encoder.bounded(texts, max_tokens, pooled=pooled)
            assert [_as_served(row, max_tokens) for row, _ in got] == whole, name
        assert any(is_prefix for _, is_prefix in got), name  # the prefix path ran


def test_a_long_text_costs_a_prefix_not_the_whole(encoders) -> None:
    text = "word " * 800_000  # 4 MB; encoding all of it took 2.6 s on a 2-core VM
    encoder = encoders["wordpiece"]
    ((row, is_prefix),) = encoder.bounded([text], 512, pooled=False)
    assert is_prefix and 512 < len(row) < 1200  # from the first 4,096 characters
    with pytest.raises(InputTooLong, match=r"input\[0\] has more than 512 tokens"):
        tokenize_inputs(encoder, [text], max_tokens=512, truncate=False, max_inputs=1)
    served = tokenize_inputs(encoder, [text], max_tokens=512, truncate=True, max_inputs=1)
    assert served.truncated == (True,) and len(served.ids[0]) == 512
