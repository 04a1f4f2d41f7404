"""The policy factory, the predictive fit (nothing after the cut, budget, procyclicality cap) and the bound's
optimality (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from _support.markets import forecast_for, market

from backtest.factory import make_policy
from backtest.fit import fit_predictive
from backtest.population import PopulationConfig, generate_population
from backtest.simulation import BacktestConfig
from margin.policies import EwmaCcpPolicy, GarchFhsPolicy, OracleVolPolicy, PolicyContext, StaticPolicy
from margin.predictive import PredictivePolicy


class TestFactory:
    def test_names(self):
        assert make_policy("static_0.10").im == 0.10 and make_policy("static_0.10").name == "static_0.10"
        assert isinstance(make_policy("ewma_ccp", apc="buffer"), EwmaCcpPolicy)
        assert isinstance(make_policy("garch_fhs", confidence=0.995), GarchFhsPolicy)
        assert isinstance(make_policy("predictive", level=0.2), PredictivePolicy)
        assert isinstance(make_policy("oracle_vol"), OracleVolPolicy)
        pair = make_policy("static", im=0.2, mm=0.05)
        assert isinstance(pair, StaticPolicy) and pair.name == "static_0.20_mm0.05"

    @pytest.mark.parametrize(
        ("name", "kw", "match"),
        [
            ("nope", {}, "unknown policy 'nope'"),
            ("static_x", {}, "static_<im> with im a number"),
            ("static_1.5", {}, r"static im must be in \(0, 1\], got 1.5"),
            ("ewma_ccp", {"apc": "both"}, "ewma_ccp.apc must be"),
            ("ewma_ccp", {"bogus": 1}, "bad config for policy 'ewma_ccp'"),
            ("garch_fhs", {"measure": "cvar"}, "garch_fhs.measure must be"),
            ("bound", {}, "unknown policy 'bound'"),
            ("static", {"im": 0.1, "mm": 0.2}, r"static mm must be in \(0, im=0.1\], got 0.2"),
        ],
    )
    def test_errors(self, name, kw, match):
        with pytest.raises(ValueError, match=match):
            make_policy(name, **kw)


class TestPredictiveFit:
    def test_fit_sees_nothing_after_cut(self):
        bars, sig = market(240, seed=5)
        cut = bars.index[160]
        pop = generate_population(240, PopulationConfig(n_positions=1500, seed=3))
        grid = {"level": (0.05, 0.1, 0.2), "power": (0.0, 1.0), "omega": (0.5,), "floor": (0.01,), "mm_k": (0.0, 3.0),
                "mm_floor": (0.0,)}
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), cut=cut)
        a = fit_predictive(ctx, pop, BacktestConfig(), {"alpha": 100.0, "beta": 1e-4}, grid=grid)
        bars2 = bars.copy()
        bars2.iloc[161:, :4] *= 0.5  # a crash after the cut
        sig2 = sig.copy()
        sig2[161:] *= 3
        ctx2 = PolicyContext(bars=bars2, forecast=forecast_for(bars2, sig2), cut=cut)
        b = fit_predictive(ctx2, pop, BacktestConfig(), {"alpha": 100.0, "beta": 1e-4}, grid=grid)
        assert a.params() == b.params()
        assert a.fitted["objective"] == b.fitted["objective"]
        assert a.fitted["evaluations"] >= 4 and a.fitted["fit_end"] == str(cut)
        # the fitted objective is the minimum over the grid points it evaluated
        assert a.fitted["objective"]["objective"] == min(t["objective"] for t in a.fitted["trace"])

    def test_fit_at_target_average_im(self):
        bars, sig = market(240, seed=5)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), cut=bars.index[160])
        pop = generate_population(240, PopulationConfig(n_positions=1000, seed=3))
        grid = {"power": (0.0, 1.0), "omega": (0.5,), "floor": (0.01,), "release": (1.0,), "mm_binds": ("path",),
                "mm_k": (0.0,), "mm_floor": (0.0,)}
        pol = fit_predictive(ctx, pop, BacktestConfig(), grid=grid, target_avg_im=0.08)
        assert np.mean(pol.path(ctx).im_rate[:160]) == pytest.approx(0.08, rel=2e-3)
        assert pol.fitted["target_avg_im"] == 0.08 and pol.fitted["evaluations"] == 4  # 2 powers + 2 refined
        with pytest.raises(ValueError, match=r"target_avg_im must be in \(0, 1\], got 2"):
            fit_predictive(ctx, pop, BacktestConfig(), grid=grid, target_avg_im=2)

    def test_fit_under_procyclicality_cap(self):
        from backtest.simulation import max_increase

        bars, sig = market(240, seed=5)
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), cut=bars.index[160])
        pop = generate_population(240, PopulationConfig(n_positions=1000, seed=3))
        grid = {"level": (0.1,), "power": (0.0, 1.0, 1.5), "omega": (0.5,), "floor": (0.01,), "release": (1.0,),
                "mm_binds": ("path",), "mm_k": (0.0,), "mm_floor": (0.0,), "stress": (0.0,)}
        free = fit_predictive(ctx, pop, BacktestConfig(), grid=grid, refine=False)
        inc = {p: max_increase(PredictivePolicy(level=0.1, power=p, sigma_ref=free.sigma_ref).path(ctx).im_rate[:160], 5)
               for p in (0.0, 1.0, 1.5)}
        assert inc[0.0] == 0.0 and inc[1.5] > inc[1.0] > 0
        cap = 0.5 * (inc[0.0] + inc[1.0]) if free.power >= 1.0 else 0.5 * (inc[1.0] + inc[1.5])
        capped = fit_predictive(ctx, pop, BacktestConfig(), grid=grid, refine=False, max_im_increase_5d=cap)
        assert inc[capped.power] <= cap and capped.fitted["max_im_increase_5d"] == cap
        assert capped.fitted["objective"]["max_im_increase_5d"] <= cap
        with pytest.raises(ValueError, match="max_im_increase_5d must be a fraction > 0, got 'ewma_ccp'"):
            fit_predictive(ctx, pop, BacktestConfig(), grid=grid, max_im_increase_5d="ewma_ccp")
        with pytest.raises(ValueError, match="no candidate on the grid meets it"):
            fit_predictive(ctx, pop, BacktestConfig(), grid={**grid, "power": (1.0, 1.5)}, refine=False,
                           max_im_increase_5d=1e-6)

    def test_fit_needs_cut(self):
        bars, sig = market(50)
        with pytest.raises(ValueError, match="needs ctx.cut"):
            fit_predictive(PolicyContext(bars=bars), generate_population(50, PopulationConfig(n_positions=5)))
