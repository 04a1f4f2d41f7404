"""Cascade engine: equal to the backtest with the feedback off, a hand-calculated cascade, the plain loop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from backtest.factory import make_policy
from backtest.population import Population, PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, reference_backtest, run_backtest
from data_pipelines.pipeline import prepare_dataset
from margin.params import LiquidationSettings
from margin.path import MarginPath
from margin.policies import PolicyContext
from stress.agents import AgentConfig
from stress.cascade import CascadeConfig, run_cascade
from stress.impact import ImpactModel
from stress.reference import reference_cascade


@pytest.fixture(scope="module")
def btc():
    return prepare_dataset("bundled:bitstamp/BTC").bars.iloc[-450:]


@pytest.fixture(scope="module")
def pop(btc):
    return generate_population(len(btc), PopulationConfig(n_positions=2500, seed=5))


class TestEqualsBacktest:
    """Impact, volume slippage (frozen), agents and the oracle's delay off: the backtest's numbers exactly."""

    @pytest.mark.parametrize("policy", ["static_0.10", "ewma_ccp", "predictive"])
    def test_one_step_per_bar_exact(self, btc, pop, policy):
        path = make_policy(policy).path(PolicyContext(bars=btc))
        cfg = BacktestConfig(frozen=True, max_steps_per_bar=1)
        r = run_backtest(btc, path, pop, cfg, per_position=True)
        c = run_cascade(btc, path, pop, CascadeConfig(backtest=cfg), per_position=True)
        assert r.liquidations > 50  # the comparison means something
        assert (c.liquidations, c.liquidation_events) == (r.liquidations, r.liquidation_events)
        assert c.bad_debt == pytest.approx(r.bad_debt, rel=1e-12, abs=1e-9)
        assert c.liquidated_notional == pytest.approx(r.liquidated_notional, rel=1e-12)
        np.testing.assert_allclose(c.series["fund"].to_numpy(), r.series["fund"].to_numpy(), rtol=1e-12)
        np.testing.assert_array_equal(c.per_position["liquidation_events"], r.per_position["liquidation_events"])
        np.testing.assert_allclose(c.per_position["bad_debt"], r.per_position["bad_debt"], rtol=1e-10, atol=1e-9)
        assert c.cascade_depth == 1
        assert c.ledger_residual < 1e-9

    def test_steps_within_bar(self, btc, pop):
        """Many steps per bar: the engine's rule step by step equals the backtest's closed form (and its loop)."""
        path = make_policy("ewma_ccp").path(PolicyContext(bars=btc))
        cfg = BacktestConfig(frozen=True)
        r = run_backtest(btc, path, pop, cfg, per_position=True)
        c = run_cascade(btc, path, pop, CascadeConfig(backtest=cfg), per_position=True)
        ref = reference_backtest(btc, path, pop, cfg)
        assert c.liquidations == r.liquidations
        assert c.liquidated_notional == pytest.approx(r.liquidated_notional, rel=1e-9)
        assert c.bad_debt == pytest.approx(r.bad_debt, rel=1e-9, abs=1e-6)
        np.testing.assert_allclose(c.series["fund"].to_numpy(), r.series["fund"].to_numpy(), rtol=1e-9)
        # step counts: the plain loop exactly (the closed form may round a boundary step differently)
        np.testing.assert_array_equal(c.per_position["liquidation_events"], ref["liquidation_events"])


def _hand_population(n_bars: int) -> Population:
    cfg = PopulationConfig(n_positions=3, topup_prob=0.0, fee_rate=0.0, funding_rate=0.0)
    return Population(open_bar=np.zeros(3, dtype=np.int64), hold_bars=np.full(3, 5), side=np.ones(3),
                      leverage_draw=np.array([20.0, 10.0, 8.0]), notional=np.full(3, 1000.0),
                      topup_u=np.full(3, 0.5), n_bars=n_bars, cfg=cfg)


class TestHandCascade:
    def test_linear_impact_three_waves(self):
        """Three longs (entry 100, margins 5 %, 10 %, 12.5 %, MM 1 %): lp = (100 - w/q) / 0.99 =
        95.9596, 90.9091, 88.3838. The bar's low 95 reaches the first; each full close sells q × lp; linear impact
        0.05 × cumulative sold / 1000 USD pushes the low to 95 e^-Δ, reaching the next."""
        idx = pd.date_range("2024-01-01", periods=3, freq="h", tz="UTC")
        bars = pd.DataFrame({"open": [100.0, 100.0, 90.0], "high": [100.0, 100.0, 90.0], "low": [100.0, 95.0, 90.0],
                             "close": [100.0, 97.0, 90.0]}, index=idx)
        path = MarginPath(times=idx, im_rate=np.full(3, 0.01), mm_rate=np.full(3, 0.01), policy="hand")
        liq = LiquidationSettings(penalty_rate=0.0, max_close_fraction=1e-9, slippage_base=0.0, slippage_range_coef=0.0,
                                  slippage_volume_coef=0.0)
        bt = BacktestConfig(liquidation=liq, fund_initial=1e6, topups=False, funding=False, fees=False)
        imp = ImpactModel(kind="linear", coef=0.05, depth_usd=1000.0, vol_elasticity=0.0, lp_withdrawal=0.0,
                          resilience=0.0, max_impact=10.0)
        res = run_cascade(bars, path, _hand_population(3), CascadeConfig(backtest=bt, impact=imp))
        lps = [(100 - 5) / 0.99, (100 - 10) / 0.99, (100 - 12.5) / 0.99]
        sold = 0.0
        low = 95.0
        depth = 0
        for lp in lps:  # by hand: each wave's low reaches the next liquidation price
            assert low <= lp
            sold += 10.0 * lp
            depth += 1
            low = 95.0 * math.exp(-0.05 * sold / 1000.0)
        assert res.cascade_depth == depth == 3
        assert res.liquidations == 3
        assert res.liquidated_notional == pytest.approx(sold, rel=1e-12)
        assert res.series["mark_close"].iloc[1] == pytest.approx(97.0 * math.exp(-0.05 * sold / 1000.0), rel=1e-12)
        assert res.series["mark_low"].iloc[1] == pytest.approx(low, rel=1e-12)
        assert res.impact_from_liquidations == pytest.approx(1 - math.exp(-0.05 * sold / 1000.0), rel=1e-12)
        assert res.bad_debt == 0.0

    def test_no_impact_one_wave(self):
        idx = pd.date_range("2024-01-01", periods=3, freq="h", tz="UTC")
        bars = pd.DataFrame({"open": [100.0, 100.0, 90.0], "high": [100.0, 100.0, 90.0], "low": [100.0, 95.0, 90.0],
                             "close": [100.0, 97.0, 90.0]}, index=idx)
        path = MarginPath(times=idx, im_rate=np.full(3, 0.01), mm_rate=np.full(3, 0.01), policy="hand")
        bt = BacktestConfig(fund_initial=1e6, topups=False, funding=False, fees=False)
        res = run_cascade(bars, path, _hand_population(3), CascadeConfig(backtest=bt))
        assert res.cascade_depth == 1
        assert res.series["mark_close"].iloc[1] == 97.0


class TestPlainLoop:
    def test_impact_matches_loop(self, btc):
        b = btc.iloc[-300:]
        pop = generate_population(len(b), PopulationConfig(n_positions=800, seed=2, topup_prob=0.0))
        path = make_policy("ewma_ccp").path(PolicyContext(bars=b))
        cfg = CascadeConfig(backtest=BacktestConfig(frozen=True, topups=False, fund_initial=1e6),
                            impact=ImpactModel(kind="sqrt", coef=0.3, depth_usd=1e7))
        c = run_cascade(b, path, pop, cfg, per_position=True)
        r = reference_cascade(b, path, pop, cfg)
        assert c.cascade_depth > 1  # cascades happened
        assert c.liquidated_notional == pytest.approx(r["liquidated_notional"], rel=1e-10)
        assert c.liquidation_events == r["events"]
        np.testing.assert_array_equal(c.series["waves"].to_numpy(), r["waves"])
        np.testing.assert_allclose(c.series["fund"].to_numpy(), r["fund"], rtol=1e-10)
        np.testing.assert_allclose(c.per_position["bad_debt"], r["bad_debt_pp"], rtol=1e-9, atol=1e-7)


class TestBehaviour:
    def test_deterministic_with_seed(self, btc):
        btc = btc.iloc[-150:]
        pop = generate_population(len(btc), PopulationConfig(n_positions=800, seed=5))
        path = make_policy("static_0.10").path(PolicyContext(bars=btc))
        cfg = CascadeConfig(impact=ImpactModel(depth_usd=2e7), agents=AgentConfig(noise_usd=3e4, momentum_usd=1e4, seed=3))
        a = run_cascade(btc, path, pop, cfg)
        b = run_cascade(btc, path, pop, cfg)
        pd.testing.assert_frame_equal(a.series, b.series)
        c = run_cascade(btc, path, pop, CascadeConfig(impact=cfg.impact, agents=AgentConfig(noise_usd=3e4, seed=4)))
        assert not np.array_equal(a.series["market_close"].to_numpy(), c.series["market_close"].to_numpy())

    def test_agents_watch_what_the_simulation_adds(self, btc):
        """With no liquidation (margin 100 %), agents on the deviation from the exogenous bars never trade and the
        market is the bars; on the price, momentum with square-root impact drives it away on its own."""
        btc = btc.iloc[-150:]
        pop = generate_population(len(btc), PopulationConfig(n_positions=300, seed=5, leverage_max=1.0))
        path = MarginPath(times=btc.index, im_rate=np.full(len(btc), 1.0), mm_rate=np.full(len(btc), 1e-4),
                          policy="full")
        ag = AgentConfig(momentum_usd=2e4, mean_reversion_usd=1e4, mm_absorb=0.2, mm_capacity_usd=2e6)
        imp = ImpactModel(kind="sqrt", coef=0.3, depth_usd=5e7)
        dev = run_cascade(btc, path, pop, CascadeConfig(impact=imp, agents=ag))
        assert dev.liquidated_notional == 0.0
        np.testing.assert_array_equal(dev.series["agent_flow"].to_numpy(), 0.0)
        np.testing.assert_allclose(dev.series["market_close"].to_numpy(), btc["close"].to_numpy(), rtol=1e-12)
        price = run_cascade(btc, path, pop, CascadeConfig(impact=imp, agents=AgentConfig(**{**ag.to_dict(),
                                                                                          "signal": "price"})))
        assert np.max(np.abs(price.series["market_close"].to_numpy() / btc["close"].to_numpy() - 1)) > 0.02
        with pytest.raises(ValueError, match="agents.signal must be 'deviation' or 'price', got 'pnl'"):
            AgentConfig(signal="pnl")

    def test_more_impact_more_liquidation(self, btc):
        btc = btc.iloc[-250:]
        pop = generate_population(len(btc), PopulationConfig(n_positions=1500, seed=5))
        path = make_policy("static_0.10").path(PolicyContext(bars=btc))
        out = [run_cascade(btc, path, pop, CascadeConfig(impact=ImpactModel(kind="linear", coef=k, depth_usd=5e7)))
               for k in (0.0, 0.5, 2.0)]
        assert out[0].liquidated_notional <= out[1].liquidated_notional <= out[2].liquidated_notional
        assert out[2].cascade_depth > 1
        assert all(o.ledger_residual < 1e-9 for o in out)

    def test_oracle_delay_removes_in_bar_waves(self, btc, pop):
        from stress.impact import Oracle

        path = make_policy("static_0.10").path(PolicyContext(bars=btc))
        imp = ImpactModel(kind="linear", coef=2.0, depth_usd=5e7)
        r = run_cascade(btc, path, pop, CascadeConfig(impact=imp, oracle=Oracle(delay_bars=1)))
        assert r.cascade_depth == 1  # the delayed oracle does not see the impact within the bar
        assert r.ledger_residual < 1e-9

    def test_misaligned_path(self, btc, pop):
        path = make_policy("static_0.10").path(PolicyContext(bars=btc.iloc[:-1]))
        with pytest.raises(ValueError, match="same bars"):
            run_cascade(btc, path, pop)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="cascade.max_waves must be an integer >= 1, got 0"):
            CascadeConfig(max_waves=0)
        with pytest.raises(ValueError, match="impact.kind must be 'none', 'linear' or 'sqrt', got 'cubic'"):
            ImpactModel(kind="cubic")
