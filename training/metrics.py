"""Forecast-quality metrics: plain functions of arrays.

Every function takes ``realized`` (the proxy ``y``, per-bar variance in decimal log-return units) and
``forecast`` (``f``, the per-step variance forecast for the same bar) as arrays of equal shape. A 1-D input
gives a float; a 2-D ``(n_obs, n_series)`` input gives one value per column (skfolio's convention).
Rows where either value is NaN are dropped before averaging (pairwise, per column).

Proxies
-------
The scoring target is a named proxy of the unobservable variance of each bar:

``gk``
    Garman-Klass range variance ``0.5 ln(H/L)^2 - (2 ln 2 - 1) ln(C/O)^2`` of the bar (feature ``var_gk``).
``sq``
    Squared log return of the bar (feature ``ret``), reported alongside.
``rv``
    Realized variance from intraday bars (feature ``rv``), where available.

Each proxy is floored at ``PROXY_FLOOR = 1e-10`` so that QLIKE stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "PROXY_FLOOR",
    "PROXIES",
    "ProxyName",
    "MincerZarnowitz",
    "proxy_variance",
    "aligned_targets",
    "qlike_loss",
    "mse_loss",
    "loss_series",
    "qlike",
    "mse",
    "mincer_zarnowitz",
    "newey_west_variance",
]

PROXY_FLOOR = 1e-10
ProxyName = Literal["gk", "sq", "rv"]
PROXIES: dict[str, str] = {"gk": "var_gk", "sq": "ret", "rv": "rv"}


# ---------------------------------------------------------------------------- proxies
def proxy_variance(frame: pd.DataFrame, proxy: str = "gk", *, floor: float = PROXY_FLOOR) -> pd.Series:
    """Per-bar variance proxy from a prepared feature frame.

    Parameters
    ----------
    frame : pd.DataFrame
        Feature frame with a UTC ``DatetimeIndex``; needs ``var_gk`` (``gk``), ``ret`` (``sq``) or ``rv``
        (``rv``). When ``var_gk`` is missing but ``open/high/low/close`` are present, GK is computed here.
    proxy : {"gk", "sq", "rv"}
        Which proxy.
    floor : float
        Lower bound applied to every value (decimal variance per bar), default 1e-10.

    Returns
    -------
    pd.Series
        Variance per bar, named ``proxy``; NaN where the input is NaN.
    """
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {sorted(PROXIES)}, got {proxy!r}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    if proxy == "gk":
        if "var_gk" in frame.columns:
            v = frame["var_gk"].astype(float)
        elif {"open", "high", "low", "close"} <= set(frame.columns):
            v = garman_klass(frame["open"], frame["high"], frame["low"], frame["close"])
        else:
            raise KeyError("proxy 'gk' needs column 'var_gk' (or open/high/low/close) in the frame")
    elif proxy == "sq":
        if "ret" not in frame.columns:
            raise KeyError("proxy 'sq' needs column 'ret' in the frame")
        v = frame["ret"].astype(float) ** 2
    else:
        if "rv" not in frame.columns:
            raise KeyError("proxy 'rv' needs column 'rv' (realized variance) in the frame")
        v = frame["rv"].astype(float)
    out = v.clip(lower=floor)
    out.name = proxy
    return out


def garman_klass(open_: pd.Series, high: pd.Series, low: pd.Series, close: pd.Series) -> pd.Series:
    """Garman-Klass (1980) variance of each bar from OHLC prices (quote currency), decimal units."""
    hl = np.log(high / low)
    co = np.log(close / open_)
    return 0.5 * hl**2 - (2.0 * np.log(2.0) - 1.0) * co**2


def aligned_targets(proxy: pd.Series, origins: pd.DatetimeIndex, horizon: int) -> np.ndarray:
    """Proxy values aligned with a forecast table.

    Row ``i``, column ``k-1`` holds the proxy of the bar ``k`` bars after ``origins[i]`` (the bar whose
    variance ``h.k`` forecasts). NaN where that bar lies beyond the data.

    Parameters
    ----------
    proxy : pd.Series
        Per-bar proxy indexed by bar timestamps (UTC).
    origins : pd.DatetimeIndex
        Forecast origins; each must be a bar of ``proxy``.
    horizon : int
        Number of steps ``H``.

    Returns
    -------
    np.ndarray
        ``(len(origins), H)`` float64.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    pos = proxy.index.get_indexer(origins)
    if np.any(pos < 0):
        missing = origins[pos < 0][0]
        raise KeyError(f"forecast origin {missing} is not a bar of the proxy series")
    values = proxy.to_numpy(dtype=float)
    n = len(values)
    out = np.full((len(origins), horizon), np.nan)
    for k in range(1, horizon + 1):
        idx = pos + k
        ok = idx < n
        out[ok, k - 1] = values[idx[ok]]
    return out


# ---------------------------------------------------------------------------- per-row losses
def _pair(realized: np.ndarray, forecast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(realized, dtype=float)
    f = np.asarray(forecast, dtype=float)
    if y.shape != f.shape:
        raise ValueError(f"realized and forecast must have the same shape, got {y.shape} and {f.shape}")
    if np.any(f[np.isfinite(f)] <= 0):
        raise ValueError("forecast variance must be > 0")
    if np.any(y[np.isfinite(y)] <= 0):
        raise ValueError(f"realized variance must be > 0 (floor the proxy at {PROXY_FLOOR})")
    return y, f


def qlike_loss(realized: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    """Per-row QLIKE loss ``y/f - ln(y/f) - 1`` (>= 0, zero iff ``f == y``); NaN propagates."""
    y, f = _pair(realized, forecast)
    r = y / f
    return r - np.log(r) - 1.0


def mse_loss(realized: np.ndarray, forecast: np.ndarray) -> np.ndarray:
    """Per-row squared error ``(y - f)^2`` on variance; NaN propagates."""
    y, f = _pair(realized, forecast)
    return (y - f) ** 2


def loss_series(realized: np.ndarray, forecast: np.ndarray, loss: str = "qlike") -> np.ndarray:
    """Per-row loss series (input to Diebold-Mariano and the model confidence set)."""
    if loss == "qlike":
        return qlike_loss(realized, forecast)
    if loss == "mse":
        return mse_loss(realized, forecast)
    raise ValueError(f"loss must be 'qlike' or 'mse', got {loss!r}")


def _nanmean(x: np.ndarray) -> float | np.ndarray:
    if x.ndim == 1:
        ok = np.isfinite(x)
        return float(np.mean(x[ok])) if ok.any() else float("nan")
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        ok = np.isfinite(x[:, j])
        if ok.any():
            out[j] = np.mean(x[ok, j])
    return out


def qlike(realized: np.ndarray, forecast: np.ndarray) -> float | np.ndarray:
    """QLIKE ``mean(y/f - ln(y/f) - 1)``; 1-D gives a float, 2-D one value per column; NaN rows dropped."""
    return _nanmean(qlike_loss(realized, forecast))


def mse(realized: np.ndarray, forecast: np.ndarray) -> float | np.ndarray:
    """Mean squared error on variance; 1-D gives a float, 2-D one value per column; NaN rows dropped."""
    return _nanmean(mse_loss(realized, forecast))


# ---------------------------------------------------------------------------- Mincer-Zarnowitz
def newey_west_variance(x: np.ndarray, lags: int) -> float:
    """Newey-West (Bartlett kernel) long-run variance of a 1-D series around its mean.

    ``gamma_0 + 2 sum_{j=1..L} (1 - j/(L+1)) gamma_j`` with ``gamma_j = sum_t d_t d_{t-j} / n``.
    """
    x = np.asarray(x, dtype=float)
    if lags < 0:
        raise ValueError(f"lags must be >= 0, got {lags}")
    d = x - x.mean()
    n = len(d)
    lrv = float(d @ d) / n
    for j in range(1, min(lags, n - 1) + 1):
        lrv += 2.0 * (1.0 - j / (lags + 1.0)) * float(d[j:] @ d[:-j]) / n
    return lrv


@dataclass(frozen=True)
class MincerZarnowitz:
    """Result of the Mincer-Zarnowitz regression ``y = a + b f + e``.

    ``t_a`` tests ``a = 0`` and ``t_b`` tests ``b = 1``, both with HAC (Newey-West) standard errors;
    ``wald``/``wald_pvalue`` is the joint chi-square(2) test of ``a = 0, b = 1``.
    """

    a: float
    b: float
    se_a: float
    se_b: float
    t_a: float
    t_b: float
    wald: float
    wald_pvalue: float
    r2: float
    n: int
    hac_lags: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def mincer_zarnowitz(realized: np.ndarray, forecast: np.ndarray, *, hac_lags: int | None = None) -> MincerZarnowitz:
    """Mincer-Zarnowitz regression of realized on forecast variance with HAC inference.

    Parameters
    ----------
    realized, forecast : np.ndarray
        1-D arrays of the proxy and the forecast (decimal variance per bar); NaN pairs dropped.
    hac_lags : int, optional
        Newey-West lags (Bartlett kernel); default ``floor(4 (n/100)^(2/9))``.

    Returns
    -------
    MincerZarnowitz
        Coefficients, HAC standard errors, t-statistics (``a=0``, ``b=1``), joint Wald test and R².
        The HAC covariance matches statsmodels ``OLS(...).fit(cov_type="HAC",
        cov_kwds={"maxlags": L, "use_correction": False})``.
    """
    y = np.asarray(realized, dtype=float).ravel()
    f = np.asarray(forecast, dtype=float).ravel()
    if y.shape != f.shape:
        raise ValueError(f"realized and forecast must have the same shape, got {y.shape} and {f.shape}")
    ok = np.isfinite(y) & np.isfinite(f)
    y, f = y[ok], f[ok]
    n = len(y)
    if n < 3:
        raise ValueError(f"mincer_zarnowitz needs at least 3 finite pairs, got {n}")
    if hac_lags is None:
        hac_lags = int(np.floor(4.0 * (n / 100.0) ** (2.0 / 9.0)))
    X = np.column_stack([np.ones(n), f])
    XtX_inv = np.linalg.pinv(X.T @ X)
    beta = XtX_inv @ X.T @ y
    e = y - X @ beta
    u = X * e[:, None]
    S = u.T @ u
    for j in range(1, min(hac_lags, n - 1) + 1):
        w = 1.0 - j / (hac_lags + 1.0)
        G = u[j:].T @ u[:-j]
        S += w * (G + G.T)
    cov = XtX_inv @ S @ XtX_inv
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    r = beta - np.array([0.0, 1.0])
    try:
        wald = float(r @ np.linalg.solve(cov, r))
    except np.linalg.LinAlgError:
        wald = float("nan")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(e @ e) / ss_tot if ss_tot > 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        t_a = float(beta[0] / se[0]) if se[0] > 0 else float("nan")
        t_b = float((beta[1] - 1.0) / se[1]) if se[1] > 0 else float("nan")
    return MincerZarnowitz(
        a=float(beta[0]),
        b=float(beta[1]),
        se_a=float(se[0]),
        se_b=float(se[1]),
        t_a=t_a,
        t_b=t_b,
        wald=wald,
        wald_pvalue=float(stats.chi2.sf(wald, 2)) if np.isfinite(wald) else float("nan"),
        r2=r2,
        n=n,
        hac_lags=int(hac_lags),
    )
