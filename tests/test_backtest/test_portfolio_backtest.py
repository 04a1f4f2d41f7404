"""Portfolio-margin backtest: hand-worked liquidations, determinism, orderings, static equivalence, identity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from backtest.portfolio_backtest import PortfolioBacktestConfig, margin_orderings, run_portfolio_backtest
from backtest.portfolio_population import (
    SLOTS,
    AccountPopulation,
    AccountPopulationConfig,
    CycleBook,
    generate_accounts,
)
from margin.controls import Controls
from margin.dynamic_grid import DynamicGridPolicy, static_grid_path
from margin.instruments import Instrument
from margin.params import CollateralHaircuts, LiquidationSettings, MarginParams
from margin.policies import PolicyContext
from models.base import VolatilityForecast

FREE = Controls(floor=1e-4, ceiling=0.95, max_change=1e6, notice_bars=0)


def _closes(n: int = 90, seed: int = 42) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    times = pd.date_range("2019-01-01", periods=n, freq="D", tz="UTC")
    z = rng.standard_normal((n, 3))
    r = np.c_[0.04 * z[:, 0], 0.05 * (0.8 * z[:, 0] + 0.6 * z[:, 1]), 0.06 * (0.7 * z[:, 0] + 0.7 * z[:, 2])]
    r[0] = 0.0
    return pd.DataFrame(np.exp(np.cumsum(r, axis=0)) * [8000.0, 300.0, 60.0], index=times,
                        columns=["BTC", "ETH", "LTC"])


def _contexts(closes: pd.DataFrame, var: float | None = None) -> dict[str, PolicyContext]:
    out = {}
    for u in closes.columns:
        bars = pd.DataFrame({"close": closes[u]})
        r = np.r_[0.0, np.diff(np.log(closes[u].to_numpy()))]
        v = np.full(len(bars), var) if var is not None else np.maximum(
            pd.Series(r**2).ewm(alpha=0.06).mean().to_numpy(), 1e-6)
        fc = VolatilityForecast(origins=bars.index, variance=v[:, None], model="test")
        out[u] = PolicyContext(bars=bars, forecast=fc, controls=FREE)
    return out


@pytest.fixture(scope="module")
def small():
    closes = _closes()
    pop = generate_accounts(closes, AccountPopulationConfig(n_accounts=60, cycle_bars=20, seed=7))
    return closes, pop


class TestHandWorked:
    """Two accounts, one long BTC perp each, a ±10 % grid (IM = 10 on a 100 notional, MM = 0.8 × 10 % × mark)."""

    def _pop(self) -> AccountPopulation:
        times = pd.date_range("2020-01-01", periods=3, freq="D", tz="UTC")
        closes = np.array([[100.0], [93.0], [78.0]])
        book = CycleBook(start=0, stop=2, instruments=(Instrument("BTC-PERP", "linear_perp", "BTC"),),
                         positions=np.array([[1.0], [1.0]]), carry=0.0)
        return AccountPopulation(underlyings=("BTC",), times=times, closes=closes, iv=np.full((3, 1), 0.5),
                                 pool_index=np.array([0, 1]), strategy=np.array(["directional"] * 2, dtype=object),
                                 slot=np.array([0, 0]), buffer=np.array([1.0, 2.0]), tops_up=np.array([False, False]),
                                 cycles=(book,), cfg=AccountPopulationConfig(n_accounts=2))

    def test_exact_liquidations_and_bad_debt(self):
        pop = self._pop()
        path = static_grid_path(pop.times, ("BTC",), 0.10, mm_fraction=0.8)
        hc = CollateralHaircuts(tier_haircuts=(("stablecoin", 0.0), ("major", 0.1), ("long_tail", 0.35)))
        liq = LiquidationSettings(penalty_rate=0.005, slippage_base=0.0, slippage_range_coef=0.0,
                                  slippage_volume_coef=0.0, insurance_fund_initial=1.0)
        cfg = PortfolioBacktestConfig(liquidation=liq, template=MarginParams(market_id="_", im_rate=0.1, mm_rate=0.05,
                                                                             haircuts=hc))
        res = run_portfolio_backtest(pop, path, cfg)
        # opening: A posts 10, B posts 20. Bar 1 (93): A equity 3, MM 7.44, health 0.40; closing half would not
        # restore 1.05 (f = (1.05*7.44 - 3) / (1.05*7.44 - 0.465) = 0.655 > 0.5): full close, penalty 0.465,
        # returned 2.535. Bar 2 (78): B equity 20 - 22 = -2: full close, bad debt 2, the fund (1 + 0.465) pays
        # 1.465, 0.535 is uncovered.
        assert res.liquidations == 2 and res.full_closes == 2 and res.liquidation_events == 2
        assert res.penalties == pytest.approx(0.465, abs=1e-12)
        assert res.bad_debt == pytest.approx(2.0, abs=1e-12)
        assert res.fund_draw == pytest.approx(1.465, abs=1e-12)
        assert res.uncovered_bad_debt == pytest.approx(0.535, abs=1e-12)
        assert res.fund_end == pytest.approx(0.0, abs=1e-12)
        assert list(res.per_pool["bad_debt"]) == pytest.approx([0.0, 2.0])
        assert res.ledger_residual < 1e-12
        assert res.avg_collateral == pytest.approx((10 + 20 + 20) / (2 * 100 * 2), rel=1e-12)

    def test_partial_close(self):
        pop = self._pop()
        pop = AccountPopulation(**{**pop.__dict__, "closes": np.array([[100.0], [96.0], [96.0]]),
                                   "buffer": np.array([1.0, 1.0])})
        path = static_grid_path(pop.times, ("BTC",), 0.10, mm_fraction=0.8)
        hc = CollateralHaircuts(tier_haircuts=(("stablecoin", 0.0), ("major", 0.1), ("long_tail", 0.35)))
        liq = LiquidationSettings(penalty_rate=0.005, slippage_base=0.0, slippage_range_coef=0.0,
                                  slippage_volume_coef=0.0, insurance_fund_initial=1.0)
        cfg = PortfolioBacktestConfig(liquidation=liq, template=MarginParams(market_id="_", im_rate=0.1, mm_rate=0.05,
                                                                             haircuts=hc))
        res = run_portfolio_backtest(pop, path, cfg)
        # bar 1 (96): equity 6, MM 7.68; f = (1.05*7.68 - 6) / (1.05*7.68 - 0.48) = 2.064 / 7.584 (partial)
        f = (1.05 * 7.68 - 6.0) / (1.05 * 7.68 - 0.48)
        assert res.liquidations == 2 and res.full_closes == 0 and res.bad_debt == 0.0
        assert res.penalties == pytest.approx(2 * f * 0.48, rel=1e-9)


class TestProperties:
    def test_deterministic_with_seed(self):
        closes = _closes(60)
        cfg = AccountPopulationConfig(n_accounts=40, cycle_bars=15, seed=11)
        path = static_grid_path(closes.index, tuple(closes.columns), 0.12)
        a = run_portfolio_backtest(generate_accounts(closes, cfg), path).metrics()
        b = run_portfolio_backtest(generate_accounts(closes, cfg), path).metrics()
        assert a == b
        c = run_portfolio_backtest(generate_accounts(closes, AccountPopulationConfig(n_accounts=40, cycle_bars=15,
                                                                                      seed=12)), path).metrics()
        assert c != a

    def test_orderings_every_account_every_bar(self, small):
        closes, pop = small
        path = DynamicGridPolicy(k=2.5, stress_base=0.0, stress_slope=0.0, controls=FREE).path(_contexts(closes))
        seen = {"n": 0}

        def check(t, pf, prm):
            m = margin_orderings(pf, prm)
            assert np.all(m["portfolio"] <= m["cross"] * (1 + 1e-12) + 1e-9), t
            assert np.all(m["cross"] <= m["isolated"] * (1 + 1e-12) + 1e-9), t
            seen["n"] += 1
            if seen["n"] == 1:
                assert np.any(m["portfolio"] < m["cross"] - 1e-6)  # offsets do bite somewhere

        run_portfolio_backtest(pop, path, on_bar=check)
        assert seen["n"] == len(pop.times) - 1

    def test_frozen_dynamic_equals_static_run(self, small):
        closes, pop = small
        k, r = 2.0, 0.14
        ctx = _contexts(closes, var=(math.log1p(r) / k) ** 2)
        dyn = DynamicGridPolicy(k=k, vol_shock=0.25, correlation="none", controls=FREE).path(ctx)
        st = static_grid_path(closes.index, tuple(closes.columns), r)
        a = run_portfolio_backtest(pop, dyn).metrics()
        b = run_portfolio_backtest(pop, st).metrics()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key

    def test_cross_mode_and_identity(self, small):
        closes, pop = small
        path = static_grid_path(closes.index, tuple(closes.columns), 0.08)
        for mode in ("cross", "portfolio"):
            res = run_portfolio_backtest(pop, path, PortfolioBacktestConfig(mode=mode))
            assert res.ledger_residual < 1e-9
            assert res.n_account_cycles == pop.n_pools * len(pop.cycles)
            assert res.bad_debt == pytest.approx(res.fund_draw + res.uncovered_bad_debt, abs=1e-6)

    def test_wider_grid_fewer_liquidations(self, small):
        closes, pop = small
        narrow = run_portfolio_backtest(pop, static_grid_path(closes.index, tuple(closes.columns), 0.05))
        wide = run_portfolio_backtest(pop, static_grid_path(closes.index, tuple(closes.columns), 0.30))
        assert wide.avg_collateral > narrow.avg_collateral and wide.liquidations <= narrow.liquidations


class TestPopulation:
    def test_books_and_collateral(self, small):
        closes, pop = small
        assert set(pop.strategy) <= {"directional", "basis", "covered_call", "short_straddle", "pair", "subaccounts"}
        assert pop.n_rows == pop.n_pools + int((pop.strategy == "subaccounts").sum())
        assert SLOTS[4][1] != "ethereum"  # one bridged slot
        c0 = pop.cycles[0]
        assert len(c0.instruments) == 18 and c0.positions.shape == (pop.n_rows, 18)
        assert np.all(np.abs(c0.positions).sum(axis=1) > 0)
        assert np.all(pop.iv >= 0.2)

    def test_errors(self):
        with pytest.raises(ValueError, match="unknown strategies"):
            AccountPopulationConfig(strategy_weights={"martingale": 1.0})
        with pytest.raises(ValueError, match="mode must be"):
            PortfolioBacktestConfig(mode="isolated")
