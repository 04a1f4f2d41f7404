"""Equal capital under stress: every policy of a comparison at the same pre-window average collateral."""

from __future__ import annotations

import numpy as np
import pytest

from backtest.budgets import scaled_path
from backtest.population import PopulationConfig
from backtest.simulation import BacktestConfig, run_backtest
from data_pipelines.pipeline import prepare_dataset
from margin.controls import Controls
from stress.budget import BudgetSettings, ScaledPolicy, collateral_spread, place_population
from stress.cascade import CascadeConfig
from stress.compare import PolicySpec, build_policy, context
from stress.scenarios import Scenario, shock_drop
from stress.suite import headline, load_settings

BUDGET = 0.20
POP = PopulationConfig(n_positions=500, seed=3, hold_mean_bars=30, hold_max_bars=150)
CCFG = CascadeConfig(backtest=BacktestConfig(fund_initial=20_000, max_steps_per_bar=10))
SPECS = (
    PolicySpec(name="static_best", kind="static"),
    PolicySpec(name="ewma_ccp", kind="ewma_ccp"),
    PolicySpec(name="garch_fhs", kind="garch_fhs", params={"n_sims": 500}),
    PolicySpec(name="predictive", kind="predictive",
               fit={"max_positions": None, "rounds": 1, "refine": False,
                    "grid": {"power": [0.5], "stress": [0.0], "omega": [0.5], "floor": [0.02], "release": [1.0],
                             "mm_binds": ["path"], "mm_k": [0.0, 2.0], "mm_floor": [0.0], "mm_fraction": [None]}}),
)


@pytest.fixture(scope="module")
def base():
    b = prepare_dataset("bundled:tsd/BTC-15m").bars.iloc[:760][["open", "high", "low", "close", "volume"]]
    return Scenario(name="base", kind="hypothetical", bars=b, start=560, shock=660, end=750, meta={})


@pytest.fixture(scope="module")
def settings():
    return BudgetSettings(collateral=BUDGET, calibration_bars=300, im_grid=(0.05, 0.15, 0.4),
                          mm_fractions=(0.5,), mm_fixed=(0.03,))


@pytest.fixture(scope="module")
def built(base, settings):
    return {s.name: build_policy(s, base, POP, CCFG, Controls(), settings) for s in SPECS}


def pre_window_collateral(pol, scn: Scenario, n_cal: int) -> float:
    """Independently of stress.budget's run: the policy's path, the population over the bars before the
    window, ``run_backtest`` on them."""
    ctx, _ = context(scn.bars, scn, Controls(), cut=True)
    c0 = scn.start - n_cal
    pop = place_population(len(scn.bars), c0, scn.start, POP)
    idx = scn.bars.index
    return run_backtest(scn.bars, pol.path(ctx), pop, CCFG.backtest, start=idx[c0], end=idx[scn.start]).avg_collateral


class TestEqualCapital:
    def test_every_policy_locks_the_budget_before_the_window(self, built, base, settings):
        coll = {name: pre_window_collateral(pol, base, settings.calibration_bars) for name, (pol, _) in built.items()}
        for name, (_, rec) in built.items():
            assert rec["pre_window_avg_collateral"] == pytest.approx(coll[name], abs=1e-12)
            assert abs(coll[name] - BUDGET) <= settings.tol, (name, coll[name])
            assert rec["at_budget"] is True
        assert max(coll.values()) - min(coll.values()) <= 0.005, coll  # the same capital within 0.5 points
        assert collateral_spread([r for _, r in built.values()]) <= 0.005

    def test_how_each_kind_reaches_it(self, built):
        assert built["static_best"][1]["method"] == "static_envelope"
        assert built["predictive"][1]["method"] in ("fit", "fit+scale")
        for name in ("ewma_ccp", "garch_fhs"):
            pol, rec = built[name]
            assert rec["method"] == "scale" and isinstance(pol, ScaledPolicy) and pol.scale == rec["scale"]

    def test_static_is_the_best_pair_at_the_budget(self, built, base, settings):
        from stress.budget import calibration

        ctx, _ = context(base.bars, base, Controls(), cut=True)
        env = calibration(ctx, POP, CCFG.backtest, settings).envelope()
        best = env.brute_force_at(BUDGET, settings.bad_debt_tolerance)
        pol, rec = built["static_best"]
        assert (pol.im, pol.mm) == pytest.approx((best.im, best.mm), rel=1e-9)
        assert rec["pre_window_liquidations"] == best.liquidations

    def test_scaled_policy_is_scaled_path(self, built, base):
        pol, _ = built["ewma_ccp"]
        ctx, _ = context(base.bars, base, Controls())
        ref = scaled_path(pol.policy.path(ctx), pol.scale, ctx.controls)
        np.testing.assert_array_equal(pol.path(ctx).im_rate, ref.im_rate)
        np.testing.assert_array_equal(pol.path(ctx).mm_rate, ref.mm_rate)

    def test_nothing_after_the_window_start_is_seen(self, built, base, settings):
        shocked = shock_drop(base, 0.4, 4)
        for spec in SPECS[:2]:  # the envelope and a scale (garch_fhs is scaled as ewma_ccp)
            _, rec = build_policy(spec, shocked, POP, CCFG, Controls(), settings)
            ref = built[spec.name][1]
            assert rec["pre_window_avg_collateral"] == ref["pre_window_avg_collateral"]
            assert rec.get("scale") == ref.get("scale") and rec.get("pair") == ref.get("pair")

    def test_without_budget_policies_run_as_configured(self, base):
        pol, rec = build_policy(PolicySpec(name="s", kind="static", params={"im": 0.1}), base, POP, CCFG, Controls(),
                                BudgetSettings(calibration_bars=100))
        assert pol.im == 0.1 and rec["method"] == "unbudgeted" and rec["target"] is None
        with pytest.raises(ValueError, match="'s' \\(static\\) needs params.im or a top-level budget"):
            build_policy(PolicySpec(name="s", kind="static"), base, POP, CCFG, Controls(),
                         BudgetSettings(calibration_bars=100))


class TestSettings:
    def test_errors_name_field_and_value(self):
        with pytest.raises(ValueError, match="budget.collateral must be in \\(0, 1\\] .*got 1.5"):
            BudgetSettings.from_dict({"collateral": 1.5})
        with pytest.raises(ValueError, match="budget.tol must be in \\(0, 0.005\\] \\(0.5 points\\), got 0.01"):
            BudgetSettings.from_dict({"collateral": 0.2, "tol": 0.01})
        with pytest.raises(ValueError, match="budget has unknown keys \\['colateral'\\]"):
            BudgetSettings.from_dict({"colateral": 0.2})
        with pytest.raises(ValueError, match="calibration_bars must be an integer >= 10, got 5"):
            BudgetSettings.from_dict({"collateral": 0.2, "calibration_bars": 5})
        assert BudgetSettings.from_dict(0.25).collateral == 0.25

    def test_policy_budget_key_points_to_the_top_level(self):
        with pytest.raises(ValueError, match="policies\\[0\\].budget is not a policy key \\(got 0.1\\).*budget.collateral"):
            load_settings({"policies": [{"name": "s", "kind": "static", "budget": 0.1}]})
        with pytest.raises(ValueError, match="scenarios.intraday.calibration_bars must be an integer >= 10, got 3"):
            load_settings({"policies": [{"name": "e", "kind": "ewma_ccp"}],
                           "scenarios": {"intraday": {"calibration_bars": 3}}})

    def test_headline_states_the_capital(self):
        def pol(liq, c):
            return {"liquidated_notional": liq, "bad_debt": 0.0, "self_inflicted_share": 0.0,
                    "budget": {"pre_window_avg_collateral": c}}

        res = {"a": {"ranking": ["x", "y"], "budget": {"spread": 0.001},
                     "policies": {"x": pol(1.0, 0.2005), "y": pol(2.0, 0.1995)}}}
        h = headline(res, {}, 0.2)
        assert h["least_amplifying"] == "x" and h["budget"]["max_spread"] == 0.001
        assert h["statement"].startswith("At equal capital (every policy locks 20.0% average collateral on the bars "
                                         "before each window: 19.95-20.05%, at most 0.10 points apart")
