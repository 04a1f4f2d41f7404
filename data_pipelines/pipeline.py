"""Load → check/clean → features, and the atomic on-disk layout of a prepared data set.

A prepared folder holds ``bars.parquet`` (canonical OHLCV), ``features.parquet``
(:func:`data_pipelines.features.build_features`) and ``quality.json`` (the quality report plus the
data set's identity: source id, asset, bar, content hash). It is written all-or-nothing: files go
to a temporary sibling folder that is renamed into place.

Prepared folders under the data directory (``$VOLMARGIN_DATA_DIR`` or ``./artifacts/data``) are the
*cached* sets: ``cached:<folder name>`` loads their ``bars.parquet``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from data_pipelines.bars import Calendar, bar_nanos, grid_phase
from data_pipelines.features import build_features, realized_variance
from data_pipelines.quality import (
    DEFAULT_EXTREME_SIGMA,
    Policy,
    QualityReport,
    check_and_clean,
    write_quality_json,
)
from data_pipelines.sources import BUNDLED, load_parquet, load_raw

__all__ = [
    "PreparedData",
    "DatasetInfo",
    "INTRADAY_FOR",
    "prepare_dataset",
    "write_prepared",
    "read_prepared",
    "list_datasets",
    "asset_label",
    "split_label",
    "data_dir",
]

logger = logging.getLogger(__name__)

#: Daily sets whose ``rv`` column is filled from an overlapping intraday bundled set.
INTRADAY_FOR: dict[str, str] = {"bundled:tsd/BTC-1d": "bundled:tsd/BTC-15m"}


def data_dir() -> Path:
    """Folder of cached (prepared) sets: ``$VOLMARGIN_DATA_DIR`` or ``./artifacts/data``."""
    return Path(os.environ.get("VOLMARGIN_DATA_DIR", "artifacts/data"))


@dataclass(frozen=True)
class PreparedData:
    """A cleaned data set with its features and quality report.

    Attributes
    ----------
    source_id : str
        The id it was loaded from (``bundled:bitstamp/BTC``, ``csv:...``).
    asset : str
        Short label (``asset_label(source_id)``), e.g. ``"BTC"``, ``"BTC-15m"``, ``"SP500"``.
    bars : pd.DataFrame
        Canonical clean OHLCV frame.
    features : pd.DataFrame
        ``build_features(bars)`` (``rv`` filled where intraday data exists).
    report : QualityReport
    """

    source_id: str
    asset: str
    bars: pd.DataFrame
    features: pd.DataFrame
    report: QualityReport

    @property
    def bar(self) -> str:
        """Bar alias of the data set."""
        return str(self.bars.attrs["bar"])

    @property
    def content_hash(self) -> str:
        """SHA-256 of the canonical bars (see :func:`data_pipelines.bars.content_hash`)."""
        return str(self.bars.attrs["content_hash"])


@dataclass(frozen=True)
class DatasetInfo:
    """One row of :func:`list_datasets`."""

    source_id: str
    asset: str
    bar: str
    kind: str  # "bundled" or "cached"
    available: bool
    description: str
    path: str | None = None


_LABEL = re.compile(r"#([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


def split_label(source_id: str) -> tuple[str, str | None]:
    """``"csv:data/sol.csv#SOL"`` -> ``("csv:data/sol.csv", "SOL")``: an id may end in ``#LABEL`` (letters, digits,
    ``.``, ``_``, ``-``; at most 64) naming the asset of a user's file; ``(source_id, None)`` without one."""
    m = _LABEL.search(source_id)
    return (source_id[:m.start()], m.group(1)) if m else (source_id, None)


def asset_label(source_id: str) -> str:
    """Short unique label of a data set: ``"BTC"``, ``"ETH"``, ``"LTC"``, ``"BTC-1d"``, ``"BTC-15m"``, ``"SP500"``.

    An explicit ``#LABEL`` at the end of the id wins (``csv:data/prices.csv#SOL`` -> ``"SOL"``); otherwise
    cached sets use their folder name, files their file stem.
    """
    source_id, explicit = split_label(source_id)
    if explicit:
        return explicit
    if source_id in BUNDLED:
        return BUNDLED[source_id].asset
    if source_id.startswith("bundled:"):
        raise ValueError(f"unknown source {source_id!r}; bundled sets are: {', '.join(BUNDLED)}")
    if source_id.startswith("cached:"):
        return source_id.split(":", 1)[1]
    _, sep, rest = source_id.partition(":")
    path = rest if sep and len(_) > 1 else source_id
    return Path(path).name.split(".")[0] or "UNKNOWN"


def _load(source_id: str, *, asset: str | None, bar: str | None, calendar: Calendar | None) -> pd.DataFrame:
    if source_id.startswith("cached:"):
        name = source_id.split(":", 1)[1]
        path = data_dir() / name / "bars.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"cached set {source_id!r} not found: {path} does not exist")
        return load_parquet(path, asset=asset or name, bar=bar, calendar=calendar or "24/7", source=source_id)
    return load_raw(source_id, asset=asset, bar=bar, calendar=calendar)


def prepare_dataset(source_id: str, *, policy: Policy = "repair", asset: str | None = None, bar: str | None = None,
                    calendar: Calendar | None = None, extreme_sigma: float = DEFAULT_EXTREME_SIGMA,
                    har_days: Sequence[float] = (1, 7, 30), har_base: str = "var_gk", yz_window: int = 30,
                    intraday: str | None = None) -> PreparedData:
    """Load ``source_id`` raw, run the quality checks with ``policy``, and build features.

    Parameters
    ----------
    source_id : str
        Any id :func:`data_pipelines.sources.load_raw` accepts, or ``cached:<name>``.
    policy : {"repair", "drop", "fail"}
        Quality policy (see :mod:`data_pipelines.quality`).
    asset, bar, calendar : optional
        Override what the source says (``asset`` defaults to :func:`asset_label`).
    extreme_sigma, har_days, har_base, yz_window
        Passed to the quality step / :func:`data_pipelines.features.build_features`.
    intraday : str, optional
        Source id of finer bars used to fill ``rv`` (defaults to :data:`INTRADAY_FOR`); ``rv`` is NaN
        where the intraday data do not cover a bar.

    Returns
    -------
    PreparedData
    """
    if not isinstance(source_id, str) or not source_id.strip():
        raise ValueError(f"source_id must be a non-empty string, got {source_id!r}")
    source_id = source_id.strip()
    source, _ = split_label(source_id)
    label = asset or asset_label(source_id)
    raw = _load(source, asset=label, bar=bar, calendar=calendar)
    bars, report = check_and_clean(raw, policy=policy, bar=bar, extreme_sigma=extreme_sigma, calendar=calendar)
    if bars.empty:
        raise ValueError(f"{source_id}: no rows left after the quality checks (policy={policy!r}); see the report")
    rv = None
    intraday_id = intraday or INTRADAY_FOR.get(source)
    if intraday_id:
        iraw = _load(intraday_id, asset=None, bar=None, calendar=None)
        ibars, _ = check_and_clean(iraw, policy="repair" if policy == "fail" else policy)
        if bar_nanos(ibars.attrs["bar"]) < bar_nanos(bars.attrs["bar"]):
            phase = grid_phase(bars.index, bars.attrs["bar"], bars.attrs.get("calendar", "24/7"))
            rv = realized_variance(ibars, to="1D" if bars.attrs["bar"] == "1B" else bars.attrs["bar"],
                                   offset=pd.Timedelta(phase, unit="ns"))
            logger.info("rv for %s from %s: %d bars covered", source_id, intraday_id, int(rv.reindex(bars.index).notna().sum()))
    features = build_features(bars, har_days=har_days, har_base=har_base, yz_window=yz_window, rv=rv,
                              extreme_sigma=extreme_sigma)
    if rv is not None:
        features.attrs["rv_source"] = intraday_id
    return PreparedData(source_id=source_id, asset=label, bars=bars, features=features, report=report)


def _meta(prepared: PreparedData) -> dict[str, Any]:
    f = prepared.features
    return {
        "source_id": prepared.source_id,
        "asset": prepared.asset,
        "bar": prepared.bar,
        "calendar": prepared.bars.attrs.get("calendar"),
        "bars_per_year": prepared.bars.attrs.get("bars_per_year"),
        "content_hash": prepared.content_hash,
        "rows": len(prepared.bars),
        "feature_columns": list(f.columns),
        "rv_bars": int(f["rv"].notna().sum()),
        "rv_source": f.attrs.get("rv_source"),
        "variance_floored": f.attrs.get("floored", {}),
    }


def _json_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.attrs = json.loads(json.dumps(frame.attrs, default=str))
    return out


def write_prepared(prepared: PreparedData, out_dir: str | Path) -> Path:
    """Write ``bars.parquet``, ``features.parquet`` and ``quality.json`` into ``out_dir`` all-or-nothing.

    Everything is written to a temporary sibling folder which then replaces ``out_dir`` (an existing
    ``out_dir`` is swapped out only after the new one is complete). Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the published folder is an ordinary one
    try:
        _json_attrs(prepared.bars).to_parquet(tmp / "bars.parquet")
        _json_attrs(prepared.features).to_parquet(tmp / "features.parquet")
        payload = {**_meta(prepared), "report": prepared.report.to_dict()}
        payload.update({k: v for k, v in prepared.report.to_dict().items() if k not in payload})
        write_quality_json(payload, tmp / "quality.json")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_prepared(out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Read a prepared folder back: ``(bars, features, quality_json)``."""
    d = Path(out_dir)
    for name in ("bars.parquet", "features.parquet", "quality.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not a prepared data folder: {name} is missing")
    bars = pd.read_parquet(d / "bars.parquet")
    features = pd.read_parquet(d / "features.parquet")
    meta = json.loads((d / "quality.json").read_text(encoding="utf-8"))
    return bars, features, meta


def list_datasets(cache_dir: str | Path | None = None) -> list[DatasetInfo]:
    """Bundled sets (with whether their package is installed) and cached prepared sets under ``cache_dir``."""
    infos = [
        DatasetInfo(source_id=s.source_id, asset=s.asset, bar=s.bar, kind="bundled", available=s.available(),
                    description=s.description)
        for s in BUNDLED.values()
    ]
    root = Path(cache_dir) if cache_dir is not None else data_dir()
    if root.is_dir():
        for q in sorted(root.glob("*/quality.json")):
            if q.parent.name.startswith("."):
                continue
            try:
                meta = json.loads(q.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            infos.append(DatasetInfo(
                source_id=f"cached:{q.parent.name}", asset=str(meta.get("asset", q.parent.name)), bar=str(meta.get("bar", "?")),
                kind="cached", available=(q.parent / "bars.parquet").is_file(),
                description=f"prepared from {meta.get('source_id', '?')} ({meta.get('rows', '?')} bars)", path=str(q.parent),
            ))
    return infos
