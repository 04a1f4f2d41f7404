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
