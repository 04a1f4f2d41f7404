"""Features from canonical OHLCV bars: returns, range-based variance, realized variance, HAR lags, targets.

Units: returns are decimal log returns per bar; every variance column is the variance of ONE bar's log
return in decimal units (never annualised, never ×100). Nothing uses data after bar ``t`` to build row
``t`` (the only forward-looking function is :func:`forward_targets`, which builds targets on purpose).

Range estimators (per bar, with u = ln H/O, d = ln L/O, c = ln C/O):

* Parkinson (1980): ``(u - d)^2 / (4 ln 2)``
* Garman-Klass (1980): ``0.5 (u - d)^2 - (2 ln 2 - 1) c^2``
* Rogers-Satchell (1991): ``u (u - c) + d (d - c)`` (unbiased under drift)
* Yang-Zhang (2000), rolling window n: ``σ_o² + k σ_c² + (1 - k) mean(RS)`` with overnight
  o = ln O_t/C_{t-1}, k = 0.34 / (1.34 + (n + 1)/(n - 1)); σ_o² and σ_c² are sample variances.

They estimate the variance of the open-to-close move; for 24/7 markets (open = previous close) that
is the bar's return. A flat bar (high == low) gives 0; every variance column is floored at
``VARIANCE_FLOOR`` = 1e-10 (so logs and QLIKE stay finite) and the number of floored values per column
is stored in ``features.attrs["floored"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from data_pipelines.bars import CANONICAL_COLUMNS, bar_nanos, bar_steps, bars_per_day, grid_phase, infer_bar
from data_pipelines.quality import DEFAULT_EXTREME_SIGMA, extreme_return_mask

__all__ = [
    "VARIANCE_FLOOR",
    "VARIANCE_COLUMNS",
    "build_features",
    "range_variances",
    "yang_zhang",
    "realized_variance",
    "har_window_bars",
    "forward_targets",
]

VARIANCE_FLOOR = 1e-10
VARIANCE_COLUMNS: tuple[str, ...] = ("var_sq", "var_pk", "var_gk", "var_rs", "var_yz", "rv")
_LN2 = float(np.log(2.0))


def _check_bars(bars: pd.DataFrame) -> None:
    if not isinstance(bars, pd.DataFrame):
        raise TypeError(f"bars must be a pandas DataFrame, got {type(bars).__name__}")
    missing = [c for c in CANONICAL_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"bars is missing column(s) {missing}; expected {list(CANONICAL_COLUMNS)}")
    if not isinstance(bars.index, pd.DatetimeIndex):
        raise TypeError(f"bars must have a DatetimeIndex, got {type(bars.index).__name__}")
    if not bars.index.is_monotonic_increasing or bars.index.has_duplicates:
        raise ValueError("bars index must be sorted and unique; run data_pipelines.quality.check_and_clean first")


def range_variances(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray) -> dict[str, np.ndarray]:
    """Per-bar Parkinson, Garman-Klass and Rogers-Satchell variances (unfloored), vectorised.

    Parameters
    ----------
    open_, high, low, close : np.ndarray
        Positive prices of the same shape.

    Returns
    -------
    dict with keys ``var_pk``, ``var_gk``, ``var_rs`` (decimal log-return variance per bar).
    """
    lo = np.log(open_)
    u = np.log(high) - lo
    d = np.log(low) - lo
    c = np.log(close) - lo
    hl2 = (u - d) ** 2
    return {
        "var_pk": hl2 / (4.0 * _LN2),
        "var_gk": 0.5 * hl2 - (2.0 * _LN2 - 1.0) * c * c,
        "var_rs": u * (u - c) + d * (d - c),
    }


def yang_zhang(bars: pd.DataFrame, window: int = 30, *, rs: np.ndarray | None = None) -> pd.Series:
    """Yang-Zhang variance per bar over a trailing window of ``window`` bars (rows t-window+1..t).

    NaN until ``window`` overnight returns exist (the first is NaN), i.e. for the first ``window`` rows.
    ``rs`` may pass precomputed (unfloored) Rogers-Satchell values to avoid recomputing them.
    """
    if window < 2:
        raise ValueError(f"yz_window must be >= 2, got {window}")
    o = np.log(bars["open"].to_numpy(dtype=np.float64))
    c = np.log(bars["close"].to_numpy(dtype=np.float64))
    overnight = np.full(o.shape[0], np.nan)
    overnight[1:] = o[1:] - c[:-1]
    oc = c - o
    if rs is None:
        rs = range_variances(*(bars[k].to_numpy(dtype=np.float64) for k in ("open", "high", "low", "close")))["var_rs"]
    k = 0.34 / (1.34 + (window + 1) / (window - 1))
    var_o = pd.Series(overnight).rolling(window, min_periods=window).var(ddof=1)
    var_c = pd.Series(oc).rolling(window, min_periods=window).var(ddof=1)
    mean_rs = pd.Series(rs).rolling(window, min_periods=window).mean()
    yz = var_o + k * var_c + (1.0 - k) * mean_rs
    yz = yz.where(var_o.notna())
    return pd.Series(yz.to_numpy(), index=bars.index, name="var_yz")


def realized_variance(intraday_bars: pd.DataFrame, to: str = "1D", *, min_coverage: float = 0.8,
                      offset: pd.Timedelta | str | None = None) -> pd.Series:
    """Sum of squared intraday log returns per ``to`` period (UTC), in decimal variance units.

    The return of bar t (close-to-close, ``ln C_t / C_{t-1}``) belongs to the period containing bar
    t's open time, so a daily value covers exactly that UTC day's price path. A period whose returns
    cover less than ``min_coverage`` of its expected bars is NaN (a partial day is not a full-day
    variance). Returns across a gap are included (they are real price moves).

    Parameters
    ----------
    intraday_bars : pd.DataFrame
        Canonical bars (sorted, unique UTC index) finer than ``to``.
    to : str
        Target period, a fixed pandas alias (default one UTC day).
    min_coverage : float
        Fraction in (0, 1] of the expected returns a period needs.
    offset : Timedelta, optional
        Start of the periods relative to the UTC grid (e.g. ``"5h"`` for days that start at 05:00 UTC).

    Returns
    -------
    pd.Series named ``rv`` indexed by period start (UTC); floored at ``VARIANCE_FLOOR``.
    """
    _check_bars(intraday_bars)
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    bar = intraday_bars.attrs.get("bar") or infer_bar(intraday_bars.index)
    per = bar_nanos(to) / bar_nanos(bar)
    if per < 2:
        raise ValueError(f"intraday bars ({bar}) must be finer than the target period {to!r}")
    lc = np.log(intraday_bars["close"].to_numpy(dtype=np.float64))
    r = np.full(lc.shape[0], np.nan)
    r[1:] = np.diff(lc)
    s = pd.Series(r * r, index=intraday_bars.index)
    off = pd.Timedelta(offset) if offset is not None else pd.Timedelta(0)
    grouped = s.groupby((intraday_bars.index - off).floor(to) + off)
    total = grouped.sum(min_count=1)
    count = grouped.count()
    rv = total.where(count >= min_coverage * per)
    rv = rv.clip(lower=VARIANCE_FLOOR).where(rv.notna())
    rv.index.name = "time"
    return rv.rename("rv")


def har_window_bars(days: float, bar: str) -> int:
    """Number of bars in ``days`` days of ``bar`` bars (1 day of 15-min bars = 96), at least 1."""
    return max(1, round(days * bars_per_day(bar)))


def build_features(bars: pd.DataFrame, *, har_days: Sequence[float] = (1, 7, 30), har_base: str = "var_gk",
                   yz_window: int = 30, rv: pd.Series | None = None, intraday: pd.DataFrame | None = None,
                   extreme_sigma: float = DEFAULT_EXTREME_SIGMA) -> pd.DataFrame:
    """Build the feature frame from canonical bars (no look-ahead: row t uses bars <= t only).

    Parameters
    ----------
    bars : pd.DataFrame
        Canonical OHLCV (sorted unique UTC ``DatetimeIndex``; attrs ``bar``, ``calendar`` used when present).
    har_days : sequence of float
        HAR lag lengths in DAYS; column ``har_<d>`` is the trailing mean of ``har_base`` over
        ``d × bars_per_day`` bars up to and including t (NaN until the window is full).
    har_base : str
        Variance column the HAR lags average (``var_gk``, ``var_sq``, ``var_pk``, ``var_rs``, ``rv`` ...).
    yz_window : int
        Yang-Zhang window in bars.
    rv, intraday : optional
        Realized variance per bar: either a Series aligned by timestamp, or intraday canonical bars
        from which :func:`realized_variance` computes it. Otherwise ``rv`` is NaN.
    extreme_sigma : float
        Threshold of the ``extreme`` flag (see :func:`data_pipelines.quality.extreme_return_mask`).

    Returns
    -------
    pd.DataFrame
        OHLCV plus ``ret, ret_bars, gap, extreme, var_sq, var_pk, var_gk, var_rs, var_yz, rv,
        har_<d>...``; attrs copied from ``bars`` plus ``floored`` (count of floored values per column).
    """
    _check_bars(bars)
    bar = bars.attrs.get("bar") or infer_bar(bars.index)
    calendar = bars.attrs.get("calendar", "24/7")
    out = bars.loc[:, list(CANONICAL_COLUMNS)].astype(np.float64)
    o, h, lo, c = (out[k].to_numpy() for k in ("open", "high", "low", "close"))
    if len(out) and not (np.isfinite(out.to_numpy()[:, :4]).all() and (out.to_numpy()[:, :4] > 0).all()):
        raise ValueError("bars contain non-finite or non-positive prices; run data_pipelines.quality.check_and_clean first")
    lc = np.log(c)
    ret = np.full(lc.shape[0], np.nan)
    ret[1:] = np.diff(lc)
    steps = np.rint(bar_steps(out.index, bar, calendar))
    out["ret"] = ret
    out["ret_bars"] = steps
    out["gap"] = steps > 1
    out["extreme"] = extreme_return_mask(ret, steps, sigma=extreme_sigma)
    floored: dict[str, int] = {}

    def put(name: str, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        low_mask = v < VARIANCE_FLOOR  # NaN compares False: NaN stays NaN
        floored[name] = int(low_mask.sum())
        out[name] = np.where(low_mask, VARIANCE_FLOOR, v)

    put("var_sq", ret * ret)
    rv_range = range_variances(o, h, lo, c)
    for name, v in rv_range.items():
        put(name, v)
    put("var_yz", yang_zhang(out, yz_window, rs=rv_range["var_rs"]).to_numpy())
    if rv is None and intraday is not None:
        phase = grid_phase(out.index, bar, calendar)
        rv = realized_variance(intraday, to="1D" if bar == "1B" else bar, offset=pd.Timedelta(phase, unit="ns"))
    if rv is not None:
        aligned = pd.Series(rv).reindex(out.index).to_numpy(dtype=np.float64)
        put("rv", aligned)
    else:
        out["rv"] = np.nan
        floored["rv"] = 0
    if har_base not in out.columns or har_base not in VARIANCE_COLUMNS:
        raise ValueError(f"har_base must be one of {VARIANCE_COLUMNS}, got {har_base!r}")
    base = out[har_base]
    for d in har_days:
        if not d > 0:
            raise ValueError(f"har_days must be positive, got {d}")
        w = har_window_bars(d, bar)
        label = f"har_{d:g}"
        out[label] = base.rolling(w, min_periods=w).mean().to_numpy()
    out.attrs.update(bars.attrs)
    out.attrs["floored"] = floored
    out.attrs["har_windows"] = {f"har_{d:g}": har_window_bars(d, bar) for d in har_days}
    return out


def forward_targets(series: pd.Series, horizon: int) -> pd.DataFrame:
    """Targets ``y.1 .. y.H``: ``y.k`` at row t is ``series`` at row t + k (NaN past the end).

    Row t therefore holds only FUTURE values; use it as the label of a forecast made at the close of
    bar t. Shifts are by rows (bars), matching a forecaster's per-step horizon.
    """
    if not isinstance(horizon, int | np.integer) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    s = pd.Series(series)
    return pd.DataFrame({f"y.{k}": s.shift(-k) for k in range(1, int(horizon) + 1)}, index=s.index)
