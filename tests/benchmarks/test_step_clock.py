"""The load benchmark's step clock: busy time counts the model thread once, interludes or not."""

import time
from types import SimpleNamespace

from benchmarks.load_targets import StepClock


class FakeLoop:
    """A step loop whose long step runs one interlude inside it, as StepLoop does."""

    def __init__(self) -> None:
        self.engine = SimpleNamespace(_steps=self)

    def _step(self, batch, token_ids, interleave=False):
        time.sleep(0.01)
        if interleave:
            short = SimpleNamespace(rows=[SimpleNamespace(request_id=2)])
            self._step(short, [[1]])  # looked up again: the clock's wrapper, as in StepLoop
        time.sleep(0.01)
        return []


def test_an_interlude_counts_as_a_step_but_not_as_more_busy_time() -> None:
    loop, clock = FakeLoop(), StepClock(keeps_spans=True)
    assert clock.install(loop.engine)
    long = SimpleNamespace(rows=[SimpleNamespace(request_id=1), SimpleNamespace(request_id=1)])
    started = time.perf_counter()
    loop._step(long, [[1], [2]], True)
    wall = time.perf_counter() - started
    counters = clock.counters()
    assert counters["steps"] == 2 and counters["rows"] == 3
    assert 0.03 <= counters["busy_s"] <= wall + 1e-3  # the interlude is inside the long step
    first, last = clock.pop(2)
    assert started <= first <= last <= started + wall


def test_an_engine_without_a_step_loop_is_not_timed() -> None:
    assert not StepClock(keeps_spans=False).install(SimpleNamespace())
