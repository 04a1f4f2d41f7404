"""Feature frames of simulated markets for tests that need the data pipeline's feature contract."""

from __future__ import annotations

import pandas as pd

from data_pipelines.features import build_features
from data_pipelines.synthetic import simulate

__all__ = ["daily_frame"]


def daily_frame(n: int = 560, seed: int = 3) -> pd.DataFrame:
    """Features of a simulated daily market (regime-switching GARCH-t with jumps)."""
    return build_features(simulate(n, seed=seed, start="2016-01-01").bars)
