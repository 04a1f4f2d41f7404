"""Policies: closed forms, plain-loop references and no look-ahead."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _support.markets import forecast_for, market
from scipy.stats import norm

from margin.controls import Controls
from margin.policies import (
    EwmaCcpPolicy,
    GarchFhsPolicy,
    OracleVolPolicy,
    PolicyContext,
    StaticPolicy,
    ewma_variance,
    slow_release,
)
from margin.predictive import PredictivePolicy
from models.base import VolatilityForecast


class TestSimplePolicies:
    def test_static(self):
        bars, _ = market(30)
        p = StaticPolicy(0.08).path(PolicyContext(bars=bars, controls=Controls(mm_fraction=0.6)))
        np.testing.assert_array_equal(p.im_rate, 0.08)
        np.testing.assert_allclose(p.mm_rate, 0.048)
        prm = p.params_at(3, "BTC-PERP")
        assert prm.tiers[0].im_rate == 0.08 and prm.tiers[0].mm_rate == pytest.approx(0.048)

    def test_ewma_variance_plain_loop(self):
        rng = np.random.default_rng(42)
        r = rng.normal(0, 0.02, 200)
        v = ewma_variance(r, 0.94, seed_bars=30)
        prev = float(np.mean(r[1:31] ** 2))
        for t in range(r.size):
            prev = 0.94 * prev + 0.06 * r[t] ** 2
            assert v[t] == pytest.approx(prev, rel=1e-12)

    @pytest.mark.parametrize("apc", ["floor", "buffer", "stressed_weight"])
    def test_ewma_ccp_tools(self, apc):
        bars, _ = market(500)
        ctx = PolicyContext(bars=bars, controls=Controls(floor=0.001, ceiling=1.0, max_change=100.0, notice_bars=0))
        pol = EwmaCcpPolicy(apc=apc, lookback=250)
        raw = pol.raw(ctx)
        base = np.expm1(norm.ppf(0.99) * np.sqrt(2 * ewma_variance(ctx.returns(), 0.94)))
        if apc == "floor":
            assert np.all(raw >= base - 1e-15) and np.any(raw > base)
        elif apc == "buffer":
            ratio = raw / base
            assert set(np.round(np.unique(ratio), 12)) <= {1.0, 1.25} and np.any(ratio == 1.0)
        else:
            assert np.all(raw >= base - 1e-15)
            assert np.all(raw <= 0.75 * base + 0.25 * np.max(raw / 0.25) + 1e-12)
        p = pol.path(ctx)
        np.testing.assert_allclose(p.im_rate, raw)  # loose controls: the raw path passes through

    def test_controls_apply_to_deployable(self):
        bars, sig = market(400)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig),
                            controls=Controls(floor=0.03, ceiling=0.2, max_change=0.1, notice_bars=2))
        for pol in (EwmaCcpPolicy(), GarchFhsPolicy(), PredictivePolicy()):
            p = pol.path(ctx)
            assert p.im_rate.min() >= 0.03 - 1e-15 and p.im_rate.max() <= 0.2 + 1e-15
            assert np.max(np.abs(p.im_rate[1:] / p.im_rate[:-1] - 1)) <= 0.1 + 1e-12
            assert np.all(p.mm_rate <= 0.5 * p.im_rate + 1e-15)

    def test_garch_fhs_normal_residuals(self):
        pol = GarchFhsPolicy(confidence=0.99, horizon=1, measure="var", n_sims=200_000)
        lo, hi = pol.tail_factors(np.random.default_rng(1).standard_normal(100_000))
        assert lo == pytest.approx(-norm.ppf(0.99), abs=0.05) and hi == pytest.approx(norm.ppf(0.99), abs=0.05)
        es = GarchFhsPolicy(confidence=0.99, horizon=1, measure="es", n_sims=200_000)
        lo, hi = es.tail_factors(np.random.default_rng(1).standard_normal(100_000))
        assert hi == pytest.approx(norm.pdf(norm.ppf(0.99)) / 0.01, abs=0.06)

    def test_garch_fhs_closed_form(self):
        bars, sig = market(300)
        fc = forecast_for(bars, sig, H=2)
        ctx = PolicyContext(bars=bars, forecast=fc, controls=Controls(floor=1e-4, ceiling=1.0, max_change=1e3,
                                                                      notice_bars=0))
        pol = GarchFhsPolicy(horizon=2)
        lo, hi = pol.tail_factors(fc.std_resid)
        s = np.sqrt(2 * sig**2)
        np.testing.assert_allclose(pol.path(ctx).im_rate, np.maximum(-np.expm1(lo * s), np.expm1(hi * s)))

    def test_garch_fhs_without_residuals_uses_pre_cut(self):
        bars, sig = market(300)
        fc = VolatilityForecast(origins=bars.index, variance=(sig**2)[:, None], model="x")
        p = GarchFhsPolicy().path(PolicyContext(bars=bars, forecast=fc, cut=bars.index[200]))
        assert p.meta["resid_source"] == "pre_cut_one_step"

    def test_oracle_uses_future(self):
        bars, _ = market(100)
        ctx = PolicyContext(bars=bars)
        p = OracleVolPolicy(scale=2.0, horizon=1, floor=1e-6).path(ctx)
        r = ctx.returns()
        np.testing.assert_allclose(p.im_rate[:-1], np.expm1(2.0 * np.abs(r[1:])).clip(1e-6, 1))
        assert p.meta["deployable"] is False


class TestPredictive:
    def test_raw_formula(self):
        bars, sig = market(200)
        fc = forecast_for(bars, sig, H=3, regimes=True)
        ctx = PolicyContext(bars=bars, forecast=fc,
                            controls=Controls(floor=1e-4, ceiling=1.0, max_change=1e3, notice_bars=0))
        pol = PredictivePolicy(level=0.1, power=0.7, stress=0.5, omega=0.3, floor=0.02, sigma_ref=0.03)
        p = pol.path(ctx)
        expected = np.maximum(0.02, 0.1 * (sig / 0.03) ** 0.7 * (1 + 0.5 * fc.regime_probs[:, 2]))
        np.testing.assert_allclose(p.im_rate, np.minimum(expected, 1.0), rtol=1e-12)

    def test_power_zero_is_static_and_regime_frame(self):
        bars, sig = market(200)
        probs = pd.DataFrame({"calm": 0.5, "stressed": 0.5}, index=bars.index)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), regime_probs=probs,
                            controls=Controls(floor=1e-4, ceiling=1.0, max_change=1e3, notice_bars=0))
        p = PredictivePolicy(level=0.1, power=0.0, stress=1.0).path(ctx)
        np.testing.assert_allclose(p.im_rate, 0.15)

    def test_slow_release_plain_loop(self):
        x = np.array([0.1, 0.3, 0.1, 0.1, 0.5, 0.2, 0.05])
        y = slow_release(x, 0.25)
        ref, prev = [], -1.0
        for v in x:
            prev = max(v, 0.75 * prev)
            ref.append(prev)
        np.testing.assert_allclose(y, ref, rtol=1e-15)
        np.testing.assert_array_equal(slow_release(x, 1.0), x)
        with pytest.raises(ValueError, match=r"release must be in \(0, 1\], got 0"):
            slow_release(x, 0)

    def test_mm_fixed_at_entry(self):
        bars, sig = market(200)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), controls=Controls(mm_fraction=0.4))
        p = PredictivePolicy(mm_binds="entry").path(ctx)
        assert p.mm_binds == "entry" and p.mm_pending is None
        np.testing.assert_allclose(p.mm_rate, 0.4 * p.im_rate)

    @pytest.mark.parametrize("mm_binds", ["path", "entry"])
    def test_own_mm_mapping(self, mm_binds):
        # mm_k > 0: MM covers an mm_k-sigma one-bar move of the 1-step forecast, capped at IM
        bars, sig = market(200)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig),
                            controls=Controls(floor=1e-4, ceiling=1.0, max_change=1e3, notice_bars=0))
        p = PredictivePolicy(level=0.3, power=0.5, mm_k=2.0, mm_binds=mm_binds, sigma_ref=0.03).path(ctx)
        np.testing.assert_allclose(p.mm_rate, np.minimum(np.expm1(2.0 * sig), p.im_rate), rtol=1e-12)
        assert p.meta["mm_k"] == 2.0 and p.mm_binds == mm_binds
        base = PredictivePolicy(level=0.3, power=0.5, mm_binds=mm_binds, sigma_ref=0.03).path(ctx)
        np.testing.assert_array_equal(base.im_rate, p.im_rate)  # the MM mapping leaves IM alone
        fl = PredictivePolicy(level=0.3, power=0.5, mm_k=2.0, mm_floor=0.07, mm_binds=mm_binds, sigma_ref=0.03).path(ctx)
        np.testing.assert_allclose(fl.mm_rate, np.minimum(np.maximum(np.expm1(2.0 * sig), 0.07), fl.im_rate), rtol=1e-12)
        assert (fl.mm_rate >= np.minimum(0.07, fl.im_rate) - 1e-15).all() and fl.meta["mm_floor"] == 0.07

    def test_quantiles_blend(self):
        bars, sig = market(200)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig, quantiles=True),
                            controls=Controls(floor=1e-4, ceiling=1.0, max_change=1e3, notice_bars=0))
        feats = PredictivePolicy.features(ctx)
        np.testing.assert_allclose(feats["sq"], sig, rtol=1e-9)  # normal quantiles imply the same sigma
