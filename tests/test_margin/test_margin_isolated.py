"""Isolated margin: tiers, liquidation/bankruptcy closed forms (1e-9) and published exchange examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from margin.isolated import (
    bankruptcy_price_inverse,
    bankruptcy_price_linear,
    isolated_requirements,
    liquidation_price_inverse,
    liquidation_price_linear,
    liquidation_price_tiered,
    option_margin,
    tier_table,
    tiered_requirement,
)
from margin.params import MarginParams, OptionMarginRule, RiskTier

BRACKETS = (
    RiskTier(50_000, 0.008, 0.004),
    RiskTier(500_000, 0.01, 0.005),
    RiskTier(8_000_000, 0.02, 0.01),
    RiskTier(math.inf, 0.05, 0.025),
)


def _cases(n=300, seed=42):
    rng = np.random.default_rng(seed)
    side = rng.choice([-1.0, 1.0], n)
    qty = rng.uniform(0.01, 50, n)
    entry = rng.uniform(100, 100_000, n)
    lev = rng.uniform(1.5, 100, n)
    mmr = rng.uniform(0.001, 0.5, n) / lev
    fee = rng.choice([0.0, 0.00055], n)
    return side, qty, entry, lev, mmr, fee


class TestTiers:
    def test_binance_maintenance_amounts(self):
        # Binance rule (COIN-M/USDS-M FAQ): cum_n = floor_n * (mmr_n - mmr_{n-1}) + cum_{n-1}; for these
        # illustrative Binance-style brackets: 0, 50, 2,550, 122,550
        tab = tier_table(BRACKETS)
        np.testing.assert_allclose(tab["cum_mm"], [0.0, 50.0, 2_550.0, 122_550.0])

    def test_continuous_and_monotone(self):
        tab = tier_table(BRACKETS)
        n = np.linspace(0, 2e7, 20001)
        im, mm = tiered_requirement(n, tab)
        assert np.all(np.diff(mm) >= -1e-9) and np.all(np.diff(im) >= -1e-9)
        for cap in (50_000, 500_000, 8_000_000):
            lo, hi = tiered_requirement(np.array([cap * (1 - 1e-12), cap * (1 + 1e-12)]), tab)[1]
            assert hi - lo == pytest.approx(0.0, abs=1e-3)


class TestLinear:
    def test_closed_form_vs_root(self):
        side, qty, entry, lev, mmr, fee = _cases()
        w = qty * entry / lev
        lp = liquidation_price_linear(side, qty, entry, w, mmr, 0.0, fee)
        bp = bankruptcy_price_linear(side, qty, entry, w)
        for i in range(len(side)):
            def eq(p, i=i):
                return w[i] + side[i] * qty[i] * (p - entry[i]) - (mmr[i] + fee[i]) * qty[i] * p
            hi = entry[i] * 10
            ref = brentq(eq, 1e-12, hi, xtol=1e-14, rtol=1e-15) if eq(1e-12) * eq(hi) < 0 else None
            if ref is None:
                assert lp[i] == (0.0 if side[i] > 0 else math.inf)
            else:
                assert lp[i] == pytest.approx(ref, rel=1e-9)
            assert w[i] + side[i] * qty[i] * (bp[i] - entry[i]) == pytest.approx(0.0, abs=1e-9 * w[i])
        # liquidation comes before bankruptcy
        live = np.isfinite(lp) & (lp > 0)
        assert np.all(np.where(side[live] > 0, lp[live] >= bp[live], lp[live] <= bp[live]))

    def test_closed_form_algebra(self):
        # L_long = (N E - W - cum) / (N (1 - m)), L_short = (N E + W + cum) / (N (1 + m))
        n, e, w, m, cum = 2.5, 31_234.5, 8_000.0, 0.006, 12.5
        assert liquidation_price_linear(1, n, e, w, m, cum) == pytest.approx((n * e - w - cum) / (n * (1 - m)), rel=1e-12)
        assert liquidation_price_linear(-1, n, e, w, m, cum) == pytest.approx((n * e + w + cum) / (n * (1 + m)), rel=1e-12)

    def test_bybit_usdt_published_examples(self):
        # Bybit help centre, "Liquidation Price (USDT Contract)", isolated margin, MM on entry value:
        # long 1 BTC @ 20,000, 50x, MMR 0.5% -> 19,700; long 1 BTC @ 10,000, 50x -> 9,850;
        # short 1 BTC @ 8,000, 40x -> 8,160.
        lp = liquidation_price_linear(
            np.array([1, 1, -1]), 1.0, np.array([20_000, 10_000, 8_000]), np.array([400, 200, 200]), 0.005,
            mm_basis="entry",
        )
        np.testing.assert_allclose(lp, [19_700, 9_850, 8_160], rtol=1e-12)

    def test_binance_simplified_example_mark_basis(self):
        # dr-binance example: long 0.1 BTC @ 60,000, 10x (W = 600), MMR 0.4%: exact mark-basis solution
        lp = liquidation_price_linear(1, 0.1, 60_000, 600, 0.004)
        assert lp == pytest.approx((6_000 - 600) / (0.1 * 0.996), rel=1e-12)
        assert lp == pytest.approx(54_216.87, abs=0.01)  # the page's approximation E(1 - 1/L + m) gives 54,240

    def test_unliquidatable(self):
        assert liquidation_price_linear(1, 1.0, 100.0, 150.0, 0.01) == 0.0
        assert bankruptcy_price_linear(1, 1.0, 100.0, 150.0) == 0.0

    def test_tiered_uses_tier_at_liquidation_price(self):
        side = np.array([1.0, -1.0, 1.0])
        qty = np.array([20.0, 20.0, 0.5])
        entry = np.full(3, 30_000.0)
        w = qty * entry / np.array([20.0, 20.0, 50.0])
        lp = liquidation_price_tiered(side, qty, entry, w, BRACKETS)
        tab = tier_table(BRACKETS)
        for i in range(3):
            def eq(p, i=i):
                _, mm = tiered_requirement(np.array([qty[i] * p]), tab)
                return w[i] + side[i] * qty[i] * (p - entry[i]) - mm[0]
            ref = brentq(eq, 1.0, 1e6, xtol=1e-14, rtol=1e-15)
            assert lp[i] == pytest.approx(ref, rel=1e-9)


class TestInverse:
    def test_closed_form_vs_root(self):
        side, qty, entry, lev, mmr, fee = _cases(seed=7)
        cs = 100.0
        w = qty * cs / entry / lev  # coin
        lp = liquidation_price_inverse(side, qty, entry, w, mmr, 0.0, fee, cs)
        bp = bankruptcy_price_inverse(side, qty, entry, w, cs)
        for i in range(len(side)):
            n = qty[i] * cs
            def eq(p, i=i, n=n):
                return w[i] + side[i] * n * (1 / entry[i] - 1 / p) - (mmr[i] + fee[i]) * n / p
            lo, hi = entry[i] * 1e-3, entry[i] * 1e3
            if eq(lo) * eq(hi) < 0:
                ref = brentq(eq, lo, hi, xtol=1e-14, rtol=1e-15)
                assert lp[i] == pytest.approx(ref, rel=1e-9)
            else:
                assert lp[i] in (0.0, math.inf)
            if np.isfinite(bp[i]):
                assert w[i] + side[i] * n * (1 / entry[i] - 1 / bp[i]) == pytest.approx(0.0, abs=1e-9 * w[i])

    def test_bybit_inverse_published_formula(self):
        # Bybit UTA isolated inverse: long L = Q(1+MMR) / (Q/E + Q/E/lev + ded); short L = Q(1-MMR)/(Q/E - Q/E/lev - ded)
        q, e, lev, m = 60_000.0, 50_000.0, 10.0, 0.005
        w = q / e / lev
        lp = liquidation_price_inverse(np.array([1, -1]), q, e, w, m)
        np.testing.assert_allclose(lp, [q * 1.005 / (1.2 + 0.12), q * 0.995 / (1.2 - 0.12)], rtol=1e-12)
        np.testing.assert_allclose(lp, [45_681.818181818, 55_277.777777778], rtol=1e-9)

    def test_bybit_inverse_bankruptcy_with_fee(self):
        # Bybit help centre (inverse, cross): balance 0.5 BTC, long 10,000 contracts at 8,000 USD, taker fee
        # 0.075 %: bankruptcy price = 1.00075 * 10000 / (10000/8000 + 0.5) = 5,718.57
        bp = bankruptcy_price_inverse(1, 10_000.0, 8_000.0, 0.5, 1.0, close_fee_rate=0.00075)
        assert bp == pytest.approx(5_718.57, abs=0.005)
        assert bp == pytest.approx(1.00075 * 10_000 / 1.75, rel=1e-12)
        assert bankruptcy_price_linear(1, 2.0, 100.0, 20.0, 1.0, 0.001) == pytest.approx(180 / (2 * 0.999), rel=1e-12)

    def test_short_at_1x_is_never_liquidated(self):
        # 100 contracts x 100 USD at 100 USD = 100 coin of notional, fully collateralised by W = 100 coin
        assert liquidation_price_inverse(-1, 100.0, 100.0, 100.0, 0.005, 0.0, 0.0, 100.0) == math.inf
        assert bankruptcy_price_inverse(-1, 100.0, 100.0, 100.0, 100.0) == math.inf


class TestRequirements:
    def test_hand_computed(self):
        p = MarginParams(market_id="BTC", tiers=BRACKETS)
        pos = np.array([[2.0, -1.0]])  # 2 BTC linear long, 1,000 USD-contract inverse short (10 contracts x 100)
        entry = np.array([[30_000.0, 31_000.0]])
        pos[0, 1] = -10.0
        im, mm = isolated_requirements(
            pos, entry, np.array([32_000.0, 32_000.0]), np.array([32_000.0, 32_000.0]), np.array([1.0, 100.0]),
            np.array([False, True]), np.array([False, False]), np.array([False, False]), np.full(2, np.nan), [p, p],
        )
        # long: entry notional 60,000 (tier 2: 1% - cum_im 100) ; mark notional 64,000 (0.5% - 50)
        cum_im = 50_000 * (0.01 - 0.008)
        np.testing.assert_allclose(im[0, 0], 0.01 * 60_000 - cum_im)
        np.testing.assert_allclose(mm[0, 0], 0.005 * 64_000 - 50)
        np.testing.assert_allclose(im[0, 1], 0.008 * 1_000)
        np.testing.assert_allclose(mm[0, 1], 0.004 * 1_000)

    def test_option_rule(self):
        rule = OptionMarginRule()
        im, mm = option_margin(np.array([-2.0, 3.0]), 50_000.0, np.array([60_000.0, 60_000.0]), True,
                               np.array([1_000.0, 1_000.0]), 1.0, rule)
        # short OTM call: OTM = 10,000 -> max(0.15 - 0.2, 0.10) = 0.10
        assert im[0] == pytest.approx((0.10 * 50_000 + 1_000) * 2)
        assert mm[0] == pytest.approx((0.075 * 50_000 + 1_000) * 2)
        assert im[1] == 0.0 and mm[1] == 0.0
