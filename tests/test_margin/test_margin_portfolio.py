"""Portfolio margin: grid vs a plain loop, ES/VaR, EWMA correlation, FHS, add-ons; cross; collateral."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from margin.collateral import collateral_value, haircut_value
from margin.cross import cross_requirements, net_linear_notional
from margin.instruments import Instrument, InstrumentArrays
from margin.params import CollateralHaircuts, MarginParams, RiskTier, ScenarioGrid
from margin.portfolio import (
    EwmaCorrelation,
    ewma_covariance_path,
    fhs_scenarios,
    grid_scenario_matrix,
    max_loss_margin_chunked,
    option_addons,
    risk_measure,
    scenario_margin,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EXP = NOW + timedelta(days=45)


def _bs_ref(f, k, t, sig, call):
    """Black-76 with math.erf (independent of scipy)."""
    d1 = (math.log(f / k) + 0.5 * sig * sig * t) / (sig * math.sqrt(t))
    d2 = d1 - sig * math.sqrt(t)
    n = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return f * n(d1) - k * n(d2) if call else k * n(-d2) - f * n(-d1)


@pytest.fixture
def book():
    inst = [
        Instrument("BTC-PERP", "linear_perp", "BTC", contract_size=0.01),
        Instrument("BTC-C", "option", "BTC", expiry=EXP, strike=100_000, option_type="call"),
        Instrument("BTC-P", "option", "BTC", expiry=EXP, strike=80_000, option_type="put"),
        Instrument("ETH-INV", "inverse_perp", "ETH", contract_size=10.0),
    ]
    arr = InstrumentArrays.from_instruments(inst)
    mark = np.array([90_000.0, 90_000.0, 90_000.0, 3_000.0])
    sigma = np.array([np.nan, 0.5, 0.6, np.nan])
    return inst, arr, mark, sigma


class TestGrid:
    def test_hand_computed_linear(self, book):
        _, arr, mark, sigma = book
        s = grid_scenario_matrix(arr, mark, sigma, NOW, ScenarioGrid())
        p = np.array([[100.0, 0, 0, 0]])  # 1 BTC long
        # worst grid loss: -15 % on 90,000 = 13,500
        assert scenario_margin(p, s)[0] == pytest.approx(13_500.0, rel=1e-12)

    def test_matches_plain_loop(self, book):
        _, arr, mark, sigma = book
        g = ScenarioGrid()
        s = grid_scenario_matrix(arr, mark, sigma, NOW, g)
        rng = np.random.default_rng(42)
        p = rng.normal(0, 3, (25, 4))
        t = 45 / 365
        ref = np.zeros(25)
        for a in range(25):
            worst = -np.inf
            for ds in g.spot_shocks:
                for dv in g.vol_shocks:
                    pnl = p[a, 0] * 0.01 * 90_000 * ds
                    for j, (k, sg, c) in enumerate(((100_000, 0.5, True), (80_000, 0.6, False)), start=1):
                        pnl += p[a, j] * (_bs_ref(90_000 * (1 + ds), k, t, sg * (1 + dv), c) - _bs_ref(90_000, k, t, sg, c))
                    pnl += p[a, 3] * 10.0 * ds  # inverse valued at the scenario price
                    worst = max(worst, -pnl)
            ref[a] = max(worst, 0.0)
        np.testing.assert_allclose(scenario_margin(p, s), ref, rtol=1e-9, atol=1e-6)

    def test_per_underlying_groups(self, book):
        _, arr, mark, sigma = book
        s = grid_scenario_matrix(arr, mark, sigma, NOW, ScenarioGrid())
        p = np.array([[100.0, 0, 0, 1000.0]])  # 1 BTC long + 10,000 USD ETH inverse long
        joint = scenario_margin(p, s)[0]
        per = scenario_margin(p, s, arr.underlying_index)[0]
        assert per == pytest.approx(13_500 + 1_500)
        assert joint == pytest.approx(13_500 + 1_500)  # same-direction joint shock: no offset

    def test_chunked_kernel_matches(self, book):
        _, arr, mark, sigma = book
        s = grid_scenario_matrix(arr, mark, sigma, NOW, ScenarioGrid())
        p = np.random.default_rng(1).normal(0, 5, (5000, 4))
        ref = scenario_margin(p, s)
        np.testing.assert_allclose(max_loss_margin_chunked(p, s, chunk=777), ref, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(max_loss_margin_chunked(p, s, chunk=500, workers=2), ref, rtol=1e-12, atol=1e-9)
        pf = np.asfortranarray(p)
        np.testing.assert_allclose(max_loss_margin_chunked(pf, s, chunk=600, workers=2), ref, rtol=1e-12, atol=1e-9)
        got32 = max_loss_margin_chunked(p.astype(np.float32), s, chunk=1024)
        assert np.max(np.abs(got32 - ref) / np.maximum(ref, 1.0)) < 1e-4


class TestMeasures:
    def test_es_var_values(self):
        loss = np.arange(1.0, 101.0)[None, :]  # 100 scenarios, 1..100
        assert risk_measure(loss, "max")[0] == 100.0
        assert risk_measure(loss, "es", 0.95)[0] == pytest.approx(np.mean([96, 97, 98, 99, 100]))
        assert risk_measure(loss, "var", 0.95)[0] == 96.0
        assert risk_measure(loss, "es", 0.999)[0] == 100.0  # tail holds at least one scenario

    def test_unknown(self):
        with pytest.raises(ValueError, match="measure must be"):
            risk_measure(np.zeros((1, 3)), "cvar")


class TestEwmaFhs:
    def test_ewma_path_vs_loop(self):
        rng = np.random.default_rng(42)
        r = rng.normal(0, 0.02, (200, 3))
        path = ewma_covariance_path(r, 0.94, warmup=20)
        c = r[:20].T @ r[:20] / 20 + 1e-12 * np.eye(3)
        ew = EwmaCorrelation(0.94, c)
        for t in range(200):
            np.testing.assert_allclose(path[t], ew.cov_, rtol=1e-12)
            ew.update(r[t])
        corr = ew.corr_
        assert np.allclose(np.diag(corr), 1.0) and np.all(np.abs(corr) <= 1.0 + 1e-12)

    def test_ewma_matches_pandas(self):
        pd = pytest.importorskip("pandas")
        rng = np.random.default_rng(3)
        r = rng.normal(0, 0.02, (300, 2))
        x = pd.Series(r[:, 0] * r[:, 1])
        ref = x.ewm(alpha=0.06, adjust=False).mean().to_numpy()  # y_t = 0.94 y_{t-1} + 0.06 x_t, y_0 = x_0
        ew = EwmaCorrelation(0.94, np.outer(r[0], r[0]))
        for t in range(1, 300):
            ew.update(r[t])
        assert ew.cov_[0, 1] == pytest.approx(ref[-1], rel=1e-10)

    def test_fhs_vs_loop_and_correlation(self):
        rng = np.random.default_rng(42)
        cov = np.array([[1.0, 0.7], [0.7, 1.0]]) * 0.02**2
        r = rng.multivariate_normal([0, 0], cov, 600)
        shocks, corr = fhs_scenarios(r, 0.94, horizon=4, warmup=30)
        path = ewma_covariance_path(r, 0.94, 30)
        now = 0.94 * path[-1] + 0.06 * np.outer(r[-1], r[-1])
        for t in (30, 100, 599):
            z = np.linalg.solve(np.linalg.cholesky(path[t]), r[t])
            x = np.linalg.cholesky(now) @ z * 2.0
            np.testing.assert_allclose(shocks[t - 30], np.expm1(x), rtol=1e-10)
        emp = np.corrcoef(np.log1p(shocks).T)[0, 1]
        assert abs(emp - 0.7) < 0.1 and abs(corr[0, 1] - 0.7) < 0.25


class TestAddons:
    def test_short_option_and_concentration(self, book):
        _, arr, mark, sigma = book
        grids = [ScenarioGrid(short_option_addon=0.01, concentration_threshold=50_000.0, concentration_addon=0.02),
                 ScenarioGrid()]
        p = np.array([[0.0, -3.0, 1.0, 0.0], [200.0, 0.0, 0.0, 0.0]])
        add = option_addons(p, arr, mark, sigma, NOW, grids)
        assert add[0, 0] >= 0.01 * 2 * 90_000  # net short 2 options
        assert add[1, 0] == pytest.approx(0.02 * (2 * 90_000 - 50_000))
        assert np.all(add[:, 1] == 0.0)


class TestCross:
    def test_netting_hand_computed(self, book):
        _, arr, mark, sigma = book
        prm = [MarginParams(market_id="BTC", im_rate=0.02, mm_rate=0.01), MarginParams(market_id="ETH", im_rate=0.05, mm_rate=0.02)]
        p = np.array([[150.0, 0, 0, 0], [150.0, 0, 0, -1000.0]])
        im, mm = cross_requirements(p, arr, mark, mark, prm)
        assert im[0] == pytest.approx(0.02 * 1.5 * 90_000) and mm[0] == pytest.approx(0.01 * 1.5 * 90_000)
        assert im[1] == pytest.approx(0.02 * 135_000 + 0.05 * 10_000)
        np.testing.assert_allclose(net_linear_notional(p, arr, mark)[1], [135_000.0, -10_000.0])

    def test_offsetting_positions_net(self):
        inst = [Instrument("P", "linear_perp", "BTC"), Instrument("F", "future", "BTC", expiry=EXP)]
        arr = InstrumentArrays.from_instruments(inst)
        prm = [MarginParams(market_id="BTC", tiers=(RiskTier(1e5, 0.02, 0.01), RiskTier(None, 0.05, 0.025)))]
        mark = np.array([100.0, 100.0])
        im, _ = cross_requirements(np.array([[1000.0, -900.0], [1000.0, 0.0]]), arr, mark, mark, prm)
        assert im[0] == pytest.approx(0.02 * 10_000) and im[1] == pytest.approx(0.02 * 100_000)


class TestCollateral:
    def test_hand_computed(self):
        cfg = CollateralHaircuts(size_brackets=((1_000_000, 0.05), (5_000_000, 0.10)), bridge_haircut=0.05)
        # 6,000,000 USD of BTC (major, 10 %) on arbitrum
        v = haircut_value(np.array([6e6]), 0.10, cfg.size_brackets, True, cfg.bridge_haircut)[0]
        ref = (1e6 * 0.90 + 4e6 * 0.85 + 1e6 * 0.75) * 0.95
        assert v == pytest.approx(ref)

    def test_strictest_market_and_pool(self):
        slots = (("USDC", "ethereum"), ("ETH", "arbitrum"), ("PEPE", "ethereum"))
        bal = np.array([[1000.0, 2.0, 1e6]])
        prices = np.array([1.0, 3000.0, 1e-5])
        loose = CollateralHaircuts(bridge_haircut=0.0)
        strict = CollateralHaircuts(bridge_haircut=0.2)
        v = collateral_value(bal, prices, slots, [loose, strict])[0]
        assert v == pytest.approx(1000 * 0.98 + 6000 * 0.9 * 0.8 + 10 * 0.65)

    def test_negative_balance_at_face(self):
        assert haircut_value(np.array([-100.0]), 0.5)[0] == -100.0
