"""Years of 1-minute bars for many assets without loading them all: partitioned parquet, per-partition features.

Layout (hive partitioning, read through ``pyarrow.dataset``)::

    <root>/bars/asset=<A>/month=<YYYY-MM>/part-0.parquet        canonical OHLCV, column ``time`` (UTC)
    <root>/manifest.json                                         what was generated (parameters, rows)
    <out>/asset=<A>/month=<YYYY-MM>/part-0.parquet              features of that month's bars

Features are built one (asset, month) partition at a time: the partition's bars are read together with
a warm-up of the bars before it (:func:`feature_warmup_bars`: the longest trailing window any feature
uses, plus one bar for the first return), :func:`data_pipelines.features.build_features` runs on that
slice, and only the partition's own rows are written. Every feature of row t uses bars ``<= t`` within
its window, so the per-partition result equals the one of the whole series (to the rounding of the
rolling sums, ~1e-15 relative; ``tests/test_scale``) while a task holds at most a few months of one
asset in memory. Partition tasks are independent and go through any executor with
``map_unordered(fn, tasks)`` (local processes, Ray).

:func:`generate_minute_set` writes a synthetic set on demand (default 20 assets × 3 years of 1-minute
bars, 31.5 million bars) with :func:`data_pipelines.synthetic.simulate`, one asset at a time, and reuses
an existing set whose manifest has the same parameters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_pipelines.atomic import atomic_write, atomic_write_text
from data_pipelines.bars import CANONICAL_COLUMNS, bar_nanos, bars_per_day, validate_bar
from data_pipelines.features import VARIANCE_FLOOR, build_features, har_window_bars
from data_pipelines.quality import DEFAULT_EXTREME_WINDOW

__all__ = [
    "MinuteSetSpec",
    "FeatureBuildReport",
    "generate_minute_set",
    "write_partitioned_bars",
    "open_bars",
    "list_partitions",
    "read_partition",
    "feature_warmup_bars",
    "build_partitioned_features",
    "read_features",
]

log = logging.getLogger(__name__)

_PART = "part-0.parquet"
_HAR_DAYS: tuple[float, ...] = (1, 7, 30)


@dataclass(frozen=True)
class MinuteSetSpec:
    """Parameters of a synthetic minute-bar set.

    Parameters
    ----------
    assets : int
        Number of assets (``SYN00``, ``SYN01`` ...), each an independent simulated market.
    days : int
        Calendar days of bars per asset (3 years = 1095).
    bar : str
        Bar size (fixed, 24/7), ``"1min"`` by default.
    seed : int
        Asset ``i`` is simulated with seed ``seed + i``.
    start : str
        First bar's open time (UTC).
    intraday_steps : int
        Brownian steps per bar for high/low (see :func:`data_pipelines.synthetic.simulate`).
    """

    assets: int = 20
    days: int = 3 * 365
    bar: str = "1min"
    seed: int = 0
    start: str = "2021-01-01"
    intraday_steps: int = 4

    def __post_init__(self) -> None:
        if int(self.assets) < 1:
            raise ValueError(f"assets must be >= 1, got {self.assets}")
        if int(self.days) < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if int(self.intraday_steps) < 1:
            raise ValueError(f"intraday_steps must be >= 1, got {self.intraday_steps}")
        validate_bar(self.bar)

    @property
    def n_bars(self) -> int:
        """Bars per asset."""
        return int(round(self.days * bars_per_day(self.bar)))

    @property
    def asset_names(self) -> list[str]:
        width = max(2, len(str(self.assets - 1)))
        return [f"SYN{i:0{width}d}" for i in range(self.assets)]


@dataclass(frozen=True)
class FeatureBuildReport:
    """What :func:`build_partitioned_features` did (durations in seconds)."""

    out: Path
    partitions: int
    rows: int
    seconds: float
    warmup_bars: int
    floored: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ---------------------------------------------------------------------------- writing bars
def _month_bounds(index: pd.DatetimeIndex) -> list[tuple[str, int, int]]:
    """``(YYYY-MM, first row, end row)`` of each calendar month (UTC) in a sorted index."""
    months = index.tz_convert("UTC").tz_localize(None).to_numpy().astype("datetime64[M]")
    starts = np.flatnonzero(np.r_[True, months[1:] != months[:-1]])
    ends = np.r_[starts[1:], len(months)]
    return [(str(months[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write a frame with a UTC DatetimeIndex as parquet with a ``time`` column, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"time": pa.array(pd.DatetimeIndex(df.index).as_unit("ns").asi8, type=pa.timestamp("ns", "UTC"))}
    for c in df.columns:
        cols[str(c)] = pa.array(df[c].to_numpy())
    table = pa.table(cols)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_partitioned_bars(bars: pd.DataFrame, root: str | Path, asset: str) -> int:
    """Write one asset's canonical bars as ``<root>/asset=<asset>/month=<YYYY-MM>/part-0.parquet``.

    The asset's partitions are written into a hidden folder and renamed into place, so readers never see
    half an asset (an existing folder of that asset is replaced). Returns the number of partitions.
    """
    if not isinstance(bars.index, pd.DatetimeIndex) or bars.index.tz is None:
        raise TypeError("bars must have a tz-aware DatetimeIndex (UTC)")
    if not bars.index.is_monotonic_increasing or bars.index.has_duplicates:
        raise ValueError("bars index must be sorted and unique")
    if "/" in asset or "=" in asset or not asset:
        raise ValueError(f"asset must be a non-empty name without '/' or '=', got {asset!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".asset={asset}.", dir=root))
    frame = bars.loc[:, list(CANONICAL_COLUMNS)].astype(np.float64)
    frame.index = frame.index.rename("time")
    try:
        bounds = _month_bounds(frame.index)
        for month, s, e in bounds:
            _write_parquet(frame.iloc[s:e], tmp / f"month={month}" / _PART)
        final = root / f"asset={asset}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(bounds)


@dataclass(frozen=True)
class _AssetJob:
    spec: MinuteSetSpec
    index: int
    root: str


def _generate_asset(job: _AssetJob) -> dict[str, Any]:
    """Simulate one asset and write its monthly partitions (an executor task)."""
    from data_pipelines.synthetic import simulate

    spec = job.spec
    name = spec.asset_names[job.index]
    t0 = time.perf_counter()
    path = simulate(spec.n_bars, seed=spec.seed + job.index, bar=spec.bar, intraday_steps=spec.intraday_steps,
                    start=spec.start, asset=name)
    n_parts = write_partitioned_bars(path.bars, job.root, name)
    return {"asset": name, "rows": len(path.bars), "partitions": n_parts, "content_hash": path.bars.attrs["content_hash"],
            "seconds": time.perf_counter() - t0}


def _serial_map(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    for i, t in enumerate(tasks):
        yield i, fn(t)


def _map(executor: Any, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    if executor is None:
        return _serial_map(fn, tasks)
    if not callable(getattr(executor, "map_unordered", None)):
        raise TypeError(f"executor must have a map_unordered(fn, tasks) method, got {type(executor).__name__}")
    return executor.map_unordered(fn, list(tasks))


def generate_minute_set(root: str | Path, spec: MinuteSetSpec | None = None, *, executor: Any = None,
                        force: bool = False) -> Path:
    """Generate (or reuse) a synthetic partitioned minute-bar set under ``root``; returns ``root/bars``.

    Parameters
    ----------
    root : path
        Folder of the set (``bars/`` and ``manifest.json`` are written there).
    spec : MinuteSetSpec, optional
        What to generate; default 20 assets × 3 years of 1-minute bars.
    executor : object, optional
        Anything with ``map_unordered(fn, tasks)``; one task per asset (a 3-year 1-minute asset takes
        about 0.8 GB of memory while it is simulated). Default: one asset after the other here.
    force : bool
        Regenerate even when ``manifest.json`` already describes the same set.
    """
    spec = spec or MinuteSetSpec()
    root = Path(root)
    bars_root = root / "bars"
    manifest = root / "manifest.json"
    if not force and manifest.exists():
        try:
            existing = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            existing = {}
        if existing.get("spec") == asdict(spec) and all((bars_root / f"asset={a}").is_dir() for a in spec.asset_names):
            log.info("reusing the minute set at %s", root)
            return bars_root
    manifest.unlink(missing_ok=True)  # written last: a set without one is incomplete
    jobs = [_AssetJob(spec, i, str(bars_root)) for i in range(spec.assets)]
    assets: list[dict[str, Any]] = [{} for _ in jobs]
    t0 = time.perf_counter()
    for i, rec in _map(executor, _generate_asset, jobs):
        assets[i] = rec
        log.info("generated %s (%d bars) in %.1fs", rec["asset"], rec["rows"], rec["seconds"])
    atomic_write_text(manifest, json.dumps({
        "spec": asdict(spec), "rows": int(sum(a["rows"] for a in assets)), "seconds": time.perf_counter() - t0,
        "assets": assets,
    }, indent=2))
    return bars_root


# ---------------------------------------------------------------------------- reading
def open_bars(root: str | Path) -> Any:
    """The partitioned set at ``root`` as a ``pyarrow.dataset.Dataset`` (partition columns asset, month)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"partitioned dataset folder {str(root)!r} does not exist")
    part = ds.partitioning(pa.schema([("asset", pa.string()), ("month", pa.string())]), flavor="hive")
    return ds.dataset(str(root), format="parquet", partitioning=part)


def list_partitions(root: str | Path) -> list[tuple[str, str]]:
    """Sorted ``(asset, month)`` partitions of a set (from the folder names; no data is read)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"partitioned dataset folder {str(root)!r} does not exist")
    out = []
    for a in sorted(root.glob("asset=*")):
        for m in sorted(a.glob("month=*")):
            if (m / _PART).is_file():
                out.append((a.name.split("=", 1)[1], m.name.split("=", 1)[1]))
    return out


def _ts(t: str | pd.Timestamp) -> Any:
    """A UTC timestamp as a pyarrow scalar of the ``time`` column's type (naive input read as UTC)."""
    import pyarrow as pa

    t = pd.Timestamp(t)
    t = t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")
    return pa.scalar(t.as_unit("ns").value, type=pa.timestamp("ns", "UTC"))


def _month(t: str | pd.Timestamp) -> str:
    t = pd.Timestamp(t)
    t = t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")
    return str(np.datetime64(t.tz_localize(None), "M"))


def _to_frame(table: Any) -> pd.DataFrame:
    df = table.to_pandas()
    df = df.drop(columns=[c for c in ("asset", "month") if c in df.columns])
    df = df.set_index("time").sort_index()
    df.index = pd.DatetimeIndex(df.index).as_unit("ns")
    if df.index.tz is None:
        df.index = df.index.tz_localize("UTC")
    return df


def _months_back(month: str, start: pd.Timestamp) -> list[str]:
    """Months from the one containing ``start`` up to ``month`` (inclusive), as ``YYYY-MM``."""
    first = np.datetime64(_month(start), "M")
    last = np.datetime64(month, "M")
    return [str(m) for m in np.arange(first, last + 1)]


def read_partition(root: str | Path, asset: str, month: str, *, warmup_bars: int = 0, bar: str = "1min",
                   columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Bars of one (asset, month) partition, preceded by up to ``warmup_bars`` bars of earlier months.

    Only the partition files of the months that can hold those rows are opened (named from the layout,
    not discovered by listing the whole set), as one ``pyarrow.dataset`` filtered on ``time``. The frame
    carries ``attrs`` ``asset``, ``bar``, ``calendar`` and ``partition_start`` (the month's first
    timestamp; rows before it are warm-up).
    """
    import pyarrow.dataset as ds

    if warmup_bars < 0:
        raise ValueError(f"warmup_bars must be >= 0, got {warmup_bars}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"partitioned dataset folder {str(root)!r} does not exist")
    month_start = pd.Timestamp(f"{month}-01", tz="UTC")
    lo = month_start - pd.Timedelta(int(warmup_bars) * bar_nanos(bar), unit="ns")
    files = [root / f"asset={asset}" / f"month={m}" / _PART for m in _months_back(month, lo)]
    files = [f for f in files if f.is_file()]
    if not files or files[-1].parent.name != f"month={month}":
        raise KeyError(f"no bars for asset {asset!r} in month {month!r} under {str(root)!r}")
    cols = None if columns is None else ["time", *[c for c in columns if c != "time"]]
    table = ds.dataset([str(f) for f in files], format="parquet").to_table(filter=ds.field("time") >= _ts(lo),
                                                                           columns=cols)
    frame = _to_frame(table)
    frame.attrs.update(asset=asset, bar=bar, calendar="24/7", partition_start=month_start)
    return frame


# ---------------------------------------------------------------------------- features
def feature_warmup_bars(bar: str = "1min", *, har_days: Sequence[float] = _HAR_DAYS, yz_window: int = 30,
                        extreme_window: int = DEFAULT_EXTREME_WINDOW) -> int:
    """Bars before a partition that :func:`build_features` needs to give the whole-series values.

    The longest trailing window (HAR lags of ``har_days`` days, Yang-Zhang's ``yz_window`` overnight
    returns, the extreme-return flag's ``extreme_window`` returns) plus one bar for the first return.
    """
    har = max((har_window_bars(d, bar) for d in har_days), default=0)
    return int(max(har, yz_window + 1, extreme_window + 1) + 1)


@dataclass(frozen=True)
class _FeatureJob:
    bars_root: str
    out_root: str
    asset: str
    month: str
    bar: str
    warmup: int
    har_days: tuple[float, ...]
    har_base: str
    yz_window: int


def _feature_partition(job: _FeatureJob) -> dict[str, Any]:
    """Build and write the features of one (asset, month) partition (an executor task)."""
    bars = read_partition(job.bars_root, job.asset, job.month, warmup_bars=job.warmup, bar=job.bar)
    feats = build_features(bars, har_days=job.har_days, har_base=job.har_base, yz_window=job.yz_window)
    own = feats.loc[feats.index >= bars.attrs["partition_start"]]
    own.index = own.index.rename("time")
    floored = {k: int(np.count_nonzero(own[k].to_numpy() <= VARIANCE_FLOOR)) for k in feats.attrs.get("floored", {})}
    _write_parquet(own, Path(job.out_root) / f"asset={job.asset}" / f"month={job.month}" / _PART)
    return {"rows": len(own), "floored": floored}


def build_partitioned_features(bars_root: str | Path, out_root: str | Path, *, bar: str = "1min",
                               har_days: Sequence[float] = _HAR_DAYS, har_base: str = "var_gk", yz_window: int = 30,
                               assets: Sequence[str] | None = None, executor: Any = None) -> FeatureBuildReport:
    """Features of every (asset, month) partition of ``bars_root``, written under ``out_root`` (same layout).

    Parameters
    ----------
    bars_root, out_root : path
        The partitioned bars (e.g. :func:`generate_minute_set`'s result) and where the features go.
    bar : str
        Bar size of the set.
    har_days, har_base, yz_window
        Passed to :func:`data_pipelines.features.build_features`.
    assets : sequence of str, optional
        Only these assets (default all).
    executor : object, optional
        Anything with ``map_unordered(fn, tasks)``; one task per partition. Default: here, in order.

    Returns
    -------
    FeatureBuildReport
        ``floored`` counts the rows of each variance column at the floor (1e-10), over all partitions.
    """
    parts = list_partitions(bars_root)
    if assets is not None:
        wanted = set(assets)
        missing = wanted - {a for a, _ in parts}
        if missing:
            raise KeyError(f"assets {sorted(missing)} are not in {str(bars_root)!r}")
        parts = [p for p in parts if p[0] in wanted]
    if not parts:
        raise FileNotFoundError(f"no partitions (asset=*/month=*/{_PART}) under {str(bars_root)!r}")
    warmup = feature_warmup_bars(bar, har_days=har_days, yz_window=yz_window)
    jobs = [
        _FeatureJob(str(bars_root), str(out_root), a, m, bar, warmup, tuple(float(d) for d in har_days), har_base,
                    int(yz_window))
        for a, m in parts
    ]
    t0 = time.perf_counter()
    rows = 0
    floored: dict[str, int] = {}
    for _i, rec in _map(executor, _feature_partition, jobs):
        rows += rec["rows"]
        for k, v in rec["floored"].items():
            floored[k] = floored.get(k, 0) + v
    return FeatureBuildReport(Path(out_root), len(jobs), rows, time.perf_counter() - t0, warmup, floored)


def read_features(root: str | Path, *, asset: str, start: str | pd.Timestamp | None = None,
                  end: str | pd.Timestamp | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One asset's features between ``start`` (inclusive) and ``end`` (exclusive), read from the partitions.

    Only the months in range are opened, so a model can be fed a window of a long minute history.
    """
    import pyarrow.dataset as ds

    dataset = open_bars(root)
    flt = ds.field("asset") == asset
    if start is not None:
        flt &= (ds.field("month") >= _month(start)) & (ds.field("time") >= _ts(start))
    if end is not None:
        flt &= (ds.field("month") <= _month(end)) & (ds.field("time") < _ts(end))
    cols = None if columns is None else ["time", *[c for c in columns if c != "time"]]
    frame = _to_frame(dataset.to_table(filter=flt, columns=cols))
    frame.attrs.update(asset=asset)
    return frame
