"""volmargin run / backtest end to end on a tiny synthetic config (tmp MLflow, tmp artifacts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from backtest.budgets import scaled_path
from data_pipelines.synthetic import simulate
from volmargin.cli import app
from volmargin.config import RunConfig, load_config
from volmargin.run import config_hash, headline_numbers, horizon_breaches

runner = CliRunner()

POLICY_KEYS = {"liquidations", "bad_debt", "avg_collateral", "traffic_light", "max_im_increase_5d"}
POLICY_EXTRA_KEYS = {"liquidated_notional", "fund_draw", "uncovered_bad_debt", "max_im_increase_1d",
                     "max_im_increase_10d", "peak_to_trough"}
BUDGET_POLICY_KEYS = {"liquidations", "bad_debt", "avg_collateral", "share_of_bound", "max_im_increase_5d"}
HEADLINE_KEYS = {"share_of_bound_min", "share_of_bound_mean", "budgets_met", "budgets_total"}


def tiny_config(root: Path, dataset: str, **over: object) -> dict:
    cfg = {
        "name": "tiny-run",
        "seed": 11,
        "datasets": [dataset],
        "cuts": {dataset: "2020-01-01"},
        "training": {
            "horizon": 2,
            "walk_forward": {"min_train": 200, "refit_every": 100},
            "models": [{"name": "ewma"}, {"name": "ewma", "label": "ewma80", "params": {"lam": 0.8}}],
            "promotion": {"mcs_reps": 50},
        },
        "budgets": [0.15, 0.25],
        "policies": {
            "static_pairs": {"im": [0.02, 0.06, 0.12, 0.25, 0.5], "mm_fractions": [0.5], "mm_fixed": [0.03]},
            "predictive": {"rounds": 1, "refine": False,
                           "grid": {"power": [0.0, 1.0], "stress": [0.0], "omega": [0.5], "floor": [0.02],
                                    "release": [1.0], "mm_binds": ["path"], "mm_k": [0.0], "mm_floor": [0.0],
                                    "mm_fraction": [None, 0.25]}},
        },
        "population": {"n_positions": 400},
        "sensitivity": {"vary": {"population.topup_prob": [0.0]}},
        "tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
        "artifacts_dir": str(root / "artifacts"),
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("run")
    csv = root / "prices.csv"  # a user's file; the asset label is given in the id (``#SYN``), not the file name
    simulate(700, seed=3, start="2019-01-01").bars.to_csv(csv)
    dataset = f"csv:{csv}#SYN"
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(root, dataset)))
    outs = []
    for i in range(2):
        out = root / f"out{i}"
        res = runner.invoke(app, ["run", "--config", str(cfg_path), "--out", str(out)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        outs.append(out)
    return {"root": root, "dataset": dataset, "config": cfg_path, "outs": outs, "output": res.output}


def _is_num_or_null(x: object) -> bool:
    return x is None or (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x))


class TestSummary:
    def test_keys_and_types(self, tiny: dict) -> None:
        s = json.loads((tiny["outs"][0] / "summary.json").read_text())
        assert set(s) == {"assets", "headline", "portfolio", "mlflow_run_id", "cut", "config_hash"}
        assert "fewer than 2 daily assets" in s["portfolio"]["skipped"]  # one asset: no portfolio
        assert not (tiny["outs"][0] / "portfolio_grid.json").exists()
        assert HEADLINE_KEYS <= set(s["headline"])
        assert s["headline"]["budgets_total"] == 2 and 0 <= s["headline"]["budgets_met"] <= 2
        assert list(s["assets"]) == ["SYN"]
        a = s["assets"]["SYN"]
        assert {"budgets", "ablation", "policies", "predictive_params"} <= set(a)
        assert set(a["budgets"]) == {"0.15", "0.25"} and set(a["ablation"]) == {"0.15", "0.25"}
        for b, e in a["budgets"].items():
            st = e["best_static"]
            assert {"im", "mm", "liquidations", "bad_debt", "avg_collateral"} <= set(st)
            assert st["mm"] <= st["im"] and abs(st["avg_collateral"] - float(b)) <= 0.005
            assert {"liquidations", "bad_debt"} <= set(e["bound"])
            assert e["bound"]["liquidations"] <= st["liquidations"] + 1e-9
            for pol in ("predictive", "ewma_ccp", "garch_fhs"):
                assert BUDGET_POLICY_KEYS <= set(e[pol]), (b, pol)
                assert all(_is_num_or_null(e[pol][k]) for k in BUDGET_POLICY_KEYS)
                sh = e[pol]["share_of_bound"]
                assert sh is None or sh <= 1 + 1e-9  # the bound is never beaten
            assert set(a["ablation"][b]) == {"forecast", "constant_variance", "realised_variance"}
            for v in a["ablation"][b].values():
                assert set(v) == {"liquidations", "bad_debt", "avg_collateral"}
        for name, p in a["policies"].items():
            assert set(p) == POLICY_KEYS | POLICY_EXTRA_KEYS, name
            assert p["uncovered_bad_debt"] <= p["bad_debt"] + 1e-9 and p["fund_draw"] <= p["bad_debt"] + 1e-9, name
            assert p["traffic_light"] in (("green", "yellow", "red") if name != "oracle_vol" else (None,))
        assert s["cut"] == {"SYN": "2020-01-01"}
        assert len(s["config_hash"]) == 64
        assert isinstance(s["mlflow_run_id"], str) and s["mlflow_run_id"]

    def test_share_matches_its_parts(self, tiny: dict) -> None:
        """share = (static - policy) / (static - bound) with static and bound taken at the policy's collateral."""
        s = json.loads((tiny["outs"][0] / "summary.json").read_text())
        for e in s["assets"]["SYN"]["budgets"].values():
            for pol in ("predictive", "ewma_ccp", "garch_fhs"):
                v = e[pol]
                if v["share_of_bound"] is None:
                    continue
                st, bd = v["best_static_here"]["liquidations"], v["bound_here"]
                assert abs(v["best_static_here"]["avg_collateral"] - v["avg_collateral"]) <= 0.005
                assert v["share_of_bound"] == pytest.approx((st - v["liquidations"]) / (st - bd), rel=1e-9)

    def test_same_seed_same_numbers(self, tiny: dict) -> None:
        a, b = (json.loads((o / "summary.json").read_text()) for o in tiny["outs"])
        assert a["mlflow_run_id"] != b["mlflow_run_id"]
        a.pop("mlflow_run_id"), b.pop("mlflow_run_id")
        assert a == b

    def test_cli_prints_report_and_headline(self, tiny: dict) -> None:
        out = tiny["output"]
        assert "report:" in out and "report.html" in out
        assert "headline" in out and "share of the bound" in out

    def test_mlflow_run_has_artifacts(self, tiny: dict) -> None:
        from mlflow.tracking import MlflowClient

        s = json.loads((tiny["outs"][1] / "summary.json").read_text())
        client = MlflowClient(f"sqlite:///{tiny['root'] / 'mlruns.db'}")
        run = client.get_run(s["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        names = {f.path for f in client.list_artifacts(s["mlflow_run_id"])}
        assert {"summary.json", "report.html", "details.json", "config.json"} <= names
        assert any(k.startswith("assets.SYN.budgets.0.15.predictive") for k in run.data.metrics)
        assert "headline.budgets_total" in run.data.metrics

    def test_champion_quality_matches_the_training_evaluation(self, tiny: dict) -> None:
        """The backtest-only forecast-quality table (from the pinned table) equals the training job's QLIKE."""
        from types import SimpleNamespace

        from volmargin.run import _champion_quality, load_assets

        cfg = load_config(tiny["config"], "run")
        inputs, _ = load_assets(cfg, mode="backtest")
        got = _champion_quality({k: SimpleNamespace(inputs=v) for k, v in inputs.items()}).iloc[0]
        d = json.loads((tiny["outs"][1] / "details.json").read_text())
        ev_path = Path(cfg.artifacts_dir) / "train" / d["training_run_ids"][0] / "evaluation.json"
        ev = json.loads(ev_path.read_text())["assets"][tiny["dataset"]]
        champ = ev["models"][ev["champion"]]
        assert got["model"] == ev["champion"]
        assert got["qlike_pre"] == pytest.approx(champ["pre_cut"]["qlike"], rel=1e-12)
        assert got["qlike_held_out"] == pytest.approx(champ["held_out"]["qlike"], rel=1e-12)

    def test_report_is_standalone(self, tiny: dict) -> None:
        html = (tiny["outs"][0] / "report.html").read_text()
        assert "http://" not in html and "https://" not in html
        assert 'src="data:image/png;base64,' in html
        assert "Verdict" in html and "Sensitivity" in html and "Data quality" in html


class TestBacktestCommand:
    @pytest.mark.slow
    def test_backtest_from_saved_tables(self, tiny: dict, tmp_path: Path) -> None:
        d = json.loads((tiny["outs"][0] / "details.json").read_text())
        table = Path(d["assets"]["SYN"]["champion"]["forecast_table"])
        fdir = tmp_path / "fc"
        fdir.mkdir()
        (fdir / "SYN.parquet").write_bytes(table.read_bytes())
        cfg = yaml.safe_load(tiny["config"].read_text())
        cfg["forecasts_dir"] = str(fdir)
        p = tmp_path / "bt.yaml"
        p.write_text(yaml.safe_dump(cfg))
        res = runner.invoke(app, ["backtest", "--config", str(p), "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output + repr(res.exception)
        a = json.loads((tmp_path / "out" / "summary.json").read_text())
        b = json.loads((tiny["outs"][0] / "summary.json").read_text())
        # same forecasts and seed: same numbers; only the config (forecasts_dir) and the run differ
        assert a["assets"] == b["assets"]
        assert a["config_hash"] != b["config_hash"]


    def test_backtest_pins_the_champion_at_the_cut(self, tiny: dict, tmp_path: Path) -> None:
        res = runner.invoke(app, ["backtest", "--config", str(tiny["config"]), "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output + repr(res.exception)
        a = json.loads((tmp_path / "out" / "summary.json").read_text())
        b = json.loads((tiny["outs"][0] / "summary.json").read_text())
        assert a["assets"] == b["assets"] and a["config_hash"] == b["config_hash"]
        da = json.loads((tmp_path / "out" / "details.json").read_text())
        db = json.loads((tiny["outs"][1] / "details.json").read_text())  # the latest champion at the cut
        assert da["mode"] == "backtest" and da["training_run_ids"] == []
        assert da["assets"]["SYN"]["champion"] == db["assets"]["SYN"]["champion"]

    @pytest.mark.slow
    def test_backtest_without_a_champion_recomputes_ewma(self, tiny: dict, tmp_path: Path) -> None:
        cfg = yaml.safe_load(tiny["config"].read_text())
        # no champion was recorded at this cut (neither in the registry records nor in MLflow)
        cfg.update({"cuts": {tiny["dataset"]: "2020-02-01"}, "artifacts_dir": str(tmp_path / "art")})
        p = tmp_path / "bt.yaml"
        p.write_text(yaml.safe_dump(cfg))
        res = runner.invoke(app, ["backtest", "--config", str(p), "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output + repr(res.exception)
        d = json.loads((tmp_path / "out" / "details.json").read_text())
        assert d["assets"]["SYN"]["champion"]["model_key"] == "ewma"
        assert d["assets"]["SYN"]["champion"]["forecast_table"] == "recomputed"
        s = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert BUDGET_POLICY_KEYS <= set(s["assets"]["SYN"]["budgets"]["0.15"]["predictive"])
        assert s["cut"] == {"SYN": "2020-02-01"}


class TestConfigErrors:
    @pytest.mark.parametrize(
        ("change", "needle"),
        [
            ({"polices": {}}, "unknown key 'polices'"),
            ({"population": {"n_positons": 3}}, "population.n_positons: unknown key 'n_positons'"),
            ({"backtest": {"liquidation": {"penalty": 0.1}}}, "backtest.liquidation.penalty: unknown key 'penalty'"),
            ({"sensitivity": {"vary": {"population.levrage": [1.0]}}}, "unknown field 'levrage'"),
            ({"controls": {"floor": 0.3, "ceiling": 0.2}}, "controls.floor"),
            ({"policies": {"ewma_ccp": {"tool": "buffer"}}}, "policies.ewma_ccp"),
            ({"policies": {"predictive": {"round": 1}}}, "policies.predictive: unknown key(s) ['round']"),
            ({"policies": {"predictive": {"max_im_increase_5d": "ewma"}}},
             "policies.predictive.max_im_increase_5d must be a fraction > 0 or 'ewma_ccp', got 'ewma'"),
            ({"portfolio": {"n_accounts": 0}}, "portfolio.n_accounts: Input should be greater than or equal to 1"),
            ({"portfolio": {"budgets": [1.5]}}, "portfolio.budgets: Value error, a budget"),
            ({"portfolio": {"assets": ["SYN", "XRP"]}}, "portfolio.assets: unknown asset(s) ['XRP']"),
            ({"portfolio": {"assets": ["SYN"]}}, "a portfolio needs at least 2 assets"),
            ({"portfolio": {"fit_grid": [{"vol_kk": 1.0}]}}, "portfolio.fit_grid: Value error, shape 0: unknown key(s)"),
            ({"portfolio": {"fit_grid": [{"mm_fraction": 1.5}]}}, "mm_fraction must be in (0, 1]"),
            ({"portfolio": {"mode": "isolated"}}, "portfolio.mode"),
            ({"portfolio": {"n_acounts": 100}}, "portfolio.n_acounts: unknown key 'n_acounts'"),
        ],
    )
    def test_bad_config_exits_2_naming_the_key(self, tmp_path: Path, change: dict, needle: str) -> None:
        cfg = tiny_config(tmp_path, "csv:/nonexistent/SYN.csv")
        cfg.update(change)
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(cfg))
        res = runner.invoke(app, ["run", "--config", str(p), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert needle in " ".join(res.output.split())
        assert not (tmp_path / "o" / "summary.json").exists()

    def test_missing_config_file_exits_2(self, tmp_path: Path) -> None:
        res = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
        assert res.exit_code == 2
        assert "config file not found" in res.output

    def test_shipped_configs_validate(self) -> None:
        root = Path(__file__).resolve().parents[2]
        for name in ("demo.yaml", "full.yaml"):
            cfg = load_config(root / "configs" / name, "run")
            assert isinstance(cfg, RunConfig)
            assert [cfg.cut_for(d).isoformat() for d in cfg.datasets] == ["2018-01-01"] * 3
        cfg = load_config(root / "configs" / "btc15m.yaml", "run")
        assert [cfg.cut_for(d).isoformat() for d in cfg.datasets] == ["2021-11-15"]


class TestHelpers:
    def test_headline_numbers(self) -> None:
        assets = {"A": {"budgets": {"0.1": {"predictive": {"share_of_bound": 0.2}, "checks": {"met": False}},
                                    "0.2": {"predictive": {"share_of_bound": None}, "checks": {"met": False}}}},
                  "B": {"budgets": {"0.1": {"predictive": {"share_of_bound": 0.8}, "checks": {"met": True}}}}}
        got = headline_numbers(assets)
        assert got == {"share_of_bound_min": 0.2, "share_of_bound_mean": pytest.approx(0.5), "budgets_met": 1,
                       "budgets_total": 3, "shares_undefined": 1}

    def test_config_hash_is_stable_and_sensitive(self) -> None:
        a, b = RunConfig(), RunConfig()
        assert config_hash(a) == config_hash(b)
        assert config_hash(a) != config_hash(RunConfig(seed=1))

    def test_scaled_path_respects_controls(self) -> None:
        from margin.controls import Controls
        from margin.path import MarginPath

        t = pd.date_range("2020-01-01", periods=50, freq="D", tz="UTC")
        im = 0.05 + 0.04 * np.sin(np.arange(50) / 3.0)
        ctl = Controls(floor=0.03, ceiling=0.12, max_change=0.2, notice_bars=2, mm_fraction=0.5)
        base = MarginPath(times=t, im_rate=im, mm_rate=0.5 * im, policy="x")
        p = scaled_path(base, 1.6, ctl)
        assert p.im_rate.min() >= 0.03 - 1e-15 and p.im_rate.max() <= 0.12 + 1e-15
        ratio = p.im_rate[1:] / p.im_rate[:-1]
        assert np.all(ratio <= 1.2 + 1e-12) and np.all(ratio >= 0.8 - 1e-12)
        # an MM increase binds on open positions only after the notice
        assert np.all(p.mm_rate <= 0.5 * p.im_rate + 1e-15)
        ref = scaled_path(base, 1.6, None)
        np.testing.assert_allclose(ref.im_rate, np.minimum(im * 1.6, 1.0), rtol=0, atol=0)

    def test_scaled_policy_keeps_the_controls_ceiling(self) -> None:
        """A policy scaled down to a budget is scaled before its controls, not after: its ceiling stays the
        controls' ceiling (scaling the controlled IM made it scale x ceiling, a rival that could not rise as
        far as the contender), and the result is the controls applied once to the scaled request."""
        from margin.controls import Controls, apply_controls
        from margin.policies import EwmaCcpPolicy, PolicyContext

        t = pd.date_range("2020-01-01", periods=400, freq="D", tz="UTC")
        r = np.random.default_rng(3).standard_t(3, 400) * np.where(np.arange(400) > 300, 0.08, 0.02)
        bars = pd.DataFrame({"close": 100 * np.exp(np.cumsum(r))}, index=t)
        bars["open"] = bars["high"] = bars["low"] = bars["close"]
        bars["volume"] = 1.0
        ctl = Controls(floor=0.02, ceiling=0.3, max_change=0.5, notice_bars=1, mm_fraction=0.5)
        path = EwmaCcpPolicy().path(PolicyContext(bars=bars, controls=ctl))
        assert path.im_requested is not None and path.im_requested.max() > 0.3 / 0.5  # the request passes 2x ceiling
        half = scaled_path(path, 0.5, ctl)
        assert np.isclose(half.im_rate.max(), 0.3)  # the ceiling binds at its own level ...
        assert np.isclose(scaled_path(path, 0.5, None).im_rate.max(), 0.15)  # ... not at 0.5 x 0.3
        once = apply_controls(np.minimum(path.im_requested * 0.5, 1.0), ctl)
        np.testing.assert_array_equal(half.im_rate, once.im_new)
        np.testing.assert_array_equal(half.mm_rate, once.mm_open)
        # scaling composes: half of double is the original request
        np.testing.assert_allclose(scaled_path(scaled_path(path, 2.0, ctl), 0.5, ctl).im_rate, path.im_rate)

    def test_horizon_breaches_hand_example(self) -> None:
        close = np.array([100.0, 90.0, 95.0, 120.0, 100.0])
        longs, shorts = horizon_breaches(close, np.full(5, 0.04), 0, 2)
        # windows 0->2 (95/100: the long loses 5% > 4%) and 2->4 (100/95: the short loses 5.3% > 4%)
        assert longs.tolist() == [True, False] and shorts.tolist() == [False, True]

    def test_horizon_breaches_against_a_loop(self) -> None:
        rng = np.random.default_rng(42)
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.03, 200)))
        im = rng.uniform(0.01, 0.08, 200)
        longs, shorts = horizon_breaches(close, im, 17, 3)
        ref_l, ref_s = [], []
        t = 17
        while t + 3 <= 199:
            ref_l.append(1 - close[t + 3] / close[t] > im[t])
            ref_s.append(close[t + 3] / close[t] - 1 > im[t])
            t += 3
        assert longs.tolist() == ref_l and shorts.tolist() == ref_s


def test_forecast_table_falls_back_to_its_mlflow_copy(tmp_path, monkeypatch) -> None:
    # a table trained from another folder (the recorded path is gone) is read from the run's artifact
    import mlflow

    from volmargin.run_inputs import _load_table

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
        idx = pd.date_range("2020-01-01", periods=3, freq="D", tz="UTC")
        df = pd.DataFrame({"h.1": [1e-4, 2e-4, 3e-4]}, index=idx)
        local = tmp_path / "gone" / "garch.parquet"
        local.parent.mkdir()
        df.to_parquet(local)
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(str(local), artifact_path="forecast")
    finally:
        mlflow.set_tracking_uri(previous)
    local.unlink()
    got = _load_table(local, f"runs:/{run.info.run_id}/forecast/garch.parquet", uri)
    pd.testing.assert_frame_equal(got, df, check_freq=False)
    with pytest.raises(FileNotFoundError, match="forecast table not found"):
        _load_table(local)
    with pytest.raises(FileNotFoundError, match="its MLflow copy runs:/nope"):
        _load_table(local, "runs:/nope/forecast/garch.parquet", uri)
