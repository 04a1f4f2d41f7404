"""The portfolio clairvoyant bound (never beaten, account by account) and the headline at budgets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from backtest.portfolio_backtest import PortfolioBacktestConfig, run_portfolio_backtest
from backtest.portfolio_headline import (
    PortfolioBound,
    PortfolioHeadlineSettings,
    portfolio_bound,
    portfolio_headline,
)
from backtest.portfolio_population import AccountPopulationConfig, generate_accounts
from margin.controls import Controls
from margin.dynamic_grid import DynamicGridPolicy, static_grid_path
from margin.policies import PolicyContext
from models.base import VolatilityForecast

FREE = Controls(floor=1e-4, ceiling=0.95, max_change=1e6, notice_bars=0)


def _market(n: int = 100, seed: int = 42):
    rng = np.random.default_rng(seed)
    times = pd.date_range("2019-01-01", periods=n, freq="D", tz="UTC")
    vol = 0.03 * np.exp(np.cumsum(rng.standard_normal(n) * 0.1))
    z = rng.standard_normal((n, 3))
    r = np.c_[z[:, 0], 0.8 * z[:, 0] + 0.6 * z[:, 1], 0.7 * z[:, 0] + 0.71 * z[:, 2]] * vol[:, None]
    r[0] = 0.0
    closes = pd.DataFrame(np.exp(np.cumsum(r, axis=0)) * [8000.0, 300.0, 60.0], index=times,
                          columns=["BTC", "ETH", "LTC"])
    fcs = {u: VolatilityForecast(origins=times, variance=(vol**2)[:, None], model="oracle") for u in closes.columns}
    return closes, fcs


def _ctx(closes, fcs):
    return {u: PolicyContext(bars=pd.DataFrame({"close": closes[u]}), forecast=fcs[u], controls=FREE)
            for u in closes.columns}


class TestKnapsack:
    def test_hand_worked(self):
        b = PortfolioBound(survive=np.array([5.0, 3.0, 10.0]), liquidate=np.array([1.0, 1.0, 1.0]), exposure=10.0)
        # the least lockable is 3 (every account liquidated after one bar); survivals cost 2, 4, 9 more
        assert b.at(0.2) == 3 and b.at(0.3) == 3
        assert b.at(0.5) == 2 and b.at(0.9) == 1 and b.at(1.8) == 0


class TestNeverBeaten:
    def test_account_by_account_lemma(self):
        closes, fcs = _market(40)
        pop = generate_accounts(closes, AccountPopulationConfig(n_accounts=50, cycle_bars=39, seed=3))
        assert len(pop.cycles) == 1
        cfg = PortfolioBacktestConfig()
        bound = portfolio_bound(pop, cfg)
        paths = [static_grid_path(closes.index, tuple(closes.columns), r) for r in (0.03, 0.1, 0.3)]
        paths.append(DynamicGridPolicy(k=2.0, controls=FREE).path(_ctx(closes, fcs)))
        for p in paths:
            res = run_portfolio_backtest(pop, p, cfg)
            hit = res.per_pool["liquidations"] > 0
            coll = res.per_pool["collateral"]
            # survivors lock at least the least solvent collateral; liquidated accounts at least one bar of the floor
            assert np.all(coll[~hit] >= bound.survive[~hit] * (1 - 1e-9) - 1e-6), p.policy
            assert np.all(coll[hit] >= bound.liquidate[hit] * (1 - 1e-9) - 1e-6), p.policy
            assert bound.at(res.avg_collateral) <= res.liquidations

    @pytest.mark.parametrize("mode", ["portfolio", "cross"])
    def test_policies_never_beat_bound(self, mode):
        closes, fcs = _market(100)
        pop = generate_accounts(closes, AccountPopulationConfig(n_accounts=40, cycle_bars=15, seed=5))
        cfg = PortfolioBacktestConfig(mode=mode)
        bound = portfolio_bound(pop, cfg)
        paths = [static_grid_path(closes.index, tuple(closes.columns), r) for r in (0.04, 0.12)]
        paths.append(DynamicGridPolicy(k=2.5, controls=FREE).path(_ctx(closes, fcs)))
        for p in paths:
            res = run_portfolio_backtest(pop, p, cfg)
            assert bound.at(res.avg_collateral) <= res.liquidations, p.policy
            assert bound.exposure == pytest.approx(res.exposure, rel=1e-12)


class TestHeadline:
    def test_keys_and_share_at_most_one(self):
        closes, fcs = _market(100)
        bars = {u: pd.DataFrame({"close": closes[u]}) for u in closes.columns}
        st = PortfolioHeadlineSettings(budgets=(0.2,), fit_grid=({"vol_k": 2.0, "stress_slope": 1.0},),
                                       static_mm_fractions=(0.8,), collateral_tol=5e-3)
        out = portfolio_headline(bars, fcs, None, closes.index[60], 7, settings=st,
                                 population=AccountPopulationConfig(n_accounts=20, cycle_bars=10))
        b = out["0.2"]
        assert set(b) >= {"best_static", "bound", "dynamic_grid", "ablation"}
        dg = b["dynamic_grid"]
        assert set(dg) >= {"liquidations", "bad_debt", "avg_collateral", "share_of_bound"}
        assert dg["bound_here"] <= dg["liquidations"]
        if dg["share_of_bound"] is not None:
            assert dg["share_of_bound"] <= 1.0 + 1e-12
        assert set(b["ablation"]) == {"forecast", "constant_variance"}
        assert out["_meta"]["held_out_first_cycle_bar"] >= 60

    def test_cut_validation(self):
        closes, fcs = _market(60)
        bars = {u: pd.DataFrame({"close": closes[u]}) for u in closes.columns}
        with pytest.raises(ValueError, match="leaves"):
            portfolio_headline(bars, fcs, None, closes.index[5], 1,
                               population=AccountPopulationConfig(n_accounts=5, cycle_bars=10))
