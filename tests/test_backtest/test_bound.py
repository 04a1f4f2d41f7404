"""The clairvoyant bound: never beaten by any path (both MM modes, notice, caps), exact on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _support.markets import market
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backtest.bound import clairvoyant_bound
from backtest.population import Population, PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, run_backtest
from margin.controls import Controls, apply_controls
from margin.path import MarginPath


def random_path(rng, times, entry: bool) -> MarginPath:
    n = len(times)
    im = np.exp(rng.uniform(np.log(0.01), np.log(0.6), n))
    if entry:
        return MarginPath(times=times, im_rate=im, mm_rate=im * rng.uniform(0.05, 1.0, n), policy="entry",
                          mm_binds="entry")
    c = Controls(floor=0.01, ceiling=0.6, max_change=float(rng.uniform(0.1, 2.0)), notice_bars=int(rng.integers(0, 4)))
    cp = apply_controls(im, c, np.exp(rng.uniform(np.log(0.002), np.log(0.4), n)))
    return MarginPath(times=times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy="path", mm_pending=cp.mm_pending,
                      mm_effective_bar=cp.mm_effective_bar)


class TestNeverBeaten:
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 10_000), topup=st.sampled_from([0.0, 0.5, 1.0]), entry=st.booleans())
    def test_random_paths(self, seed, topup, entry):
        bars, _ = market(120, seed=seed, vol=0.05)
        pop = generate_population(120, PopulationConfig(n_positions=300, seed=seed, topup_prob=topup))
        cfg = BacktestConfig(frozen=True)
        cut = bars.index[30]
        bound = clairvoyant_bound(bars, pop, cfg, start=cut)
        rng = np.random.default_rng(seed)
        for _ in range(4):
            r = run_backtest(bars, random_path(rng, bars.index, entry), pop, cfg, start=cut)
            assert r.exposure == pytest.approx(bound.exposure, rel=1e-12)
            b = bound.at(r.avg_collateral)
            if b.reason is None:  # the path locks less than the bound's least possible: nothing to compare
                assert b.liquidations <= r.liquidations + 1e-9
                assert b.bad_debt <= r.bad_debt

    def test_static_pairs_and_tighter_with_more_collateral(self):
        bars, _ = market(300, seed=3, vol=0.04)
        pop = generate_population(300, PopulationConfig(n_positions=2000, seed=3))
        cfg = BacktestConfig(frozen=True)
        cut = bars.index[100]
        bound = clairvoyant_bound(bars, pop, cfg, start=cut)
        prev = math.inf
        for im in (0.03, 0.06, 0.1, 0.2, 0.33):
            for mm in (0.25 * im, 0.5 * im, min(0.05, im)):
                r = run_backtest(bars, MarginPath(times=bars.index, im_rate=np.full(300, im),
                                                  mm_rate=np.full(300, mm), policy="s"), pop, cfg, start=cut)
                assert bound.at(r.avg_collateral).liquidations <= r.liquidations
        for c in (0.15, 0.2, 0.3, 0.4):
            v = bound.at(c).liquidations
            assert v <= prev + 1e-9  # more collateral never hurts the bound
            prev = v


def _one_position(side: float, lev: float, hold: int, topup_u: float = 0.99, topup_prob: float = 0.0) -> Population:
    cfg = PopulationConfig(n_positions=1, topup_prob=topup_prob, funding_rate=0.0, fee_rate=0.0)
    return Population(open_bar=np.array([0]), side=np.array([side]), leverage_draw=np.array([lev]),
                      hold_bars=np.array([hold]), notional=np.array([1000.0]), topup_u=np.array([topup_u]),
                      cfg=cfg, n_bars=4)


class TestHandWorked:
    """One long of 1,000 USD at 100, held 3 bars; lows 95, 80, 90: the bankruptcy price with entry margin w is
    100 - w/10, so it survives with w > 200 (20% of notional), and is liquidated otherwise."""

    bars = pd.DataFrame({"open": [100.0, 100, 95, 85], "high": [100.0, 101, 96, 92],
                         "low": [100.0, 95, 80, 90], "close": [100.0, 96, 85, 91], "volume": 1e9},
                        index=pd.date_range("2020-01-01", periods=4, freq="D", tz="UTC"))

    def test_survive_or_liquidate(self):
        pop = _one_position(1.0, 100.0, 3)  # own margin 1%: the IM sets it
        b = clairvoyant_bound(self.bars, pop, BacktestConfig(frozen=True, funding=False))
        assert b.exposure == pytest.approx(3000.0)
        # survive: IM just above 20% for 3 bars = 600 USD·bars -> avg collateral 0.2
        hi = b.at(0.2 + 1e-9)
        assert hi.liquidations == pytest.approx(0.0, abs=1e-6)
        # liquidate at once with the least IM: collateral 1% of 1,000 for one bar = 10 USD·bars
        lo = b.at(10.0 / 3000.0)
        assert lo.liquidations == pytest.approx(1.0)
        # in between: the hull, linear in collateral
        mid = b.at(0.1)
        assert mid.liquidations == pytest.approx(1.0 - (300.0 - 10.0) / (600.0 - 10.0), rel=1e-6)
        assert b.at(0.001).reason is not None  # below the least any policy locks

    def test_topping_up_trader(self):
        # a trader who tops up needs only to clear the first bar's low (95): w > 50; then tops up to 200 for
        # the second bar and keeps it: collateral >= 50+ + 200 + 200 = 450 USD·bars
        pop = _one_position(1.0, 100.0, 3, topup_u=0.0, topup_prob=1.0)
        b = clairvoyant_bound(self.bars, pop, BacktestConfig(frozen=True, funding=False))
        assert b.at(450.0 / 3000.0 + 1e-6).liquidations == pytest.approx(0.0, abs=1e-5)
        assert b.at(440.0 / 3000.0).liquidations > 0.0
