"""Shared fixtures of the scale-out tests: one local Ray instance (2 CPUs) for the whole session."""

from __future__ import annotations

import pandas as pd
import pytest

from data_pipelines.features import build_features
from data_pipelines.synthetic import simulate


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and a small object store, shut down after the session's tests."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - another suite left one up
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory):
    """One SQLite tracking store for the session (creating an MLflow database takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


def daily_frame(n: int = 560, seed: int = 3) -> pd.DataFrame:
    """Features of a simulated daily market (regime-switching GARCH-t with jumps)."""
    return build_features(simulate(n, seed=seed, start="2016-01-01").bars)
