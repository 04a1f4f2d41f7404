"""The portfolio comparison in the end-to-end job: summary.portfolio, details, report section, portfolio_grid.json."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from data_pipelines.synthetic import simulate
from margin.dynamic_grid import GridPath
from volmargin.cli import app
from volmargin.config import RunConfig
from volmargin.report import render_portfolio
from volmargin.run_portfolio import (
    evaluate_portfolio,
    portfolio_checks,
    portfolio_headline_numbers,
    select_assets,
)

ROOT = Path(__file__).resolve().parents[2]
PORTFOLIO = ROOT / "configs" / "examples" / "portfolio.json"
runner = CliRunner()

DG_KEYS = {"liquidations", "bad_debt", "avg_collateral", "share_of_bound"}
SECTION = "Portfolio margin (multi-instrument accounts)"


def _config(root: Path, datasets: list[str], **over: object) -> dict:
    """Two synthetic daily assets, one budget, a small population: the job in seconds (backtest mode: the EWMA
    baseline is recomputed, no training)."""
    cfg = {
        "name": "tiny-portfolio",
        "seed": 5,
        "datasets": datasets,
        "cuts": {d: "2020-01-01" for d in datasets},
        "training": {"horizon": 2, "walk_forward": {"min_train": 200, "refit_every": 100}},
        "budgets": [0.2],
        "regime": {"enabled": False},
        "policies": {
            "static_pairs": {"im": [0.02, 0.06, 0.12, 0.25, 0.5], "mm_fractions": [0.5], "mm_fixed": []},
            "predictive": {"rounds": 1, "refine": False, "max_positions": 200,
                           "grid": {"power": [1.0], "stress": [0.0], "omega": [0.5], "floor": [0.02],
                                    "release": [1.0], "mm_binds": ["path"], "mm_k": [0.0], "mm_floor": [0.0],
                                    "mm_fraction": [None]}},
        },
        "population": {"n_positions": 200},
        "sensitivity": {"enabled": False},
        "portfolio": {"n_accounts": 12, "cycle_bars": 10, "static_mm_fractions": [0.8],
                      "fit_grid": [{"vol_k": 2.0, "stress_slope": 1.0, "mm_fraction": 0.8}]},
        "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
        "artifacts_dir": str(root / "artifacts"),
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pf")
    datasets = []
    for name, seed in (("BTC", 3), ("ETH", 4)):  # the labels of configs/examples/portfolio.json's underlyings
        csv = root / f"{name}.csv"
        simulate(520, seed=seed, start="2019-01-01", asset=name).bars.to_csv(csv)
        datasets.append(f"csv:{csv}")
    p = root / "pf.yaml"
    p.write_text(yaml.safe_dump(_config(root, datasets)))
    out = root / "out"
    res = runner.invoke(app, ["backtest", "--config", str(p), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"root": root, "out": out, "config": p, "output": res.output}


class TestJob:
    def test_summary_has_the_contract_keys(self, job: dict) -> None:
        s = json.loads((job["out"] / "summary.json").read_text())
        assert list(s["portfolio"]) == ["0.2"]
        e = s["portfolio"]["0.2"]
        assert {"best_static", "bound", "dynamic_grid", "ablation", "checks"} <= set(e)
        assert DG_KEYS <= set(e["dynamic_grid"])
        assert {"spot_range", "mm_fraction", "liquidations", "bad_debt", "avg_collateral"} <= set(e["best_static"])
        assert abs(e["best_static"]["avg_collateral"] - 0.2) <= 0.02 * 0.2
        assert {"liquidations", "bad_debt", "avg_collateral"} <= set(e["bound"])
        assert e["bound"]["liquidations"] <= e["best_static"]["liquidations"]
        assert set(e["ablation"]) == {"forecast", "constant_variance"}
        assert {"half_of_bound", "met", "short_by"} == set(e["checks"])
        h = s["headline"]
        assert h["portfolio_budgets_total"] == 1 and h["portfolio_budgets_met"] in (0, 1)
        assert {"share_of_bound_min", "budgets_met", "budgets_total"} <= set(h)  # the isolated keys are kept
        assert "portfolio (dynamic_grid on multi-instrument accounts): target met at" in job["output"]

    def test_share_matches_its_parts(self, job: dict) -> None:
        """share = (L_static - L) / (L_static - L_bound), static and bound at the dynamic grid's own collateral."""
        dg = json.loads((job["out"] / "summary.json").read_text())["portfolio"]["0.2"]["dynamic_grid"]
        st, bd = dg["best_static_here"], dg["bound_here"]
        assert bd <= dg["liquidations"]  # the bound is never beaten
        if dg["share_of_bound"] is None:
            assert dg["reason"]
        else:
            assert dg["share_of_bound"] <= 1 + 1e-12
            assert dg["share_of_bound"] == pytest.approx((st["liquidations"] - dg["liquidations"])
                                                         / (st["liquidations"] - bd), rel=1e-12)
            assert dg["bad_debt"] <= st["bad_debt"] + 1e-9

    def test_details_and_mlflow(self, job: dict) -> None:
        from mlflow.tracking import MlflowClient

        d = json.loads((job["out"] / "details.json").read_text())["portfolio"]
        assert d["assets"] == ["BTC", "ETH"] and d["cut"] == "2020-01-01" and d["n_accounts"] == 12
        assert d["grid_file_budget"] == "0.2" and "0.2" in d["fitted"]
        s = json.loads((job["out"] / "summary.json").read_text())
        client = MlflowClient(f"sqlite:///{job['root'] / 'mlruns.db'}")
        run = client.get_run(s["mlflow_run_id"])
        assert "portfolio.0.2.dynamic_grid.liquidations" in run.data.metrics
        assert "headline.portfolio_budgets_total" in run.data.metrics
        assert "portfolio_grid.json" in {f.path for f in client.list_artifacts(s["mlflow_run_id"])}

    def test_report_has_the_section_after_the_first_screen(self, job: dict) -> None:
        html = (job["out"] / "report.html").read_text()
        assert SECTION in html and "At 20% collateral" in html
        assert "survive-or-liquidate knapsack" in html
        assert html.index("Verdict") < html.index(SECTION)

    def test_grid_file_serves_volmargin_margin(self, job: dict) -> None:
        gp = GridPath.read(job["out"] / "portfolio_grid.json")
        assert gp.underlyings == ("BTC", "ETH") and gp.policy == "dynamic_grid"
        last = gp.times[-1].isoformat()
        r = runner.invoke(app, ["margin", "--portfolio", str(PORTFOLIO), "--params-from", str(job["out"]),
                                "--as-of", last, "--mode", "portfolio", "--scenarios", "grid", "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert doc["accounts"][0]["account"] == "alice" and doc["accounts"][0]["initial_margin"] > 0


# ---------------------------------------------------------------------------- without running the job
def _inp(asset: str, cut: str = "2020-01-01", freq: str = "D", n: int = 50) -> SimpleNamespace:
    idx = pd.date_range("2019-12-01", periods=n, freq=freq, tz="UTC")
    return SimpleNamespace(asset=asset, dataset=f"csv:{asset}", cut=pd.Timestamp(cut, tz="UTC"),
                           bars=pd.DataFrame({"close": np.linspace(1, 2, n)}, index=idx), champion={})


class TestSelection:
    def test_daily_assets_sharing_the_most_common_cut(self) -> None:
        inputs = {"a": _inp("A"), "b": _inp("B"), "c": _inp("C", cut="2020-01-10"), "d": _inp("D", freq="15min")}
        chosen, why = select_assets(RunConfig(datasets=["csv:A.csv"], cuts={"csv:A.csv": "2020-01-01"}), inputs)
        assert why is None and [a.asset for a in chosen] == ["A", "B"]

    def test_fewer_than_two_daily_assets_skip(self) -> None:
        inputs = {"a": _inp("A"), "d": _inp("D", freq="15min")}
        chosen, why = select_assets(RunConfig(datasets=["csv:A.csv"], cuts={"csv:A.csv": "2020-01-01"}), inputs)
        assert chosen == [] and "fewer than 2 daily assets" in why

    def test_disabled_computes_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import backtest.portfolio_headline as ph

        def boom(*a: object, **k: object) -> None:
            raise AssertionError("portfolio_headline called although the section is disabled")

        monkeypatch.setattr(ph, "portfolio_headline", boom)
        cfg = RunConfig(datasets=["csv:A.csv", "csv:B.csv"], cuts={"csv:A.csv": "2020-01-01", "csv:B.csv": "2020-01-01"},
                        portfolio={"enabled": False})
        out = evaluate_portfolio(cfg, {"a": _inp("A"), "b": _inp("B")})
        assert out.summary == {"skipped": "portfolio.enabled is false"} and out.path is None
        assert portfolio_headline_numbers(out.summary) == {}

    def test_too_few_shared_bars_skip(self) -> None:
        cfg = RunConfig(datasets=["csv:A.csv", "csv:B.csv"], cuts={"csv:A.csv": "2020-01-01", "csv:B.csv": "2020-01-01"})
        b = _inp("B")
        b.bars.index = b.bars.index + pd.Timedelta(days=45)  # 5 shared bars
        out = evaluate_portfolio(cfg, {"a": _inp("A"), "b": b})
        assert "share only 5 bars" in out.summary["skipped"]


class TestChecksAndReport:
    @staticmethod
    def _entry(share: float | None, reason: str | None = None, bound: int = 0) -> dict:
        dg = {"liquidations": 70, "bad_debt": 0.0, "avg_collateral": 0.21, "share_of_bound": share,
              "best_static_here": {"spot_range": 0.2, "mm_fraction": 0.8, "liquidations": 100, "bad_debt": 0.0,
                                   "avg_collateral": 0.21},
              "bound_here": bound}
        if reason:
            dg["reason"] = reason
        e = {"best_static": {"spot_range": 0.19, "mm_fraction": 0.8, "liquidations": 105, "bad_debt": 0.0,
                             "avg_collateral": 0.2},
             "bound": {"liquidations": bound, "bad_debt": 0.0, "avg_collateral": 0.2}, "dynamic_grid": dg,
             "ablation": {"forecast": {"liquidations": 70, "bad_debt": 0.0, "avg_collateral": 0.21},
                          "constant_variance": {"liquidations": 90, "bad_debt": 0.0, "avg_collateral": 0.2}}}
        e["checks"] = portfolio_checks(e)
        return e

    def test_checks(self) -> None:
        assert portfolio_checks(self._entry(0.6)) == {"half_of_bound": True, "met": True, "short_by": None}
        c = portfolio_checks(self._entry(0.3))
        assert c["half_of_bound"] is False and c["short_by"] == pytest.approx(0.2)
        bad = portfolio_checks(self._entry(None, "bad debt 5 USD above the best static's 0 USD (share undefined)"))
        assert bad["half_of_bound"] is False and not bad["met"]
        na = portfolio_checks(self._entry(None, "the bound does not cut liquidations against the best static here"))
        assert na["half_of_bound"] is None and not na["met"]

    def test_headline_numbers(self) -> None:
        got = portfolio_headline_numbers({"0.1": self._entry(0.6), "0.2": self._entry(0.3), "0.3": self._entry(None)})
        assert got == {"portfolio_share_of_bound_min": 0.3, "portfolio_share_of_bound_mean": pytest.approx(0.45),
                       "portfolio_budgets_met": 1, "portfolio_budgets_total": 3, "portfolio_shares_undefined": 1}

    def test_section_says_by_how_much_and_when_the_bound_is_zero(self) -> None:
        html = render_portfolio({"0.1": self._entry(0.6, bound=5), "0.2": self._entry(0.3)},
                                {"assets": ["BTC", "ETH"], "cut": "2018-01-01", "n_accounts": 300})
        assert SECTION in html and "met at 1 of 2 budgets" in html
        assert "falls short by 0.20 (share 0.30 against the 0.50 target)" in html
        assert "The bound reads 0 liquidations at 20%" in html and "at 10%" not in html.split("reads 0")[1][:20]
        assert "constant variance" in html and "spot ±19.0%, MM 0.8×IM" in html

    def test_share_above_one_is_flagged(self) -> None:
        assert "BUG: portfolio at 0.2" in render_portfolio({"0.2": self._entry(1.2)})

    def test_skipped(self) -> None:
        html = render_portfolio({"skipped": "fewer than 2 daily assets sharing a cut"})
        assert "Skipped: fewer than 2 daily assets" in html
