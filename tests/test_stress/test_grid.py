"""The dynamic grid under stress: its single-perp reduction, the static equivalence, the budget."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from backtest.population import PopulationConfig
from backtest.simulation import BacktestConfig
from data_pipelines.pipeline import prepare_dataset
from margin.accounts import MarketData, Portfolio
from margin.controls import Controls
from margin.dynamic_grid import DynamicGridPolicy
from margin.engine import compute_margin
from margin.instruments import Instrument
from margin.policies import StaticPolicy
from stress.budget import BudgetSettings
from stress.cascade import CascadeConfig
from stress.compare import KEYS, PolicySpec, build_policy, context, stress_policy
from stress.grid import UNDERLYING, GridPerpPolicy, build_dynamic_grid
from stress.impact import ImpactModel
from stress.scenarios import Scenario, shock_drop

CONTROLS = Controls(floor=0.02, ceiling=0.5, max_change=0.25, notice_bars=1, mm_fraction=0.5)
POP = PopulationConfig(n_positions=800, seed=2, hold_mean_bars=40, hold_max_bars=200)
CCFG = CascadeConfig(backtest=BacktestConfig(fund_initial=20_000, max_steps_per_bar=10),
                     impact=ImpactModel(kind="sqrt", coef=0.3, depth_usd=2e7))


@pytest.fixture(scope="module")
def base():
    b = prepare_dataset("bundled:tsd/BTC-15m").bars.iloc[:760][["open", "high", "low", "close", "volume"]]
    return Scenario(name="base", kind="hypothetical", bars=b, start=560, shock=660, end=750, meta={})


def _one_perp(qty: float, price: float) -> Portfolio:
    now = pd.Timestamp("2021-01-01", tz="UTC").to_pydatetime()
    inst = [Instrument(f"{UNDERLYING}-PERP", "linear_perp", UNDERLYING)]
    market = MarketData({UNDERLYING: price}, {}, {}, {"USDC": 1.0})
    return Portfolio.from_arrays(inst, np.array([[qty]]), np.array([[price]]), market, now,
                                 balances=np.full((1, 1), 1e6))


class TestReduction:
    @pytest.mark.parametrize("mm_fraction,scale", [(0.8, 1.0), (0.5, 2.3)])
    def test_rates_are_the_portfolio_engines_margin_of_one_perp(self, base, mm_fraction, scale):
        """IM = the opening grid's margin / notional, MM = the open grid's MM / notional, bar by bar (the
        portfolio engine on the GridPath's parameters), long and short."""
        ctx, _ = context(base.bars, base, CONTROLS)
        pol = GridPerpPolicy(grid=DynamicGridPolicy(k=12.0, mm_fraction=mm_fraction), scale=scale)
        path, gp = pol.path(ctx), pol.grid_path(ctx)
        assert len(set(np.round(path.im_rate, 6))) > 50  # the range moves
        for t in (0, 300, 600, 659, 700, 759):
            for qty in (2.0, -3.0):
                pf = _one_perp(qty, 100.0)
                notional = abs(qty) * 100.0
                new = compute_margin(pf, gp.params_at(t, opening=True), "portfolio", liquidation_price=False)
                opn = compute_margin(pf, gp.params_at(t), "portfolio", liquidation_price=False)
                assert new.im[0] / notional == pytest.approx(path.im_rate[t], rel=1e-9)
                assert opn.mm[0] / notional == pytest.approx(path.mm_rate[t], rel=1e-9)

    def test_controls_are_the_comparisons(self, base):
        ctx, _ = context(base.bars, base, replace(CONTROLS, ceiling=0.03))
        p = GridPerpPolicy(grid=DynamicGridPolicy(k=3.0)).path(ctx)
        assert p.im_rate.max() <= 0.03 + 1e-15 and p.im_rate.min() >= 0.02 - 1e-15

    def test_errors(self):
        with pytest.raises(ValueError, match="dynamic_grid scale must be > 0, got -1"):
            GridPerpPolicy(scale=-1)
        with pytest.raises(ValueError, match="unknown params \\['kk'\\]"):
            build_dynamic_grid(PolicySpec(name="g", kind="dynamic_grid", params={"kk": 1}), None)


class TestStaticEquivalence:
    def test_frozen_vol_fixed_k_equals_the_static_pair(self, base):
        """A constant forecast and frozen vol shock: the range is one r, and the stress run is the static pair
        (IM r, MM mm_fraction × r) number for number."""
        k, r, mmf = 2.5, 0.12, 0.8
        sigma = math.log1p(r) / k
        grid = GridPerpPolicy(grid=DynamicGridPolicy(k=k, vol_shock=0.25, correlation="none", mm_fraction=mmf),
                              sigma=sigma)
        ctx, _ = context(base.bars, base, CONTROLS)
        im = grid.path(ctx).im_rate
        assert np.ptp(im) == 0.0 and im[0] == pytest.approx(r, rel=1e-12)
        static = StaticPolicy(im=float(im[0]), mm=mmf * float(im[0]))
        scn = shock_drop(base, 0.25, 4)
        a = stress_policy(scn, grid, POP, CCFG, CONTROLS, feedback_rounds=1)
        b = stress_policy(scn, static, POP, CCFG, CONTROLS, feedback_rounds=1)
        assert a["liquidated_notional"] > 0
        for key in KEYS:
            assert a[key] == b[key], key
        assert a["details"] == b["details"]
        pd.testing.assert_frame_equal(a["series"], b["series"])
        assert a["self_inflicted_share"] == 0.0  # nothing moves: nothing self-inflicted


class TestBudget:
    def test_fit_at_the_budget(self, base):
        settings = BudgetSettings(collateral=0.2, calibration_bars=300, im_grid=(0.05, 0.15, 0.4), mm_fractions=(0.5,),
                                  mm_fixed=(0.03,))
        spec = PolicySpec(name="dynamic_grid", kind="dynamic_grid", params={"k": 3.0},
                          fit={"mm_fraction": [0.5, 0.8]})
        pol, rec = build_policy(spec, base, POP, CCFG, CONTROLS, settings)
        assert isinstance(pol, GridPerpPolicy)
        assert abs(rec["pre_window_avg_collateral"] - 0.2) <= settings.tol and rec["at_budget"]
        assert rec["method"] == "fit" and rec["scale"] == pol.scale != 1.0
        assert rec["grid"]["mm_fraction"] in (0.5, 0.8)
        with pytest.raises(ValueError, match="fit takes one key, mm_fraction"):
            build_policy(replace(spec, fit={"k": [1, 2]}), base, POP, CCFG, CONTROLS, settings)
