"""Bar sizes, calendars and grid arithmetic shared by the loaders, the quality checks and the features.

A *bar* is a pandas offset alias: fixed sizes such as ``"1min"``, ``"15min"``, ``"1h"``, ``"1D"`` for
markets that trade around the clock (``calendar="24/7"``), or ``"1B"`` (one business day) for equity
data (``calendar="business"``: weekends are not gaps; exchange holidays are counted as missing bars
because no holiday calendar is bundled).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

__all__ = [
    "Calendar",
    "CANONICAL_COLUMNS",
    "PRICE_COLUMNS",
    "bar_nanos",
    "bar_alias_from_nanos",
    "bars_per_day",
    "bars_per_year",
    "bar_steps",
    "off_grid_mask",
    "grid_phase",
    "infer_bar",
    "content_hash",
    "validate_bar",
]

Calendar = Literal["24/7", "business"]

#: Columns of the canonical OHLCV frame, in order (float64; prices in quote currency, volume in base units).
CANONICAL_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")

_NS_PER_DAY = 86_400 * 10**9


def validate_bar(bar: str) -> str:
    """Return ``bar`` if it is a fixed-size pandas offset alias or ``"1B"``; raise ``ValueError`` otherwise."""
    if not isinstance(bar, str) or not bar:
        raise ValueError(f"bar must be a pandas offset alias such as '1D' or '15min', got {bar!r}")
    if bar.upper() == "1B":
        return "1B"
    try:
        off = to_offset(bar)
        nanos = off.nanos
    except (ValueError, TypeError):
        raise ValueError(
            f"bar must be a fixed-size pandas offset alias such as '1D', '15min', '1h' (or '1B'), got {bar!r}"
        ) from None
    if nanos <= 0:
        raise ValueError(f"bar must be a positive duration, got {bar!r}")
    return bar


def bar_nanos(bar: str) -> int:
    """Nominal length of one bar in nanoseconds (``"1B"`` counts as one day)."""
    bar = validate_bar(bar)
    if bar == "1B":
        return _NS_PER_DAY
    return int(to_offset(bar).nanos)


def bar_alias_from_nanos(nanos: int) -> str:
    """Human alias for a bar length: ``86400e9 -> "1D"``, ``900e9 -> "15min"``, ``3600e9 -> "1h"``."""
    nanos = int(nanos)
    if nanos <= 0:
        raise ValueError(f"bar length must be positive, got {nanos} ns")
    sec, rem = divmod(nanos, 10**9)
    if rem:
        return f"{nanos // 1000}us" if nanos % 1000 == 0 else f"{nanos}ns"
    for unit, size in (("D", 86_400), ("h", 3_600), ("min", 60)):
        if sec % size == 0:
            return f"{sec // size}{unit}"
    return f"{sec}s"


def bars_per_day(bar: str) -> float:
    """Number of bars in one calendar day (business day for ``"1B"``)."""
    return _NS_PER_DAY / bar_nanos(bar)


def bars_per_year(bar: str, calendar: Calendar = "24/7") -> float:
    """Bars in one year: 365 days for 24/7 markets, 252 trading days for ``calendar="business"``."""
    if calendar == "business":
        return 252.0 * bars_per_day(bar)
    if calendar != "24/7":
        raise ValueError(f"calendar must be '24/7' or 'business', got {calendar!r}")
    return 365.0 * bars_per_day(bar)


def _as_ns(index: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    values = pd.DatetimeIndex(index)
    if values.tz is not None:
        values = values.tz_convert("UTC").tz_localize(None)
    return values.as_unit("ns").asi8


def bar_steps(index: pd.DatetimeIndex, bar: str, calendar: Calendar = "24/7") -> np.ndarray:
    """Number of bar intervals between consecutive timestamps, as float64 (NaN for the first).

    For fixed bars this is ``Δt / bar`` (may be fractional for off-grid stamps); for ``calendar=
    "business"`` it is the number of business days (Mon-Fri) between the two dates.
    """
    ns = _as_ns(index)
    out = np.full(ns.shape[0], np.nan)
    if ns.shape[0] < 2:
        return out
    if calendar == "business":
        days = (ns // _NS_PER_DAY).astype("datetime64[D]")
        out[1:] = np.busday_count(days[:-1], days[1:]).astype(np.float64)
        return out
    out[1:] = np.diff(ns).astype(np.float64) / float(bar_nanos(bar))
    return out


def grid_phase(index: pd.DatetimeIndex, bar: str, calendar: Calendar = "24/7") -> int:
    """The grid's offset in ns from the Unix epoch: the most common ``t mod bar`` (ties: the smallest).

    Daily bars stamped at 05:00 UTC (a local midnight) have phase 5 h; bars on round times have 0.
    Business-day bars use the time of day.
    """
    ns = _as_ns(index)
    if ns.shape[0] == 0:
        return 0
    step = _NS_PER_DAY if calendar == "business" else bar_nanos(bar)
    vals, counts = np.unique(ns % step, return_counts=True)
    return int(vals[np.argmax(counts)])


def off_grid_mask(index: pd.DatetimeIndex, bar: str, calendar: Calendar = "24/7", phase: int = 0) -> np.ndarray:
    """True where a timestamp is not on the bar grid ``phase + k × bar`` (ns since the Unix epoch, UTC).

    Business-day bars must also fall on a weekday (Mon-Fri) at the phase's time of day.
    """
    ns = _as_ns(index)
    if calendar == "business":
        on_time = (ns - phase) % _NS_PER_DAY == 0
        weekday = np.is_busday(((ns - phase) // _NS_PER_DAY).astype("datetime64[D]"))
        return ~(on_time & weekday)
    return (ns - phase) % bar_nanos(bar) != 0


def infer_bar(index: pd.DatetimeIndex | pd.Series) -> str:
    """Infer the bar alias as the most common positive spacing between sorted unique timestamps."""
    ns = np.unique(_as_ns(pd.DatetimeIndex(index).dropna()))
    if ns.shape[0] < 2:
        raise ValueError("cannot infer the bar size from fewer than 2 distinct timestamps; pass bar= (CLI: --bar)")
    diffs = np.diff(ns)
    vals, counts = np.unique(diffs, return_counts=True)
    return bar_alias_from_nanos(int(vals[np.argmax(counts)]))


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the canonical bytes: int64 UTC nanosecond index, then the float64 OHLCV matrix (C order)."""
    h = hashlib.sha256()
    h.update(_as_ns(frame.index).astype("<i8").tobytes())
    values = np.ascontiguousarray(frame.loc[:, list(CANONICAL_COLUMNS)].to_numpy(dtype="<f8"))
    h.update(values.tobytes())
    return h.hexdigest()
