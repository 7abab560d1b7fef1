"""The order of rates in a sweep: auto rates go once past the first saturated one."""

from benchmarks.load_sweep import RateProgression


def _walk(progression: RateProgression, saturated_from: float) -> list[float]:
    """The rates a sweep would run against a target saturated at ``saturated_from`` and up."""
    rates = []
    while (rate := progression.next()) is not None and len(rates) < 20:
        rates.append(rate)
        progression.record(rate >= saturated_from)
    return rates


def test_auto_rates_grow_then_run_once_past_the_first_saturated_rate() -> None:
    rates = _walk(RateProgression([30.0, 60.0, 90.0, 120.0], grows=True), saturated_from=150)
    assert rates == [30.0, 60.0, 90.0, 120.0, 160.0, 210.0]  # two significant digits


def test_auto_rates_saturated_early_skip_the_rest_of_the_list() -> None:
    rates = _walk(RateProgression([30.0, 60.0, 90.0, 120.0], grows=True), saturated_from=60)
    assert rates == [30.0, 60.0, 78.0]


def test_explicit_rates_stop_at_the_first_saturated_one() -> None:
    rates = _walk(RateProgression([10.0, 20.0, 40.0, 80.0], grows=False), saturated_from=20)
    assert rates == [10.0, 20.0]
    assert _walk(RateProgression([10.0, 20.0], grows=False), saturated_from=1000) == [10.0, 20.0]


def test_a_second_saturated_rate_ends_the_sweep_even_if_it_answered_more() -> None:
    progression = RateProgression([50.0], grows=True)
    assert progression.next() == 50.0
    progression.record(True)
    assert progression.next() == 65.0
    progression.record(True)
    assert progression.next() is None
