"""Fixtures shared by the engine tests."""

from pathlib import Path

import pytest

from tests.engine.mixed_fleet import ADAPTERS


@pytest.fixture
def fleet_registry(tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.create_tenant("t1")
    registry.create_tenant("t2")
    for i, (rank, targets, pooling, labels) in enumerate(ADAPTERS):
        publish_random(
            registry,
            "t1" if i % 2 == 0 else "t2",
            f"m{i}",
            seed=i,
            rank=rank,
            labels=labels,
            pooling=pooling,
            targets=targets,
        )
    yield registry
    registry.close()
