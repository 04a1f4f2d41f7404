"""prepare_dataset / write_prepared / list_datasets / asset_label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipelines.pipeline import (
    PreparedData,
    asset_label,
    list_datasets,
    prepare_dataset,
    read_prepared,
    split_label,
    write_prepared,
)
from data_pipelines.sources import BUNDLED

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _bundled(sid: str) -> PreparedData:
    try:
        return prepare_dataset(sid)
    except FileNotFoundError as exc:
        pytest.skip(f"bundled data not installed: {exc}")


def test_prepare_file_and_roundtrip(tmp_path: Path) -> None:
    p = prepare_dataset(str(FIX / "ohlcv_dirty_1h.csv"))
    assert p.asset == "ohlcv_dirty_1h" and p.bar == "1h" and len(p.bars) == p.report.rows_out == 8
    assert p.features.index.equals(p.bars.index)
    out = write_prepared(p, tmp_path / "dirty")
    assert sorted(x.name for x in out.iterdir()) == ["bars.parquet", "features.parquet", "quality.json"]
    bars, feats, meta = read_prepared(out)
    pd.testing.assert_frame_equal(bars, p.bars, check_freq=False)
    assert bars.attrs["content_hash"] == p.content_hash == meta["content_hash"]
    assert feats["gap"].dtype == bool and feats.columns.tolist() == p.features.columns.tolist()
    assert meta["rows_out"] == 8 and meta["report"]["off_grid_bars"] == 1 and meta["source_id"].endswith("dirty_1h.csv")
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temp folders left


def test_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = prepare_dataset(str(FIX / "ohlcv_clean.csv"))
    out = write_prepared(p, tmp_path / "set")
    before = (out / "quality.json").read_text()
    calls = {"n": 0}
    real = pd.DataFrame.to_parquet

    def flaky(self, path, *a, **k):  # second parquet write (features) fails
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise OSError("disk full")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(p, tmp_path / "set")
    with pytest.raises(OSError):
        write_prepared(p, tmp_path / "new")
    assert (out / "quality.json").read_text() == before  # old output untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["set"]  # no partial "new", no temp folder


def test_asset_label() -> None:
    assert [asset_label(s) for s in BUNDLED] == ["BTC", "ETH", "LTC", "BTC-1d", "BTC-15m", "SP500"]
    assert asset_label("csv:/x/y/eth_1h.csv") == "eth_1h"
    assert asset_label("cached:BTC") == "BTC"
    with pytest.raises(ValueError, match="unknown source 'bundled:x/Y'"):
        asset_label("bundled:x/Y")
    # an explicit label at the end of the id names a user's file's asset
    assert asset_label("csv:/x/y/prices.csv#SOL") == "SOL" and asset_label("bundled:bitstamp/BTC#XBT") == "XBT"
    assert split_label("parquet:/a#b/c.parquet") == ("parquet:/a#b/c.parquet", None)  # '#' inside a path stays


def test_explicit_label_loads_the_same_bars() -> None:
    src = str(FIX / "ohlcv_clean.csv")
    plain, labelled = prepare_dataset(src), prepare_dataset(f"{src}#MYCOIN")
    assert labelled.asset == "MYCOIN" and plain.asset == "ohlcv_clean"
    pd.testing.assert_frame_equal(labelled.bars, plain.bars, check_freq=False)


def test_list_datasets_bundled_and_cached(tmp_path: Path) -> None:
    p = prepare_dataset(str(FIX / "ohlcv_clean.csv"))
    write_prepared(p, tmp_path / "MYSET")
    infos = list_datasets(tmp_path)
    ids = [i.source_id for i in infos]
    assert ids[:6] == list(BUNDLED) and ids[6:] == ["cached:MYSET"]
    assert infos[-1].kind == "cached" and infos[-1].bar == "1D"


def test_cached_source_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLMARGIN_DATA_DIR", str(tmp_path))
    p = prepare_dataset(str(FIX / "ohlcv_clean.csv"))
    write_prepared(p, tmp_path / "MYSET")
    q = prepare_dataset("cached:MYSET")
    assert q.content_hash == p.content_hash and q.asset == "MYSET"
    with pytest.raises(FileNotFoundError, match="cached set 'cached:NOPE' not found"):
        prepare_dataset("cached:NOPE")


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown source"):
        prepare_dataset("bundled:kraken/BTC")


def test_tsd_daily_gets_rv_from_15m() -> None:
    p = _bundled("bundled:tsd/BTC-1d")
    rv = p.features["rv"]
    assert 25 <= rv.notna().sum() <= 95  # the 15-min set covers 2021-09-27..2021-10-27 of the daily set
    assert rv.first_valid_index() >= pd.Timestamp("2021-09-27", tz="UTC")
    both = p.features.loc[rv.notna(), ["rv", "var_sq"]]
    # realized variance and squared daily return agree on average within noise (same price path)
    assert 0.3 < both["rv"].mean() / both["var_sq"].mean() < 3.0


@pytest.mark.parametrize("sid", ["bundled:bitstamp/BTC", "bundled:coinbase-pro/ETH", "bundled:coinbase-pro/LTC",
                                 "bundled:tsd/BTC-15m", "bundled:arch/sp500"])
def test_bundled_prepare(sid: str, tmp_path: Path) -> None:
    p = _bundled(sid)
    f = p.features
    assert p.bars.index.is_unique and p.bars.index.is_monotonic_increasing
    assert int(f["gap"].sum()) == p.report.gaps["count"]
    for c in ("var_sq", "var_pk", "var_gk", "var_rs", "var_yz"):
        v = f[c].dropna()
        assert (v >= 1e-10).all() and np.isfinite(v).all()
    out = write_prepared(p, tmp_path / p.asset)
    meta = json.loads((out / "quality.json").read_text())
    assert meta["asset"] == asset_label(sid) and meta["rows_out"] == len(p.bars)
