"""The load generator's traffic: arrival statistics, popularity, real texts."""

import numpy as np
import pytest

from benchmarks.arrivals import (
    TrafficConfig,
    arrival_times_s,
    inter_arrival_s,
    load_corpus,
    popularity,
    schedule,
)

NUM_GAPS = 200_000


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_poisson_gaps_have_mean_one_over_rate_and_variance_its_square() -> None:
    rate = 40.0
    gaps = inter_arrival_s("poisson", rate, cv=3.0, count=NUM_GAPS, rng=np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.01)
    assert gaps.var() == pytest.approx(1 / rate**2, rel=0.03)  # exponential: cv 1, cv ignored
    assert (gaps > 0).all()


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_gaps_keep_the_mean_and_have_the_asked_cv(cv: float) -> None:
    rate = 25.0
    gaps = inter_arrival_s("gamma", rate, cv=cv, count=2 * NUM_GAPS, rng=np.random.default_rng(2))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert _cv(gaps) == pytest.approx(cv, rel=0.05)


def test_arrival_times_stay_within_duration_and_request_bounds() -> None:
    rng = np.random.default_rng(3)
    times = arrival_times_s(TrafficConfig(rate_rps=100.0, duration_s=20.0), rng)
    assert np.all(np.diff(times) >= 0) and times[-1] <= 20.0
    assert len(times) == pytest.approx(2000, rel=0.1)
    capped = arrival_times_s(TrafficConfig(rate_rps=100.0, duration_s=20.0, max_requests=7), rng)
    assert len(capped) == 7


def test_bursty_arrivals_clump_more_than_poisson_at_the_same_rate() -> None:
    def counts_per_100ms(arrival: str, cv: float) -> np.ndarray:
        config = TrafficConfig(rate_rps=50.0, arrival=arrival, cv=cv, duration_s=200.0)
        times = arrival_times_s(config, np.random.default_rng(4))
        return np.bincount((times * 10).astype(int))

    poisson, bursty = counts_per_100ms("poisson", 1.0), counts_per_100ms("gamma", 3.0)
    assert bursty.mean() == pytest.approx(poisson.mean(), rel=0.1)
    assert bursty.var() > 3 * poisson.var()  # index of dispersion ~ cv**2 for renewal processes


def test_zipf_popularity_ranks_adapters_in_index_order() -> None:
    probs = popularity("zipf", 50, zipf_s=1.1)
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs) < 0)
    assert probs[0] / probs[1] == pytest.approx(2**1.1)
    config = TrafficConfig(rate_rps=2000.0, duration_s=30.0, num_adapters=50, popularity="zipf")
    sent = schedule(config, ["text"], np.random.default_rng(5))
    counts = np.bincount([a.adapter for a in sent], minlength=50)
    assert list(np.argsort(-counts[:5], kind="stable")) == [0, 1, 2, 3, 4]
    assert counts[0] / len(sent) == pytest.approx(probs[0], rel=0.05)


def test_uniform_popularity_is_flat() -> None:
    assert np.allclose(popularity("uniform", 8), 1 / 8)
    config = TrafficConfig(rate_rps=1000.0, duration_s=20.0, num_adapters=4, popularity="uniform")
    counts = np.bincount([a.adapter for a in schedule(config, ["t"], np.random.default_rng(6))])
    assert counts.min() / counts.max() > 0.95


def test_schedule_draws_real_texts_and_the_asked_inputs_per_request() -> None:
    texts = load_corpus("sms")
    assert len(texts) > 4000 and all(t.strip() for t in texts)
    config = TrafficConfig(rate_rps=100.0, duration_s=2.0, num_adapters=3, inputs_per_request=4)
    sent = schedule(config, texts, np.random.default_rng(7))
    assert sent and all(len(a.texts) == 4 and 0 <= a.adapter < 3 for a in sent)
    assert all(text in texts for a in sent for text in a.texts)


def test_news_texts_are_long_and_cut() -> None:
    news = load_corpus("news", max_chars=300)
    assert max(len(t) for t in news) <= 300
    assert np.median([len(t) for t in news]) > 200  # articles, unlike SMS


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_rps": 0.0},
        {"rate_rps": 1.0, "cv": 0.0},
        {"rate_rps": 1.0, "arrival": "weibull"},
        {"rate_rps": 1.0, "popularity": "pareto"},
        {"rate_rps": 1.0, "num_adapters": 0},
        {"rate_rps": 1.0, "duration_s": -1.0},
    ],
)
def test_bad_traffic_config_raises_value_error(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrafficConfig(**bad)
