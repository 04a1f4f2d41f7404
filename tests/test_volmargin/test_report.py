"""volmargin.report: the verdict per (asset, budget) against the target, and a standalone HTML file."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from backtest.headline import headline_checks
from volmargin.report import (
    AssetReport,
    ReportData,
    beats_bound,
    render_report,
    static_envelope,
    verdict,
    write_report,
)


def _pol(liq: int, share: float | None, bad: float = 0.0, p5: float = 0.5, reason: str | None = None) -> dict:
    v = {"liquidations": liq, "bad_debt": bad, "avg_collateral": 0.201, "share_of_bound": share,
         "max_im_increase_5d": p5, "best_static_here": {"liquidations": 100, "bad_debt": 0.0, "avg_collateral": 0.2},
         "bound_here": 20.0}
    if reason:
        v["reason"] = reason
    return v


def _summary(pred: dict, ewma: dict, garch: dict) -> dict:
    e = {"best_static": {"im": 0.2, "mm": 0.05, "mm_rule": "0.05", "liquidations": 100, "bad_debt": 0.0,
                         "avg_collateral": 0.2},
         "bound": {"liquidations": 20.0, "bad_debt": 0.0}, "predictive": pred, "ewma_ccp": ewma, "garch_fhs": garch}
    e["checks"] = headline_checks(e)
    return {"assets": {"BTC": {"budgets": {"0.2": e},
                               "ablation": {"0.2": {k: {"liquidations": 60, "bad_debt": 0.0, "avg_collateral": 0.2}
                                                    for k in ("forecast", "constant_variance", "realised_variance")}},
                               "policies": {}, "predictive_params": {}}},
            "headline": {"share_of_bound_min": pred["share_of_bound"], "share_of_bound_mean": pred["share_of_bound"],
                         "budgets_met": int(e["checks"]["met"]), "budgets_total": 1, "shares_undefined": 0},
            "mlflow_run_id": "r", "cut": {"BTC": "2018-01-01"}, "config_hash": "0" * 64}


GOOD = _pol(60, 0.5, p5=0.4)
RIVAL = _pol(90, 0.125, p5=0.6)


class TestVerdict:
    def test_all_checks_pass(self) -> None:
        rows = verdict(_summary(GOOD, RIVAL, RIVAL))
        assert len(rows) == 4 and all(r["passed"] is True for r in rows)
        assert rows[0]["scope"] == "BTC @ 20%"

    def test_short_of_the_share_says_by_how_much(self) -> None:
        rows = verdict(_summary(_pol(80, 0.25, p5=0.4), RIVAL, RIVAL))
        bad = [r for r in rows if r["passed"] is False]
        assert len(bad) == 1 and "short by 0.25" in bad[0]["detail"]

    def test_more_bad_debt_than_static_fails(self) -> None:
        pred = _pol(50, None, bad=300.0, reason="bad debt 300 USD above the best static's 0 USD (share undefined)")
        rows = {r["check"]: r for r in verdict(_summary(pred, RIVAL, RIVAL))}
        half = next(v for k, v in rows.items() if k.startswith("captures"))
        assert half["passed"] is False and "bad debt 300 USD" in half["detail"]
        assert next(v for k, v in rows.items() if k.startswith("beats ewma"))["passed"] is False

    def test_rival_and_procyclicality(self) -> None:
        rows = verdict(_summary(_pol(60, 0.5, p5=0.9), _pol(40, 0.75), RIVAL))
        failed = {r["check"] for r in rows if r["passed"] is False}
        assert failed == {"beats ewma_ccp (larger share of the bound)", "5-day IM increase <= ewma_ccp's"}

    def test_beats_bound_is_a_bug(self) -> None:
        msgs = beats_bound(_summary(_pol(10, 1.2), RIVAL, RIVAL))
        assert len(msgs) == 1 and msgs[0].startswith("BUG: BTC at 0.2: predictive")


def test_static_envelope_is_the_running_best() -> None:
    env = pd.DataFrame({"im": [0.1, 0.2, 0.3, 0.15], "mm": 0.05, "avg_collateral": [0.1, 0.2, 0.3, 0.15],
                        "liquidations": [50, 40, 45, 30], "bad_debt": [0.0, 0.0, 0.0, 5.0]})
    x, y = static_envelope(env, "liquidations")
    assert x.tolist() == [0.1, 0.2, 0.3] and y.tolist() == [50, 40, 40]  # the pair with bad debt is left out
    assert static_envelope(env, "bad_debt", tolerance=0.0)[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def _data(summary: dict | None = None) -> ReportData:
    t = pd.date_range("2018-01-01", periods=40, freq="D", tz="UTC")
    series = pd.DataFrame({"close": np.linspace(100, 80, 40), "realized_vol": np.full(40, 0.6),
                           "im.predictive": np.full(40, 0.1), "mm.predictive": np.full(40, 0.03),
                           "im.ewma_ccp": np.full(40, 0.12)}, index=t)
    env = pd.DataFrame({"im": [0.1, 0.2, 0.3], "mm": 0.05, "avg_collateral": [0.1, 0.2, 0.3],
                        "liquidations": [150, 100, 70], "bad_debt": [10.0, 0.0, 0.0]})
    bc = pd.DataFrame({"avg_collateral": [0.1, 0.2, 0.3], "liquidations": [60.0, 20.0, 5.0]})
    pol = {"ewma_ccp": {"liquidations": 50, "bad_debt": 500.0, "avg_collateral": 0.1, "max_im_increase_5d": 0.3,
                        "traffic_light": "green"}}
    a = AssetReport(asset="BTC", dataset="bundled:bitstamp/BTC", cut="2018-01-01", champion={"model_key": "garch"},
                    policies=pol, budget_median="0.2", envelope=env, bound_curve=bc, series=series,
                    crash_days=pd.DataFrame({"return": [-0.2]}, index=pd.Index(["2018-02-05"], name="bar")))
    return ReportData(title="t <&>", summary=summary or _summary(GOOD, RIVAL, RIVAL), assets=[a],
                      forecast_quality=pd.DataFrame({"asset": ["BTC"], "model": ["garch"], "qlike_held_out": [0.5]}),
                      data_quality={"bundled:bitstamp/BTC": {"rows_in": 10, "rows_out": 9, "gaps": {"count": 1}}},
                      sensitivity=pd.DataFrame({"assumption": ["base"], "liquidations": [10]}),
                      config={"seed": 1, "bad_debt_tolerance": 0})


class TestHtml:
    def test_standalone_and_escaped(self, tmp_path) -> None:
        p = write_report(_data(), tmp_path / "r.html")
        html = p.read_text()
        assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert "http://" not in html and "https://" not in html
        assert html.count('src="data:image/png;base64,') == 2  # frontier + margin over time
        assert "t &lt;&amp;&gt;" in html
        assert "Verdict: the target is MET" in html
        assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file

    def test_first_screen_is_verdict_and_frontier(self) -> None:
        html = render_report(_data())
        verdict_at = html.index("Verdict")
        plot_at = html.index('src="data:image/png;base64,')
        assert verdict_at < plot_at < html.index("At each budget")
        for section in ("What the forecast adds", "Margin over time", "crash days", "Forecast quality",
                        "Data quality", "Sensitivity", "Every check"):
            assert section in html, section

    @pytest.mark.parametrize("share", [0.2])
    def test_not_met_is_said(self, share: float) -> None:
        html = render_report(_data(_summary(_pol(84, share, p5=0.4), RIVAL, RIVAL)))
        assert "Verdict: the target is NOT met" in html and "short by 0.30" in html
