"""Budgets: the static envelope against a brute-force search, budgets met within 0.5 points, the share of the
bound, scales fitted before the cut, and the headline (fitted policies near their budget, deterministic)."""

from __future__ import annotations

import pytest
from _support.markets import forecast_for, market

from backtest.budgets import MmRule, StaticEnvelope, budget_key, scale_to_budget, share_of_bound
from backtest.headline import HeadlineSettings, evaluate_headline, headline_checks
from backtest.population import PopulationConfig, generate_population
from backtest.simulation import BacktestConfig
from margin.controls import Controls
from margin.policies import EwmaCcpPolicy, GarchFhsPolicy, PolicyContext

RULES = (MmRule("fraction", 0.25), MmRule("fraction", 0.5), MmRule("fixed", 0.03))


@pytest.fixture(scope="module")
def case():
    bars, sig = market(360, seed=11, vol=0.03, drift=0.01)
    pop = generate_population(360, PopulationConfig(n_positions=2500, seed=11))
    return bars, sig, pop


class TestStaticEnvelope:
    def test_equals_brute_force_and_meets_the_level(self, case):
        bars, _, pop = case
        env = StaticEnvelope(bars, pop, BacktestConfig(frozen=True), RULES, (0.02, 0.06, 0.12, 0.25, 0.5),
                             start=bars.index[120])
        for c in (0.14, 0.2, 0.3):
            best, pairs = env.best_at(c, refine_top=None)
            assert best == env.brute_force_at(c)
            for p in pairs:
                assert abs(p.avg_collateral - c) <= 0.005  # within 0.5 points (the solver aims at 0.1)
                assert p.mm <= p.im + 1e-15
            # the shortlist (3 rules of 3 here, then 2) gives the same choice as long as the best is in it
            assert env.best_at(c, refine_top=3)[0] == best
            top2 = env.best_at(c, refine_top=2)[0]
            assert top2.liquidations >= best.liquidations or top2.bad_debt > 0

    def test_rules(self):
        assert MmRule("fixed", 0.05).mm(0.04) is None and MmRule("fixed", 0.05).mm(0.1) == 0.05
        assert MmRule("fraction", 0.5).mm(0.1) == 0.05
        with pytest.raises(ValueError, match="MM rule kind must be 'fraction' or 'fixed', got 'x'"):
            MmRule("x", 0.1)
        assert budget_key(0.2) == "0.2" and budget_key(0.125) == "0.125"


class TestShare:
    def test_values_and_undefined(self):
        assert share_of_bound(100, 60, 20, bad_debt_policy=0.0, bad_debt_static=0.0) == (0.5, None)
        assert share_of_bound(100, 120, 20, bad_debt_policy=0.0, bad_debt_static=0.0)[0] == -0.25
        s, why = share_of_bound(100, 60, 20, bad_debt_policy=5.0, bad_debt_static=0.0)
        assert s is None and "bad debt 5 USD above the best static's 0 USD" in why
        assert share_of_bound(100, 60, 20, bad_debt_policy=5.0, bad_debt_static=10.0)[0] == 0.5
        assert share_of_bound(100, 60, 20, bad_debt_policy=5.0, bad_debt_static=0.0, tolerance=5.0)[0] == 0.5
        assert share_of_bound(100, 60, 100, bad_debt_policy=0.0, bad_debt_static=0.0)[0] is None

    def test_scale_to_budget_on_a_monotone_response(self):
        class R:
            def __init__(self, c):
                self.avg_collateral = c

        scale, r = scale_to_budget(lambda s: R(0.05 + 0.1 * s**0.7), 0.2)
        assert abs(r.avg_collateral - 0.2) <= 1e-3 and scale == pytest.approx((0.15 / 0.1) ** (1 / 0.7), rel=2e-2)
        assert scale_to_budget(lambda s: R(0.3 + 0.01 * s), 0.2)[0] == 0.05  # out of reach: the nearest end


class TestHeadline:
    def test_fitted_near_budget_deterministic_and_checked(self, case):
        bars, sig, pop = case
        ctx = PolicyContext(bars=bars, forecast=forecast_for(bars, sig), cut=bars.index[200],
                            controls=Controls(floor=0.01, ceiling=0.6, max_change=0.5, notice_bars=1))
        rivals = {"ewma_ccp": EwmaCcpPolicy(apc="buffer").path(ctx), "garch_fhs": GarchFhsPolicy().path(ctx)}
        grid = {"power": (0.0, 1.0), "stress": (0.0,), "omega": (0.5,), "release": (1.0,), "mm_binds": ("path",),
                "mm_k": (0.0, 2.0), "mm_floor": (0.0,), "mm_fraction": (None, 0.25)}
        hs = HeadlineSettings(budgets=(0.15, 0.25), rules=RULES, im_grid=(0.02, 0.06, 0.12, 0.25, 0.5),
                              fit={"grid": grid, "rounds": 1, "refine": False}, refit={"power": (0.0, 1.0)})
        cfg = BacktestConfig(frozen=True)
        a = evaluate_headline(ctx, pop, cfg, rivals, hs)
        b = evaluate_headline(ctx, pop, cfg, rivals, hs)
        assert a.budgets.keys() == {"0.15", "0.25"}
        for k, e in a.budgets.items():
            budget = float(k)
            assert abs(e["best_static"]["avg_collateral"] - budget) <= 0.005
            for name in ("predictive", "ewma_ccp", "garch_fhs"):
                assert abs(e[name]["avg_collateral"] - budget) <= 0.02, (k, name, e[name]["avg_collateral"])
                sh = e[name]["share_of_bound"]
                assert sh is None or sh <= 1.0 + 1e-9  # the bound is never beaten
            assert e["bound"]["liquidations"] <= e["best_static"]["liquidations"]
            assert set(a.ablation[k]) == {"forecast", "constant_variance", "realised_variance"}
            assert a.ablation[k]["forecast"]["liquidations"] == e["predictive"]["liquidations"]
            assert set(headline_checks(e)) == {"half_of_bound", "beats_ewma_ccp", "beats_garch_fhs",
                                               "procyclicality", "met"}
        assert a.budgets == b.budgets and a.ablation == b.ablation  # same seed, same numbers
