"""Synthetic OHLCV bars with a known volatility path, and a forecast built from that path."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

from models.base import VolatilityForecast

__all__ = ["market", "forecast_for"]


def market(n=400, seed=42, vol=0.03, drift=0.08):
    """OHLCV bars (t(4) returns) whose log volatility is a random walk with step ``drift`` (0: constant)."""
    rng = np.random.default_rng(seed)
    sig = vol * np.exp(np.cumsum(rng.normal(0, drift, n)))
    r = rng.standard_t(4, n) * sig / np.sqrt(2)
    c = 100 * np.exp(np.cumsum(r))
    o = np.r_[100.0, c[:-1]]
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, sig / 2)))
    lo = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, sig / 2)))
    idx = pd.date_range("2016-01-01", periods=n, freq="D", tz="UTC")
    return pd.DataFrame({"open": o, "high": h, "low": lo, "close": c, "volume": 1e4}, index=idx), sig


def forecast_for(bars, sig, H=3, seed=0, quantiles=False, regimes=False):
    rng = np.random.default_rng(seed)
    var = np.repeat((sig**2)[:, None], H, axis=1)
    kw = {}
    if quantiles:
        lv = (0.01, 0.5, 0.99)
        kw["quantiles"] = np.stack([sig * norm.ppf(q) for q in lv], axis=1)[:, None, :].repeat(H, axis=1)
        kw["quantile_levels"] = lv
    if regimes:
        p = rng.dirichlet([1, 1, 1], size=len(bars))
        kw["regime_probs"], kw["regime_names"] = p, ("calm", "normal", "stressed")
    return VolatilityForecast(origins=bars.index, variance=var, model="test", std_resid=rng.standard_normal(3000),
                              **kw)
