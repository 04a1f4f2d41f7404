"""The cross/portfolio liquidation-price search (secant bracketing + Illinois on the pools still searching)
against the plain method it replaced: a coarse scan over fixed levels on every pool, then bisection to the
last bit. Random books of perps, futures, inverse perps and options on two underlyings, subaccounts sharing a
pool, USDC and BTC collateral (tiers, size haircuts, close fees on). Tolerance: prices agree to 1e-9 relative,
and both find a price for the same pools."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from margin import engine
from margin.accounts import MarketData, Portfolio
from margin.engine import compute_margin
from margin.instruments import Instrument
from margin.isolated import liquidation_price_linear
from margin.params import CollateralHaircuts, MarginParams, ParamsFile, RiskTier, ScenarioGrid

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EXP = NOW + timedelta(days=60)
LEVELS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.9, 0.99, 1.5, 2.5,
          5.0, 10.0)

LINEAR = [
    Instrument("BTC-PERP", "linear_perp", "BTC", contract_size=0.01),
    Instrument("BTC-FUT", "future", "BTC", contract_size=0.01, expiry=EXP),
    Instrument("ETH-PERP", "linear_perp", "ETH", contract_size=0.1),
    Instrument("ETH-INV", "inverse_perp", "ETH", contract_size=10.0),
]
OPTIONS = [
    Instrument("BTC-C", "option", "BTC", expiry=EXP, strike=95_000, option_type="call", contract_size=0.1),
    Instrument("ETH-P", "option", "ETH", expiry=EXP, strike=2_800, option_type="put"),
]
MD = MarketData(
    underlying_price={"BTC": 90_000.0, "ETH": 3_000.0},
    instrument_mark={"BTC-FUT": 90_500.0, "BTC-C": 3_000.0, "ETH-P": 110.0},
    implied_vol={"BTC-C": 0.55, "ETH-P": 0.7},
    collateral_price={"USDC": 1.0, "BTC": 90_000.0},
)
SLOTS = (("USDC", "ethereum"), ("BTC", "ethereum"))


def _params() -> ParamsFile:
    tiers = (RiskTier(100_000, 0.02, 0.01), RiskTier(1_000_000, 0.05, 0.025), RiskTier(None, 0.1, 0.05))
    grid = ScenarioGrid(short_option_addon=0.01)
    hc = CollateralHaircuts(size_brackets=((1e6, 0.05), (1e7, 0.1)))
    return ParamsFile(markets=(
        MarginParams(market_id="BTC", tiers=tiers, scenario_grid=grid, haircuts=hc, close_fee_in_mm=True),
        MarginParams(market_id="ETH", tiers=tiers, scenario_grid=grid, haircuts=hc),
    ))


PARAMS = _params()


def _reference_search(state: engine._State) -> np.ndarray:
    """The plain method: every pool at every coarse level until liquidated, then 80 bisection steps."""
    gap, ustar, dval = engine._gap_function(state)
    n = state.pf.n_pools
    pools = np.arange(n)
    direction = -np.sign(dval)
    a, b = np.zeros(n), np.full(n, np.nan)
    for lv in LEVELS:
        x = direction * np.where(direction < 0, min(lv, 0.99), lv)
        g = gap(x, pools)
        new = np.isnan(b) & (g <= 0) & (direction != 0)
        b[new] = x[new]
        a = np.where(np.isnan(b), x, a)
    found = np.isfinite(b) & (b != 0.0)
    for _ in range(80):  # brackets are at most 10 wide: 10 / 2^80 < 1e-23
        c = np.where(found, 0.5 * (a + b), 0.0)
        g = gap(c, pools)
        b = np.where(found & (g <= 0), c, b)
        a = np.where(found & (g > 0), c, a)
    f_u = np.zeros(len(state.arr.underlyings_unique))
    f_u[state.arr.underlying_index] = state.mark
    return f_u[ustar] * (1.0 + b)


def _book(data: st.DataObject, instruments: list[Instrument]) -> Portfolio:
    n_rows = data.draw(st.integers(1, 8), label="rows")
    n_i = len(instruments)
    # sizes of at least 1e-4 contracts (a denormal size makes compute_margin's health division overflow)
    size = st.one_of(st.just(0.0), st.builds(lambda m, s: s * m, st.floats(1e-4, 80.0), st.sampled_from([-1.0, 1.0])))
    pos = np.array(data.draw(st.lists(st.lists(size, min_size=n_i, max_size=n_i), min_size=n_rows, max_size=n_rows)))
    drift = np.array(data.draw(st.lists(st.floats(-0.08, 0.08), min_size=n_i, max_size=n_i)))
    mark = np.array([MD.instrument_mark.get(x.instrument_id, MD.underlying_price[x.underlying]) for x in instruments])
    entry = np.tile(mark * (1.0 + drift), (n_rows, 1))
    usdc = data.draw(st.lists(st.floats(0.0, 2e5), min_size=n_rows, max_size=n_rows))
    btc = data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.5, 2.0]), min_size=n_rows, max_size=n_rows))
    pools = sorted(data.draw(st.lists(st.integers(0, n_rows - 1), min_size=n_rows, max_size=n_rows)))
    pool_index = np.unique(pools, return_inverse=True)[1]  # subaccounts share their pool's collateral
    return Portfolio.from_arrays(instruments, pos, entry, MD, NOW, balances=np.c_[usdc, btc], slots=SLOTS,
                                 pool_index=pool_index)


def _compare(pf: Portfolio, mode: str) -> None:
    new = compute_margin(pf, PARAMS, mode, scenarios="grid").liquidation_price
    ref = _reference_search(engine._State(pf, PARAMS, mode, "grid"))
    assert np.array_equal(np.isnan(new), np.isnan(ref)), (new, ref)
    ok = np.isfinite(ref)
    np.testing.assert_allclose(new[ok], ref[ok], rtol=1e-9, atol=0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), mode=st.sampled_from(["cross", "portfolio"]))
def test_search_matches_scan_and_bisection_on_linear_books(data, mode):
    _compare(_book(data, LINEAR), mode)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_search_matches_scan_and_bisection_with_options(data):
    """Options make equity - MM curved (Black-76 repricing); the search still lands on the same root."""
    _compare(_book(data, LINEAR + OPTIONS), "cross")


def test_many_accounts_against_closed_form():
    """500 single-perp accounts (leverage 1.5x to 15x, long and short, one MM rate): each liquidation
    price equals the closed form to 1e-9 relative; those liquidatable now report the mark."""
    rng = np.random.default_rng(42)
    n = 500
    q = rng.choice([-1.0, 1.0], n) * rng.lognormal(0.0, 1.0, n)
    entry = 90_000.0 * (1 + rng.normal(0, 0.01, n))
    lev = rng.uniform(1.5, 15.0, n)
    coll = np.abs(q) * entry / lev
    inst = [Instrument("P", "linear_perp", "BTC")]
    md = MarketData({"BTC": 90_000.0}, {}, {}, {"USDC": 1.0})
    pf = Portfolio.from_arrays(inst, q[:, None], entry[:, None], md, NOW, balances=coll[:, None])
    prm = ParamsFile(markets=(MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05),))
    r = compute_margin(pf, prm, "cross")
    ref = liquidation_price_linear(np.sign(q), np.abs(q), entry, 0.98 * coll, 0.05)  # USDC haircut 2 %
    has = (ref > 900.0) & (ref < 990_000.0) & (r.health > 1)  # inside the searched range [0.01 F, 11 F]
    assert has.sum() > 450
    np.testing.assert_allclose(r.liquidation_price[has], ref[has], rtol=1e-9)
    liquidated_now = r.health <= 1
    assert np.all(r.liquidation_price[liquidated_now] == pytest.approx(90_000.0))
