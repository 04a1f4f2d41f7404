"""Instruments: Black-76 vs put-call parity and finite differences; scenario P&L; fees and funding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from margin.instruments import (
    Instrument,
    InstrumentArrays,
    black76_greeks,
    black76_price,
    funding_payment,
    round_to_tick,
    scenario_pnl,
    trade_fee,
    unrealised_pnl,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _close(actual, desired, rtol, atol):
    """Elementwise |a - d| <= rtol |d| + atol with an array ``atol`` (numpy's needs a scalar)."""
    err = np.abs(np.asarray(actual) - desired)
    bound = rtol * np.abs(desired) + atol
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


@pytest.fixture
def grid():
    rng = np.random.default_rng(42)
    n = 200
    return dict(
        f=rng.uniform(500, 100_000, n),
        k=None,
        t=rng.uniform(1 / 365, 2.0, n),
        sigma=rng.uniform(0.1, 1.5, n),
        r=rng.uniform(0.0, 0.08, n),
        m=rng.uniform(0.5, 1.6, n),
    )


class TestBlack76:
    def test_put_call_parity(self, grid):
        f, t, s, r = grid["f"], grid["t"], grid["sigma"], grid["r"]
        k = f * grid["m"]
        c = black76_price(f, k, t, s, True, r)
        p = black76_price(f, k, t, s, False, r)
        _close(c - p, np.exp(-r * t) * (f - k), rtol=1e-10, atol=1e-9 * f)

    def test_known_value(self):
        # Hull, Options Futures and Other Derivatives, Example 18.6 (futures option): F=20, K=20, r=9%,
        # T=4/12, sigma=25% -> put 1.12
        p = black76_price(20.0, 20.0, 4 / 12, 0.25, False, 0.09)
        assert p == pytest.approx(1.1166, abs=1e-4)

    def test_greeks_vs_finite_differences(self, grid):
        f, t, s, r = grid["f"], grid["t"], grid["sigma"], grid["r"]
        k = f * grid["m"]
        for call in (True, False):
            g = black76_greeks(f, k, t, s, call, r)
            h = 1e-4 * f
            up, dn, mid = (black76_price(f + d, k, t, s, call, r) for d in (h, -h, 0.0))
            np.testing.assert_allclose(g["delta"], (up - dn) / (2 * h), rtol=1e-6, atol=1e-8)
            _close(g["gamma"], (up - 2 * mid + dn) / h**2, rtol=1e-4, atol=1e-6 / f)
            hv = 1e-5
            vega_fd = (black76_price(f, k, t, s + hv, call, r) - black76_price(f, k, t, s - hv, call, r)) / (2 * hv)
            _close(g["vega"], vega_fd, rtol=1e-6, atol=1e-8 * f)
            ht = 1e-6
            theta_fd = -(black76_price(f, k, t + ht, s, call, r) - black76_price(f, k, t - ht, s, call, r)) / (2 * ht)
            _close(g["theta"], theta_fd, rtol=1e-5, atol=1e-6 * f)
            hr = 1e-6
            rho_fd = (black76_price(f, k, t, s, call, r + hr) - black76_price(f, k, t, s, call, r - hr)) / (2 * hr)
            _close(g["rho"], rho_fd, rtol=1e-6, atol=1e-8 * f)

    def test_expiry_and_zero_vol_are_intrinsic(self):
        assert black76_price(110.0, 100.0, 0.0, 0.5, True) == pytest.approx(10.0)
        assert black76_price(90.0, 100.0, 0.5, 0.0, False) == pytest.approx(10.0)
        g = black76_greeks(110.0, 100.0, 0.0, 0.5, True)
        assert g["delta"] == 1.0 and g["gamma"] == 0.0 and g["vega"] == 0.0

    def test_bounds(self, grid):
        f, t, s = grid["f"], grid["t"], grid["sigma"]
        k = f * grid["m"]
        c = black76_price(f, k, t, s, True)
        assert np.all(c >= np.maximum(f - k, 0) - 1e-9) and np.all(c <= f)


class TestInstrument:
    def test_validation(self):
        with pytest.raises(ValueError, match="kind must be one of"):
            Instrument("X", "swap", "BTC")
        with pytest.raises(ValueError, match="contract_size must be a positive number, got -1"):
            Instrument("X", "linear_perp", "BTC", contract_size=-1)
        with pytest.raises(ValueError, match="needs an expiry"):
            Instrument("X", "option", "BTC", strike=1.0, option_type="call")
        with pytest.raises(ValueError, match="option_type"):
            Instrument("X", "option", "BTC", expiry=NOW, strike=1.0, option_type="straddle")

    def test_round_to_tick(self):
        np.testing.assert_allclose(round_to_tick([100.04, 100.06], 0.1, [1, -1]), [100.1, 100.0])


class TestScenarioPnl:
    def test_linear_inverse_option(self):
        exp = NOW + timedelta(days=30)
        inst = [
            Instrument("BTC-PERP", "linear_perp", "BTC", contract_size=0.001),
            Instrument("BTC-INV", "inverse_perp", "BTC", contract_size=100.0),
            Instrument("BTC-C", "option", "BTC", expiry=exp, strike=50_000, option_type="call"),
            Instrument("ETH-FUT", "future", "ETH", contract_size=1.0, expiry=exp),
        ]
        arr = InstrumentArrays.from_instruments(inst)
        mark = np.array([50_000.0, 50_000.0, 50_000.0, 3_000.0])
        sigma = np.array([np.nan, np.nan, 0.6, np.nan])
        spot = np.array([[-0.1, 0.0, 0.1], [0.05, 0.0, -0.05]])  # BTC row, ETH row
        vol = np.array([[0.0, 0.25, 0.0], [0.0, 0.0, 0.0]])
        s = scenario_pnl(arr, mark, sigma, NOW, spot, vol)
        np.testing.assert_allclose(s[0], 0.001 * 50_000 * np.array([-0.1, 0.0, 0.1]))
        # inverse: coin P&L cs*(1/F0 - 1/F1) valued at F1
        f1 = 50_000 * (1 + np.array([-0.1, 0.0, 0.1]))
        np.testing.assert_allclose(s[1], 100.0 * (1 / 50_000 - 1 / f1) * f1, rtol=1e-12)
        t = 30 / 365
        base = black76_price(50_000, 50_000, t, 0.6, True)
        ref = black76_price(f1, 50_000, t, 0.6 * np.array([1.0, 1.25, 1.0]), True) - base
        np.testing.assert_allclose(s[2], ref, rtol=1e-12)
        np.testing.assert_allclose(s[3], 3_000 * np.array([0.05, 0.0, -0.05]))

    def test_unrealised_fee_funding(self):
        upnl = unrealised_pnl(np.array([2.0, -100.0]), np.array([100.0, 50_000.0]), np.array([110.0, 40_000.0]),
                              np.array([1.0, 10.0]), np.array([False, True]))
        # inverse short 100 x 10 USD: coin pnl = -1000*(1/50000 - 1/40000) = +0.005 BTC -> 200 USD at 40k
        np.testing.assert_allclose(upnl, [20.0, 1000 * (1 / 40_000 - 1 / 50_000) * 40_000])
        assert trade_fee(2.0, 100.0, 0.0005) == pytest.approx(0.1)
        assert trade_fee(100.0, 50_000.0, 0.0005, 10.0, True) == pytest.approx(1000 / 50_000 * 0.0005)
        # positive funding: longs pay
        assert funding_payment(2.0, 100.0, 0.0001) == pytest.approx(-0.02)
        assert funding_payment(-2.0, 100.0, 0.0001) == pytest.approx(0.02)
