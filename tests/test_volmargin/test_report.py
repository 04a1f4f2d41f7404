"""volmargin.report: the verdict against the target, and a standalone HTML file."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from volmargin.report import AssetReport, ReportData, beats_bound, render_report, verdict, write_report


def _summary(pred: dict, ewma: dict, garch: dict, p5: float = 0.1, e5: float = 0.2) -> dict:
    comp = {
        "predictive_vs_best_static": pred,
        "ewma_ccp_vs_best_static": ewma,
        "garch_fhs_vs_best_static": garch,
        "bound_vs_best_static": {"liquidations_change": -0.6, "bad_debt_change": -0.8,
                                 "share_of_bound_liquidations": 1.0, "share_of_bound_bad_debt": 1.0},
    }
    pol = {"predictive": {"max_im_increase_5d": p5}, "ewma_ccp": {"max_im_increase_5d": e5}}
    return {"assets": {"BTC": {"policies": pol, "comparison": comp}},
            "comparison": {"predictive_vs_best_static": {"liquidations_change": pred["liquidations_change"],
                                                         "bad_debt_change": pred["bad_debt_change"], "n_assets": 1},
                           "bound_vs_best_static": {"liquidations_change": -0.6, "bad_debt_change": -0.8,
                                                    "n_assets": 1}},
            "mlflow_run_id": "r", "cut": {"BTC": "2018-01-01"}, "config_hash": "0" * 64}


GOOD = {"liquidations_change": -0.4, "bad_debt_change": -0.5, "share_of_bound_liquidations": 0.67,
        "share_of_bound_bad_debt": 0.62}
RIVAL = {"liquidations_change": -0.1, "bad_debt_change": 0.05, "share_of_bound_liquidations": 0.17,
         "share_of_bound_bad_debt": -0.06}


class TestVerdict:
    def test_all_checks_pass(self) -> None:
        rows = verdict(_summary(GOOD, RIVAL, RIVAL))
        assert rows and all(r["passed"] is True for r in rows)
        # 2 shares + 4 rival comparisons + 5-day increase per asset, and 2 pooled shares
        assert len(rows) == 9

    def test_short_of_the_share_says_by_how_much(self) -> None:
        pred = {**GOOD, "share_of_bound_liquidations": 0.3}
        rows = verdict(_summary(pred, RIVAL, RIVAL))
        bad = [r for r in rows if r["passed"] is False]
        assert [r["scope"] for r in bad] == ["BTC", "pooled"]  # one asset: the pooled share is its share
        assert all("short by 0.20" in r["detail"] for r in bad)

    def test_loses_to_a_rival_and_larger_increase(self) -> None:
        rival = {**RIVAL, "bad_debt_change": -0.7}
        rows = verdict(_summary(GOOD, rival, RIVAL, p5=0.35, e5=0.2))
        failed = {r["check"] for r in rows if r["passed"] is False}
        assert all(r["scope"] == "BTC" for r in rows if r["passed"] is False)
        assert failed == {"beats ewma_ccp on bad_debt (vs best static)", "5-day IM increase <= ewma_ccp's"}
        inc = next(r for r in rows if r["check"].startswith("5-day"))
        assert "larger by 15.0 points" in inc["detail"]

    def test_null_comparison_is_undefined_not_passed(self) -> None:
        pred = {"liquidations_change": None, "bad_debt_change": None, "share_of_bound_liquidations": None,
                "share_of_bound_bad_debt": None}
        rows = verdict(_summary(pred, RIVAL, RIVAL))
        assert all(r["passed"] is None for r in rows if r["check"] != "5-day IM increase <= ewma_ccp's")

    @pytest.mark.parametrize(("own", "passed", "word"), [(1915.0, False, "(worse)"), (0.0, None, "(equal)")])
    def test_no_static_bad_debt_to_reduce(self, own: float, passed: bool | None, word: str) -> None:
        # the best static has no bad debt at the policy's collateral: more is a failure, none is undefined
        pred = {**GOOD, "bad_debt_change": None, "share_of_bound_bad_debt": None, "best_static_bad_debt": 0.0}
        s = _summary(pred, RIVAL, RIVAL)
        s["assets"]["BTC"]["policies"]["predictive"]["bad_debt"] = own
        row = next(r for r in verdict(s) if r["scope"] == "BTC" and "bad_debt reduction" in r["check"])
        assert row["passed"] is passed and word in row["detail"] and f"{own:,.0f}" in row["detail"]

    def test_rival_without_bad_debt_at_less_collateral_wins(self) -> None:
        none = {"liquidations_change": -0.1, "bad_debt_change": None, "share_of_bound_liquidations": 0.2,
                "share_of_bound_bad_debt": None}
        pred = {**GOOD, "bad_debt_change": None, "share_of_bound_bad_debt": None, "best_static_bad_debt": 0.0}
        s = _summary(pred, none, none)
        pol = s["assets"]["BTC"]["policies"]
        pol["predictive"].update(bad_debt=10.0, avg_collateral=0.3)
        pol["ewma_ccp"].update(bad_debt=0.0, avg_collateral=0.2)
        pol["garch_fhs"] = {"bad_debt": 0.0, "avg_collateral": 0.4}  # more collateral: not comparable
        rows = {r["check"]: r for r in verdict(s) if r["scope"] == "BTC"}
        assert rows["beats ewma_ccp on bad_debt (vs best static)"]["passed"] is False
        assert "at more collateral (30.0% vs 20.0%)" in rows["beats ewma_ccp on bad_debt (vs best static)"]["detail"]
        assert rows["beats garch_fhs on bad_debt (vs best static)"]["passed"] is None
        pooled = next(r for r in verdict(s) if r["scope"] == "pooled" and "bad_debt" in r["check"])
        assert pooled["passed"] is False and "on 1 of 1 assets (BTC)" in pooled["detail"]

    def test_pooled_share_is_mean_of_asset_shares(self) -> None:
        s = _summary(GOOD, RIVAL, RIVAL)
        s["assets"]["ETH"] = {"policies": s["assets"]["BTC"]["policies"],
                              "comparison": {**s["assets"]["BTC"]["comparison"],
                                             "predictive_vs_best_static": {**GOOD, "share_of_bound_liquidations": 0.11}}}
        pooled = [r for r in verdict(s) if r["scope"] == "pooled" and "liquidations" in r["check"]][0]
        assert "mean share 0.39" in pooled["detail"] and pooled["passed"] is False

    def test_beats_bound_named(self) -> None:
        s = _summary({**GOOD, "share_of_bound_bad_debt": 1.3}, RIVAL, RIVAL)
        msgs = beats_bound(s)
        assert len(msgs) == 1 and "predictive beats the perfect-foresight entry-IM bound on bad_debt" in msgs[0]


def _data() -> ReportData:
    t = pd.date_range("2018-01-01", periods=40, freq="D", tz="UTC")
    series = pd.DataFrame({"close": np.linspace(100, 80, 40), "realized_vol": np.full(40, 0.6),
                           "im.predictive": np.full(40, 0.1), "im.ewma_ccp": np.full(40, 0.12)}, index=t)
    front = [{"scale": s, "avg_collateral": 0.05 * s, "liquidations": 100 / s, "bad_debt": 1000 / s} for s in (1, 2, 3)]
    pol = {"predictive": {"liquidations": 40, "bad_debt": 300.0, "avg_collateral": 0.11, "max_im_increase_5d": 0.1},
           "static_0.10": {"liquidations": 50, "bad_debt": 500.0, "avg_collateral": 0.1, "max_im_increase_5d": 0.0}}
    a = AssetReport(asset="BTC", dataset="bundled:bitstamp/BTC", cut="2018-01-01", champion={"model_key": "garch"},
                    policies=pol, comparison={"predictive_vs_best_static": GOOD}, frontiers={"static": front},
                    series=series, crash_days=pd.DataFrame({"return": [-0.2]}, index=pd.Index(["2018-02-05"], name="bar")))
    return ReportData(title="t <&>", summary=_summary(GOOD, RIVAL, RIVAL), assets=[a],
                      forecast_quality=pd.DataFrame({"asset": ["BTC"], "model": ["garch"], "qlike_held_out": [0.5]}),
                      data_quality={"bundled:bitstamp/BTC": {"rows_in": 10, "rows_out": 9, "gaps": {"count": 1}}},
                      sensitivity=pd.DataFrame({"assumption": ["base"], "liquidations_change": [-0.1]}),
                      config={"seed": 1})


class TestHtml:
    def test_standalone_and_escaped(self, tmp_path) -> None:
        p = write_report(_data(), tmp_path / "r.html")
        html = p.read_text()
        assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert "http://" not in html and "https://" not in html
        assert html.count('src="data:image/png;base64,') == 2  # frontiers + margin over time
        assert "t &lt;&amp;&gt;" in html
        assert "Verdict: the target is MET" in html
        assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file

    def test_sections_present(self) -> None:
        html = render_report(_data())
        for section in ("Headline", "Frontiers", "Margin over time", "crash days", "Procyclicality",
                        "Forecast quality", "Data quality", "Sensitivity"):
            assert section in html, section

    @pytest.mark.parametrize("share", [0.2])
    def test_not_met_is_said(self, share: float) -> None:
        d = _data()
        s = _summary({**GOOD, "share_of_bound_liquidations": share}, RIVAL, RIVAL)
        html = render_report(ReportData(**{**d.__dict__, "summary": s}))
        assert "Verdict: the target is NOT met" in html and "short by 0.30" in html
