"""Shared fixtures of the scale-out tests: one local Ray instance (2 CPUs) for the whole session."""

from __future__ import annotations

import pytest


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
