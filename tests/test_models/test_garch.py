"""GARCH family through arch: parameter recovery, units, closed-form forecasts, warm starts, fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from arch.univariate import GARCH, StudentsT, ZeroMean
from scipy import stats

from models.garch import ArchForecaster, EGARCHForecaster, GJRForecaster

TRUE = {"omega": 0.05, "alpha[1]": 0.08, "beta[1]": 0.90, "nu": 6.0}  # omega in %² (returns ×100)


def simulate_garch_t(n: int, seed: int) -> pd.DataFrame:
    """GARCH(1,1)-t path from arch's own simulator, as a decimal-return frame."""
    am = ZeroMean(None, volatility=GARCH(), distribution=StudentsT(seed=np.random.default_rng(seed)))
    sim = am.simulate(list(TRUE.values()), n, burn=500)
    idx = pd.date_range("2010-01-01", periods=n, freq="D", tz="UTC")
    return pd.DataFrame({"ret": sim["data"].to_numpy() / 100.0}, index=idx)


@pytest.fixture(scope="module")
def garch_frame() -> pd.DataFrame:
    return simulate_garch_t(5000, seed=1)


class TestParameterRecovery:
    @pytest.mark.parametrize("seed", [1, 2])
    def test_garch11_t_recovers_parameters(self, seed):
        """n=5000: alpha within ±0.03, beta within ±0.04, alpha+beta within ±0.02, omega within ±50%, nu ±2."""
        f = ArchForecaster().fit(simulate_garch_t(5000, seed))
        p = f.params_
        assert f.converged_
        assert abs(p["alpha[1]"] - TRUE["alpha[1]"]) < 0.03
        assert abs(p["beta[1]"] - TRUE["beta[1]"]) < 0.04
        assert abs(p["alpha[1]"] + p["beta[1]"] - 0.98) < 0.02
        assert abs(p["omega"] / TRUE["omega"] - 1) < 0.5
        assert abs(p["nu"] - TRUE["nu"]) < 2.0


class TestForecasts:
    def test_units_and_closed_form_multistep(self, garch_frame):
        """Per-step variance in decimal units equals the GARCH(1,1) closed form written by hand."""
        f = ArchForecaster().fit(garch_frame)
        p = f.params_
        w, a, b = p["omega"] / 1e4, p["alpha[1]"], p["beta[1]"]
        # one-step variance by a plain loop over the returns (backcast as arch: EWMA of first 75 squares)
        r = garch_frame["ret"].to_numpy()
        tau = min(75, len(r))
        wts = 0.94 ** np.arange(tau)
        s2 = float(wts @ r[:tau] ** 2 / wts.sum())
        for x in r:
            s2 = w + a * x * x + b * s2
        h = np.arange(1, 11)
        lr = w / (1 - a - b)
        expected = lr + (a + b) ** (h - 1) * (s2 - lr)
        fc = f.predict_variance(10)
        np.testing.assert_allclose(fc.variance[0], expected, rtol=1e-6)

    def test_matches_arch_forecast_of_scaled_data(self, garch_frame):
        from arch import arch_model

        f = GJRForecaster(dist="skewt").fit(garch_frame)
        ref = arch_model(garch_frame["ret"] * 100, mean="Zero", vol="GARCH", p=1, o=1, q=1, dist="skewt",
                         rescale=False).fix(f.params_).forecast(horizon=5, reindex=False)
        np.testing.assert_allclose(f.predict_variance(5).variance[0], ref.variance.to_numpy()[-1] / 1e4, rtol=1e-10)

    def test_normal_quantiles(self, garch_frame):
        f = ArchForecaster(dist="normal", quantile_levels=(0.01, 0.5, 0.99)).fit(garch_frame)
        fc = f.predict_variance(3)
        expected = np.sqrt(fc.variance[0])[:, None] * stats.norm.ppf([0.01, 0.5, 0.99])[None, :]
        np.testing.assert_allclose(fc.quantiles[0], expected, rtol=1e-8, atol=1e-15)

    def test_egarch_simulation_is_seeded(self, garch_frame):
        a = EGARCHForecaster(seed=3).fit(garch_frame).predict_variance(5).variance
        b = EGARCHForecaster(seed=3).fit(garch_frame).predict_variance(5).variance
        c = EGARCHForecaster(seed=4).fit(garch_frame).predict_variance(5).variance
        np.testing.assert_array_equal(a, b)
        assert a[0, 0] == c[0, 0]  # step 1 is analytic
        assert not np.allclose(a[0, 1:], c[0, 1:], rtol=1e-12)

    def test_std_resid_are_arch_standardized_residuals(self, garch_frame):
        f = ArchForecaster().fit(garch_frame)
        fc = f.predict_variance(1)
        r = garch_frame["ret"].to_numpy()
        np.testing.assert_allclose(fc.std_resid, r / np.sqrt(f.conditional_variance().to_numpy()), rtol=1e-8)


class TestRollingRefits:
    def test_warm_start_uses_last_good_parameters(self, garch_frame):
        f = ArchForecaster().fit(garch_frame.iloc[:3000])
        assert not f.warm_started_
        f.fit(garch_frame.iloc[:3001])
        assert f.warm_started_ and f.n_fits_ == 2
        cold = ArchForecaster(warm_start=False).fit(garch_frame.iloc[:3001])
        assert not cold.warm_started_
        np.testing.assert_allclose(f.params_.to_numpy(), cold.params_.to_numpy(), rtol=2e-2)

    def test_warm_start_needs_fewer_iterations(self, garch_frame):
        warm = ArchForecaster().fit(garch_frame.iloc[:3000]).fit(garch_frame.iloc[:3001])
        cold = ArchForecaster(warm_start=False).fit(garch_frame.iloc[:3001])
        assert warm.n_iter_ < cold.n_iter_

    def test_boundary_parameters_still_warm_start(self, garch_frame):
        """An optimum on the stationarity boundary (alpha + beta = 1 up to solver round-off, as SLSQP
        returns on BTC) is nudged inside instead of being discarded by arch."""
        import warnings

        from arch.utility.exceptions import StartingValueWarning

        from models.garch import _feasible_start

        f = ArchForecaster().fit(garch_frame.iloc[:3000])
        f.last_good_params_ = pd.Series([0.01, 0.12, 0.88 + 1e-12, 4.0], index=f.params_.index)
        am = f._model(100 * garch_frame["ret"].to_numpy()[:3001])
        sv = _feasible_start(am, 100 * garch_frame["ret"].to_numpy()[:3001], f.last_good_params_.to_numpy())
        assert sv[1] + sv[2] < 1.0 and abs(sv[1] + sv[2] - 1.0) < 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("error", StartingValueWarning)
            f.fit(garch_frame.iloc[:3001])
        assert f.warm_started_ and f.converged_

    def test_changed_specification_starts_cold(self, garch_frame):
        f = ArchForecaster().fit(garch_frame.iloc[:2000])
        f.set_params(dist="skewt").fit(garch_frame.iloc[:2001])
        assert not f.warm_started_

    def test_non_convergence_falls_back_and_is_counted(self, garch_frame, monkeypatch, caplog):
        f = ArchForecaster().fit(garch_frame.iloc[:2000])
        good = f.params_.copy()
        monkeypatch.setattr(ArchForecaster, "_ok", staticmethod(lambda res: False))
        with caplog.at_level(logging.WARNING, logger="models.garch"):
            f.fit(garch_frame.iloc[:2500])
        assert f.n_fallbacks_ == 1 and f.used_fallback_ and not f.converged_
        pd.testing.assert_series_equal(f.params_, good)
        assert "did not converge" in caplog.text and "fallback #1" in caplog.text
        # the state moved on to the new data even though the parameters were kept
        assert f.last_time_ == garch_frame.index[2499]

    def test_first_fit_without_convergence_warns(self, garch_frame, monkeypatch, caplog):
        monkeypatch.setattr(ArchForecaster, "_ok", staticmethod(lambda res: False))
        with caplog.at_level(logging.WARNING, logger="models.garch"):
            f = ArchForecaster().fit(garch_frame.iloc[:1000])
        assert not f.converged_ and f.n_fallbacks_ == 0
        assert "no earlier good parameters" in caplog.text


class TestValidation:
    @pytest.mark.parametrize(
        ("params", "match"),
        [
            ({"vol": "XGARCH"}, "vol must be one of"),
            ({"dist": "cauchy"}, "dist must be one of"),
            ({"mean": "AR"}, "mean must be one of"),
            ({"p": -1}, "p must be a non-negative integer"),
            ({"p": 0, "o": 0}, "p or o must be >= 1"),
        ],
    )
    def test_bad_parameters(self, garch_frame, params, match):
        with pytest.raises(ValueError, match=match):
            ArchForecaster(**params).fit(garch_frame.iloc[:500])

    def test_too_few_returns(self, garch_frame):
        with pytest.raises(ValueError, match="needs at least min_obs=100 returns, got 50"):
            ArchForecaster().fit(garch_frame.iloc[:50])


# ---------------------------------------------------------------------------- estimate checks (LTC EGARCH)
#: the estimate arch's SLSQP returned with flag 0 for EGARCH(1,1,1)-t on LTC's first 379 returns
#: (2016-08-25 .. 2017-09-12, one-thread BLAS): stationary, but log-variance swings by hundreds per shock
LTC_DEGENERATE = np.array([-0.0161, 133.164, -534.0621, 0.9387, 2.1117])


def _optimizer_returns(monkeypatch, x: np.ndarray) -> None:
    """Make arch's optimizer report success (status 0) at ``x``: the failure mode seen on LTC."""
    import arch.univariate.base as arch_base
    from scipy.optimize import OptimizeResult

    def fake_minimize(func, sv, args=(), **kw):
        return OptimizeResult(x=np.asarray(x, dtype=float), fun=float(func(np.asarray(x, dtype=float), *args)),
                              status=0, success=True, message="forced", nit=1)

    monkeypatch.setattr(arch_base, "minimize", fake_minimize)


class TestEstimateChecks:
    def test_degenerate_converged_estimate_is_rejected_and_counted(self, garch_frame, monkeypatch, caplog):
        f = EGARCHForecaster().fit(garch_frame.iloc[:1000])
        good = f.params_.copy()
        _optimizer_returns(monkeypatch, LTC_DEGENERATE)
        with caplog.at_level(logging.WARNING, logger="models.garch"):
            f.fit(garch_frame.iloc[:1020])
        assert f.used_fallback_ and not f.converged_
        assert f.n_fallbacks_ == 1 and f.n_rejected_fits_ == 1
        pd.testing.assert_series_equal(f.params_, good)
        assert "below" in f.rejection_ or "variance_bounds widened" in f.rejection_
        assert "estimate rejected" in caplog.text and "fallback #1" in caplog.text
        # the kept parameters forecast what arch forecasts with them (independent reference)
        from arch import arch_model

        ref = arch_model(garch_frame["ret"].iloc[:1020] * 100, mean="Zero", vol="EGARCH", p=1, o=1, q=1, dist="t",
                         rescale=False).fix(good).forecast(horizon=1, reindex=False)
        np.testing.assert_allclose(f.predict_variance(1).variance[0, 0], ref.variance.to_numpy()[-1, 0] / 1e4,
                                   rtol=1e-10)
        assert f.diagnostics() == {"fallbacks": 1, "rejected_fits": 1, "cold_starts": 0,
                                   "start_warnings": 0, "variance_clipped": 0}

    def test_non_stationary_egarch_is_rejected(self, garch_frame, monkeypatch):
        f = EGARCHForecaster().fit(garch_frame.iloc[:1000])
        x = f.params_.to_numpy().copy()
        x[3] = 1.0  # beta on arch's bound: a unit root in log-variance
        _optimizer_returns(monkeypatch, x)
        f.fit(garch_frame.iloc[:1020])
        assert f.used_fallback_ and "not stationary: sum(beta) = 1" in f.rejection_

    def test_first_fit_degenerate_raises(self, garch_frame, monkeypatch):
        _optimizer_returns(monkeypatch, LTC_DEGENERATE)
        with pytest.raises(RuntimeError, match="no earlier good parameters to fall back on"):
            EGARCHForecaster().fit(garch_frame.iloc[:1000])

    def test_walk_forward_ltc_like_spike_stays_finite(self, garch_frame, monkeypatch):
        """A refit schedule where one refit degenerates: every forecast stays inside the band."""
        f = EGARCHForecaster(simulations=200)
        f.fit(garch_frame.iloc[:1000])
        out = [f.predict_variance(5).variance[0]]
        with monkeypatch.context() as m:
            _optimizer_returns(m, LTC_DEGENERATE)
            f.fit(garch_frame.iloc[:1020])
            out.append(f.predict_variance(5).variance[0])
        f.fit(garch_frame.iloc[:1040])  # warm-starts from the last good parameters again
        out.append(f.predict_variance(5).variance[0])
        v = np.mean(garch_frame["ret"].iloc[:1040].to_numpy() ** 2)
        assert f.converged_ and f.n_fallbacks_ == 1
        assert np.all((np.array(out) > 1e-3 * v) & (np.array(out) < 1e2 * v))


class TestVarianceBounds:
    def test_forecast_clipped_to_band_and_counted(self, garch_frame, caplog):
        f = ArchForecaster().fit(garch_frame.iloc[:2000])
        sd = garch_frame["ret"].iloc[:2000].std()
        shock = pd.DataFrame({"ret": [60.0 * sd]}, index=[garch_frame.index[2000]])
        f.update(shock)
        from arch import arch_model

        y = np.append(garch_frame["ret"].iloc[:2000].to_numpy(), shock["ret"].to_numpy()) * 100
        raw = arch_model(y, mean="Zero", vol="GARCH", p=1, q=1, dist="t", rescale=False).fix(f.params_).forecast(
            horizon=3, reindex=False).variance.to_numpy()[-1] / 1e4
        cap = 100.0 * f.sample_variance_
        assert raw[0] > cap  # arch's own forecast leaves the band
        with caplog.at_level(logging.WARNING, logger="models.garch"):
            fc = f.predict_variance(3).variance[0]
        expected = np.minimum(raw, cap)
        np.testing.assert_allclose(fc, expected, rtol=1e-10)
        assert f.n_variance_clipped_ == int((raw > cap).sum()) >= 1
        assert f.diagnostics()["variance_clipped"] == f.n_variance_clipped_
        assert "clipped" in caplog.text
        np.testing.assert_allclose(f.sample_variance_, np.mean(garch_frame["ret"].iloc[:2000].to_numpy() ** 2))

    @pytest.mark.parametrize("bounds", [(0.0, 10.0), (0.5, 0.9), (1e-3,), (1e-3, float("inf"))])
    def test_bad_bounds(self, garch_frame, bounds):
        with pytest.raises(ValueError, match="variance_bounds must be"):
            ArchForecaster(variance_bounds=bounds).fit(garch_frame.iloc[:500])


class TestStartingValues:
    def test_unrepairable_warm_start_goes_cold_without_warning(self, garch_frame, monkeypatch):
        """Starting values arch would reject are never passed to it: arch's defaults are used, counted."""
        import warnings

        from arch.utility.exceptions import StartingValueWarning

        import models.garch as mg

        f = ArchForecaster().fit(garch_frame.iloc[:2000])
        f.last_good_params_ = pd.Series([0.01, 0.12, 0.88 + 1e-3, 4.0], index=f.params_.index)  # alpha+beta > 1
        monkeypatch.setattr(mg, "_feasible_start", lambda am, y, sv, margin=1e-6: np.asarray(sv, dtype=float))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f.fit(garch_frame.iloc[:2001])
        assert not [w for w in caught if issubclass(w.category, StartingValueWarning)]
        assert f.n_cold_starts_ == 1 and not f.warm_started_ and f.converged_
        assert f.diagnostics()["cold_starts"] == 1

    def test_feasibility_check_matches_arch(self, garch_frame):
        """``_is_feasible`` says True exactly when arch accepts the values without a StartingValueWarning."""
        import warnings

        from arch.utility.exceptions import StartingValueWarning

        from models.garch import _is_feasible

        y = 100 * garch_frame["ret"].to_numpy()[:1500]
        f = GJRForecaster()
        for sv in ([0.05, 0.05, 0.1, 0.85, 6.0], [0.05, 0.05, 0.1, 0.95, 6.0], [0.05, -0.01, 0.1, 0.85, 6.0],
                   [0.05, 0.05, 0.1, 0.85, 1.5]):
            am = f._model(y)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                am.fit(disp="off", show_warning=False, starting_values=np.array(sv), options={"maxiter": 1})
            arch_warned = any(issubclass(w.category, StartingValueWarning) for w in caught)
            assert _is_feasible(am, y, np.array(sv)) == (not arch_warned), sv
