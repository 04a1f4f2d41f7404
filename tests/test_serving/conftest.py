"""Shared fixtures of the serving tests: a fixed signing key, a small markets config on bundled data with fast
models (EWMA fitted on the market's bars, 60-row window), a store in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serving_test_helpers import KEY_HEX, markets_doc

from serving.markets import load_markets


@pytest.fixture(autouse=True)
def _no_registry(monkeypatch, tmp_path_factory):
    # no MLflow registry unless a test sets one: markets fall back to their `fit` specification
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp()}/absent/mlruns.db")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving-cache")


@pytest.fixture
def key_file(tmp_path) -> Path:
    p = tmp_path / "signing.key"
    p.write_text("0x" + KEY_HEX + "\n")
    os.chmod(p, 0o600)
    return p


@pytest.fixture
def markets(tmp_path, cache_dir):
    return load_markets(markets_doc(tmp_path, cache_dir))
