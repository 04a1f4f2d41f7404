"""EWMA / RiskMetrics variance forecaster.

Recursion (RiskMetrics 1996): ``s[t+1] = lam * s[t] + (1 - lam) * r[t]**2`` with the first variance
the mean square of the first ``init_bars`` returns. The multi-step forecast is flat (a random walk in
variance): every step ``k`` equals ``s[t+1]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.signal import lfilter

from models._inputs import VARIANCE_FLOOR, per_bar_returns
from models.base import Forecaster, VolatilityForecast, register

__all__ = ["EWMA", "ewma_filter"]


def ewma_filter(returns: np.ndarray, lam: float, s0: float) -> np.ndarray:
    """Run the EWMA recursion.

    Parameters
    ----------
    returns : np.ndarray
        ``(n,)`` decimal log returns per bar.
    lam : float
        Decay factor in (0, 1).
    s0 : float
        Variance of the first return (known before it).

    Returns
    -------
    np.ndarray
        ``(n + 1,)`` variances: element ``t`` is the variance of ``returns[t]`` known at ``t - 1``;
        the last element is the one-step forecast after the last return.
    """
    x = np.asarray(returns, dtype=np.float64) ** 2
    out = np.empty(len(x) + 1)
    out[0] = s0
    if len(x):
        y, _ = lfilter([1.0 - lam], [1.0, -lam], x, zi=[lam * s0])
        out[1:] = y
    return np.maximum(out, VARIANCE_FLOOR)


@register
class EWMA(Forecaster):
    """Exponentially weighted moving average of squared returns (RiskMetrics).

    Parameters
    ----------
    lam : float
        Decay factor in (0, 1); 0.94 is RiskMetrics' daily value.
    init_bars : int
        Number of first returns whose mean square starts the recursion.
    """

    name = "ewma"
    required_columns = ("ret",)

    def __init__(self, *, lam: float = 0.94, init_bars: int = 30) -> None:
        self.lam = lam
        self.init_bars = init_bars

    def _check_params(self) -> None:
        if not 0.0 < float(self.lam) < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam!r}")
        if int(self.init_bars) < 1:
            raise ValueError(f"init_bars must be >= 1, got {self.init_bars!r}")

    def _fit(self, frame: pd.DataFrame) -> None:
        self._check_params()
        r = per_bar_returns(frame).to_numpy()
        if len(r) < 2:
            raise ValueError(f"EWMA needs at least 2 returns, got {len(r)}")
        self.s0_ = max(float(np.mean(r[: int(self.init_bars)] ** 2)), VARIANCE_FLOOR)
        self._filter(frame)

    def _filter(self, frame: pd.DataFrame) -> None:
        r = per_bar_returns(frame).to_numpy()
        s = ewma_filter(r, float(self.lam), self.s0_)
        self.var_next_ = float(s[-1])
        self.std_resid_ = r / np.sqrt(s[:-1])

    def _update(self, new_bars: pd.DataFrame) -> None:
        r = per_bar_returns(new_bars).to_numpy()
        if len(r) == 0:
            return
        s = ewma_filter(r, float(self.lam), self.var_next_)
        self.var_next_ = float(s[-1])
        self.std_resid_ = np.concatenate([self.std_resid_, r / np.sqrt(s[:-1])])

    def _predict(self, horizon: int) -> VolatilityForecast:
        return self._forecast(np.full(horizon, self.var_next_), std_resid=self.std_resid_)
