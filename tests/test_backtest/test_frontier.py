"""Frontier sweep, monotone interpolation, comparisons at equal collateral (hand numbers)."""

from __future__ import annotations

from types import SimpleNamespace as R

import numpy as np
import pandas as pd
import pytest

from backtest.factory import make_policy
from backtest.frontier import (
    Frontier,
    FrontierPoint,
    compare,
    frontier_from_results,
    interpolate,
    refine,
    sweep,
)
from backtest.population import PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, run_backtest
from margin.policies import PolicyContext


def fr(points, family="static"):
    return Frontier(family=family, points=tuple(FrontierPoint(scale=i, avg_collateral=c, liquidations=liq,
                                                              bad_debt=bd) for i, (c, liq, bd) in enumerate(points)))


STATIC = fr([(0.30, 20.0, 0.0), (0.10, 100.0, 50.0), (0.20, 40.0, 10.0)])


class TestInterpolate:
    def test_linear_between_sorted_points(self):
        assert [p.avg_collateral for p in STATIC.points] == [0.10, 0.20, 0.30]
        assert interpolate(STATIC, 0.15, "liquidations").value == pytest.approx(70.0)
        assert interpolate(STATIC, 0.25, "bad_debt").value == pytest.approx(5.0)
        assert interpolate(STATIC, 0.30, "liquidations").value == pytest.approx(20.0)

    def test_outside_range_is_null_with_reason(self):
        out = interpolate(STATIC, 0.05, "liquidations")
        assert out.value is None and "outside the static frontier's range [0.1, 0.3]" in out.reason
        assert interpolate(STATIC, 0.5, "liquidations").value is None
        assert interpolate(STATIC, 0.5, "liquidations", extend_right=True).value == 20.0

    def test_monotone_envelope(self):
        f = fr([(0.1, 100.0, 0.0), (0.2, 120.0, 0.0), (0.3, 60.0, 0.0)])
        # the 0.2 point is dominated by 0.1: the envelope keeps 100 there
        assert interpolate(f, 0.2, "liquidations").value == 100.0
        assert interpolate(f, 0.25, "liquidations").value == pytest.approx(80.0)
        xs = np.linspace(0.1, 0.3, 41)
        ys = [interpolate(f, x, "liquidations").value for x in xs]
        assert np.all(np.diff(ys) <= 1e-12)

    def test_bad_metric(self):
        with pytest.raises(ValueError, match="metric must be one of"):
            interpolate(STATIC, 0.2, "fund")


class TestCompare:
    def test_hand_numbers(self):
        pol = R(avg_collateral=0.15, liquidations=49.0, bad_debt=15.0)
        bound = {"liquidations": fr([(0.1, 60.0, 0.0), (0.2, 20.0, 0.0)], "bound_liq"),
                 "bad_debt": fr([(0.1, 0.0, 10.0), (0.2, 0.0, 0.0)], "bound_bd")}
        out = compare(pol, STATIC, bound)
        # static at 0.15: 70 liquidations, 30 bad debt; bound at 0.15: 40 liquidations, 5 bad debt
        assert out["liquidations_change"] == pytest.approx(49 / 70 - 1)
        assert out["bad_debt_change"] == pytest.approx(15 / 30 - 1)
        assert out["share_of_bound_liquidations"] == pytest.approx((49 - 70) / (40 - 70))
        assert out["share_of_bound_bad_debt"] == pytest.approx((15 - 30) / (5 - 30))
        assert out["reason"] is None and out["reasons"] == {}

    def test_single_bound_result(self):
        pol = R(avg_collateral=0.15, liquidations=49.0, bad_debt=15.0)
        b = R(avg_collateral=0.2, liquidations=20.0, bad_debt=5.0)
        out = compare(pol, STATIC, {"liquidations": b, "bad_debt": b})
        assert out["share_of_bound_liquidations"] == pytest.approx((49 / 70 - 1) / (20 / 40 - 1))
        assert out["share_of_bound_bad_debt"] == pytest.approx((15 / 30 - 1) / (5 / 10 - 1))

    def test_nulls_with_reasons(self):
        pol = R(avg_collateral=0.3, liquidations=10.0, bad_debt=0.0)
        flat = {"liquidations": fr([(0.1, 20.0, 0.0), (0.3, 20.0, 0.0)]), "bad_debt": None}
        out = compare(pol, STATIC, flat)
        assert out["liquidations_change"] == pytest.approx(-0.5)
        assert out["bad_debt_change"] is None and "is 0" in out["reasons"]["bad_debt_change"]
        assert out["share_of_bound_liquidations"] is None
        assert "does not change liquidations" in out["reasons"]["share_of_bound_liquidations"]
        assert out["share_of_bound_bad_debt"] is None and out["reason"]
        out = compare(R(avg_collateral=0.01, liquidations=1.0, bad_debt=1.0), STATIC)
        assert out["liquidations_change"] is None and "outside" in out["reasons"]["liquidations_change"]


def test_sweep_static_family_on_backtests():
    rng = np.random.default_rng(42)
    n = 150
    c = 100 * np.exp(np.cumsum(rng.normal(0, 0.04, n)))
    o = np.r_[100.0, c[:-1]]
    bars = pd.DataFrame({"open": o, "high": np.maximum(o, c) * 1.01, "low": np.minimum(o, c) * 0.99, "close": c},
                        index=pd.date_range("2020-01-01", periods=n, freq="D", tz="UTC"))
    pop = generate_population(n, PopulationConfig(n_positions=2000, seed=1))
    ctx = PolicyContext(bars=bars)
    cfg = BacktestConfig(frozen=True)
    f = sweep("static", (0.05, 0.1, 0.2), lambda s: run_backtest(bars, make_policy(f"static_{s}").path(ctx), pop, cfg))
    assert [p.scale for p in f.points] == [0.05, 0.1, 0.2]  # more IM, more collateral
    liq = [p.liquidations for p in f.points]
    assert liq[0] > liq[1] > liq[2]
    same = frontier_from_results("static", {0.05: run_backtest(bars, make_policy("static_0.05").path(ctx), pop, cfg)})
    assert same.points[0] == f.points[0]
    assert f.to_dict()["points"][0]["policy"] == "static_0.05"


class TestRefine:
    @staticmethod
    def run(scale):
        return R(avg_collateral=scale, liquidations=1.0 / scale, bad_debt=0.0, policy=f"static_{scale:g}")

    def test_convex_frontier_chord_flatters_refine_removes_it(self):
        coarse = sweep("static", (0.1, 0.5), self.run)
        on_curve = R(avg_collateral=0.2, liquidations=5.0, bad_debt=0.0)  # a static level in disguise
        naive = compare(on_curve, coarse)
        assert naive["liquidations_change"] == pytest.approx(5.0 / 8.0 - 1.0)  # chord: 10 + 0.25 * (2 - 10)
        assert naive["static_bracket"] == [0.1, 0.5]
        fair = compare(on_curve, coarse, run_static=self.run)
        assert abs(fair["liquidations_change"]) < 2e-3
        lo, hi = fair["static_bracket"]
        assert lo <= 0.2 <= hi and hi - lo <= 2e-3 * 0.2 * 1.0001

    def test_refine_outside_range_unchanged(self):
        coarse = sweep("static", (0.1, 0.5), self.run)
        assert refine(coarse, 0.7, self.run).points == coarse.points
        f = refine(coarse, 0.3, self.run, rel_tol=1e-2)
        assert len(f.points) > 2 and f.meta["refined_at"] == 0.3
