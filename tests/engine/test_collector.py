"""Start-up objects leave the cycle collector's passes while an engine runs, and come back."""

import gc

import pytest

from engine import Engine, EngineConfig
from engine.collector import freeze_startup_objects, release_startup_objects


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()  # whatever an earlier test left
    yield
    gc.unfreeze()


def test_freezes_nest_and_the_last_release_unfreezes() -> None:
    freeze_startup_objects()
    assert gc.get_freeze_count() > 0
    freeze_startup_objects()  # a second engine in the same process
    release_startup_objects()
    assert gc.get_freeze_count() > 0, "the first engine still runs"
    release_startup_objects()
    assert gc.get_freeze_count() == 0
    release_startup_objects()  # one too many: harmless
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("freeze", [True, False])
async def test_an_engine_freezes_while_it_runs_unless_told_not_to(
    registry, publish_random, freeze: bool
) -> None:
    publish_random(registry, "acme", "m")
    config = EngineConfig(registry_dir=registry.root, gc_freeze=freeze)
    async with Engine(config) as engine:
        assert (gc.get_freeze_count() > 0) == freeze
        gc.collect()  # a full pass while frozen leaves the engine serving
        (prediction,) = await engine.classify("acme", "m", ["still answers"])
        assert sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert gc.get_freeze_count() == 0
