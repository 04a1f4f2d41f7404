"""Fixtures for the forecaster tests: feature frames from the data pipeline's simulator.

``data_pipelines.synthetic.simulate`` (regime-switching GARCH-t with jumps, daily bars) and
``data_pipelines.features.build_features`` give frames with the feature contract the models read.
"""

from __future__ import annotations

import pandas as pd
import pytest

from data_pipelines.features import build_features
from data_pipelines.synthetic import simulate


def make_frame(n: int = 800, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Feature frame and the true per-bar variance (known at t-1) of a simulated path."""
    path = simulate(n=n, seed=seed, bar="1D")
    return build_features(path.bars), path.true_variance


@pytest.fixture(scope="session")
def feature_frame() -> pd.DataFrame:
    """800 daily bars, seed 0."""
    return make_frame(800, 0)[0]


@pytest.fixture(scope="session")
def make_feature_frame():
    """Factory ``(n, seed) -> (frame, true_variance)``."""
    return make_frame
