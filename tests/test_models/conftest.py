"""Fixtures for the forecaster tests: feature frames from a regime-switching simulator.

The frames follow the feature contract of ``data_pipelines.features.build_features``. When the data
pipeline's own simulator and feature builder are importable they are used; otherwise a small local
simulator with the same columns stands in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def _local_simulate(n: int, seed: int, steps: int = 24) -> tuple[pd.DataFrame, pd.Series]:
    """Three-regime Markov-switching volatility with jumps; OHLC from ``steps`` intraday moves."""
    rng = np.random.default_rng(seed)
    vols = np.array([0.015, 0.03, 0.07])  # daily vol per regime
    trans = np.array([[0.985, 0.015, 0.0], [0.02, 0.97, 0.01], [0.0, 0.05, 0.95]])
    reg = np.empty(n, dtype=int)
    reg[0] = 0
    for t in range(1, n):
        reg[t] = rng.choice(3, p=trans[reg[t - 1]])
    jump_p, jump_sd = 0.01, 0.08
    true_var = vols[reg] ** 2 + jump_p * jump_sd**2
    inc = rng.standard_normal((n, steps)) * (vols[reg] / np.sqrt(steps))[:, None]
    jumps = (rng.random(n) < jump_p) * rng.standard_normal(n) * jump_sd
    inc[:, steps // 2] += jumps
    path = np.log(30000.0) + np.cumsum(inc.ravel())
    path = path.reshape(n, steps)
    opens = np.concatenate([[np.log(30000.0)], path[:-1, -1]])
    highs = np.maximum(path.max(axis=1), opens)
    lows = np.minimum(path.min(axis=1), opens)
    idx = pd.date_range("2015-01-01", periods=n, freq="D", tz="UTC")
    bars = pd.DataFrame(
        {
            "open": np.exp(opens),
            "high": np.exp(highs),
            "low": np.exp(lows),
            "close": np.exp(path[:, -1]),
            "volume": rng.uniform(100, 200, n),
        },
        index=idx,
    )
    return bars, pd.Series(true_var, index=idx, name="true_variance")


def _local_features(bars: pd.DataFrame) -> pd.DataFrame:
    o, h, lo, c = (np.log(bars[k].to_numpy()) for k in ("open", "high", "low", "close"))
    f = bars.copy()
    ret = np.concatenate([[np.nan], np.diff(c)])
    f["ret"] = ret
    f["ret_bars"] = 1
    f["gap"] = False
    f["extreme"] = False
    f["var_sq"] = ret**2
    hl, co = h - lo, c - o
    floor = 1e-10
    f["var_pk"] = np.maximum(hl**2 / (4 * np.log(2)), floor)
    f["var_gk"] = np.maximum(0.5 * hl**2 - (2 * np.log(2) - 1) * co**2, floor)
    rs = (h - c) * (h - o) + (lo - c) * (lo - o)
    f["var_rs"] = np.maximum(rs, floor)
    f["var_yz"] = np.maximum(rs + np.nan_to_num(np.concatenate([[0.0], o[1:] - c[:-1]]) ** 2), floor)
    f["rv"] = np.nan
    for k in (1, 7, 30):
        f[f"har_{k}"] = f["var_gk"].rolling(k, min_periods=1).mean()
    f.attrs.update({"bar": "1D", "bars_per_year": 365, "asset": "SYN"})
    return f


def make_frame(n: int = 800, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Feature frame and the true per-bar variance (known at t-1) of a regime-switching path."""
    try:  # prefer the data pipeline's simulator once it exists
        from data_pipelines.features import build_features
        from data_pipelines.synthetic import simulate

        path = simulate(n=n, seed=seed, bar="1D")
        return build_features(path.bars), path.true_variance
    except ImportError:
        bars, tv = _local_simulate(n, seed)
        return _local_features(bars), tv


@pytest.fixture(scope="session")
def feature_frame() -> pd.DataFrame:
    """800 daily bars, seed 0."""
    return make_frame(800, 0)[0]


@pytest.fixture(scope="session")
def make_feature_frame():
    """Factory ``(n, seed) -> (frame, true_variance)``."""
    return make_frame
