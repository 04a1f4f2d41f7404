"""data_pipelines.minute: partitioned minute bars, per-partition features equal to whole-series features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_pipelines.features import build_features
from data_pipelines.minute import (
    MinuteSetSpec,
    build_partitioned_features,
    feature_warmup_bars,
    generate_minute_set,
    list_partitions,
    read_features,
    read_partition,
    write_partitioned_bars,
)
from data_pipelines.synthetic import simulate

# 50 days from mid-January: partitions Jan (17 days), Feb (28), Mar (5). March's 30-day HAR warm-up
# reaches back through all of February into January, so the warm-up spans two earlier partitions.
SPEC = MinuteSetSpec(assets=2, days=50, start="2021-01-15", seed=11)
HAR_DAYS = (1, 7, 30)


@pytest.fixture(scope="module")
def minute_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("minute")
    return root, generate_minute_set(root, SPEC)


@pytest.fixture(scope="module")
def features_serial(minute_set, tmp_path_factory):
    _root, bars = minute_set
    out = tmp_path_factory.mktemp("features")
    return out, build_partitioned_features(bars, out, har_days=HAR_DAYS)


def _whole_series(i: int) -> pd.DataFrame:
    path = simulate(SPEC.n_bars, seed=SPEC.seed + i, bar="1min", intraday_steps=SPEC.intraday_steps,
                    start=SPEC.start, asset=SPEC.asset_names[i])
    return build_features(path.bars, har_days=HAR_DAYS)


class TestGenerate:
    def test_layout_and_manifest(self, minute_set):
        root, bars = minute_set
        assert list_partitions(bars) == [(a, m) for a in ("SYN00", "SYN01") for m in ("2021-01", "2021-02", "2021-03")]
        man = json.loads((root / "manifest.json").read_text())
        assert man["rows"] == 2 * 50 * 1440 and man["spec"]["assets"] == 2

    def test_reused_when_the_manifest_matches(self, minute_set):
        root, bars = minute_set
        stamp = (bars / "asset=SYN00" / "month=2021-02" / "part-0.parquet").stat().st_mtime_ns
        assert generate_minute_set(root, SPEC) == bars
        assert (bars / "asset=SYN00" / "month=2021-02" / "part-0.parquet").stat().st_mtime_ns == stamp

    def test_bars_round_trip(self, minute_set):
        _root, bars = minute_set
        path = simulate(SPEC.n_bars, seed=SPEC.seed + 1, bar="1min", intraday_steps=SPEC.intraday_steps,
                        start=SPEC.start)
        feb = read_partition(bars, "SYN01", "2021-02")
        want = path.bars.loc["2021-02-01":"2021-02-28 23:59"]
        pd.testing.assert_frame_equal(feb, want, check_freq=False, check_names=False)


class TestFeatures:
    def test_partitions_equal_whole_series(self, features_serial):
        out, report = features_serial
        assert report.partitions == 6 and report.rows == 2 * 50 * 1440
        for i, asset in enumerate(SPEC.asset_names):
            got = read_features(out, asset=asset)
            want = _whole_series(i)
            assert got.index.equals(want.index)
            for col in want.columns:
                a, b = got[col].to_numpy(dtype=np.float64), want[col].to_numpy(dtype=np.float64)
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
                # rolling sums restarted in the warm-up: equal to rounding (stated tolerance 1e-12 relative)
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, equal_nan=True, err_msg=col)

    def test_warmup_spans_earlier_partitions(self, minute_set):
        _root, bars = minute_set
        w = feature_warmup_bars("1min", har_days=HAR_DAYS)
        assert w == 30 * 1440 + 1  # the 30-day HAR window is the longest, plus one bar for the first return
        mar = read_partition(bars, "SYN00", "2021-03", warmup_bars=w)
        start = pd.Timestamp("2021-03-01", tz="UTC")
        assert (mar.index < start).sum() == w and mar.index[0].month == 1
        jan = read_partition(bars, "SYN00", "2021-01", warmup_bars=w)
        assert jan.index[0] == pd.Timestamp(SPEC.start, tz="UTC")  # nothing before the first bar

    def test_read_window(self, features_serial):
        out, _ = features_serial
        f = read_features(out, asset="SYN00", start="2021-02-27", end="2021-03-02", columns=["var_gk", "har_1"])
        assert list(f.columns) == ["var_gk", "har_1"]
        assert f.index[0] == pd.Timestamp("2021-02-27", tz="UTC") and len(f) == 3 * 1440

    def test_ray_executor_gives_the_same_files(self, ray_local, minute_set, features_serial, tmp_path):
        from volmargin.executor import Executor

        _root, bars = minute_set
        out, _ = features_serial
        rep = build_partitioned_features(bars, tmp_path, har_days=HAR_DAYS, assets=["SYN01"],
                                         executor=Executor(backend="ray", address="auto"))
        assert rep.partitions == 3
        pd.testing.assert_frame_equal(read_features(tmp_path, asset="SYN01"), read_features(out, asset="SYN01"))


class TestErrors:
    def test_missing_folder(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            list_partitions(tmp_path / "nope")
        with pytest.raises(FileNotFoundError, match="no partitions"):
            build_partitioned_features(tmp_path, tmp_path / "out")

    def test_missing_month_and_asset(self, minute_set, tmp_path):
        _root, bars = minute_set
        with pytest.raises(KeyError, match="no bars for asset 'SYN00' in month '2021-05'"):
            read_partition(bars, "SYN00", "2021-05")
        with pytest.raises(KeyError, match="SYN07"):
            build_partitioned_features(bars, tmp_path, assets=["SYN07"])

    def test_bad_inputs(self, tmp_path):
        with pytest.raises(ValueError, match="assets must be >= 1, got 0"):
            MinuteSetSpec(assets=0)
        bars = simulate(10, bar="1min").bars
        with pytest.raises(ValueError, match="asset must be a non-empty name without"):
            write_partitioned_bars(bars, tmp_path, "a/b")
        with pytest.raises(ValueError, match="warmup_bars must be >= 0, got -1"):
            read_partition(tmp_path, "A", "2021-01", warmup_bars=-1)
