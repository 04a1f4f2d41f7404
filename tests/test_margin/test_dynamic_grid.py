"""The dynamic_grid policy: static equivalence, references, offsets, controls, errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from margin.accounts import MarketData, Portfolio
from margin.controls import Controls
from margin.dynamic_grid import (
    DynamicGridPolicy,
    GridPath,
    deribit_style_grid,
    derive_style_grid,
    ewma_correlation_path,
    static_grid,
    static_grid_path,
)
from margin.engine import compute_margin
from margin.instruments import Instrument
from margin.params import MarginParams, ParamsFile, RiskModel
from margin.policies import PolicyContext
from margin.portfolio import aggregate_grid_risk
from models.base import VolatilityForecast

FREE = Controls(floor=1e-4, ceiling=0.95, max_change=1e6, notice_bars=0)


def _contexts(var: dict[str, np.ndarray], n: int = 60, seed: int = 42, regime: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-01-01", periods=n, freq="D", tz="UTC")
    out = {}
    base = rng.standard_normal(n) * 0.03
    for j, (u, v) in enumerate(var.items()):
        r = 0.7 * base + 0.3 * rng.standard_normal(n) * 0.03
        close = 100.0 * (j + 1) * np.exp(np.cumsum(r))
        bars = pd.DataFrame({"close": close}, index=times)
        v2 = np.asarray(v, dtype=float).reshape(n, -1)
        rp = None if regime is None else np.c_[1 - regime, regime]
        fc = VolatilityForecast(origins=times, variance=v2, model="test", regime_probs=rp,
                                regime_names=None if rp is None else ("calm", "stressed"))
        out[u] = PolicyContext(bars=bars, forecast=fc, controls=FREE)
    return out


def _book() -> Portfolio:
    now = datetime(2020, 2, 1, tzinfo=UTC)
    exp = now + timedelta(days=30)
    inst = [Instrument("BTC-PERP", "linear_perp", "BTC"), Instrument("ETH-PERP", "linear_perp", "ETH"),
            Instrument("BTC-C", "option", "BTC", expiry=exp, strike=110.0, option_type="call"),
            Instrument("ETH-P", "option", "ETH", expiry=exp, strike=180.0, option_type="put")]
    pos = np.array([[1.0, 0.0, -1.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, -0.5, 0.0, -1.0], [0.0, 0.0, -2.0, -2.0]])
    market = MarketData({"BTC": 100.0, "ETH": 200.0}, {"BTC-C": 2.0, "ETH-P": 5.0}, {"BTC-C": 0.6, "ETH-P": 0.7},
                        {"USDC": 1.0})
    return Portfolio.from_arrays(inst, pos, np.where(pos != 0, 1.0, 0.0) * np.array([100, 200, 2, 5.0]), market, now,
                                 balances=np.full((4, 1), 50.0))


class TestStaticEquivalence:
    def test_frozen_dynamic_grid_equals_static(self):
        k, r = 2.5, 0.16
        v = (math.log1p(r) / k) ** 2
        n = 40
        ctx = _contexts({"BTC": np.full(n, v), "ETH": np.full(n, v)}, n=n)
        pol = DynamicGridPolicy(k=k, vol_shock=0.25, correlation="none", controls=FREE)
        path = pol.path(ctx)
        ref = static_grid(r)
        for t in (0, 17, n - 1):
            for u in range(2):
                g = path.grid(t, u)
                np.testing.assert_allclose(g.spot_shocks, ref.spot_shocks, rtol=0, atol=1e-12)
                assert g.vol_shocks == ref.vol_shocks
        st = static_grid_path(path.times, path.underlyings, r)
        pf = _book()
        a = compute_margin(pf, path.params_at(10), "portfolio", liquidation_price=False)
        b = compute_margin(pf, st.params_at(10), "portfolio", liquidation_price=False)
        np.testing.assert_allclose(a.im, b.im, rtol=1e-12)
        np.testing.assert_allclose(a.mm, b.mm, rtol=1e-12)

    def test_stress_weight_one_equals_no_offsets(self):
        n = 30
        ctx = _contexts({"BTC": np.full(n, 4e-4), "ETH": np.full(n, 9e-4)}, n=n)
        path = DynamicGridPolicy(k=3.0, stress_base=1.0, controls=FREE).path(ctx)
        assert path.correlation is not None and np.all(path.stress_weight == 1.0)
        pf = _book()
        with_c = compute_margin(pf, path.params_at(20), "portfolio", liquidation_price=False)
        plain = ParamsFile(markets=path.params_at(20).markets)
        no_c = compute_margin(pf, plain, "portfolio", liquidation_price=False)
        np.testing.assert_allclose(with_c.im, no_c.im, rtol=1e-12)


class TestReferences:
    def test_deribit_style(self):
        g = deribit_style_grid()
        assert len(g.spot_shocks) == 17 and g.spot_shocks[0] == pytest.approx(-0.16)
        assert g.spot_shocks[-1] == pytest.approx(0.16)
        np.testing.assert_allclose(np.diff(g.spot_shocks), 0.02, atol=1e-12)
        assert g.vol_shocks == (-0.30, 0.0, 0.45)

    def test_derive_style(self):
        g = derive_style_grid()
        assert g.n_scenarios == 33
        assert (g.spot_shocks[0], g.spot_shocks[-1]) == (pytest.approx(-0.18), pytest.approx(0.18))

    def test_static_grid_linear_margin(self):
        pf = _book()
        prm = ParamsFile(markets=(MarginParams(market_id="BTC", im_rate=0.16, mm_rate=0.1,
                                               scenario_grid=deribit_style_grid()),
                                  MarginParams(market_id="ETH", im_rate=0.16, mm_rate=0.1,
                                               scenario_grid=deribit_style_grid())))
        one = Portfolio.from_arrays(pf.instruments, np.array([[2.0, 0, 0, 0]]), np.array([[100.0, 0, 0, 0]]),
                                    pf.market, pf.as_of)
        res = compute_margin(one, prm, "portfolio", liquidation_price=False)
        assert res.im[0] == pytest.approx(0.16 * 2 * 100.0, rel=1e-12)  # a lone perp: range × notional


class TestOffsets:
    def test_hand_worked(self):
        m = np.array([[3.0, 4.0]])
        s = np.ones((1, 2))
        r0 = np.eye(2)
        assert aggregate_grid_risk(m, s, r0, 0.0)[0] == pytest.approx(5.0)
        assert aggregate_grid_risk(m, s, r0, 1.0)[0] == pytest.approx(7.0)
        # a pair: long BTC (worst on a fall), short ETH (worst on a rise), correlation 0.8 -> hedge credit
        rr = np.array([[1.0, 0.8], [0.8, 1.0]])
        pair = aggregate_grid_risk(m, np.array([[1.0, -1.0]]), rr, 0.0)[0]
        assert pair == pytest.approx(math.sqrt(9 + 16 - 2 * 0.8 * 12))
        w = 0.3
        assert aggregate_grid_risk(m, np.array([[1.0, -1.0]]), rr, w)[0] == pytest.approx(
            math.sqrt((1 - w) * (9 + 16 - 2 * 0.8 * 12) + w * 49))

    def test_never_above_sum(self):
        rng = np.random.default_rng(42)
        for _ in range(50):
            u = 3
            a = rng.standard_normal((u, u))
            c = a @ a.T
            d = np.sqrt(np.diag(c))
            r = c / np.outer(d, d)
            m = rng.random((20, u)) * 10
            s = rng.choice([-1.0, 1.0], (20, u))
            agg = aggregate_grid_risk(m, s, r, float(rng.random()))
            assert np.all(agg <= m.sum(axis=1) + 1e-12) and np.all(agg >= 0)

    def test_ewma_correlation_causal(self):
        rng = np.random.default_rng(42)
        r = rng.standard_normal((50, 2))
        a = ewma_correlation_path(r, 0.94)
        b = ewma_correlation_path(np.r_[r[:30], rng.standard_normal((20, 2))], 0.94)
        np.testing.assert_allclose(a[:30], b[:30], rtol=1e-12)
        assert np.allclose(a[:, 0, 0], 1.0) and np.all(np.abs(a) <= 1.0)

    def test_stress_raises_weight(self):
        n = 40
        reg = np.linspace(0.0, 1.0, n)
        ctx = _contexts({"BTC": np.full(n, 4e-4), "ETH": np.full(n, 9e-4)}, n=n, regime=reg)
        path = DynamicGridPolicy(k=3.0, stress_base=0.1, stress_slope=0.8, controls=FREE).path(ctx)
        np.testing.assert_allclose(path.stress_weight, np.clip(0.1 + 0.8 * reg, 0, 1), rtol=1e-12)


class TestForecastResponse:
    def test_range_follows_sigma_over_horizon(self):
        n = 30
        v = np.tile([1e-4, 4e-4, 9e-4], (n, 1))
        ctx = _contexts({"BTC": v}, n=n)
        p1 = DynamicGridPolicy(k=2.0, horizon_bars=2, correlation="none", controls=FREE).path(ctx)
        np.testing.assert_allclose(p1.range_new[:, 0], np.expm1(2.0 * math.sqrt(5e-4)), rtol=1e-12)
        p5 = DynamicGridPolicy(k=2.0, horizon_bars=5, correlation="none", controls=FREE).path(ctx)
        np.testing.assert_allclose(p5.range_new[:, 0], np.expm1(2.0 * math.sqrt(1e-4 + 4e-4 + 9e-4 * 3)), rtol=1e-12)

    def test_constant_forecast_gives_floor_vol_shock(self):
        n = 30
        ctx = _contexts({"BTC": np.full(n, 4e-4)}, n=n)
        p = DynamicGridPolicy(vol_floor=0.07, controls=FREE).path(ctx)
        np.testing.assert_allclose(p.vol_shock, 0.07)

    def test_vol_of_vol_widens_vol_shock(self):
        n = 60
        v = np.full(n, 4e-4)
        v[30:] *= np.exp(np.random.default_rng(42).standard_normal(30))
        p = DynamicGridPolicy(vol_k=2.0, vol_floor=0.0, controls=FREE).path(_contexts({"BTC": v}, n=n))
        assert p.vol_shock[:30, 0].max() == 0.0 and p.vol_shock[35:, 0].min() > 0.05

    def test_controls_cap_and_notice(self):
        n = 20
        v = np.full(n, 1e-4)
        v[10:] = 1e-2
        c = Controls(floor=0.01, ceiling=0.9, max_change=0.25, notice_bars=2)
        p = DynamicGridPolicy(k=2.0, correlation="none", controls=c).path(_contexts({"BTC": v}, n=n))
        rn, ro = p.range_new[:, 0], p.range_open[:, 0]
        assert np.all(rn[1:] / rn[:-1] <= 1.25 + 1e-12)
        assert np.all(ro <= rn + 1e-15)
        assert ro[10] == pytest.approx(rn[8]) and ro[11] == pytest.approx(rn[9])  # increases bind 2 bars later


class TestValidation:
    def test_errors(self):
        with pytest.raises(ValueError, match="k must be > 0"):
            DynamicGridPolicy(k=0.0)
        with pytest.raises(ValueError, match="correlation must be"):
            DynamicGridPolicy(correlation="dcc")
        with pytest.raises(ValueError, match="spot_range must be in"):
            static_grid(1.2)
        with pytest.raises(ValueError, match="positive semi-definite"):
            RiskModel(underlyings=("A", "B", "C"),
                      grid_correlation=((1, 0.9, -0.9), (0.9, 1, 0.9), (-0.9, 0.9, 1)))
        with pytest.raises(ValueError, match="must be 2x2"):
            RiskModel(underlyings=("A", "B"), grid_correlation=((1.0,),))
        with pytest.raises(ValueError, match="grid_stress_weight"):
            RiskModel(underlyings=("A",), grid_correlation=((1.0,),), grid_stress_weight=1.5)
        times = pd.date_range("2020-01-01", periods=3, tz="UTC")
        with pytest.raises(ValueError, match="range_new must have shape"):
            GridPath(times=times, underlyings=("A",), range_new=np.ones((2, 1)) * 0.1, range_open=np.ones((3, 1)),
                     vol_shock=np.zeros((3, 1)), correlation=None, stress_weight=np.ones(3),
                     concentration_addon=np.zeros((3, 1)))

    def test_risk_model_round_trip(self):
        rm = RiskModel(underlyings=("A", "B"), grid_correlation=((1.0, 0.5), (0.5, 1.0)), grid_stress_weight=0.3)
        assert RiskModel.from_dict(rm.to_dict()) == rm
        assert "grid_correlation" not in RiskModel(underlyings=("A",)).to_dict()
