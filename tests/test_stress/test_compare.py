"""Scenarios, the policy comparison pieces (frozen counterfactual, Cover-2, reverse stress) and the config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backtest.population import PopulationConfig
from backtest.simulation import BacktestConfig
from data_pipelines.pipeline import prepare_dataset
from margin.controls import Controls, apply_controls
from margin.path import MarginPath
from margin.policies import PolicyContext, StaticPolicy
from stress.cascade import CascadeConfig, CascadeResult
from stress.compare import cover2, freeze_path, reverse_stress, self_inflicted, stress_policy
from stress.impact import ImpactModel
from stress.scenarios import Scenario, largest_daily_crashes, shock_drop, vol_multiply, worst_intraday_drop
from stress.suite import load_settings


@pytest.fixture(scope="module")
def m15():
    return prepare_dataset("bundled:tsd/BTC-15m").bars


@pytest.fixture(scope="module")
def base(m15):
    b = m15.iloc[:700][["open", "high", "low", "close", "volume"]]
    return Scenario(name="base", kind="hypothetical", bars=b, start=500, shock=600, end=690, meta={})


class TestScenarios:
    def test_shock_drop_by_hand(self, base):
        s = shock_drop(base, 0.30, 4)
        c0, c1 = base.bars["close"].to_numpy(), s.bars["close"].to_numpy()
        np.testing.assert_array_equal(c1[:600], c0[:600])
        step = 0.7 ** 0.25
        for k in range(4):
            assert c1[600 + k] == pytest.approx(c0[600 + k] * step ** (k + 1), rel=1e-12)
        np.testing.assert_allclose(c1[604:], c0[604:] * 0.7, rtol=1e-12)
        assert (s.bars["low"] <= s.bars[["open", "close"]].min(axis=1)).all()

    def test_vol_multiply(self, base):
        s = vol_multiply(base, 3.0)
        r0, r1 = np.diff(np.log(base.bars["close"].to_numpy())), np.diff(np.log(s.bars["close"].to_numpy()))
        np.testing.assert_allclose(r1[599:], 3.0 * r0[599:], rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(r1[:599], r0[:599], rtol=1e-12)

    def test_december_2021_crash(self, m15):
        s = worst_intraday_drop(m15, "2021-12")
        assert s.bars.index[s.shock].strftime("%Y-%m-%d") == "2021-12-04"  # the 4 December 2021 crash
        assert s.meta["drop"] < -0.10

    def test_largest_daily_crashes_sorted(self):
        bars = prepare_dataset("bundled:bitstamp/BTC").bars
        out = largest_daily_crashes(bars, k=2)
        c = bars["close"].to_numpy()
        r = [c[s.shock] / c[s.shock - 1] - 1 for s in out]
        assert r[0] <= r[1] < -0.2
        assert out[0].meta["date"] in ("2020-03-12", "2020-03-13")  # March 2020 (bar label: day end)

    def test_bad_shock(self, base):
        with pytest.raises(ValueError, match="shock size must be in \\(0, 1\\), got 1.5"):
            shock_drop(base, 1.5, 4)


@dataclass(frozen=True)
class StepPolicy:
    """IM and MM that step from ``before`` to ``after`` at the close of bar ``at``."""

    at: int
    before: tuple[float, float]
    after: tuple[float, float]

    def path(self, ctx: PolicyContext) -> MarginPath:
        t = np.arange(len(ctx.bars))
        im = np.where(t >= self.at, self.after[0], self.before[0])
        mm = np.where(t >= self.at, self.after[1], self.before[1])
        return MarginPath(times=ctx.times, im_rate=im, mm_rate=mm, policy="step")


def _quiet_scenario() -> Scenario:
    """A quiet random walk (0.1 % per bar): nothing is liquidated at 10 % margin and 5 % MM."""
    n = 500
    idx = pd.date_range("2024-01-01", periods=n, freq="15min", tz="UTC")
    c = 100.0 * np.exp(np.cumsum(0.001 * np.random.default_rng(42).standard_normal(n)))
    o = np.r_[c[0], c[:-1]]
    bars = pd.DataFrame({"open": o, "high": np.maximum(o, c) * 1.0005, "low": np.minimum(o, c) * 0.9995, "close": c,
                         "volume": np.full(n, 1e3)}, index=idx)
    return Scenario(name="quiet", kind="hypothetical", bars=bars, start=400, shock=450, end=490, meta={})


class TestSelfInflicted:
    POP = PopulationConfig(n_positions=400, seed=1, topup_prob=0.0, hold_mean_bars=60, hold_max_bars=200)
    CCFG = CascadeConfig(backtest=BacktestConfig(fund_initial=20_000, max_steps_per_bar=20),
                         impact=ImpactModel(kind="sqrt", coef=0.3, depth_usd=2e7))

    def test_by_hand(self):
        # position 0 liquidated only because of the policy (10), position 1 only under the frozen margin (8, not
        # counted), position 2 in both (5): 10 / 15; the net (15 - 13) / 15 would hide most of it
        assert self_inflicted(np.array([10.0, 0.0, 5.0]), np.array([0.0, 8.0, 5.0])) == pytest.approx(10 / 15)
        assert self_inflicted(np.zeros(3), np.ones(3)) == 0.0
        with pytest.raises(ValueError, match="same run"):
            self_inflicted(np.zeros(3), np.zeros(2))

    def test_mm_raised_in_the_shock_liquidates_what_frozen_keeps(self):
        scn = _quiet_scenario()
        pol = StepPolicy(at=scn.shock, before=(0.10, 0.05), after=(0.10, 0.30))  # MM above every margin posted
        out = stress_policy(scn, pol, self.POP, self.CCFG, Controls(), feedback_rounds=1)
        d = out["details"]
        assert d["liquidated_notional_frozen"] == 0.0 and out["liquidated_notional"] > 0
        assert out["self_inflicted_share"] == pytest.approx(1.0)
        assert d["self_inflicted_notional"] == pytest.approx(out["liquidated_notional"])

    def test_protection_elsewhere_does_not_hide_it(self):
        """MM and IM raised at the shock on a quiet walk that then falls 12 %: the raised MM (9 %, above the 5 %)
        liquidates positions open at the shock that the frozen margin keeps, the raised IM (45 %) spares the
        positions opening after it that the frozen 10 % IM loses in the fall. The net is negative, the
        per-position share is not."""
        scn = _quiet_scenario()
        fall = scn.bars.copy()
        k = np.arange(len(fall))
        f = np.where(k >= 470, np.exp(np.log(0.88) * np.minimum(k - 469, 10) / 10), 1.0)
        for col in ("open", "high", "low", "close"):
            fall[col] = fall[col] * f
        scn = scn.with_bars(fall)
        pol = StepPolicy(at=scn.shock, before=(0.10, 0.05), after=(0.45, 0.09))
        out = stress_policy(scn, pol, self.POP, self.CCFG, Controls(), feedback_rounds=0)
        d = out["details"]
        assert d["liquidated_notional_frozen"] > out["liquidated_notional"]  # the response saved more than it cost
        assert d["net_response_share"] < 0.0 < 0.05 < out["self_inflicted_share"]  # the old max(net, 0) read 0

    def test_a_policy_that_does_not_move_after_the_shock(self):
        scn = _quiet_scenario()
        pol = StepPolicy(at=scn.start + 5, before=(0.10, 0.05), after=(0.10, 0.30))  # all before the shock
        out = stress_policy(scn, pol, self.POP, self.CCFG, Controls(), feedback_rounds=1)
        assert out["liquidated_notional"] > 0 and out["self_inflicted_share"] == 0.0
        assert out["details"]["liquidated_notional_frozen"] == out["liquidated_notional"]


class TestComparePieces:
    def test_freeze_path(self, base):
        ctx = PolicyContext(bars=base.bars)
        from backtest.factory import make_policy

        p = make_policy("ewma_ccp").path(ctx)
        f = freeze_path(p, 600)
        np.testing.assert_array_equal(f.im_rate[:600], p.im_rate[:600])
        assert (f.im_rate[600:] == p.im_rate[599]).all() and (f.mm_rate[600:] == p.mm_rate[599]).all()

    def test_freeze_path_keeps_what_was_announced_before_the_shock(self):
        idx = pd.date_range("2024-01-01", periods=8, freq="h", tz="UTC")
        cp = apply_controls(np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3]), Controls(notice_bars=2))
        p = MarginPath(times=idx, im_rate=cp.im_new, mm_rate=cp.mm_open, policy="p", mm_pending=cp.mm_pending,
                       mm_effective_bar=cp.mm_effective_bar)
        f = freeze_path(p, 4)  # the raise announced at the close of bar 3 is pending there
        assert np.isfinite(p.mm_pending[3]) and f.mm_pending[3] == p.mm_pending[3]  # margin calls at that close
        assert np.isnan(f.mm_pending[4:]).all() and (f.mm_effective_bar[4:] == -1).all()
        np.testing.assert_array_equal(f.mm_rate[:4], p.mm_rate[:4])
        assert (f.mm_rate[4:] == p.mm_rate[3]).all()

    def test_cover2_by_hand(self):
        idx = pd.date_range("2024-01-01", periods=2, freq="h", tz="UTC")
        series = pd.DataFrame({"mark_low": [80.0, 80.0]}, index=idx)
        mb = pd.DataFrame({"open": [100.0, 90.0], "high": [120.0, 95.0], "low": [80.0, 85.0], "close": [90.0, 90.0]},
                          index=idx)
        snap = {"side": np.array([1.0, 1.0, -1.0, 1.0]), "qty": np.array([1.0, 2.0, 1.0, 1.0]),
                "entry": np.array([100.0, 100.0, 100.0, 100.0]), "margin": np.array([5.0, 10.0, 10.0, 30.0]),
                "pid": np.arange(4), "fund": 45.0}
        res = CascadeResult(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 0.0, 0.0, 4, 0.0, series, mb, None, snap)
        # losses past margin at the adverse extreme (longs at 80, shorts at 120): 15, 30, 10, 0 -> top two 45
        out = cover2(res)
        assert out["cover2_need"] == pytest.approx(45.0) and out["cover2_ok"] is True
        res2 = CascadeResult(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 0.0, 0.0, 4, 0.0, series, mb, None,
                             {**snap, "fund": 44.0})
        assert cover2(res2)["cover2_ok"] is False

    def test_stress_policy_and_reverse(self, base):
        pop = PopulationConfig(n_positions=1500, seed=1, hold_mean_bars=60, hold_max_bars=300)
        ccfg = CascadeConfig(backtest=BacktestConfig(fund_initial=20_000, max_steps_per_bar=20),
                             impact=ImpactModel(kind="sqrt", coef=0.3, depth_usd=2e7))
        pol = StaticPolicy(im=0.10, mm_fraction=0.5)
        s = shock_drop(base, 0.2, 4)
        out = stress_policy(s, pol, pop, ccfg, Controls(), feedback_rounds=0)
        assert out["cascade_depth"] >= 1 and out["liquidated_notional"] > 0
        assert out["self_inflicted_share"] == 0.0  # a static pair frozen is itself
        rv = reverse_stress(base, pol, pop, ccfg, Controls(), shock_bars=4, max_size=0.9, tol=0.02)
        x = rv["shock_size"]
        assert x is not None and 0 < x <= 0.9
        # the bracket is real: just below the size the fund survives, at it the fund is empty
        lo_scn = shock_drop(base, rv["bracket"][0], 4) if rv["bracket"][0] > 0 else base
        lo = stress_policy(lo_scn, pol, pop, ccfg, Controls(), feedback_rounds=0)
        hi = stress_policy(shock_drop(base, x, 4), pol, pop, ccfg, Controls(), feedback_rounds=0)
        assert lo["fund_min"] > 0 >= hi["fund_min"]


@settings(max_examples=60, deadline=None)
@given(q=st.floats(1.0, 1e9), d=st.floats(1e3, 1e9), k=st.sampled_from(["linear", "sqrt"]))
def test_impact_odd_monotone_capped(q, d, k):
    m = ImpactModel(kind=k, coef=0.4, depth_usd=d, max_impact=0.3)
    a, b = m.log_impact(q, d), m.log_impact(2 * q, d)
    assert a == -m.log_impact(-q, d)
    assert 0 < a <= b <= 0.3
    if k == "linear" and 0.4 * 2 * q / d < 0.3:
        assert b == pytest.approx(2 * a)
    if k == "sqrt" and 0.4 * math.sqrt(2 * q / d) < 0.3:
        assert b == pytest.approx(math.sqrt(2) * a)


class TestSettings:
    def test_errors_name_field_and_value(self):
        ok = {"budget": 0.2, "policies": [{"name": "s", "kind": "static"}]}
        load_settings(ok)
        with pytest.raises(ValueError, match=r"policies\[0\].kind must be one of .* got 'grid'"):
            load_settings({"policies": [{"name": "s", "kind": "grid"}]})
        with pytest.raises(ValueError, match="impact.resilience must be in \\[0, 1\\], got 2"):
            load_settings({**ok, "impact": {"resilience": 2}})
        with pytest.raises(ValueError, match="stress config has unknown keys \\['polices'\\]"):
            load_settings({**ok, "polices": []})
        with pytest.raises(ValueError, match="duplicate names \\['s'\\]"):
            load_settings({"policies": [{"name": "s", "kind": "static"}] * 2})

    def test_repo_config_loads(self):
        import yaml

        s = load_settings(yaml.safe_load(open("configs/stress.yaml")))
        assert {p.kind for p in s.policies} == {"static", "ewma_ccp", "garch_fhs", "predictive", "dynamic_grid"}
        assert s.budget.collateral == 0.2 and s.scenarios["intraday"]["calibration_bars"] == 2880
