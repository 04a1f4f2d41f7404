"""training.tests against closed forms, published tables, statsmodels, scipy and arch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from training.tests import (
    TrafficLight,
    christoffersen_independence,
    coverage_test,
    diebold_mariano,
    kupiec_pof,
    model_confidence_set,
    superior_predictive_ability,
    traffic_light,
    traffic_light_bounds,
    var_breaches,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


class TestDieboldMariano:
    @pytest.mark.parametrize("h", [1, 3, 5])
    def test_matches_statsmodels_hac_mean(self, rng, h):
        a = rng.gamma(2.0, 1.0, 300)
        b = rng.gamma(2.1, 1.0, 300)
        res = diebold_mariano(a, b, horizon=h, hln=False)
        d = a - b
        ols = sm.OLS(d, np.ones_like(d)).fit(cov_type="HAC", cov_kwds={"maxlags": h - 1, "use_correction": False})
        assert res.stat == pytest.approx(float(ols.tvalues[0]), rel=1e-9)
        assert res.pvalue == pytest.approx(2 * stats.norm.sf(abs(float(ols.tvalues[0]))), rel=1e-9)

    def test_hln_correction_closed_form(self, rng):
        a, b = rng.normal(size=60) ** 2, rng.normal(size=60) ** 2
        h, n = 4, 60
        raw = diebold_mariano(a, b, horizon=h, hln=False)
        corr = diebold_mariano(a, b, horizon=h, hln=True)
        k = np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
        assert corr.stat == pytest.approx(raw.stat * k, rel=1e-12)
        assert corr.pvalue == pytest.approx(2 * stats.t.sf(abs(corr.stat), n - 1), rel=1e-12)

    def test_one_sided_detects_better_model(self, rng):
        y = rng.gamma(2, 1e-4, 500)
        good = y * np.exp(rng.normal(0, 0.1, 500))
        bad = y * np.exp(rng.normal(0.5, 0.6, 500))
        from training.metrics import qlike_loss

        res = diebold_mariano(qlike_loss(y, good), qlike_loss(y, bad), alternative="less")
        assert res.stat < 0 and res.pvalue < 0.01
        rev = diebold_mariano(qlike_loss(y, bad), qlike_loss(y, good), alternative="less")
        assert rev.pvalue > 0.99

    def test_uniform_kernel_plain_loop(self, rng):
        d = rng.normal(0.1, 1, 200)
        res = diebold_mariano(d, np.zeros(200), horizon=3, kernel="uniform", hln=False)
        dc = d - d.mean()
        g = [np.sum(dc[j:] * dc[: len(dc) - j]) / 200 for j in range(3)]
        lrv = g[0] + 2 * (g[1] + g[2])
        assert res.stat == pytest.approx(d.mean() / np.sqrt(lrv / 200), rel=1e-10)

    def test_errors(self):
        with pytest.raises(ValueError, match="same length"):
            diebold_mariano(np.ones(5), np.ones(6))
        with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
            diebold_mariano(np.ones(5), np.ones(5), horizon=0)
        with pytest.raises(ValueError, match="alternative"):
            diebold_mariano(np.ones(5), np.ones(5), alternative="bigger")


class TestMCS:
    def test_bad_model_excluded_and_seeded(self, rng):
        n = 400
        base = rng.gamma(2, 1, n)
        losses = pd.DataFrame(
            {"a": base + rng.normal(0, 0.05, n), "b": base + rng.normal(0, 0.05, n), "bad": base + 1.0}
        )
        r1 = model_confidence_set(losses, reps=200, seed=7)
        r2 = model_confidence_set(losses, reps=200, seed=7)
        assert "bad" in r1.excluded and {"a", "b"} <= set(r1.included)
        assert r1.pvalues == r2.pvalues
        assert r1.pvalues["bad"] < 0.1

    def test_same_as_arch(self, rng):
        from arch.bootstrap import MCS

        losses = pd.DataFrame(rng.gamma(2, 1, (200, 3)) + [0, 0.1, 0.3], columns=["x", "y", "z"])
        ours = model_confidence_set(losses, reps=100, seed=3, size=0.1)
        ref = MCS(losses, size=0.1, reps=100, seed=np.random.default_rng(3))
        ref.compute()
        assert set(ours.included) == set(ref.included)
        assert ours.pvalues == {k: float(v) for k, v in ref.pvalues["Pvalue"].items()}

    def test_single_model_and_errors(self):
        df = pd.DataFrame({"only": np.ones(20)})
        assert model_confidence_set(df).included == ("only",)
        with pytest.raises(ValueError, match="size must be in"):
            model_confidence_set(df, size=1.5)
        with pytest.raises(TypeError, match="DataFrame"):
            model_confidence_set(np.ones((20, 2)))


class TestKupiec:
    @pytest.mark.parametrize(
        ("T", "accept", "reject"),
        # Jorion (Value at Risk, 3rd ed., table 6-3): non-rejection regions at 95% confidence for p = 1%
        # (the table prints "N < 7" at T=255; the exact LR test also rejects N=0 there)
        [(255, [1, 6], [0, 7]), (510, [2, 10], [1, 11]), (1000, [5, 16], [4, 17])],
    )
    def test_jorion_nonrejection_regions(self, T, accept, reject):
        for x in accept + reject:
            b = np.zeros(T)
            b[:x] = 1
            _, p = kupiec_pof(b, 0.01)
            assert (p > 0.05) == (x in accept), (T, x, p)

    def test_binomial_likelihood_ratio(self, rng):
        b = (rng.random(700) < 0.03).astype(int)
        x, n = int(b.sum()), len(b)
        ref = 2 * (stats.binom.logpmf(x, n, x / n) - stats.binom.logpmf(x, n, 0.01))
        lr, p = kupiec_pof(b, 0.01)
        assert lr == pytest.approx(ref, rel=1e-10)
        assert p == pytest.approx(stats.chi2.sf(ref, 1), rel=1e-10)

    def test_zero_breaches_closed_form(self):
        lr, _ = kupiec_pof(np.zeros(250), 0.01)
        assert lr == pytest.approx(-2 * 250 * np.log(0.99))

    def test_errors(self):
        with pytest.raises(ValueError, match="p must be in"):
            kupiec_pof(np.zeros(5), 1.0)
        with pytest.raises(ValueError, match="0/1"):
            kupiec_pof(np.array([0, 2, 1]), 0.01)


class TestChristoffersen:
    def test_equals_g_test_on_transition_table(self, rng):
        b = np.zeros(1000, dtype=bool)
        b[rng.choice(1000, 30, replace=False)] = True
        b[101:104] = True  # a cluster
        n = np.zeros((2, 2))
        for t in range(1, len(b)):
            n[int(b[t - 1]), int(b[t])] += 1
        g, p_ref, _, _ = stats.chi2_contingency(n, correction=False, lambda_="log-likelihood")
        lr, p = christoffersen_independence(b)
        assert lr == pytest.approx(g, rel=1e-9)
        assert p == pytest.approx(p_ref, rel=1e-9)

    def test_clustered_breaches_rejected(self):
        b = np.zeros(500)
        for s in range(50, 500, 100):
            b[s : s + 4] = 1
        assert christoffersen_independence(b)[1] < 0.01

    def test_conditional_coverage_sum(self, rng):
        b = (rng.random(300) < 0.02).astype(float)
        r = coverage_test(b, 0.01)
        assert r.lr_cc == pytest.approx(r.lr_uc + r.lr_ind)
        assert r.p_cc == pytest.approx(stats.chi2.sf(r.lr_cc, 2))
        assert r.traffic_light in {"green", "yellow", "red"}
        assert coverage_test(b, 0.05).traffic_light is None


class TestTrafficLight:
    def test_basel_table_at_250(self):
        # Basel Committee (1996), table 2: green 0-4, yellow 5-9, red 10+
        assert traffic_light_bounds(250, 0.01) == (5, 10)
        zones = [traffic_light(x, 250) for x in range(12)]
        assert zones[:5] == [TrafficLight.GREEN] * 5
        assert zones[5:10] == [TrafficLight.YELLOW] * 5
        assert zones[10:] == [TrafficLight.RED] * 2

    @settings(max_examples=30, deadline=None)
    @given(st.integers(30, 3000))
    def test_bounds_are_binomial_quantiles(self, n):
        y, r = traffic_light_bounds(n, 0.01)
        assert stats.binom.cdf(y, n, 0.01) >= 0.95 and (y == 0 or stats.binom.cdf(y - 1, n, 0.01) < 0.95)
        assert r > y

    def test_array_input(self):
        b = np.zeros(250)
        b[:7] = 1
        assert traffic_light(b) == TrafficLight.YELLOW
        with pytest.raises(ValueError, match="n is required"):
            traffic_light(3)


def test_var_breaches_normal_quantile():
    r = np.array([-0.05, -0.01, 0.02, np.nan])
    v = np.full(4, 0.02**2)
    out = var_breaches(r, v, 0.99)
    # 99% normal VaR = 2.326 * 0.02 = 0.0465
    assert list(out[:3]) == [1.0, 0.0, 0.0] and np.isnan(out[3])
    with pytest.raises(ValueError, match="level must be in"):
        var_breaches(r, v, 99)


class TestSuperiorPredictiveAbility:
    def test_a_truly_better_candidate_is_found(self, rng):
        idx = pd.date_range("2020-01-01", periods=300, freq="D", tz="UTC")
        bench = pd.Series(rng.gamma(2.0, 0.5, 300), index=idx)
        cands = pd.DataFrame({f"c{i}": bench + rng.normal(0.0, 0.3, 300) for i in range(10)}, index=idx)
        cands["good"] = bench - 0.3 + rng.normal(0.0, 0.1, 300)
        res = superior_predictive_ability(bench, cands, reps=500, seed=1)
        assert res.pvalue < 0.01 and res.best == "good" and (res.n, res.k) == (300, 11)
        assert res.pvalue_lower <= res.pvalue <= res.pvalue_upper
        assert superior_predictive_ability(bench, cands, reps=500, seed=1) == res  # seeded

    def test_the_best_of_many_equal_candidates_is_not_credited(self):
        """Twenty candidates no better than the benchmark: the best one's own one-sided DM p-value falls below
        5 % in most samples (it was chosen as the best), the SPA p-value of the search rarely does."""
        naive, spa = [], []
        for seed in range(30):
            r = np.random.default_rng(seed)
            bench = pd.Series(r.gamma(2.0, 0.5, 250))
            cands = pd.DataFrame({f"c{i}": bench + r.normal(0.0, 0.3, 250) for i in range(20)})
            best = cands.mean().idxmin()
            naive.append(diebold_mariano(cands[best].to_numpy(), bench.to_numpy(), horizon=1,
                                         alternative="less").pvalue < 0.05)
            spa.append(superior_predictive_ability(bench, cands, reps=300, seed=seed).pvalue < 0.05)
        assert np.mean(naive) > 0.35 and np.mean(spa) <= 0.15, (np.mean(naive), np.mean(spa))  # 0.5 and 0.1 here

    def test_bad_input_is_refused(self):
        bench = pd.Series(np.ones(5))
        with pytest.raises(ValueError, match="at least 10 complete loss rows"):
            superior_predictive_ability(bench, pd.DataFrame({"a": np.ones(5)}))
        with pytest.raises(ValueError, match="at least one loss column"):
            superior_predictive_ability(bench, pd.DataFrame(index=bench.index))
