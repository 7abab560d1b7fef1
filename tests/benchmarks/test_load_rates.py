"""The order of rates in a sweep: auto rates go past saturation until answers stop rising."""

from benchmarks.load_sweep import RateProgression


def _walk(progression: RateProgression, knee: float, plateau: float) -> list[float]:
    """The rates a sweep runs against a target saturated from ``knee`` on, answering what it is
    offered up to ``plateau``."""
    rates = []
    while (rate := progression.next()) is not None and len(rates) < 20:
        rates.append(rate)
        progression.record(rate >= knee, min(rate, plateau) * 0.9 if rate >= knee else rate)
    return rates


def test_auto_rates_grow_past_the_knee_until_answers_stop_rising() -> None:
    rates = _walk(RateProgression([30.0, 60.0, 90.0, 120.0], grows=True), knee=100, plateau=200)
    # saturated from 120 on; answers rise to 160 and 200 (+5% each time), then flatten at 270
    assert rates == [30.0, 60.0, 90.0, 120.0, 160.0, 210.0, 270.0]


def test_a_flat_target_stops_one_rate_past_the_knee() -> None:
    rates = _walk(RateProgression([30.0, 60.0, 90.0, 120.0], grows=True), knee=60, plateau=60)
    assert rates == [30.0, 60.0, 78.0]  # the rest of the initial list is skipped


def test_explicit_rates_stop_at_the_first_saturated_one() -> None:
    rates = _walk(RateProgression([10.0, 20.0, 40.0, 80.0], grows=False), knee=20, plateau=1000)
    assert rates == [10.0, 20.0]
    assert _walk(RateProgression([10.0, 20.0], grows=False), knee=1000, plateau=1000) == [
        10.0,
        20.0,
    ]


def test_a_saturated_rate_that_answers_less_ends_the_sweep() -> None:
    progression = RateProgression([50.0], grows=True)
    assert progression.next() == 50.0
    progression.record(True, 45.0)
    assert progression.next() == 65.0
    progression.record(True, 40.0)
    assert progression.next() is None


async def test_the_baselines_model_thread_takes_the_threads_graft_would() -> None:
    """Started from a load generator kept on one thread, the bare backbone and the PEFT
    server ran their forward on one thread where graft's model thread took every core."""
    import numpy as np
    import torch

    from benchmarks.batcher import MicroBatcher

    seen = []

    def forward(token_ids, adapters):
        seen.append(torch.get_num_threads())
        return np.zeros((len(token_ids), 2))

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        async with MicroBatcher(forward, num_threads=2) as batcher:
            await batcher.run([[1, 2, 3]], None)
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
