"""compute_margin: modes on the example files, subaccount pooling, health factor, liquidation prices."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from margin.accounts import MarketData, Portfolio
from margin.engine import compute_margin
from margin.instruments import Instrument
from margin.isolated import liquidation_price_linear
from margin.params import MarginParams, ParamsFile

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def example():
    pf = Portfolio.from_dict(json.loads((ROOT / "configs/examples/portfolio.json").read_text()))
    prm = ParamsFile.from_dict(json.loads((ROOT / "configs/examples/params.json").read_text()))
    return pf, prm


def _single(q, entry, mark, collateral, params):
    inst = [Instrument("P", "linear_perp", "BTC")]
    md = MarketData({"BTC": mark}, {}, {}, {"USDC": 1.0})
    pf = Portfolio.from_arrays(inst, np.array([[q]]), np.array([[entry]]), md, NOW, balances=np.array([[collateral]]))
    return pf, ParamsFile(markets=(params,))


class TestExample:
    def test_alice_by_hand(self, example):
        pf, prm = example
        # alice: 2 BTC long at 88,000, mark 90,000, 20,000 USDC (2 % haircut)
        r = compute_margin(pf, prm, "portfolio", scenarios="grid")
        assert r.equity[0] == pytest.approx(20_000 * 0.98 + 2 * 2_000)
        assert r.im[0] == pytest.approx(2 * 90_000 * 0.15)
        assert r.mm[0] == pytest.approx(0.8 * r.im[0])
        c = compute_margin(pf, prm, "cross")
        # tiers 1 %/0.5 % to 50k, 2 %/1 % to 500k: IM = 0.02 * 180,000 - 500, MM = 0.01 * 180,000 - 250
        assert c.im[0] == pytest.approx(3_100.0) and c.mm[0] == pytest.approx(1_550.0)
        assert c.health[0] == pytest.approx(23_600 / 1_550)

    def test_subaccounts_share_pool(self, example):
        pf, prm = example
        r = compute_margin(pf, prm, "cross")
        bob = pf.pool_ids.index("bob")
        rows = np.flatnonzero(pf.pool_index == bob)
        assert len(rows) == 2
        assert r.mm[bob] == pytest.approx(r.mm_rows[rows].sum())
        d = r.to_dict()["accounts"][bob]
        assert [s["id"] for s in d["subaccounts"]] == ["bob", "bob/options"]

    def test_modes_order_for_hedged_book(self, example):
        pf, prm = example
        iso = compute_margin(pf, prm, "isolated").im
        cross = compute_margin(pf, prm, "cross").im
        bob = pf.pool_ids.index("bob")
        assert cross[bob] < iso[bob]  # future vs perp nets in cross

    def test_fhs_mode(self, example):
        pf, prm = example
        r = compute_margin(pf, prm, "portfolio", scenarios="fhs")
        assert r.scenarios == "fhs" and np.all(r.im >= 0) and np.all(r.mm <= r.im + 1e-9)

    def test_json_is_strict(self, example):
        pf, prm = example
        for mode in ("isolated", "cross", "portfolio"):
            json.dumps(compute_margin(pf, prm, mode).to_dict(), allow_nan=False)


def test_fhs_reports_ewma_correlation(example):
    pf, prm = example
    d = compute_margin(pf, prm, "portfolio", scenarios="fhs").to_dict()
    c = np.array(d["ewma_correlation"])
    assert c.shape == (2, 2) and np.allclose(np.diag(c), 1.0) and 0.3 < c[0, 1] < 1.0


def test_pending_mm_binds_from_effective_time():
    from dataclasses import replace
    from datetime import timedelta

    prm = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05, mm_rate_pending=0.08, mm_effective_from=NOW)
    pf, p = _single(1.0, 90_000.0, 90_000.0, 20_000.0, prm)
    after = compute_margin(pf, p, "cross", liquidation_price=False).mm[0]
    before = compute_margin(replace(pf, as_of=NOW - timedelta(hours=1)), p, "cross", liquidation_price=False).mm[0]
    assert before == pytest.approx(0.05 * 90_000) and after == pytest.approx(0.08 * 90_000)


class TestLiquidationPrice:
    def test_cross_matches_closed_form(self):
        prm = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05)
        for q, e in ((2.0, 30_000.0), (-3.0, 31_000.0)):
            pf, p = _single(q, e, 30_500.0, 6_000.0, prm)
            r = compute_margin(pf, p, "cross")
            w = 6_000 * 0.98  # USDC stablecoin haircut
            ref = liquidation_price_linear(np.sign(q), abs(q), e, w, 0.05)
            assert r.liquidation_price[0] == pytest.approx(float(ref), rel=1e-9)
            # at that price the health factor is 1
            md = MarketData({"BTC": r.liquidation_price[0]}, {}, {}, {"USDC": 1.0})
            pf2 = Portfolio.from_arrays(pf.instruments, pf.positions, pf.entry, md, NOW, balances=pf.balances)
            assert compute_margin(pf2, p, "cross", liquidation_price=False).health[0] == pytest.approx(1.0, rel=1e-9)

    def test_portfolio_long_liquidation_below_mark(self):
        prm = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05)
        pf, p = _single(1.0, 90_000.0, 90_000.0, 20_000.0, prm)
        r = compute_margin(pf, p, "portfolio")
        # equity 19,600 + (P - 90,000) = 0.8 * 0.15 * P  ->  P = 70,400 / 0.88
        assert r.liquidation_price[0] == pytest.approx(70_400 / 0.88, rel=1e-9)

    def test_already_liquidatable_and_none(self):
        prm = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05)
        pf, p = _single(1.0, 100_000.0, 90_000.0, 100.0, prm)
        r = compute_margin(pf, p, "cross")
        assert r.health[0] < 1 and r.liquidation_price[0] == pytest.approx(90_000.0)
        pf, p = _single(0.0, 0.0, 90_000.0, 100.0, prm)
        r = compute_margin(pf, p, "cross")
        assert np.isnan(r.liquidation_price[0]) and r.health[0] == np.inf

    def test_isolated_position_prices(self, example):
        pf, prm = example
        r = compute_margin(pf, prm, "isolated")
        alice = [x for x in r.position_liquidation if x["pool"] == "alice"][0]
        assert alice["liquidation_price"] == pytest.approx(r.liquidation_price[0])
        assert alice["liquidation_price"] < 88_000


@pytest.mark.parametrize("basis", ["mark", "entry"])
def test_isolated_position_at_its_liquidation_price_has_equity_equal_mm(basis):
    """Engine consistency: at each position's reported price, W + uPnL equals the engine's own MM."""
    from margin.instruments import unrealised_pnl
    from margin.isolated import isolated_requirements
    from margin.params import RiskTier

    tiers = (RiskTier(20_000, 0.02, 0.008), RiskTier(200_000, 0.05, 0.02), RiskTier(None, 0.1, 0.05))
    prm = ParamsFile(markets=(MarginParams(market_id="BTC", tiers=tiers, mm_basis=basis, close_fee_in_mm=True),))
    inst = [Instrument("L", "linear_perp", "BTC", contract_size=0.01), Instrument("I", "inverse_perp", "BTC", contract_size=100.0)]
    rng = np.random.default_rng(3)
    pos = rng.choice([-1, 1], (30, 2)) * rng.uniform(1, 500, (30, 2))
    entry = 90_000 * np.exp(rng.normal(0, 0.02, (30, 2)))
    md = MarketData({"BTC": 90_000.0}, {}, {}, {"USDC": 1.0})
    pf = Portfolio.from_arrays(inst, pos, entry, md, NOW)
    r = compute_margin(pf, prm, "isolated")
    im_pos = r.position_margin
    cs = np.array([0.01, 100.0])
    inv = np.array([False, True])
    for a in range(30):
        for i in range(2):
            lp = r.position_lp[a, i]
            assert np.isfinite(lp) and lp > 0
            m = np.array([lp, lp])
            _, mm = isolated_requirements(pos[a:a + 1], entry[a:a + 1], m, m, cs, inv, np.zeros(2, bool),
                                          np.zeros(2, bool), np.full(2, np.nan), [prm.markets[0]] * 2, NOW)
            u = unrealised_pnl(pos[a, i], entry[a, i], lp, cs[i], inv[i])
            # inverse: the isolated margin is coin (IM / entry), worth (IM / entry) * P in USD at price P
            w_usd = im_pos[a, i] / entry[a, i] * lp if inv[i] else im_pos[a, i]
            assert w_usd + u == pytest.approx(mm[0, i], rel=1e-9, abs=1e-9 * im_pos[a, i])


def test_bad_mode(example):
    pf, prm = example
    with pytest.raises(ValueError, match="mode must be"):
        compute_margin(pf, prm, "spicy")
    with pytest.raises(KeyError, match="no MarginParams for market 'ETH'"):
        compute_margin(pf, ParamsFile(markets=(prm.markets[0],)), "cross")
