"""Contagion across venues: value conserved, spill-over through collateral, bridge outage, depeg."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stress.impact import ImpactModel
from stress.scenarios import joint_prices
from stress.venues import VenueConfig, run_contagion

T = 30


def _prices(drop: float = 0.25, depeg: float = 0.0) -> pd.DataFrame:
    idx = pd.date_range("2022-01-01", periods=T, freq="D", tz="UTC")
    rng = np.random.default_rng(0)
    btc = pd.Series(40000 * np.exp(np.cumsum(0.01 * rng.standard_normal(T))), index=idx)
    eth = pd.Series(3000 * np.exp(np.cumsum(0.012 * rng.standard_normal(T))), index=idx)
    return joint_prices(btc, eth, 10, correlation_one=True, drop=drop, drop_bars=2, depeg=depeg, depeg_bars=2)


def _rates(im: float = 0.1, mm: float = 0.05) -> dict:
    return {a: (np.full(T, im), np.full(T, mm)) for a in ("BTC", "ETH")}


IMPACT = ImpactModel(kind="sqrt", coef=0.3, depth_usd=3e7, resilience=0.0)


class TestConservation:
    @pytest.mark.parametrize("mode", ["cross", "portfolio"])
    def test_cash_and_units_conserved(self, mode):
        r = run_contagion(_prices(), _rates(), VenueConfig(n_traders=400, perp_mode=mode), IMPACT)
        assert r.perp_liquidations > 0 and r.lending_liquidations > 0
        cons = r.conservation()
        assert cons["cash"] < 1e-6 * (r.liquidated_notional + 1.0)
        assert cons["units_btc"] < 1e-9 and cons["units_eth"] < 1e-9

    def test_per_trader_liquidations_add_up(self):
        r = run_contagion(_prices(), _rates(), VenueConfig(n_traders=300, seed=4), IMPACT)
        assert r.liquidated_by_trader is not None and r.liquidated_by_trader.shape == (300,)
        assert r.liquidated_by_trader.sum() == pytest.approx(r.liquidated_notional, rel=1e-12)
        assert (r.liquidated_by_trader >= 0).all() and (r.liquidated_by_trader > 0).sum() > 10

    def test_deterministic(self):
        a = run_contagion(_prices(), _rates(), VenueConfig(n_traders=300, seed=4), IMPACT)
        b = run_contagion(_prices(), _rates(), VenueConfig(n_traders=300, seed=4), IMPACT)
        pd.testing.assert_frame_equal(a.series, b.series)


class TestContagion:
    def test_impact_spills_across_venues(self):
        """With impact, lending sales mark down perp accounts: more liquidations on both venues, deeper waves."""
        calm = run_contagion(_prices(), _rates(), VenueConfig(n_traders=400), ImpactModel(kind="none"))
        hot = run_contagion(_prices(), _rates(), VenueConfig(n_traders=400), IMPACT)
        assert hot.perp_liquidated_notional > calm.perp_liquidated_notional
        assert hot.lending_liquidated_notional > calm.lending_liquidated_notional
        assert hot.cascade_depth > calm.cascade_depth == 1

    def test_bridge_outage_hits_perp_accounts(self):
        base = run_contagion(_prices(drop=0.05), _rates(), VenueConfig(n_traders=400), ImpactModel(kind="none"))
        out = run_contagion(_prices(drop=0.05), _rates(), VenueConfig(n_traders=400, bridge_outage_bar=10),
                            ImpactModel(kind="none"))
        assert out.perp_liquidations > base.perp_liquidations

    def test_depeg_hits_stablecoin_collateral(self):
        base = run_contagion(_prices(drop=0.05), _rates(), VenueConfig(n_traders=400), ImpactModel(kind="none"))
        dep = run_contagion(_prices(drop=0.05, depeg=0.2), _rates(), VenueConfig(n_traders=400), ImpactModel(kind="none"))
        assert dep.perp_liquidations > base.perp_liquidations

    def test_bad_config(self):
        with pytest.raises(ValueError, match="venues.ltv must be in"):
            VenueConfig(ltv=0.9)
        with pytest.raises(ValueError, match="prices must have a 'USDC' column"):
            run_contagion(_prices().drop(columns="USDC"), _rates())
