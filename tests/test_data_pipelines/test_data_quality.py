"""Quality checks: each on constructed bad data, each policy, the report's JSON keys, and the real sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.quality import (
    DataQualityError,
    QualityReport,
    check_and_clean,
    extreme_return_mask,
    write_quality_json,
)
from data_pipelines.sources import load_csv, load_raw

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"
REQUIRED_KEYS = {
    "rows_in", "rows_out", "non_positive_prices", "non_finite_values", "duplicate_timestamps", "gaps",
    "ohlc_inconsistent", "extreme_returns", "unsorted", "timezone_offsets", "zero_volume_bars", "off_grid_bars",
    "actions",
}


def raw_frame(rows: list[tuple], bar: str = "1h") -> pd.DataFrame:
    """rows: (time, open, high, low, close, volume[, tz_offset])."""
    f = pd.DataFrame({
        "time": pd.to_datetime([r[0] for r in rows], utc=True).as_unit("ns"),
        "tz_offset": [r[6] if len(r) > 6 else None for r in rows],
        **{c: np.array([r[i] for r in rows], dtype=float) for i, c in enumerate(("open", "high", "low", "close", "volume"), 1)},
        "src_row": np.arange(2, len(rows) + 2),
    })
    f.attrs.update(source="test", asset="T", bar=bar, calendar="24/7", row_name="line", path="test.csv")
    return f


def hourly(n: int, start: str = "2024-01-01") -> list[tuple]:
    t0 = pd.Timestamp(start, tz="UTC")
    return [(t0 + pd.Timedelta(hours=i), 100.0, 101.0, 99.0, 100.5, 10.0) for i in range(n)]


def action(report: QualityReport, check: str) -> dict:
    return next(a for a in report.actions if a["check"] == check)


class TestEachCheck:
    def test_clean_input_no_problems(self) -> None:
        clean, rep = check_and_clean(raw_frame(hourly(5)))
        assert rep.rows_in == rep.rows_out == 5 and rep.problems == 0
        assert clean.index.name == "time" and str(clean.index.tz) == "UTC"
        assert list(clean.columns) == ["open", "high", "low", "close", "volume"]
        assert (clean.dtypes == np.float64).all()
        assert len(clean.attrs["content_hash"]) == 64 and clean.attrs["bar"] == "1h"

    def test_non_finite(self) -> None:
        rows = hourly(5)
        rows[2] = (rows[2][0], 100.0, np.nan, 99.0, 100.5, 10.0)
        rows[3] = (rows[3][0], 100.0, 101.0, 99.0, np.inf, 10.0)
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.non_finite_values == 2 and rep.rows_out == 3
        assert rep.details["non_finite_by_column"]["high"] == 1
        assert rep.gaps == {**rep.gaps, "count": 1, "missing_bars": 2, "longest_bars": 2}  # dropped, NOT filled

    def test_non_positive(self) -> None:
        rows = hourly(4)
        rows[1] = (rows[1][0], 0.0, 0.0, 0.0, 0.0, 0.0)
        rows[2] = (rows[2][0], 100.0, 101.0, -1.0, 100.5, 1.0)
        _, rep = check_and_clean(raw_frame(rows))
        assert rep.non_positive_prices == 2 and rep.rows_out == 2

    def test_negative_volume(self) -> None:
        rows = hourly(3)
        rows[1] = (rows[1][0], 100.0, 101.0, 99.0, 100.5, -5.0)
        _, rep = check_and_clean(raw_frame(rows))
        assert rep.negative_volume == 1 and rep.rows_out == 2

    def test_unsorted_sorted_without_loss(self) -> None:
        rows = hourly(5)
        rows[1], rows[3] = rows[3], rows[1]  # times 0, 3, 2, 1, 4: two rows earlier than their predecessor
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.unsorted == 2 and rep.rows_out == 5
        assert clean.index.is_monotonic_increasing

    def test_duplicates_keep_last_and_count_differing(self) -> None:
        rows = hourly(4)
        rows.insert(2, (rows[1][0], 100.0, 101.0, 99.0, 100.9, 3.0))  # same time as row 1, different close
        rows.insert(0, rows[0])  # identical copy
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.duplicate_timestamps == 2 and rep.duplicate_groups_differing == 1
        assert rep.details["duplicates"]["timestamps"] == 2
        assert clean.loc[rows[2][0], "close"] == 100.9  # the LAST row in source order wins
        assert rep.rows_out == 4

    def test_duplicates_drop_policy_drops_conflicts(self) -> None:
        rows = hourly(4)
        rows.insert(2, (rows[1][0], 100.0, 101.0, 99.0, 100.9, 3.0))
        rows.insert(0, rows[0])
        clean, rep = check_and_clean(raw_frame(rows), policy="drop")
        assert rep.rows_out == 3 and pd.Timestamp("2024-01-01T01:00Z") not in clean.index

    def test_ohlc_repair_widens(self) -> None:
        rows = hourly(3)
        rows[1] = (rows[1][0], 100.0, 100.2, 99.5, 100.7, 1.0)  # high < close
        rows[2] = (rows[2][0], 100.0, 101.0, 100.1, 100.5, 1.0)  # low > open
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.ohlc_inconsistent == 2
        assert clean["high"].iloc[1] == 100.7 and clean["low"].iloc[2] == 100.0
        c = clean.to_numpy()
        assert (c[:, 1] >= c[:, [0, 3]].max(axis=1)).all() and (c[:, 2] <= c[:, [0, 3]].min(axis=1)).all()
        _, rep2 = check_and_clean(raw_frame(rows), policy="drop")
        assert rep2.rows_out == 1

    def test_off_grid_dropped(self) -> None:
        rows = hourly(3)
        rows.append((rows[-1][0] + pd.Timedelta(minutes=7), 100.0, 101.0, 99.0, 100.5, 0.0))
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.off_grid_bars == 1 and rep.rows_out == 3
        assert "not snapped" in action(rep, "off_grid_bars")["action"]

    def test_grid_phase_from_data(self) -> None:
        t0 = pd.Timestamp("2024-01-01T05:00Z")  # daily bars stamped at a local midnight (UTC-5)
        rows = [(t0 + pd.Timedelta(days=i), 100.0, 101.0, 99.0, 100.5, 1.0) for i in range(6)]
        rows.append((rows[-1][0] + pd.Timedelta(hours=3), 100.0, 101.0, 99.0, 100.5, 1.0))
        clean, rep = check_and_clean(raw_frame(rows, bar="1D"))
        assert rep.off_grid_bars == 1 and rep.rows_out == 6 and rep.details["grid_phase"] == "0 days 05:00:00"
        assert rep.gaps["count"] == 0

    def test_gaps_counted_not_filled(self) -> None:
        rows = hourly(10)
        del rows[3:6]  # one gap of 3 bars
        del rows[-1]
        rows.append((pd.Timestamp("2024-01-01T20:00Z"), 100.0, 101.0, 99.0, 100.5, 10.0))  # gap of 11
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.gaps["count"] == 2 and rep.gaps["missing_bars"] == 3 + 11 and rep.gaps["longest_bars"] == 11
        assert len(clean) == len(rows)  # nothing manufactured

    def test_timezone_offsets_counted(self) -> None:
        rows = hourly(3)
        rows = [(*r, "+00:00") for r in rows]
        rows.append(("2024-01-01T04:00:00+01:00", 100.0, 101.0, 99.0, 100.5, 10.0, "+01:00"))
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.timezone_offsets == {"+00:00": 3, "+01:00": 1}
        assert clean.index[-1] == pd.Timestamp("2024-01-01T03:00Z")

    def test_zero_volume_flagged_kept(self) -> None:
        rows = hourly(4)
        rows[2] = (rows[2][0], 100.0, 101.0, 99.0, 100.5, 0.0)
        clean, rep = check_and_clean(raw_frame(rows))
        assert rep.zero_volume_bars == 1 and rep.rows_out == 4

    def test_extreme_flagged_not_deleted(self) -> None:
        rng = np.random.default_rng(42)
        r = rng.normal(0, 0.01, 300)
        r[200] = 0.2  # 20 sigma
        close = 100 * np.exp(np.cumsum(r))
        t0 = pd.Timestamp("2024-01-01", tz="UTC")
        rows = [(t0 + pd.Timedelta(hours=i), c, c * 1.001, c * 0.999, c, 1.0) for i, c in enumerate(close)]
        rows = [(t, o, max(h, o), min(lo, o), c, v) for (t, o, h, lo, c, v) in rows]
        clean, rep = check_and_clean(raw_frame(rows), extreme_sigma=8)
        assert rep.extreme_returns == 1 and rep.rows_out == 300
        assert rep.details["extreme_returns"][0]["time"] == (t0 + pd.Timedelta(hours=200)).isoformat()


class TestExtremeMask:
    def test_matches_plain_loop(self) -> None:
        rng = np.random.default_rng(42)
        r = rng.standard_t(3, 600) * 0.01
        k = np.where(rng.random(600) < 0.05, 3.0, 1.0)
        fast = extreme_return_mask(r, k, sigma=5, window=50, min_periods=10)
        z = np.abs(r) / np.sqrt(k)
        slow = np.zeros(600, dtype=bool)
        for t in range(600):
            past = z[max(0, t - 50):t]
            if len(past) >= 10:
                slow[t] = z[t] > 5 * np.median(past) / 0.6744897501960817
        np.testing.assert_array_equal(fast, slow)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_fast_path_equals_full_rolling_median(self, seed: int) -> None:
        from data_pipelines.quality import _extreme_candidates_fast, _extreme_exact

        rng = np.random.default_rng(seed)
        n = 40_000
        z = np.abs(rng.standard_t(4, n) * 0.01 * np.exp(np.cumsum(rng.normal(0, 0.005, n))))
        z[0] = np.nan
        z[5000:5100] = 0.0  # flat stretch: zero scale, never flagged
        fast = _extreme_candidates_fast(z, 8.0, 250)
        assert fast is not None  # the fast path ran
        exact = _extreme_exact(z, 8.0, 250, 30)
        np.testing.assert_array_equal(fast, exact)
        assert exact.sum() > 10
        assert _extreme_candidates_fast(z, 1.0, 250) is None  # candidates not rare: exact path

    def test_no_look_ahead(self) -> None:
        rng = np.random.default_rng(1)
        r = rng.normal(0, 0.01, 400)
        base = extreme_return_mask(r)
        r2 = r.copy()
        r2[300:] = rng.normal(0, 1.0, 100)
        np.testing.assert_array_equal(base[:300], extreme_return_mask(r2)[:300])

    def test_bad_sigma(self) -> None:
        with pytest.raises(ValueError, match="extreme_sigma must be > 0, got -1"):
            extreme_return_mask(np.zeros(3), sigma=-1)


class TestDirtyFixture:
    """tests/fixtures/data/ohlcv_dirty_1h.csv holds one of every problem (see make_fixtures.py)."""

    def test_repair_counts(self) -> None:
        clean, rep = check_and_clean(load_csv(FIX / "ohlcv_dirty_1h.csv"))
        d = rep.to_dict()
        assert REQUIRED_KEYS <= set(d)
        assert d["rows_in"] == 12 and d["rows_out"] == 8
        assert (d["non_finite_values"], d["non_positive_prices"], d["unsorted"], d["off_grid_bars"]) == (1, 1, 1, 1)
        assert (d["duplicate_timestamps"], d["duplicate_groups_differing"], d["ohlc_inconsistent"]) == (1, 1, 1)
        assert d["gaps"]["count"] == 2 and d["gaps"]["missing_bars"] == 4 and d["gaps"]["longest_bars"] == 2
        assert d["timezone_offsets"] == {"+00:00": 11, "+01:00": 1}
        assert d["zero_volume_bars"] == 1
        assert [a["check"] for a in d["actions"]][:3] == ["timezone_offsets", "non_finite_values", "non_positive_prices"]
        assert all({"check", "count", "action"} <= set(a) for a in d["actions"])
        assert clean.loc["2024-01-01 03:00:00+00:00", "close"] == 101.9

    def test_drop_counts(self) -> None:
        _, rep = check_and_clean(load_csv(FIX / "ohlcv_dirty_1h.csv"), policy="drop")
        assert rep.rows_out == 6

    def test_fail_names_check_and_row(self) -> None:
        with pytest.raises(DataQualityError, match=r"'non_finite_values' failed.*first at line 9 \(time 2024-01-01T06:00"):
            check_and_clean(load_csv(FIX / "ohlcv_dirty_1h.csv"), policy="fail")

    @pytest.mark.parametrize(("check", "mutate"), [
        ("unsorted", lambda rows: rows.reverse()),
        ("duplicate_timestamps", lambda rows: rows.append(rows[-1])),
        ("ohlc_inconsistent", lambda rows: rows.__setitem__(1, (rows[1][0], 100.0, 100.1, 99.0, 100.5, 1.0))),
        ("off_grid_bars", lambda rows: rows.append((rows[-1][0] + pd.Timedelta(minutes=1), 1.0, 1.0, 1.0, 1.0, 1.0))),
        ("non_positive_prices", lambda rows: rows.__setitem__(1, (rows[1][0], 0.0, 1.0, 0.0, 1.0, 1.0))),
    ])
    def test_fail_each_check(self, check: str, mutate) -> None:
        rows = hourly(5)
        mutate(rows)
        with pytest.raises(DataQualityError, match=f"'{check}' failed") as info:
            check_and_clean(raw_frame(rows), policy="fail")
        assert info.value.check == check
        assert isinstance(info.value, ValueError)

    def test_fail_passes_gaps_and_zero_volume(self) -> None:
        rows = hourly(6)
        del rows[2]
        rows[0] = (rows[0][0], 100.0, 101.0, 99.0, 100.5, 0.0)
        _, rep = check_and_clean(raw_frame(rows), policy="fail")
        assert rep.gaps["count"] == 1 and rep.zero_volume_bars == 1

    def test_bad_policy(self) -> None:
        with pytest.raises(ValueError, match="policy must be one of"):
            check_and_clean(raw_frame(hourly(3)), policy="fix")  # type: ignore[arg-type]


def test_write_quality_json_atomic(tmp_path: Path) -> None:
    _, rep = check_and_clean(load_csv(FIX / "ohlcv_dirty_1h.csv"))
    path = write_quality_json(rep, tmp_path / "q" / "quality.json")
    assert json.loads(path.read_text())["rows_out"] == 8
    assert os.listdir(path.parent) == ["quality.json"]  # no temp file left
    with pytest.raises(TypeError):
        write_quality_json({"x": object()}, tmp_path / "q" / "quality.json")
    assert os.listdir(path.parent) == ["quality.json"]
    assert json.loads(path.read_text())["rows_out"] == 8  # old file intact after a failed write


class TestRealData:
    """True counts on the bundled sets (explored by hand; see the module docstring of quality.py)."""

    def test_coinbase_eth(self) -> None:
        pytest.importorskip("sqlite3")
        try:
            raw = load_raw("bundled:coinbase-pro/ETH")
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        clean, rep = check_and_clean(raw)
        assert (rep.non_positive_prices, rep.duplicate_timestamps, rep.duplicate_groups_differing) == (2, 5, 4)
        assert rep.ohlc_inconsistent == 5 and rep.rows_out == 1664 - 2 - 5
        # duplicated 2018-04-06: the kept (last) row's close equals the next day's open
        assert clean.loc["2018-04-06", "close"].item() == clean.loc["2018-04-07", "open"].item()

    def test_tsd_15m(self) -> None:
        try:
            raw = load_raw("bundled:tsd/BTC-15m")
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        clean, rep = check_and_clean(raw)
        assert rep.timezone_offsets == {"+00:00": 5839, "+01:00": 2882}
        assert rep.off_grid_bars == 3 and rep.unsorted == 1 and rep.duplicate_timestamps == 32
        assert rep.gaps["longest_bars"] == 222
        assert rep.zero_volume_bars > 2000
        assert clean.index.is_unique and clean.index.is_monotonic_increasing


# ------------------------------------------------------------------ property: every row accounted for

_row = st.tuples(
    st.integers(0, 40),  # hour slot
    st.sampled_from([0, 0, 0, 0, 7]),  # minutes: mostly on the grid
    st.one_of(st.floats(-1, 200), st.just(float("nan"))),  # open
    st.floats(0, 5, allow_nan=False),  # spread
    st.floats(-0.05, 0.05, allow_nan=False),  # close move
    st.one_of(st.floats(-1, 100), st.just(float("nan"))),  # volume
    st.booleans(),  # make high < close
)


@settings(max_examples=120, deadline=None)
@given(st.lists(_row, min_size=2, max_size=40), st.sampled_from(["repair", "drop"]))
def test_every_row_accounted_for(rows, policy) -> None:
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    data = []
    for slot, minute, o, spread, move, vol, bad_high in rows:
        c = o * (1 + move)
        h = max(o, c) + spread if not bad_high else min(o, c) - 0.01
        lo = min(o, c) - spread
        data.append((t0 + pd.Timedelta(hours=slot, minutes=minute), o, h, lo, c, vol))
    raw = raw_frame(data)
    clean, rep = check_and_clean(raw, policy=policy, bar="1h")
    removed = rep.non_finite_values + rep.non_positive_prices + rep.negative_volume + rep.off_grid_bars
    removed += rep.details["duplicates"]["rows_removed"]
    if policy == "drop":
        removed += rep.ohlc_inconsistent
    assert rep.rows_out == len(raw) - removed == len(clean)
    assert clean.index.is_unique and clean.index.is_monotonic_increasing
    v = clean.to_numpy()
    assert np.isfinite(v).all() and (v[:, :4] > 0).all() and (v[:, 4] >= 0).all()
    assert (v[:, 1] >= v[:, [0, 2, 3]].max(axis=1)).all() and (v[:, 2] <= v[:, [0, 1, 3]].min(axis=1)).all()
    assert rep.gaps["missing_bars"] >= rep.gaps["count"] and (rep.gaps["count"] == 0) == (rep.gaps["longest_bars"] == 0)


class TestWickOutliers:
    """A single print far past the body (flash-crash tick) is clipped under repair, dropped under drop."""

    @staticmethod
    def rows_with_spike(low: float) -> list[tuple]:
        rows = hourly(60)
        t, o, h, _lo, c, v = rows[45]
        rows[45] = (t, o, h, low, c, v)
        return rows

    def test_repair_clips_to_trailing_median(self) -> None:
        clean, rep = check_and_clean(raw_frame(self.rows_with_spike(1.0)))
        assert rep.wick_outliers == 1 and rep.rows_out == 60
        med = np.log(100.0 / 99.0)  # every earlier bar: body 100..100.5, low 99 -> wick ln(100/99)
        expected_low = 100.0 * np.exp(-5.0 * med)
        assert clean["low"].iloc[45] == pytest.approx(expected_low, rel=1e-12)
        detail = rep.details["wick_outliers"][0]
        assert detail["low"] == 1.0 and detail["trailing_median_wick"] == pytest.approx(med, rel=1e-12)
        assert action(rep, "wick_outliers")["changes_data"]

    def test_large_but_ordinary_wick_kept(self) -> None:
        # a 0.3 log wick is 30x the trailing median (0.01) but below wick_min (0.5): a real crash, kept
        clean, rep = check_and_clean(raw_frame(self.rows_with_spike(100.0 * np.exp(-0.3))))
        assert rep.wick_outliers == 0 and clean["low"].iloc[45] == pytest.approx(100.0 * np.exp(-0.3))

    def test_drop_and_fail(self) -> None:
        _, rep = check_and_clean(raw_frame(self.rows_with_spike(1.0)), policy="drop")
        assert rep.wick_outliers == 1 and rep.rows_out == 59
        with pytest.raises(DataQualityError, match="wick_outliers"):
            check_and_clean(raw_frame(self.rows_with_spike(1.0)), policy="fail")

    def test_uses_only_past_bars(self) -> None:
        # a spike at the very start (no trailing scale yet) is not judged
        rows = hourly(40)
        t, o, h, _lo, c, v = rows[0]
        rows[0] = (t, o, h, 1.0, c, v)
        _, rep = check_and_clean(raw_frame(rows))
        assert rep.wick_outliers == 0

    def test_bad_threshold(self) -> None:
        with pytest.raises(ValueError, match="wick_factor must be a positive number"):
            check_and_clean(raw_frame(hourly(5)), wick_factor=-1.0)
