"""Data-quality checks: every problem counted and listed, nothing dropped silently.

:func:`check_and_clean` takes a RAW frame from :mod:`data_pipelines.sources` and returns the canonical
frame plus a :class:`QualityReport`. Checks run in this order (each on the rows the previous left):

========================  =====================================  ===================================
check                     ``policy="repair"`` (default)          ``policy="drop"``
========================  =====================================  ===================================
timezone_offsets          converted to UTC (lossless)            same
non_finite_values         row dropped (cannot be repaired)       row dropped
non_positive_prices       row dropped (cannot be repaired)       row dropped
negative_volume           row dropped                            row dropped
unsorted                  stable sort by time (lossless)         same
off_grid_bars             dropped: a stamp off the bar grid is   dropped
                          (grid = the most common stamp phase,
                          e.g. 00:00 or 05:00 UTC for daily)
                          a partial snapshot of a bar in
                          progress (its range covers less than
                          one bar); snapping would overwrite
                          or fake a full bar
duplicate_timestamps      keep the LAST row in source order      identical copies: keep one; groups
                          (the latest write; in prices.db the    whose values differ: drop them all
                          later row's close matches the next
                          day's open), count how many differed
ohlc_inconsistent         widen: high = max(o, h, l, c),         row dropped
                          low = min(o, h, l, c)
wick_outliers             wick clipped to ``wick_clip`` × the    row dropped
                          trailing median wick (a single-venue
                          print such as a flash-crash tick; a
                          perp's mark price would not follow it)
gaps                      kept (never forward-filled): the       same
                          return across a gap is one multi-bar
                          return, ``gap=True`` in the features
extreme_returns           flagged, kept                          flagged, kept
zero_volume_bars          flagged, kept                          flagged, kept
========================  =====================================  ===================================

``policy="fail"`` raises :class:`DataQualityError` (a ``ValueError``) at the first check that would
change or drop a row (non-finite, non-positive, negative volume, unsorted, off-grid, duplicates, OHLC
inconsistent), naming the check and the first offending source row. Gaps, extreme returns, zero
volume and time-zone offsets never fail: they are handled without altering data.

Wick outliers: the wick of a bar is ``max(ln(high / max(open, close)), ln(min(open, close) / low))``. A
bar is an outlier when its wick exceeds both ``wick_min`` (0.5 in log units, a 39% spike past the body) and
``wick_factor`` (50) times the median wick of the previous ``extreme_window`` bars (past only). Examples in
the bundled sets: Bitstamp BTC on 2016-06-24 (low 99.7% below the open) and the GDAX ETH flash crash of
2017-06-22. Left in, one such print dominates every range-based variance estimate (Garman-Klass of 18
for a bar whose close-to-close variance is 1e-3) and liquidates every long in a margin backtest. The
original high/low are listed in ``details["wick_outliers"]``.

Extreme returns use only past data (no look-ahead): ``|r_t| / sqrt(ret_bars_t)`` is compared with
``extreme_sigma`` times a trailing robust scale, the median of ``|r|/sqrt(ret_bars)`` over the previous
``extreme_window`` returns divided by 0.6745 (equal to σ for Gaussian returns).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from data_pipelines.atomic import atomic_write_text
from data_pipelines.bars import (
    CANONICAL_COLUMNS,
    Calendar,
    bar_steps,
    bars_per_year,
    content_hash,
    grid_phase,
    infer_bar,
    off_grid_mask,
    validate_bar,
)

__all__ = [
    "Policy",
    "POLICIES",
    "DataQualityError",
    "QualityReport",
    "check_and_clean",
    "extreme_return_mask",
    "write_quality_json",
    "DEFAULT_EXTREME_SIGMA",
    "DEFAULT_EXTREME_WINDOW",
]

Policy = Literal["repair", "drop", "fail"]
POLICIES: tuple[str, ...] = ("repair", "drop", "fail")
DEFAULT_EXTREME_SIGMA = 8.0
DEFAULT_EXTREME_WINDOW = 250
DEFAULT_WICK_MIN = 0.5
DEFAULT_WICK_FACTOR = 50.0
DEFAULT_WICK_CLIP = 5.0
_MIN_SCALE_OBS = 30
_MAD_TO_SIGMA = 0.6744897501960817  # Φ^{-1}(0.75): median |z| of a standard normal


class DataQualityError(ValueError):
    """Raised by ``policy="fail"``: names the failed check and the first offending row."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class QualityReport:
    """What the quality step found and did. Counts are rows of the raw input unless stated.

    Attributes
    ----------
    rows_in, rows_out : int
        Rows read and rows in the clean frame.
    non_finite_values : int
        Rows with a NaN/inf in any of open/high/low/close/volume (dropped).
    non_positive_prices : int
        Rows with a price <= 0 (dropped).
    negative_volume : int
        Rows with volume < 0 (dropped).
    duplicate_timestamps : int
        Extra rows at a repeated timestamp (rows beyond one per timestamp).
    duplicate_groups_differing : int
        Repeated timestamps whose rows disagree in at least one value.
    unsorted : int
        Rows whose time is earlier than the previous row's (in source order).
    off_grid_bars : int
        Rows whose time is not on the bar grid (dropped).
    ohlc_inconsistent : int
        Rows where high < max(open, close), low > min(open, close) or high < low.
    wick_outliers : int
        Bars whose high/low spike far past the body (see the module docstring); clipped or dropped.
    gaps : dict
        ``count`` (gaps), ``longest_bars`` (most missing bars in one gap), ``missing_bars`` (total), and
        ``largest`` (up to 5 of the longest: start, end, missing bars).
    extreme_returns : int
        Returns flagged as extreme (kept).
    zero_volume_bars : int
        Clean bars with volume == 0 (kept).
    timezone_offsets : dict
        Offset written in the source -> rows (``"none"`` = no offset, read as UTC).
    actions : list of dict
        ``{check, count, action}`` for every check, in the order applied.
    """

    source: str
    asset: str
    bar: str
    calendar: str
    policy: str
    rows_in: int
    rows_out: int
    non_finite_values: int
    non_positive_prices: int
    negative_volume: int
    duplicate_timestamps: int
    duplicate_groups_differing: int
    unsorted: int
    off_grid_bars: int
    ohlc_inconsistent: int
    wick_outliers: int
    gaps: dict[str, Any]
    extreme_returns: int
    zero_volume_bars: int
    timezone_offsets: dict[str, int]
    actions: list[dict[str, Any]]
    extreme_sigma: float
    first_time: str | None
    last_time: str | None
    content_hash: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain ints, floats, strings)."""
        return json.loads(json.dumps(asdict(self), default=_json_default))

    @property
    def problems(self) -> int:
        """Rows changed or dropped by the cleaning (excludes flags such as gaps and extremes)."""
        return sum(a["count"] for a in self.actions if a["changes_data"])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def extreme_return_mask(ret: np.ndarray, ret_bars: np.ndarray | None = None, *, sigma: float = DEFAULT_EXTREME_SIGMA,
                        window: int = DEFAULT_EXTREME_WINDOW, min_periods: int = _MIN_SCALE_OBS) -> np.ndarray:
    """Flag returns larger than ``sigma`` trailing robust standard deviations (past data only).

    Parameters
    ----------
    ret : np.ndarray
        Log returns (decimal), NaN allowed (never flagged).
    ret_bars : np.ndarray, optional
        Bars spanned by each return (1 when omitted); multi-bar returns are scaled by ``sqrt(ret_bars)``.
    sigma : float
        Threshold in robust standard deviations, > 0.
    window, min_periods : int
        Trailing window (returns strictly before t) and the minimum of them needed to flag.

    Returns
    -------
    np.ndarray of bool
    """
    if not sigma > 0:
        raise ValueError(f"extreme_sigma must be > 0, got {sigma}")
    if window < 2 or min_periods < 2 or min_periods > window:
        raise ValueError(f"need 2 <= min_periods <= window, got window={window}, min_periods={min_periods}")
    r = np.asarray(ret, dtype=np.float64)
    k = np.ones_like(r) if ret_bars is None else np.asarray(ret_bars, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(r) / np.sqrt(np.where(k > 0, k, np.nan))
    fast = _extreme_candidates_fast(z, sigma, window)
    if fast is not None:
        return fast
    return _extreme_exact(z, sigma, window, min_periods)


def _extreme_exact(z: np.ndarray, sigma: float, window: int, min_periods: int) -> np.ndarray:
    """Reference path: trailing rolling median for every row (pandas skiplist median)."""
    scale = pd.Series(z).rolling(window, min_periods=min_periods).median().shift(1).to_numpy() / _MAD_TO_SIGMA
    ok = np.isfinite(z) & np.isfinite(scale) & (scale > 0)
    out = np.zeros(z.shape[0], dtype=bool)
    out[ok] = z[ok] > sigma * scale[ok]
    return out


def _extreme_candidates_fast(z: np.ndarray, sigma: float, window: int) -> np.ndarray | None:
    """Same result as :func:`_extreme_exact`, computing the exact median only where it can matter.

    Split the series into blocks of B = W/10 rows and take each block's k-th smallest value: at
    least B - k values of the block are >= it. Any trailing window holds >= floor(W/B) - 1 full
    blocks; when those blocks guarantee more than W/2 values >= L (the smallest of their k-th values),
    the window's median is >= L, so a row with z <= sigma * L / c cannot be flagged. The exact median
    is then computed only for the remaining candidates. Returns None (use the exact path) for short
    or non-finite input, or when candidates are not rare.
    """
    n = z.shape[0]
    block = max(1, window // 10)
    nb = window // block - 1  # full blocks guaranteed inside any window
    if nb < 1:
        return None
    k = block - -(-(window // 2 + 1) // nb)  # largest k with nb * (block - k) >= W/2 + 1
    if n < 4 * window or k < 0 or not np.isfinite(z[1:]).all():
        return None
    head = window + block + 1  # rows whose window may touch row 0 or a partial start: exact path
    out = np.zeros(n, dtype=bool)
    out[:head] = _extreme_exact(z[: head], sigma, window, _MIN_SCALE_OBS)[:head]
    n_blocks = n // block
    kth = np.partition(z[: n_blocks * block].reshape(n_blocks, block), k, axis=1)[:, k]
    if kth.shape[0] < nb:
        return None
    lower = np.lib.stride_tricks.sliding_window_view(kth, nb).min(axis=1)  # min over blocks j..j+nb-1
    t = np.arange(head, n)
    j_lo = -((t - window) // -block)  # ceil((t - W) / B): first block fully inside [t-W, t-1]
    valid = j_lo < lower.shape[0]
    bound = np.full(t.shape[0], np.inf)
    bound[valid] = lower[j_lo[valid]] / _MAD_TO_SIGMA
    cand = t[(z[t] > sigma * bound) | ~valid]
    if cand.shape[0] > n // 40:  # not rare: the full rolling median is cheaper
        return None
    windows = np.lib.stride_tricks.sliding_window_view(z, window)  # windows[i] = z[i : i + W]
    for s in range(0, cand.shape[0], 20_000):
        c = cand[s:s + 20_000]
        scale = np.median(windows[c - window], axis=1) / _MAD_TO_SIGMA
        out[c] = (scale > 0) & (z[c] > sigma * scale)
    return out


def _row_desc(raw: pd.DataFrame, pos: int) -> str:
    row_name = raw.attrs.get("row_name", "row")
    r = raw.iloc[pos]
    vals = ", ".join(f"{c}={float(r[c]):.10g}" for c in CANONICAL_COLUMNS)
    return f"{row_name} {int(r['src_row'])} (time {pd.Timestamp(r['time']).isoformat()}): {vals}"


def _fail(raw: pd.DataFrame, check: str, mask: np.ndarray, positions: np.ndarray, what: str) -> None:
    n = int(mask.sum())
    first = int(positions[np.flatnonzero(mask)[0]])
    where = raw.attrs.get("path") or raw.attrs.get("source", "input")
    raise DataQualityError(
        check, f"{where}: quality check '{check}' failed (policy='fail'): {n} row(s) {what}; first at {_row_desc(raw, first)}"
    )


def check_and_clean(raw: pd.DataFrame, policy: Policy = "repair", bar: str | None = None, *,
                    extreme_sigma: float = DEFAULT_EXTREME_SIGMA, extreme_window: int = DEFAULT_EXTREME_WINDOW,
                    calendar: Calendar | None = None, wick_min: float = DEFAULT_WICK_MIN,
                    wick_factor: float = DEFAULT_WICK_FACTOR, wick_clip: float = DEFAULT_WICK_CLIP,
                    ) -> tuple[pd.DataFrame, QualityReport]:
    """Run every check on a RAW frame and return ``(clean_frame, report)``.

    Parameters
    ----------
    raw : pd.DataFrame
        Raw frame from :func:`data_pipelines.sources.load_raw` (columns ``time``, ``tz_offset``,
        open..volume, ``src_row``; ``tz_offset`` and ``src_row`` are optional).
    policy : {"repair", "drop", "fail"}
        What to do with problems (see the module docstring).
    bar : str, optional
        Bar alias; defaults to ``raw.attrs["bar"]``, else inferred from the timestamps.
    extreme_sigma : float
        Threshold for flagging extreme returns, in trailing robust standard deviations.
    calendar : {"24/7", "business"}, optional
        Defaults to ``raw.attrs["calendar"]`` or "24/7".
    wick_min, wick_factor, wick_clip : float
        Wick-outlier rule (log units; see the module docstring): flagged when the wick exceeds
        ``wick_min`` and ``wick_factor`` × the trailing median wick; repaired by clipping it to
        ``wick_clip`` × that median.

    Returns
    -------
    clean : pd.DataFrame
        Canonical frame: UTC ``DatetimeIndex`` named ``time`` (sorted, unique, on the bar grid),
        float64 open/high/low/close/volume, attrs ``source, asset, bar, calendar, bars_per_year,
        content_hash``.
    report : QualityReport
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    missing = [c for c in ("time", *CANONICAL_COLUMNS) if c not in raw.columns]
    if missing:
        raise ValueError(f"raw frame is missing column(s) {missing}; expected time, open, high, low, close, volume")
    raw = raw.reset_index(drop=True)
    attrs = dict(raw.attrs)
    if "src_row" not in raw.columns:
        raw = raw.assign(src_row=np.arange(1, len(raw) + 1))
        raw.attrs.update(attrs)
    if "tz_offset" not in raw.columns:
        raw = raw.assign(tz_offset=None)
        raw.attrs.update(attrs)
    calendar = calendar or attrs.get("calendar") or "24/7"
    times_all = pd.DatetimeIndex(raw["time"])
    if times_all.tz is None:
        times_all = times_all.tz_localize("UTC")
    times_all = times_all.tz_convert("UTC").as_unit("ns")
    if times_all.isna().any():
        _fail(raw, "time", times_all.isna(), np.arange(len(raw)), "have a missing timestamp")
    bar = validate_bar(bar or attrs.get("bar") or infer_bar(times_all))
    if bar == "1B":
        calendar = "business"
    rows_in = len(raw)
    vals = raw.loc[:, list(CANONICAL_COLUMNS)].to_numpy(dtype=np.float64)
    pos = np.arange(rows_in)  # positions into raw of the rows still kept
    actions: list[dict[str, Any]] = []
    details: dict[str, Any] = {}

    def act(check: str, count: int, action: str, changes: bool) -> None:
        actions.append({"check": check, "count": int(count), "action": action, "changes_data": changes})

    # time-zone offsets: lossless conversion
    offs = raw["tz_offset"].astype(object).where(raw["tz_offset"].notna(), "none")
    tz_counts = {str(k): int(v) for k, v in offs.value_counts().sort_index().items()}
    act("timezone_offsets", rows_in if len(tz_counts) > 1 else 0,
        f"{len(tz_counts)} distinct offset(s) {sorted(tz_counts)}; all converted to UTC", False)

    def drop_rows(check: str, bad: np.ndarray, what: str, action: str) -> int:
        nonlocal vals, pos
        n = int(bad.sum())
        if n and policy == "fail":
            _fail(raw, check, bad, pos, what)
        vals, pos = vals[~bad], pos[~bad]
        return n

    finite = np.isfinite(vals)
    bad_nf = ~finite.all(axis=1)
    details["non_finite_by_column"] = {c: int((~finite[:, j]).sum()) for j, c in enumerate(CANONICAL_COLUMNS)}
    n_nf = drop_rows("non_finite_values", bad_nf, "have NaN/inf in open/high/low/close/volume", "dropped")
    act("non_finite_values", n_nf, "rows dropped (a missing price cannot be repaired; never filled)", True)

    bad_np = (vals[:, :4] <= 0).any(axis=1)
    n_np = drop_rows("non_positive_prices", bad_np, "have a price <= 0", "dropped")
    act("non_positive_prices", n_np, "rows dropped (a zero or negative price cannot be repaired)", True)

    bad_nv = vals[:, 4] < 0
    n_nv = drop_rows("negative_volume", bad_nv, "have volume < 0", "dropped")
    act("negative_volume", n_nv, "rows dropped", True)

    # unsorted: rows earlier than the row before them in the source (all rows, as read)
    t_all = times_all.asi8
    desc = np.zeros(t_all.shape[0], dtype=bool)
    desc[1:] = t_all[1:] < t_all[:-1]
    n_uns = int(desc.sum())
    if n_uns and policy == "fail":
        _fail(raw, "unsorted", desc, np.arange(rows_in), "are earlier than the row before them")
    t_ns = t_all[pos]
    order = np.argsort(t_ns, kind="stable")
    vals, pos, t_ns = vals[order], pos[order], t_ns[order]
    act("unsorted", n_uns, "stable sort by UTC time (no row lost)" if n_uns else "already sorted", n_uns > 0)

    # off-grid stamps
    kept_times = pd.DatetimeIndex(t_ns, tz="UTC")
    phase = grid_phase(kept_times, bar, calendar)
    details["grid_phase"] = str(pd.Timedelta(phase, unit="ns"))
    bad_og = off_grid_mask(kept_times, bar, calendar, phase)
    n_og = drop_rows("off_grid_bars", bad_og, f"are not on the {bar} grid", "dropped")
    t_ns = times_all.asi8[pos]
    act("off_grid_bars", n_og, f"rows dropped (partial snapshot of a bar in progress; not snapped onto the {bar} grid)", True)

    # duplicated timestamps
    ts = pd.Series(t_ns)
    in_dup = ts.duplicated(keep=False).to_numpy()
    n_dup = int(ts.duplicated(keep="first").sum())
    n_groups = int(ts[in_dup].nunique())
    n_diff = 0
    differing_mask = np.zeros(t_ns.shape[0], dtype=bool)
    if n_dup:
        sub = pd.DataFrame(vals[in_dup], columns=list(CANONICAL_COLUMNS))
        sub["t"] = t_ns[in_dup]
        nun = sub.groupby("t")[list(CANONICAL_COLUMNS)].nunique().gt(1).any(axis=1)
        n_diff = int(nun.sum())
        differing_mask = in_dup & ts.isin(nun.index[nun]).to_numpy()
        if policy == "fail":
            _fail(raw, "duplicate_timestamps", in_dup, pos, "share a timestamp with another row")
    if policy == "drop":
        bad_dup = differing_mask | (ts.duplicated(keep="first").to_numpy() & ~differing_mask)
        rule = "identical copies: one kept; timestamps whose rows differ: all their rows dropped"
    else:
        bad_dup = ts.duplicated(keep="last").to_numpy()
        rule = "kept the last row in source order (latest write) for each repeated timestamp"
    vals, pos = vals[~bad_dup], pos[~bad_dup]
    details["duplicates"] = {"timestamps": n_groups, "differing_timestamps": n_diff, "rows_removed": int(bad_dup.sum()),
                             "rule": rule}
    act("duplicate_timestamps", n_dup, f"{rule}; {n_groups} repeated timestamp(s), {n_diff} with differing values", True)

    # OHLC consistency
    o, h, lo, c = vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3]
    bad_ohlc = (h < np.maximum(o, c)) | (lo > np.minimum(o, c)) | (h < lo)
    n_ohlc = int(bad_ohlc.sum())
    if n_ohlc and policy == "fail":
        _fail(raw, "ohlc_inconsistent", bad_ohlc, pos, "have high < max(open, close), low > min(open, close) or high < low")
    if policy == "drop":
        vals, pos = vals[~bad_ohlc], pos[~bad_ohlc]
        act("ohlc_inconsistent", n_ohlc, "rows dropped", True)
    else:
        vals = vals.copy()
        vals[:, 1] = vals[:, :4].max(axis=1)
        vals[:, 2] = vals[:, :4].min(axis=1)
        act("ohlc_inconsistent", n_ohlc, "widened: high = max(open, high, low, close), low = min(open, high, low, close)", True)

    # wick outliers: single prints far outside the bar's body (past-only robust scale)
    for name, val in (("wick_min", wick_min), ("wick_factor", wick_factor), ("wick_clip", wick_clip)):
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive number, got {val!r}")
    o, h, lo, c = vals[:, 0], vals[:, 1], vals[:, 2], vals[:, 3]
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    up, down = np.log(h / top), np.log(bottom / lo)
    wick = np.maximum(up, down)
    med = pd.Series(wick).rolling(extreme_window, min_periods=_MIN_SCALE_OBS).median().shift(1).to_numpy()
    with np.errstate(invalid="ignore"):
        bad_wick = (wick > wick_min) & (wick > wick_factor * med)
    n_wick = int(bad_wick.sum())
    wick_rows = np.flatnonzero(bad_wick)
    details["wick_outliers"] = [
        {"time": pd.Timestamp(times_all.asi8[pos[i]], tz="UTC").isoformat(), "open": float(o[i]), "high": float(h[i]),
         "low": float(lo[i]), "close": float(c[i]), "wick": float(wick[i]), "trailing_median_wick": float(med[i])}
        for i in wick_rows[:20]
    ]
    if n_wick and policy == "fail":
        _fail(raw, "wick_outliers", bad_wick, pos, f"have a high/low more than {wick_factor:g}x the trailing median wick past the body")
    if policy == "drop":
        vals, pos = vals[~bad_wick], pos[~bad_wick]
        act("wick_outliers", n_wick, "rows dropped", True)
    else:
        vals = vals.copy()
        cap = wick_clip * med[wick_rows]
        vals[wick_rows, 1] = np.where(up[wick_rows] > cap, top[wick_rows] * np.exp(cap), h[wick_rows])
        vals[wick_rows, 2] = np.where(down[wick_rows] > cap, bottom[wick_rows] * np.exp(-cap), lo[wick_rows])
        act("wick_outliers", n_wick, f"wick clipped to {wick_clip:g}x the trailing median wick (original high/low in details)", True)

    index = pd.DatetimeIndex(times_all.asi8[pos], tz="UTC").as_unit("ns")
    index.name = "time"
    clean = pd.DataFrame(vals, index=index, columns=list(CANONICAL_COLUMNS), dtype=np.float64)

    # gaps (kept, never filled)
    steps = bar_steps(index, bar, calendar)
    k = np.rint(steps)
    is_gap = k > 1
    missing = np.where(is_gap, k - 1, 0).astype(np.int64)
    largest = []
    for i in np.argsort(-missing, kind="stable")[: min(5, int(is_gap.sum()))]:
        largest.append({"after": index[i - 1].isoformat(), "resumes": index[i].isoformat(), "missing_bars": int(missing[i])})
    gaps = {"count": int(is_gap.sum()), "longest_bars": int(missing.max()) if missing.size else 0,
            "missing_bars": int(missing.sum()), "largest": largest}
    act("gaps", gaps["count"], "kept, never forward-filled: the return across a gap is one multi-bar return (gap=True, ret_bars>1)", False)

    # extreme returns (flagged, kept)
    with np.errstate(divide="ignore", invalid="ignore"):
        ret = np.full(len(clean), np.nan)
        ret[1:] = np.diff(np.log(clean["close"].to_numpy()))
    ext = extreme_return_mask(ret, k, sigma=extreme_sigma, window=extreme_window)
    act("extreme_returns", int(ext.sum()), f"flagged (|r|/sqrt(ret_bars) > {extreme_sigma:g} trailing robust sigma), kept", False)
    details["extreme_returns"] = [{"time": index[i].isoformat(), "ret": float(ret[i]), "ret_bars": int(k[i])}
                                  for i in np.flatnonzero(ext)[:20]]

    n_zero = int((clean["volume"].to_numpy() == 0).sum())
    act("zero_volume_bars", n_zero, "flagged, kept (prices are valid; volume may be unreported)", False)

    clean.attrs.update(
        source=attrs.get("source", "unknown"), asset=attrs.get("asset", "UNKNOWN"), bar=bar, calendar=calendar,
        bars_per_year=attrs.get("bars_per_year") or bars_per_year(bar, calendar),
    )
    clean.attrs["content_hash"] = content_hash(clean)
    report = QualityReport(
        source=str(attrs.get("source", "unknown")), asset=str(attrs.get("asset", "UNKNOWN")), bar=bar, calendar=calendar,
        policy=policy, rows_in=rows_in, rows_out=len(clean), non_finite_values=n_nf, non_positive_prices=n_np,
        negative_volume=n_nv, duplicate_timestamps=n_dup, duplicate_groups_differing=n_diff, unsorted=n_uns,
        off_grid_bars=n_og, ohlc_inconsistent=n_ohlc, wick_outliers=n_wick, gaps=gaps, extreme_returns=int(ext.sum()),
        zero_volume_bars=n_zero, timezone_offsets=tz_counts, actions=actions, extreme_sigma=float(extreme_sigma),
        first_time=index[0].isoformat() if len(index) else None, last_time=index[-1].isoformat() if len(index) else None,
        content_hash=clean.attrs["content_hash"], details=details,
    )
    return clean, report


def write_quality_json(report: QualityReport | dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON atomically (temp file in the same folder, then ``os.replace``)."""
    payload = report.to_dict() if isinstance(report, QualityReport) else report
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write_text(path, text)
