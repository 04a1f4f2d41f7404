"""Liquidation: partial-close rule, fill rule, fund, bad debt, ADL and the accounting identity."""

from __future__ import annotations

import numpy as np
import pytest

from margin.isolated import liquidation_price_linear
from margin.liquidation import (
    Ledger,
    auto_deleverage,
    health_factor,
    liquidate_accounts,
    liquidate_isolated,
    partial_close_fraction,
)
from margin.params import LiquidationSettings

SET = LiquidationSettings(
    penalty_rate=0.01, max_close_fraction=0.5, target_health=1.1, slippage_base=0.001,
    slippage_range_coef=0.0, slippage_volume_coef=0.0, insurance_fund_initial=1_000.0,
)


class TestRule:
    def test_hand_computed_partial(self):
        # E = 90, MM = 100, closing all costs C = 20 -> f = (1.1*100 - 90) / (110 - 20) = 20/90
        f = partial_close_fraction(90.0, 100.0, 20.0, 1.1, 0.5)
        assert f == pytest.approx(2 / 9, rel=1e-12)
        hf_after = (90 - f * 20) / ((1 - f) * 100)
        assert hf_after >= 1.1 and hf_after == pytest.approx(1.1, rel=1e-12)

    def test_full_close_cases(self):
        # penalty+slippage >= equity; cost rate above the MM level; needs more than the cap
        np.testing.assert_array_equal(
            partial_close_fraction(np.array([10.0, 90.0, 50.0]), 100.0, np.array([20.0, 120.0, 20.0]), 1.1, 0.5),
            [1.0, 1.0, 1.0],
        )

    def test_healthy_untouched(self):
        assert partial_close_fraction(101.0, 100.0, 20.0, 1.1, 0.5) == 0.0
        assert partial_close_fraction(5.0, 0.0, 1.0, 1.1, 0.5) == 0.0

    def test_health_factor(self):
        np.testing.assert_allclose(health_factor([100.0, 50.0], [-20.0, 0.0], [40.0, 0.0]), [2.0, np.inf])

    def test_liquidate_accounts_flows(self):
        r = liquidate_accounts(np.array([90.0, -5.0]), np.array([100.0, 100.0]), np.array([1000.0, 1000.0]), SET)
        # account 0: cost = 1000 * (0.01 + 0.001) = 11 -> f = (110 - 90) / (110 - 11)
        f0 = 20 / 99
        assert r["fraction"][0] == pytest.approx(f0)
        assert r["penalty"][0] == pytest.approx(f0 * 10)
        assert r["equity_after"][0] / r["mm_after"][0] == pytest.approx(1.1)
        # account 1: below bankruptcy -> full close, bad debt = 5 + slippage 1
        assert r["fraction"][1] == 1.0 and r["penalty"][1] == 0.0 and r["bad_debt"][1] == pytest.approx(6.0)


class TestIsolatedBar:
    def test_fill_at_trigger_and_partial(self):
        # long 1 @ 100 with margin 10, mm 5%: L = (100 - 10) / 0.95
        lp = float(liquidation_price_linear(1, 1.0, 100.0, 10.0, 0.05))
        r = liquidate_isolated(np.array([1.0]), np.array([1.0]), np.array([100.0]), np.array([10.0]), 0.05,
                               bar_open=99.0, bar_high=99.5, bar_low=lp - 1, bar_close=lp, settings=SET, fund=0.0)
        assert r.triggered[0] and list(r.index) == [0] and r.fill_price[0] == pytest.approx(lp)
        assert r.exec_price[0] == pytest.approx(lp * (1 - 0.001))
        eq = 10 + (lp - 100)
        mm = 0.05 * lp
        cost = lp * 0.011
        f = (1.1 * mm - eq) / (1.1 * mm - cost)
        assert r.fraction[0] == pytest.approx(f, rel=1e-12) and not r.full[0]
        remaining_eq = r.margin_after[0] + r.qty_after[0] * (lp - 100)
        assert remaining_eq / (0.05 * r.qty_after[0] * lp) == pytest.approx(1.1, rel=1e-9)
        assert r.fund_after == pytest.approx(r.penalty[0])

    def test_gap_fills_at_open_and_bad_debt(self):
        # short 2 @ 100, margin 10: bankruptcy at 105; bar opens at 110 (gap past trigger)
        r = liquidate_isolated(np.array([-1.0]), np.array([2.0]), np.array([100.0]), np.array([10.0]), 0.01,
                               bar_open=110.0, bar_high=112.0, bar_low=109.0, bar_close=111.0, settings=SET, fund=5.0)
        assert r.fill_price[0] == 110.0 and r.full[0]
        slip = 2 * 110 * 0.001
        assert r.bad_debt[0] == pytest.approx(2 * 10 - 10 + slip)  # loss 20 past margin 10, plus slippage
        assert r.penalty[0] == 0.0
        assert r.fund_draw[0] == pytest.approx(5.0)
        assert r.uncovered_bad_debt[0] == pytest.approx(r.bad_debt[0] - 5.0)
        assert r.fund_after == pytest.approx(0.0)

    def test_untriggered_untouched(self):
        r = liquidate_isolated(np.array([1.0, -1.0]), np.array([1.0, 1.0]), np.array([100.0, 100.0]),
                               np.array([10.0, 10.0]), 0.05, 100, 101, 99, 100, SET, 0.0)
        assert not r.triggered.any() and r.index.size == 0 and np.all(r.margin_after == 10.0)
        assert r.totals["penalty"] == 0.0

    def test_zero_mm_rate_closes_at_bankruptcy(self):
        r = liquidate_isolated(np.array([1.0]), np.array([1.0]), np.array([100.0]), np.array([10.0]), 0.0,
                               95.0, 95.0, 85.0, 88.0, SET, 0.0)
        assert r.full[0] and r.fill_price[0] == pytest.approx(90.0) and r.qty_after[0] == 0.0

    def test_slippage_grows_with_range_and_volume(self):
        s = LiquidationSettings(slippage_base=0.001, slippage_range_coef=0.2, slippage_volume_coef=0.5,
                                penalty_rate=0.0, target_health=1.1)
        args = (np.array([1.0]), np.array([1.0]), np.array([100.0]), np.array([10.0]), 0.05)
        narrow = liquidate_isolated(*args, 90.0, 90.5, 89.0, 89.5, s, 0.0, bar_volume=1e9)
        wide = liquidate_isolated(*args, 90.0, 95.0, 80.0, 89.5, s, 0.0, bar_volume=1e9)
        thin = liquidate_isolated(*args, 90.0, 95.0, 80.0, 89.5, s, 0.0, bar_volume=100.0)
        assert narrow.exec_price[0] > wide.exec_price[0] > thin.exec_price[0]
        assert wide.exec_price[0] == pytest.approx(90 * (1 - (0.001 + 0.2 * 15 / 90 + 0.5 * 90 / 1e9)), rel=1e-12)


class TestAdl:
    def test_most_profitable_first(self):
        side = np.array([-1.0, -1.0, -1.0, 1.0])
        qty = np.array([1.0, 1.0, 1.0, 1.0])
        entry = np.array([120.0, 110.0, 90.0, 80.0])
        margin = np.array([10.0, 10.0, 10.0, 10.0])
        r = auto_deleverage(25.0, +1.0, side, qty, entry, margin, mark=100.0)
        # shorts: upnl 20, 10, -10 -> first loses 20, second 5; long never touched
        np.testing.assert_allclose(r["adl_loss"], [20.0, 5.0, 0.0, 0.0])
        np.testing.assert_allclose(r["adl_qty"], [1.0, 0.5, 0.0, 0.0])
        assert r["covered"] == 25.0 and r["remaining"] == 0.0

    def test_insufficient_profit(self):
        r = auto_deleverage(100.0, -1.0, np.array([1.0]), np.array([1.0]), np.array([90.0]), np.array([5.0]), 100.0)
        assert r["covered"] == 10.0 and r["remaining"] == 90.0


def _simulate(seed: int, n: int = 400, bars: int = 120):
    """Random multi-bar book with deposits, fees, funding, top-ups, liquidations and ADL; returns max residual."""
    rng = np.random.default_rng(seed)
    settings = LiquidationSettings(
        penalty_rate=float(rng.uniform(0, 0.02)), max_close_fraction=float(rng.uniform(0.2, 1.0)),
        target_health=float(rng.uniform(1.01, 1.5)), slippage_base=0.0005, slippage_range_coef=0.05,
        slippage_volume_coef=0.3, insurance_fund_initial=float(rng.uniform(0, 500)),
    )
    price = 100.0
    side = rng.choice([-1.0, 1.0], n)
    qty = rng.uniform(0.1, 5.0, n)
    entry = price * np.exp(rng.normal(0, 0.01, n))
    mmr = rng.uniform(0.01, 0.08, n)
    lev = rng.uniform(2, 0.8 / mmr)
    fee_rate = 0.0005
    deposit = qty * entry / lev
    fees = qty * entry * fee_rate
    margin = deposit - fees
    led = Ledger(deposits=float(deposit.sum()), fees=float(fees.sum()), fund_initial=settings.insurance_fund_initial)
    fund = settings.insurance_fund_initial
    worst = 0.0
    for _ in range(bars):
        ret = rng.standard_t(3) * 0.03
        o = price * np.exp(rng.normal(0, 0.01))
        c = price * np.exp(ret)
        h = max(o, c) * np.exp(abs(rng.normal(0, 0.01)))
        lo = min(o, c) * np.exp(-abs(rng.normal(0, 0.01)))
        # funding at the open, then top-ups for a random third of the open positions
        rate = rng.normal(0, 0.0003)
        fund_pay = np.where(qty > 0, -side * qty * o * rate, 0.0)
        margin = margin + fund_pay
        led.funding += float(fund_pay.sum())
        top = np.where((qty > 0) & (rng.uniform(size=n) < 0.05), rng.uniform(0, 5, n), 0.0)
        margin = margin + top
        led.top_ups += float(top.sum())
        res = liquidate_isolated(side, qty, entry, margin, mmr, o, h, lo, c, settings, fund, bar_volume=5e4,
                                 inplace=seed % 2 == 0)
        led.record_liquidation(res)
        qty, margin, fund = res.qty_after, res.margin_after, res.fund_after
        for bside in (1.0, -1.0):
            short = float(res.uncovered_bad_debt[side[res.index] == bside].sum())
            if short > 0:
                adl = auto_deleverage(short, bside, side, qty, entry, margin, c)
                led.record_adl(adl)
                qty, margin = adl["qty_after"], adl["margin_after"]
        price = c
        resid = led.residuals(float(margin[qty > 0].sum() + margin[qty <= 0].sum()), fund)
        worst = max(worst, max(abs(v) for v in resid.values()) / led.scale())
        # closed positions keep margin 0
        assert np.all(margin[qty <= 0] == 0.0)
    return worst, led


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_accounting_identity_every_step(seed):
    worst, led = _simulate(seed)
    assert worst <= 1e-9
    assert led.penalties > 0 and led.realised_pnl != 0.0 and led.bad_debt > 0


def test_vectorised_matches_single_position_calls():
    """The array call equals calling the function one position at a time (and the closed-form trigger)."""
    rng = np.random.default_rng(5)
    n = 300
    side = rng.choice([-1.0, 1.0], n)
    qty = rng.uniform(0.1, 5, n)
    qty[::17] = 0.0
    entry = 100 * np.exp(rng.normal(0, 0.03, n))
    mmr = rng.uniform(0.005, 0.05, n)
    margin = qty * entry / rng.uniform(2, 0.9 / mmr)
    r = liquidate_isolated(side, qty, entry, margin, mmr, 100.0, 104.0, 95.0, 99.0, SET, 50.0)
    lp = liquidation_price_linear(side, np.where(qty > 0, qty, 1.0), entry, margin, mmr)
    expect = (qty > 0) & np.where(side > 0, 95.0 <= lp, 104.0 >= lp)
    np.testing.assert_array_equal(r.triggered, expect)
    for j, i in enumerate(r.index):
        one = liquidate_isolated(side[i:i + 1], qty[i:i + 1], entry[i:i + 1], margin[i:i + 1], mmr[i:i + 1],
                                 100.0, 104.0, 95.0, 99.0, SET, 0.0)
        assert one.fraction[0] == pytest.approx(r.fraction[j], rel=1e-12)
        assert one.penalty[0] == pytest.approx(r.penalty[j], rel=1e-12, abs=1e-12)
        assert one.bad_debt[0] == pytest.approx(r.bad_debt[j], rel=1e-12, abs=1e-12)
