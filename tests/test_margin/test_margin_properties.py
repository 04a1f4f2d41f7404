"""Hypothesis properties of the margin engine (issue 5 "Done when")."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from margin.accounts import MarketData, Portfolio
from margin.collateral import haircut_value
from margin.engine import compute_margin
from margin.instruments import Instrument, InstrumentArrays, scenario_pnl
from margin.liquidation import liquidate_accounts, partial_close_fraction
from margin.params import (
    CollateralHaircuts,
    LiquidationSettings,
    MarginParams,
    ParamsFile,
    RiskTier,
    ScenarioGrid,
)
from margin.portfolio import delta_notional, fhs_scenarios, grid_scenario_matrix, scenario_margin

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EXP = NOW + timedelta(days=60)
PROP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INSTRUMENTS = [
    Instrument("BTC-PERP", "linear_perp", "BTC", contract_size=0.01),
    Instrument("BTC-FUT", "future", "BTC", contract_size=0.01, expiry=EXP),
    Instrument("BTC-C", "option", "BTC", expiry=EXP, strike=95_000, option_type="call", contract_size=0.1),
    Instrument("BTC-P", "option", "BTC", expiry=EXP, strike=85_000, option_type="put", contract_size=0.1),
    Instrument("ETH-PERP", "linear_perp", "ETH", contract_size=0.1),
    Instrument("ETH-INV", "inverse_perp", "ETH", contract_size=10.0),
    Instrument("ETH-C", "option", "ETH", expiry=EXP, strike=3_200, option_type="call"),
]
ARR = InstrumentArrays.from_instruments(INSTRUMENTS)
MARK = np.array([90_000.0, 90_500.0, 90_000.0, 90_000.0, 3_000.0, 3_000.0, 3_000.0])
SIGMA = np.array([np.nan, np.nan, 0.55, 0.6, np.nan, np.nan, 0.7])
S_GRID = grid_scenario_matrix(ARR, MARK, SIGMA, NOW, ScenarioGrid())
_rng = np.random.default_rng(42)
_ret = _rng.multivariate_normal([0, 0], np.array([[1, 0.8], [0.8, 1]]) * 0.03**2, 400)
_fhs, _ = fhs_scenarios(_ret, 0.94, 1, 20)
S_FHS = scenario_pnl(ARR, MARK, SIGMA, NOW, _fhs.T, np.zeros_like(_fhs.T))
# a joint grid (the same shock to both underlyings) for the "portfolio <= cross" check in grid mode
MODES = [(S_GRID, "max", 0.99), (S_FHS, "es", 0.975)]

sizes = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
books = st.lists(st.lists(sizes, min_size=7, max_size=7), min_size=1, max_size=6).map(np.array)


@PROP
@given(p=books, k=st.floats(0.01, 100.0))
def test_nonnegative_and_homogeneous(p, k):
    for s, measure, conf in MODES:
        m = scenario_margin(p, s, None, measure, conf)
        assert np.all(m >= 0)
        np.testing.assert_allclose(scenario_margin(k * p, s, None, measure, conf), k * m, rtol=1e-9, atol=1e-9)


@PROP
@given(p=books)
def test_portfolio_le_cross_le_isolated(p):
    for s, measure, conf in MODES:
        port = scenario_margin(p, s, None, measure, conf)
        cross = scenario_margin(p, s, ARR.underlying_index, measure, conf)
        iso = scenario_margin(p, s, np.arange(p.shape[1]), measure, conf)
        tol = 1e-9 * (1 + iso)
        assert np.all(port <= cross + tol) and np.all(cross <= iso + tol)


@PROP
@given(q=st.floats(0.1, 100.0), leg=st.sampled_from([1, 2, 6]))
def test_delta_matched_hedge_needs_less(q, leg):
    """Long a spot-equivalent (dated future or call), short the perp of equal delta."""
    long_leg = np.zeros((1, 7))
    long_leg[0, leg] = q
    perp = 0 if ARR.underlyings[leg] == "BTC" else 4
    unit = np.zeros((1, 7))
    unit[0, perp] = 1.0
    d_long = delta_notional(long_leg, ARR, MARK, SIGMA, NOW)[0]
    d_unit = delta_notional(unit, ARR, MARK, SIGMA, NOW)[0]
    u = ARR.underlying_index[leg]
    short_leg = -unit * d_long[u] / d_unit[u]
    for s, measure, conf in MODES:
        h = scenario_margin(long_leg + short_leg, s, None, measure, conf)[0]
        a = scenario_margin(long_leg, s, None, measure, conf)[0]
        b = scenario_margin(short_leg, s, None, measure, conf)[0]
        assert h < min(a, b)


def _params(**over):
    tiers = (RiskTier(100_000, 0.02, 0.01), RiskTier(1_000_000, 0.05, 0.025), RiskTier(None, 0.1, 0.05))
    grid = ScenarioGrid(short_option_addon=0.01, concentration_threshold=200_000, concentration_addon=0.05)
    hc = CollateralHaircuts(size_brackets=((1e6, 0.05), (1e7, 0.1)))
    return ParamsFile(markets=(
        MarginParams(market_id="BTC", tiers=tiers, scenario_grid=grid, haircuts=hc, close_fee_in_mm=True),
        MarginParams(market_id="ETH", tiers=tiers, scenario_grid=grid, haircuts=hc),
    ))


@settings(max_examples=25, deadline=None)
@given(col=st.integers(0, 6), sign=st.sampled_from([-1.0, 1.0]), base=st.floats(0.5, 20.0))
def test_single_position_margin_monotone_in_size(col, sign, base):
    """With tiers, size haircuts and add-ons on, margin never falls as one position grows."""
    sizes = sign * base * np.geomspace(1.0, 2000.0, 40)
    pos = np.zeros((40, 7))
    pos[:, col] = sizes
    entry = np.tile(np.where(ARR.is_option, 1_000.0, MARK), (40, 1))
    md = MarketData(
        underlying_price={"BTC": 90_000.0, "ETH": 3_000.0},
        instrument_mark={"BTC-FUT": 90_500.0, "BTC-C": 3_000.0, "BTC-P": 2_500.0, "ETH-C": 120.0},
        implied_vol={"BTC-C": 0.55, "BTC-P": 0.6, "ETH-C": 0.7},
        collateral_price={"USDC": 1.0},
    )
    pf = Portfolio.from_arrays(INSTRUMENTS, pos, entry, md, NOW, balances=np.full((40, 1), 1e6))
    for mode in ("isolated", "cross", "portfolio"):
        r = compute_margin(pf, _params(), mode, liquidation_price=False)
        assert np.all(np.diff(r.im) >= -1e-9 * r.im[1:]), mode
        assert np.all(np.diff(r.mm) >= -1e-9 * r.mm[1:]), mode


@PROP
@given(
    v=st.lists(st.floats(0, 1e9), min_size=1, max_size=20).map(np.array),
    h0=st.floats(0, 1),
    br=st.lists(st.tuples(st.floats(0, 1e8), st.floats(0, 1)), max_size=3),
    off=st.booleans(),
    bridge=st.floats(0, 1),
)
def test_haircuts_never_raise_value(v, h0, br, off, bridge):
    brackets = tuple(sorted({t: e for t, e in br}.items()))
    out = haircut_value(v, h0, brackets, off, bridge)
    assert np.all(out <= v + 1e-9 * v) and np.all(out >= 0)
    order = np.argsort(v)
    assert np.all(np.diff(out[order]) >= -1e-6 * (1 + v[order][1:]))


@PROP
@given(
    e=st.lists(st.floats(-100, 300), min_size=1, max_size=30).map(np.array),
    m=st.floats(1, 200),
    cost_rate=st.floats(0, 0.3),
    h=st.floats(1.001, 2.0),
    cap=st.floats(0.05, 1.0),
)
def test_partial_liquidation_never_lowers_health_or_touches_healthy(e, m, cost_rate, h, cap):
    n = m / 0.05  # notional with a 5 % MM rate
    s = LiquidationSettings(penalty_rate=cost_rate / 2, slippage_base=cost_rate / 2, max_close_fraction=cap, target_health=h)
    r = liquidate_accounts(e, np.full_like(e, m), np.full_like(e, n), s)
    f = r["fraction"]
    hf_before = e / m
    healthy = hf_before > 1
    assert np.all(f[healthy] == 0.0)
    partial = (f > 0) & (f < 1)
    hf_after = r["equity_after"][partial] / r["mm_after"][partial]
    assert np.all(hf_after >= hf_before[partial]) and np.all(hf_after >= h * (1 - 1e-12))
    assert np.all(f[partial] <= cap * (1 + 1e-12))
    f2 = partial_close_fraction(e, m, n * cost_rate, h, cap)
    np.testing.assert_array_equal(f, f2)
    assert math.isfinite(float(np.sum(r["bad_debt"])))
    # accounting identity per account, to 1e-9 relative
    lhs = r["equity_after"]
    rhs = e - r["slippage_cost"] - r["penalty"] + r["bad_debt"] - r["returned"]
    assert np.all(np.abs(lhs - rhs) <= 1e-9 * (1 + np.abs(e) + n))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    low=st.floats(80.0, 100.0),
    gap=st.floats(0.0, 10.0),
    pen=st.floats(0.0, 0.02),
    cap=st.floats(0.05, 1.0),
    h=st.floats(1.001, 1.5),
)
def test_isolated_partial_liquidation_raises_health_and_spares_healthy(seed, low, gap, pen, cap, h):
    from margin.liquidation import liquidate_isolated

    rng = np.random.default_rng(seed)
    n = 200
    side = rng.choice([-1.0, 1.0], n)
    qty = rng.uniform(0.1, 3.0, n)
    entry = 100 * np.exp(rng.normal(0, 0.03, n))
    mmr = rng.uniform(0.005, 0.08, n)
    margin = qty * entry / rng.uniform(1.5, 0.9 / mmr)
    o = low + gap
    high = 2 * 100 - low + gap
    s = LiquidationSettings(penalty_rate=pen, max_close_fraction=cap, target_health=h, slippage_base=0.0005,
                            slippage_range_coef=0.01, slippage_volume_coef=0.0)
    r = liquidate_isolated(side, qty, entry, margin, mmr, o, high, low, (o + low) / 2, s, 100.0)
    untouched = ~r.triggered
    assert np.all(r.qty_after[untouched] == qty[untouched]) and np.all(r.margin_after[untouched] == margin[untouched])
    part = ~r.full
    i = r.index[part]
    fill = r.fill_price[part]
    hf_before = (margin[i] + side[i] * qty[i] * (fill - entry[i])) / (mmr[i] * qty[i] * fill)
    hf_after = (r.margin_after[i] + side[i] * r.qty_after[i] * (fill - entry[i])) / (mmr[i] * r.qty_after[i] * fill)
    assert np.all(hf_after >= hf_before - 1e-12) and np.all(hf_after >= h * (1 - 1e-9))
    assert np.all(r.fraction[part] <= cap * (1 + 1e-12))
