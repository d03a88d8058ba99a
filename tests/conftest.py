"""Shared fixtures: real data location and small generated datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout (``../shared/data``); skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present on the project's own machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance with 2 CPUs shared by the whole session (starting Ray costs seconds).

    Reuses an instance something else already started, and only shuts down the one it started.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()



@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """The small trained model recorded in MLflow as a sweep records its trials (``registry_fixtures``)."""
    from registry_fixtures import recorded_sweep

    return recorded_sweep(tmp_path_factory.getbasetemp() / "recorded-sweep")


@pytest.fixture(scope="module")
def promoted(recorded):
    """The recorded sweep's best trial registered as ``bgad-tiles`` with alias ``champion``."""
    from registry_fixtures import SWEEP_ID
    from sweeper.promote import promote

    return promote(recorded.tracking_uri, SWEEP_ID, "bgad-tiles")
