"""training.metrics against closed forms, plain loops and statsmodels OLS."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import (
    PROXY_FLOOR,
    aligned_targets,
    garman_klass,
    loss_series,
    mincer_zarnowitz,
    mse,
    newey_west_variance,
    proxy_variance,
    qlike,
    qlike_loss,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


class TestQlike:
    def test_plain_loop(self, rng):
        f = rng.gamma(2.0, 1e-4, 300)
        y = f * rng.chisquare(1, 300) + 1e-12
        ref = sum(yi / fi - np.log(yi / fi) - 1 for yi, fi in zip(y, f, strict=True)) / len(y)
        assert qlike(y, f) == pytest.approx(ref, rel=1e-12)

    def test_zero_for_perfect_forecast(self, rng):
        y = rng.gamma(2.0, 1e-4, 50)
        assert qlike(y, y) == pytest.approx(0.0, abs=1e-15)

    def test_scale_free(self, rng):
        f = rng.gamma(2.0, 1e-4, 100)
        y = f * rng.chisquare(1, 100) + 1e-12
        assert qlike(1e4 * y, 1e4 * f) == pytest.approx(qlike(y, f), rel=1e-10)

    def test_2d_gives_per_column_and_drops_nan(self, rng):
        y = rng.gamma(2.0, 1e-4, (40, 3))
        f = rng.gamma(2.0, 1e-4, (40, 3))
        y[0, 1] = np.nan
        out = qlike(y, f)
        assert out.shape == (3,)
        assert out[1] == pytest.approx(qlike(y[1:, 1], f[1:, 1]))
        assert out[0] == pytest.approx(qlike(y[:, 0], f[:, 0]))

    def test_rejects_bad_inputs(self):
        with pytest.raises(ValueError, match="same shape"):
            qlike(np.ones(3), np.ones(4))
        with pytest.raises(ValueError, match="forecast variance must be > 0"):
            qlike(np.ones(3), np.array([1.0, 0.0, 1.0]))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.floats(1e-8, 1.0), min_size=1, max_size=30), st.floats(1e-8, 1.0))
    def test_non_negative_and_minimised_at_truth(self, ys, f):
        y = np.array(ys)
        assert np.all(qlike_loss(y, np.full_like(y, f)) >= -1e-12)
        # the constant minimising mean QLIKE is the mean of y
        assert qlike(y, np.full_like(y, y.mean())) <= qlike(y, np.full_like(y, f)) + 1e-12

    def test_mse_closed_form(self, rng):
        y, f = rng.normal(size=20) ** 2 + 0.1, rng.normal(size=20) ** 2 + 0.1
        assert mse(y, f) == pytest.approx(np.mean((y - f) ** 2))
        assert np.allclose(loss_series(y, f, "mse"), (y - f) ** 2)
        with pytest.raises(ValueError, match="loss must be"):
            loss_series(y, f, "mae")


class TestProxy:
    def test_garman_klass_closed_form(self):
        o, h, lo, c = 100.0, 110.0, 95.0, 105.0
        ref = 0.5 * np.log(h / lo) ** 2 - (2 * np.log(2) - 1) * np.log(c / o) ** 2
        out = garman_klass(pd.Series([o]), pd.Series([h]), pd.Series([lo]), pd.Series([c]))
        assert out.iloc[0] == pytest.approx(ref, rel=1e-14)

    def test_floor_and_names(self):
        idx = pd.date_range("2020-01-01", periods=3, freq="D", tz="UTC")
        df = pd.DataFrame({"var_gk": [0.0, 1e-4, np.nan], "ret": [0.0, 0.01, -0.02], "rv": [2e-4, 1e-4, 3e-4]}, index=idx)
        gk = proxy_variance(df, "gk")
        assert gk.iloc[0] == PROXY_FLOOR and gk.iloc[1] == 1e-4 and np.isnan(gk.iloc[2])
        assert proxy_variance(df, "sq").iloc[2] == pytest.approx(4e-4)
        assert proxy_variance(df, "rv").name == "rv"
        with pytest.raises(ValueError, match="proxy must be one of"):
            proxy_variance(df, "parkinson")
        with pytest.raises(KeyError, match="rv"):
            proxy_variance(df.drop(columns="rv"), "rv")

    def test_aligned_targets_plain_loop(self, rng):
        idx = pd.date_range("2020-01-01", periods=10, freq="D", tz="UTC")
        s = pd.Series(rng.gamma(2, 1e-4, 10), index=idx)
        origins = idx[[0, 3, 8, 9]]
        out = aligned_targets(s, origins, 3)
        for i, o in enumerate(origins):
            p = list(idx).index(o)
            for k in range(1, 4):
                exp = s.iloc[p + k] if p + k < 10 else np.nan
                assert (np.isnan(exp) and np.isnan(out[i, k - 1])) or out[i, k - 1] == exp
        with pytest.raises(KeyError, match="not a bar"):
            aligned_targets(s, pd.DatetimeIndex(["2019-01-01"], tz="UTC"), 1)


class TestMincerZarnowitz:
    @pytest.mark.parametrize("lags", [0, 3, 7])
    def test_matches_statsmodels_hac(self, rng, lags):
        f = rng.gamma(2.0, 1e-4, 400)
        y = 2e-5 + 0.8 * f * rng.chisquare(1, 400)
        mz = mincer_zarnowitz(y, f, hac_lags=lags)
        res = sm.OLS(y, sm.add_constant(f)).fit(cov_type="HAC", cov_kwds={"maxlags": lags, "use_correction": False})
        np.testing.assert_allclose([mz.a, mz.b], res.params, rtol=1e-9)
        np.testing.assert_allclose([mz.se_a, mz.se_b], res.bse, rtol=1e-8)
        wald = res.wald_test((np.eye(2), np.array([0.0, 1.0])), scalar=True, use_f=False)
        assert mz.wald == pytest.approx(float(wald.statistic), rel=1e-7)
        assert mz.wald_pvalue == pytest.approx(float(wald.pvalue), rel=1e-6)
        assert mz.r2 == pytest.approx(res.rsquared, rel=1e-10)

    def test_unbiased_forecast_not_rejected(self, rng):
        f = rng.gamma(2.0, 1e-4, 3000)
        y = f * rng.chisquare(1, 3000)
        mz = mincer_zarnowitz(y, f)
        assert abs(mz.b - 1) < 0.15 and mz.wald_pvalue > 0.01

    def test_newey_west_lag0_is_variance(self, rng):
        x = rng.normal(size=100)
        assert newey_west_variance(x, 0) == pytest.approx(np.var(x))

    def test_too_short(self):
        with pytest.raises(ValueError, match="at least 3"):
            mincer_zarnowitz([1.0, 2.0], [1.0, 2.0])
