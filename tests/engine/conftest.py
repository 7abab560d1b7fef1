"""Fixtures shared by the engine tests."""

from pathlib import Path

import pytest

from tests.engine.mixed_fleet import publish_fleet


@pytest.fixture
def fleet_registry(tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    publish_fleet(registry, publish_random)
    yield registry
    registry.close()


@pytest.fixture
def two_tenants(tmp_path: Path):
    """A registry with tenants acme and globex."""
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    yield registry
    registry.close()
