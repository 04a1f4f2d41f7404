"""Backtester: a hand-worked scenario, the accounting identity, the per-position reference loop, timing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from backtest.factory import make_policy
from backtest.population import Population, PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, max_increase, reference_backtest, run_backtest
from margin.controls import Controls
from margin.params import LiquidationSettings
from margin.path import MarginPath
from margin.policies import PolicyContext


def make_bars(rows, start="2024-01-01", freq="D", volume=None):
    idx = pd.date_range(start, periods=len(rows), freq=freq, tz="UTC")
    df = pd.DataFrame(rows, columns=["open", "high", "low", "close"], index=idx, dtype=float)
    if volume is not None:
        df["volume"] = volume
    return df


def make_pop(rows, n_bars, **cfg):
    """rows: (open_bar, hold_bars, side, leverage_draw, notional, topup_u)."""
    a = np.array(rows, dtype=float)
    return Population(open_bar=a[:, 0].astype(np.int64), hold_bars=a[:, 1].astype(np.int64), side=a[:, 2],
                      leverage_draw=a[:, 3], notional=a[:, 4], topup_u=a[:, 5], n_bars=n_bars,
                      cfg=PopulationConfig(n_positions=len(rows), **cfg))


def static_path(bars, im, mm, binds="path"):
    n = len(bars)
    return MarginPath(times=bars.index, im_rate=np.full(n, im), mm_rate=np.full(n, mm), policy=f"static_{im}",
                      mm_binds=binds)


def random_market(n=300, seed=42, vol=0.03):
    rng = np.random.default_rng(seed)
    sig = vol * np.exp(np.cumsum(rng.normal(0, 0.08, n)))
    r = rng.standard_t(3, n) * sig / np.sqrt(3)
    c = 100 * np.exp(np.cumsum(r))
    o = np.r_[100.0, c[:-1]] * np.exp(rng.normal(0, sig / 4))  # gaps at the open
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, sig / 2)))
    lo = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, sig / 2)))
    return make_bars(np.c_[o, h, lo, c], volume=rng.uniform(5e3, 5e4, n))


HAND = LiquidationSettings(penalty_rate=0.01, max_close_fraction=0.5, target_health=1.05, slippage_base=0.0,
                           slippage_range_coef=0.0, slippage_volume_coef=0.0, insurance_fund_initial=10.0)


class TestHandWorked:
    """Three positions, four bars, IM 10 %, MM 5 %, penalty 1 %, no slippage/fees/funding/top-ups.

    A: long 1,000 USD at 100 (10x, margin 100, 10 units), held 3 bars.
    B: short 2,000 USD at 100 (5x: margin 400, 20 units), held 2 bars.
    C: long 950 USD at 95 (draw 20x, capped at 1/IM = 10x: margin 95, 10 units), opened at the close of bar 1.
    Bar 1 (O 99, H 101, L 90, C 95): A's liquidation price (100 - 100/10)/0.95 = 94.7368 is crossed by the
    low although the bar closes above it -> partial close at L: f = (1.05 MM - E)/(1.05 MM - 0.01 N) = 1/17.
    Bar 2 (O 80, gap): A (rest) and C gap past their liquidation prices -> full closes at the open 80 with bad
    debt; B closes at 82 at the end of its holding period (+360 USD).
    """

    bars = make_bars([[100, 100, 100, 100], [99, 101, 90, 95], [80, 85, 78, 82], [82, 83, 81, 82]])
    pop = make_pop([[0, 3, 1, 10, 1000, 0.5], [0, 2, -1, 5, 2000, 0.5], [1, 5, 1, 20, 950, 0.5]], 4, fee_rate=0.0,
                   funding_rate=0.0, topup_prob=0.0)
    cfg = BacktestConfig(liquidation=HAND, topups=False, max_steps_per_bar=1)

    def test_numbers(self):
        res = run_backtest(self.bars, static_path(self.bars, 0.10, 0.05), self.pop, self.cfg, per_position=True)
        # bar 1: A partial
        L = (100 - 100 / 10) / 0.95
        f = 1 / 17
        realised_a = f * 10 * (L - 100)
        pen_a = f * 10 * L * 0.01
        w_a = 100 + realised_a - pen_a
        q_a = 10 * (1 - f)
        # bar 2: A and C gap to 80
        bad_a = -(w_a + q_a * (80 - 100))
        bad_c = -(95 + 10 * (80 - 95))
        assert bad_a == pytest.approx(91.888544891, rel=1e-9)
        assert bad_c == 55.0
        assert res.liquidations == 2 and res.liquidation_events == 3  # A (twice) and C
        assert res.bad_debt == pytest.approx(bad_a + bad_c, rel=1e-9)
        assert res.penalties == pytest.approx(pen_a, rel=1e-9)
        assert res.fund_draw == pytest.approx(10 + pen_a, rel=1e-9)
        assert res.uncovered_bad_debt == pytest.approx(bad_a + bad_c - 10 - pen_a, rel=1e-9)
        assert res.fund_end == pytest.approx(0.0, abs=1e-12)
        assert res.liquidated_notional == pytest.approx(f * 10 * L + q_a * 80 + 10 * 80, rel=1e-9)
        np.testing.assert_array_equal(res.series["liquidation_events"].to_numpy(), [0, 1, 2, 0])
        np.testing.assert_array_equal(res.series["liquidations"].to_numpy(), [0, 1, 1, 0])
        # collateral: bar 1 A 100 + B 400; bar 2 A w_a + B 400 + C 95
        assert res.collateral_locked == pytest.approx(500 + w_a + 400 + 95, rel=1e-12)
        assert res.exposure == pytest.approx(1000 * 3 + 2000 * 2 + 950 * 2)
        assert res.avg_collateral == pytest.approx(res.collateral_locked / res.exposure)
        np.testing.assert_allclose(res.per_position["liquidation_events"], [2, 0, 1])
        np.testing.assert_allclose(res.per_position["liquidations"], [1, 0, 1])
        np.testing.assert_allclose(res.per_position["bad_debt"], [bad_a, 0, bad_c], rtol=1e-9)
        assert res.ledger_residual < 1e-12
        assert res.n_positions == 3

    def test_steps_within_bar(self):
        """With more steps per bar, A is partially closed again at each new liquidation price while bar 1's low
        (90) is below it; each step is the one-step rule applied at the new trigger (hand loop)."""
        res = run_backtest(self.bars, static_path(self.bars, 0.10, 0.05), self.pop,
                           BacktestConfig(liquidation=HAND, topups=False, max_steps_per_bar=100))
        w, q, steps, pen = 100.0, 10.0, 0, 0.0
        while True:
            L = (100 - w / q) / 0.95
            if L < 90:
                break
            mm = 0.05 * q * L
            eq = w + q * (L - 100)
            f = (1.05 * mm - min(eq, mm)) / (1.05 * mm - 0.01 * q * L)
            assert 0 < f <= 0.5
            w += f * q * (L - 100) - f * q * L * 0.01
            pen += f * q * L * 0.01
            q -= f * q
            steps += 1
        assert steps > 1
        assert res.series["liquidation_events"].iloc[1] == steps
        assert res.series["liquidations"].iloc[1] == 1
        bad_a = -(w + q * (80 - 100))
        assert res.bad_debt == pytest.approx(bad_a + 55.0, rel=1e-9)
        assert res.penalties == pytest.approx(pen, rel=1e-9)
        assert res.ledger_residual < 1e-12

    def test_breaches(self):
        res = run_backtest(self.bars, static_path(self.bars, 0.10, 0.05), self.pop, self.cfg)
        b = res.breaches
        np.testing.assert_allclose(b["loss_long"], [0.05, 1 - 82 / 95, 0.0])
        np.testing.assert_array_equal(b["breach_im"], [False, True, False])
        np.testing.assert_array_equal(b["breach_mm"][1:], [True, False])  # bar 1: 5 % loss vs 5 % MM is a tie
        assert res.breach.index[0] == self.bars.index[1]

    def test_reference_loop_agrees(self):
        path = static_path(self.bars, 0.10, 0.05)
        ref = reference_backtest(self.bars, path, self.pop, self.cfg)
        res = run_backtest(self.bars, path, self.pop, self.cfg, per_position=True)
        for k in ("liquidations", "liquidation_events", "bad_debt", "collateral"):
            np.testing.assert_allclose(res.per_position[k], ref[k], rtol=1e-12)


class TestTiming:
    def test_mm_published_at_close_binds_next_bar(self):
        # long 10x at 100 (margin 100, 10 units); MM rises from 5 % to 9 % at the close of bar 2
        bars = make_bars([[100, 100, 100, 100], [100, 100, 100, 100], [100, 100, 95, 100], [100, 100, 98, 100],
                          [100, 100, 100, 100]])
        pop = make_pop([[0, 4, 1, 10, 1000, 0.5]], 5, fee_rate=0.0, funding_rate=0.0)
        path = MarginPath(times=bars.index, im_rate=np.full(5, 0.1), mm_rate=[0.05, 0.05, 0.09, 0.09, 0.09],
                          policy="x")
        res = run_backtest(bars, path, pop, BacktestConfig(liquidation=HAND, topups=False))
        # L = 90/0.95 = 94.74 in bar 2 (low 95: safe); L = 90/0.91 = 98.90 in bar 3 (low 98: hit)
        np.testing.assert_array_equal(res.series["liquidations"].to_numpy(), [0, 0, 0, 1, 0])

    def test_topup_on_announced_increase_avoids_liquidation(self):
        # MM 5 % -> 9 % announced at the close of bar 2 (pending), published as binding at bar 3, so it binds
        # during bar 4, whose low 98 is under the 9 % liquidation price 98.90 (but above the 5 % one)
        bars = make_bars([[100, 100, 100, 100]] * 4 + [[100, 100, 98, 100], [100, 100, 100, 100]])
        path = MarginPath(times=bars.index, im_rate=np.full(6, 0.1), mm_rate=[0.05, 0.05, 0.05, 0.09, 0.09, 0.09],
                          mm_pending=[np.nan, np.nan, 0.09, np.nan, np.nan, np.nan], policy="notice")
        for prob, liqs, tops in ((1.0, 0, 1), (0.0, 1, 0)):
            pop = make_pop([[0, 5, 1, 10, 1000, 0.5]], 6, fee_rate=0.0, funding_rate=0.0, topup_prob=prob,
                           topup_level=1.0)
            res = run_backtest(bars, path, pop, BacktestConfig(liquidation=HAND))
            assert (res.liquidations, res.topups) == (liqs, tops)
            assert res.ledger_residual < 1e-12
        # with top-ups: the call at the close of bar 2 uses the pending 9 %: equity 100 < 1.25 * 0.09 * 1000;
        # the trader tops up to max(1.0 * 100, 112.5) = 112.5
        pop = make_pop([[0, 5, 1, 10, 1000, 0.5]], 6, fee_rate=0.0, funding_rate=0.0, topup_prob=1.0)
        res = run_backtest(bars, path, pop, BacktestConfig(liquidation=HAND))
        assert res.topup_amount == pytest.approx(12.5)
        assert res.series["topups"].iloc[2] == 1

    def test_window(self):
        bars = random_market(120)
        pop = generate_population(120, PopulationConfig(n_positions=400, seed=1))
        path = static_path(bars, 0.1, 0.05)
        res = run_backtest(bars, path, pop, start=bars.index[60], end=bars.index[100])
        assert res.n_positions == int(((pop.open_bar >= 60) & (pop.open_bar < 99)).sum())
        assert res.series.index[0] == bars.index[60] and res.series.index[-1] == bars.index[99]
        assert res.series["n_open"].iloc[-1] >= 0 and res.ledger_residual < 1e-9


class TestIdentityAndReference:
    def test_accounting_identity_every_bar(self):
        bars = random_market(400, seed=7)
        pop = generate_population(400, PopulationConfig(n_positions=5000, seed=2, topup_prob=0.5,
                                                        funding_rate=3e-4))
        ctx = PolicyContext(bars=bars, controls=Controls(notice_bars=2))
        path = make_policy("ewma_ccp").path(ctx)
        cfg = BacktestConfig(liquidation=LiquidationSettings(insurance_fund_initial=500.0), volume_scale=1e-3)
        res = run_backtest(bars, path, pop, cfg)
        assert res.liquidations > 50 and res.bad_debt > 0 and res.uncovered_bad_debt > 0 and res.topups > 0
        assert res.ledger_residual < 1e-9  # max over bars of the relative residual of the three identities
        assert res.bad_debt == pytest.approx(res.fund_draw + res.uncovered_bad_debt, rel=1e-12)

    @pytest.mark.parametrize("binds", ["path", "entry"])
    def test_vectorised_matches_plain_loop(self, binds):
        bars = random_market(300, seed=11)
        pop = generate_population(300, PopulationConfig(n_positions=3000, seed=5, topup_prob=0.5,
                                                        funding_rate=2e-4))
        ctx = PolicyContext(bars=bars, controls=Controls(notice_bars=3, mm_fraction=0.6))
        p = make_policy("ewma_ccp").path(ctx)
        if binds == "entry":
            p = MarginPath(times=p.times, im_rate=p.im_rate, mm_rate=0.6 * p.im_rate, policy="e", mm_binds="entry")
        cfg = BacktestConfig(frozen=True)
        res = run_backtest(bars, p, pop, cfg, start=bars.index[20], per_position=True)
        ref = reference_backtest(bars, p, pop, cfg, start=bars.index[20])
        assert ref["liquidations"].sum() > 50 and ref["topups"].sum() > 10
        np.testing.assert_array_equal(res.per_position["open_bar"], ref["open_bar"])
        np.testing.assert_array_equal(res.per_position["liquidations"], ref["liquidations"])
        np.testing.assert_array_equal(res.per_position["liquidation_events"], ref["liquidation_events"])
        np.testing.assert_array_equal(res.per_position["topups"], ref["topups"])
        np.testing.assert_allclose(res.per_position["bad_debt"], ref["bad_debt"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(res.per_position["collateral"], ref["collateral"], rtol=1e-9)

    def test_deterministic(self):
        bars = random_market(200, seed=3)
        pop = generate_population(200, PopulationConfig(n_positions=2000, seed=9))
        path = make_policy("ewma_ccp").path(PolicyContext(bars=bars))
        a = run_backtest(bars, path, pop)
        b = run_backtest(bars, path, generate_population(200, PopulationConfig(n_positions=2000, seed=9)))
        assert a.metrics() == b.metrics()
        pd.testing.assert_frame_equal(a.series, b.series)

    def test_volume_slippage_off_when_frozen(self):
        bars = random_market(200, seed=3)
        pop = generate_population(200, PopulationConfig(n_positions=3000, seed=9))
        path = static_path(bars, 0.05, 0.03)
        live = run_backtest(bars, path, pop, BacktestConfig(volume_scale=1e-4))
        frozen = run_backtest(bars, path, pop, BacktestConfig(volume_scale=1e-4, frozen=True))
        assert live.bad_debt > frozen.bad_debt  # volume slippage adds to the loss past bankruptcy


class TestMetrics:
    def test_max_increase_hand(self):
        x = np.array([1.0, 2.0, 4.0, 1.0, 1.5])
        assert max_increase(x, 1) == pytest.approx(1.0)
        assert max_increase(x, 2) == pytest.approx(3.0)
        assert max_increase(np.array([3.0, 2.0, 1.0]), 5) == 0.0

    def test_procyclicality_fields(self):
        bars = make_bars([[100, 100, 100, 100]] * 12)
        im = np.array([0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
        path = MarginPath(times=bars.index, im_rate=im, mm_rate=im / 2, policy="x")
        pop = make_pop([[0, 3, 1, 10, 1000, 0.5]], 12)
        res = run_backtest(bars, path, pop)
        assert res.max_im_increase_1d == pytest.approx(2.0)  # 0.1 -> 0.3
        assert res.peak_to_trough == pytest.approx(3.0)
        assert res.avg_im == pytest.approx(im[:-1].mean())


class TestErrors:
    def test_misaligned(self):
        bars = random_market(50)
        pop = generate_population(50, PopulationConfig(n_positions=10))
        with pytest.raises(ValueError, match="path has 49 bars but bars has 50"):
            run_backtest(bars, static_path(bars.iloc[:49], 0.1, 0.05), pop)
        with pytest.raises(ValueError, match="population was drawn for 60 bars but bars has 50"):
            run_backtest(bars, static_path(bars, 0.1, 0.05), generate_population(60, PopulationConfig(n_positions=5)))
        with pytest.raises(ValueError, match="needs at least 2"):
            run_backtest(bars, static_path(bars, 0.1, 0.05), pop, start=bars.index[-1])
        with pytest.raises(ValueError, match="must have an 'low' column"):
            run_backtest(bars.drop(columns="low"), static_path(bars, 0.1, 0.05), pop)
        with pytest.raises(ValueError, match="backtest.fund_initial must be >= 0"):
            BacktestConfig(fund_initial=-1)
        with pytest.raises(ValueError, match="backtest.max_steps_per_bar must be an integer >= 1, got 0"):
            BacktestConfig(max_steps_per_bar=0)
