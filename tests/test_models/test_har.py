"""HAR / log-HAR against statsmodels OLS on a design built independently with pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from models.har import HAR, LogHAR, har_design, har_windows


def pandas_design(v: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "d": v,
            "w": v.rolling(7).mean(),
            "m": v.rolling(30).mean(),
        }
    )


@pytest.fixture(scope="module")
def frame(make_feature_frame) -> pd.DataFrame:
    return make_feature_frame(1500, 5)[0]


class TestHAR:
    @pytest.mark.parametrize("k", [1, 3, 5])
    def test_coefficients_match_statsmodels(self, frame, k):
        f = HAR(max_horizon=5).fit(frame)
        assert f.windows_ == (1, 7, 30)
        v = frame["var_gk"].clip(lower=1e-10)
        X = pandas_design(v)
        y = v.shift(-k)
        ok = X.notna().all(axis=1) & y.notna()
        res = sm.OLS(y[ok], sm.add_constant(X[ok])).fit()
        np.testing.assert_allclose(f.coef_[k - 1], res.params.to_numpy(), rtol=1e-8)
        np.testing.assert_allclose(f.resid_var_[k - 1], res.scale, rtol=1e-8)

    def test_forecast_is_per_step_direct(self, frame):
        f = HAR(max_horizon=5).fit(frame)
        v = frame["var_gk"].clip(lower=1e-10).to_numpy()
        x = np.array([1.0, v[-1], v[-7:].mean(), v[-30:].mean()])
        expected = f.coef_ @ x
        fc = f.predict_variance(8)
        np.testing.assert_allclose(fc.variance[0, :5], expected, rtol=1e-10)
        # steps beyond max_horizon repeat the last fitted step
        np.testing.assert_allclose(fc.variance[0, 5:], expected[-1], rtol=1e-10)

    def test_loghar_bias_correction(self, frame):
        f = LogHAR(max_horizon=2).fit(frame)
        v = frame["var_gk"].clip(lower=1e-10)
        X = np.log(pandas_design(v))
        y = np.log(v).shift(-1)
        ok = X.notna().all(axis=1) & y.notna()
        res = sm.OLS(y[ok], sm.add_constant(X[ok])).fit()
        x_last = np.concatenate([[1.0], X.iloc[-1].to_numpy()])
        expected = np.exp(x_last @ res.params.to_numpy() + res.scale / 2)
        np.testing.assert_allclose(f.predict_variance(1).variance[0, 0], expected, rtol=1e-8)

    def test_design_uses_past_only(self):
        v = np.arange(1.0, 41.0)
        X = har_design(v, (1, 7, 30))
        np.testing.assert_allclose(X[35], [36.0, np.mean(v[29:36]), np.mean(v[6:36])])
        X2 = har_design(np.concatenate([v[:36], v[36:] * 100]), (1, 7, 30))
        np.testing.assert_array_equal(X[:36], X2[:36])

    def test_windows_for_intraday_bars(self):
        assert har_windows(365) == (1, 7, 30)
        assert har_windows(365 * 96) == (1, 96, 672, 2880)

    def test_auto_column_prefers_rv(self, frame):
        fr = frame.copy()
        assert HAR(column="auto").fit(fr).column_ == "var_gk"
        fr["rv"] = fr["var_gk"] * 1.1
        assert HAR(column="auto").fit(fr).column_ == "rv"

    def test_missing_column_and_short_frame(self, frame):
        with pytest.raises(ValueError, match="column 'rv2' is not in the frame"):
            HAR(column="rv2").fit(frame)
        with pytest.raises(ValueError, match="needs at least min_obs=60 complete rows"):
            HAR().fit(frame.iloc[:80])


def spike_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Variance ~1e-4 with spikes every 25 bars, each followed by a quiet bar (so OLS learns a negative
    weight on the last bar), ending on a spike 100x the usual level: linear HAR predicts a negative variance."""
    rng = np.random.default_rng(seed)
    v = 1e-4 * np.exp(0.3 * rng.standard_normal(n))
    for t in range(20, n - 2, 25):
        v[t], v[t + 1] = 5e-4, 1e-5
    v[-1] = 1e-2
    idx = pd.date_range("2020-01-01", periods=n, freq="D", tz="UTC")
    return pd.DataFrame({"ret": np.sqrt(v) * rng.standard_normal(n), "var_gk": v}, index=idx)


class TestRelativeFloor:
    def test_negative_prediction_after_spike_floors_at_fraction_of_mean(self, caplog):
        import logging

        frame = spike_frame()
        f = HAR(column="var_gk", max_horizon=3).fit(frame)
        v = frame["var_gk"].to_numpy()
        raw = f.coef_ @ np.array([1.0, v[-1], v[-7:].mean(), v[-30:].mean()])
        assert np.all(raw < 0)  # the unconstrained OLS prediction after the spike
        floor = 0.05 * v.mean()
        with caplog.at_level(logging.WARNING, logger="models.har"):
            fc = f.predict_variance(3).variance[0]
        np.testing.assert_allclose(fc, floor, rtol=1e-12)
        assert f.variance_floor_ == pytest.approx(floor, rel=1e-12)
        assert f.n_floor_binds_ == 3 and "below the floor" in caplog.text
        # QLIKE of the next bar at the usual spike level stays O(100), not O(1e9) as with a 1e-12 floor
        y = 5e-4
        assert y / fc[0] - np.log(y / fc[0]) - 1 < 100

    def test_in_sample_binds_counted_against_a_plain_loop(self):
        frame = spike_frame()
        f = HAR(column="var_gk", max_horizon=1).fit(frame)
        v = frame["var_gk"].to_numpy()
        b = f.coef_[0]
        below = 0
        for t in range(len(v) - 1):  # one-step in-sample values from the trailing means at t
            x = [v[t], v[max(0, t - 6) : t + 1].mean(), v[max(0, t - 29) : t + 1].mean()]
            below += (b[0] + b[1:] @ x) < f.variance_floor_
        assert below > 0 and f.n_floor_binds_in_sample_ == below
        z = f.predict_variance(1).std_resid
        r = frame["ret"].to_numpy()[1:]
        assert np.max(np.abs(z)) <= np.max(np.abs(r)) / np.sqrt(f.variance_floor_) + 1e-12
        assert f.diagnostics() == {"floor_binds": 1, "floor_binds_in_sample": below}

    def test_counters_accumulate_over_refits(self):
        frame = spike_frame()
        f = HAR(column="var_gk", max_horizon=1).fit(frame.iloc[:-1])
        f.predict_variance(1)
        n1 = f.n_floor_binds_
        f.fit(frame)
        f.predict_variance(1)
        assert f.n_floor_binds_ == n1 + 1

    def test_loghar_floor_is_relative_too(self):
        f = LogHAR(column="var_gk", max_horizon=1).fit(spike_frame())
        assert f.variance_floor_ == pytest.approx(0.005 * spike_frame()["var_gk"].mean(), rel=1e-12)
        assert f.predict_variance(1).variance[0, 0] >= f.variance_floor_

    @pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match=r"min_variance_ratio must be in \(0, 1\), got"):
            HAR(column="var_gk", min_variance_ratio=ratio).fit(spike_frame())
