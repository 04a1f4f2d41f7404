"""End-to-end: `volmargin train` and `volmargin models list` on a synthetic CSV (ewma + har)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from volmargin.cli import app

runner = CliRunner()


def synthetic_csv(path: Path, n: int = 700, seed: int = 7) -> Path:
    """Daily OHLC from GARCH(1,1) log returns (decimal), UTC midnight timestamps."""
    rng = np.random.default_rng(seed)
    omega, alpha, beta = 4e-6, 0.1, 0.88
    s, p = omega / (1 - alpha - beta), 100.0
    rows = []
    t0 = pd.Timestamp("2015-01-01")
    for t in range(n):
        r = np.sqrt(s) * rng.standard_normal()
        close = p * np.exp(r)
        spread = np.sqrt(s) * np.abs(rng.normal(1.0, 0.3, 2))
        high = max(p, close) * np.exp(spread[0] * 0.5)
        low = min(p, close) * np.exp(-spread[1] * 0.5)
        rows.append((t0 + pd.Timedelta(days=t), p, high, low, close, 1000.0))
        s = omega + alpha * r**2 + beta * s
        p = close
    df = pd.DataFrame(rows, columns=["time", "open", "high", "low", "close", "volume"])
    df["time"] = df["time"].dt.strftime("%Y-%m-%d")
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from volmargin.commands._common import console, err_console

    monkeypatch.setattr(console, "width", 250)
    monkeypatch.setattr(err_console, "width", 250)
    synthetic_csv(tmp_path / "SYN.csv")
    return tmp_path


def _config(workdir: Path, **over) -> Path:
    cfg = {
        "name": "cli-test",
        "seed": 3,
        "datasets": [f"csv:{workdir / 'SYN.csv'}"],
        "cut": "2016-06-01",
        "horizon": 2,
        "walk_forward": {"min_train": 250, "refit_every": 100},
        "models": [{"name": "ewma"}, {"name": "har"}],
        "promotion": {"mcs_reps": 100},
        "tracking_uri": f"sqlite:///{workdir / 'mlruns.db'}",
    }
    cfg.update(over)
    p = workdir / "train.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_then_list(workdir):
    cfg = _config(workdir)
    res = runner.invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "Held-out evaluation" in res.output
    runs = list((workdir / "artifacts" / "train").iterdir())
    assert len(runs) == 1
    ev = json.loads((runs[0] / "evaluation.json").read_text())
    assert ev["parent_run_id"] == runs[0].name
    asset = ev["assets"][f"csv:{workdir / 'SYN.csv'}"]
    for key in ("ewma", "har"):
        m = asset["models"][key]
        assert m["pre_cut"]["qlike"] > 0 and m["held_out"]["qlike"] > 0
        assert m["pre_cut"]["mse"] > 0 and m["held_out"]["mse"] > 0
        assert "pvalue" in m["pre_cut"]["dm"]["har" if key == "ewma" else "ewma"]
        assert isinstance(m["pre_cut"]["in_mcs"], bool)
        assert m["held_out"]["var"]["0.99"]["traffic_light"] in ("green", "yellow", "red")
        table = pd.read_parquet(asset["forecast_tables"][key])
        assert {"h.1", "h.2", "y.1", "post_cut"} <= set(table.columns)
    assert asset["decision"]["promoted"] and asset["champion"] == asset["best_pre_cut"]

    # MLflow: parent run with the evaluation artifact, nested runs per asset and model
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cli-test")
    runs_all = client.search_runs([exp.experiment_id])
    assert len(runs_all) == 1 + 1 + 2
    arts = [a.path for a in client.list_artifacts(ev["parent_run_id"])]
    assert "evaluation.json" in arts
    children = [r for r in runs_all if r.data.tags.get("model") == "har"]
    assert children and children[0].data.metrics["held_out.qlike"] == pytest.approx(asset["models"]["har"]["held_out"]["qlike"])
    champ = client.get_model_version_by_alias("vol-SYN", "champion")
    assert champ.tags["has_pyfunc"] == "true" and champ.tags["model_key"] == asset["champion"]
    from data_pipelines.pipeline import prepare_dataset
    from models.pyfunc import to_model_input

    feats = prepare_dataset(f"csv:{workdir / 'SYN.csv'}").features
    loaded = mlflow.pyfunc.load_model("models:/vol-SYN@champion")
    out = loaded.predict(to_model_input(feats.tail(3)), params={"horizon": 2})
    # the logged model is the one fitted at the last origin: its forecast from the last bar equals the table's
    table = pd.read_parquet(asset["forecast_tables"][asset["champion"]])
    np.testing.assert_allclose(out[["h.1", "h.2"]].to_numpy()[-1], table[["h.1", "h.2"]].to_numpy()[-1], rtol=1e-10)

    res = runner.invoke(app, ["models", "list", "--tracking-uri", f"sqlite:///{workdir / 'mlruns.db'}"])
    assert res.exit_code == 0, res.output
    assert "vol-SYN" in res.output and "champion" in res.output

    from training.registry import pinned_champion

    pin = pinned_champion(f"csv:{workdir / 'SYN.csv'}", "2016-06-01")
    assert pin.model_version == "1" and pin.spec["key"] == asset["champion"]
    assert Path(pin.forecast_table).is_absolute() and Path(pin.forecast_table).is_file()
    assert pin.forecast_artifact.startswith("runs:/") and pin.forecast_artifact.endswith(".parquet")


def test_bad_config_exits_2_naming_key(workdir):
    cfg = _config(workdir, walk_forward={"min_train": 250, "refit_evry": 5})
    res = runner.invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "refit_evry" in res.output and "unknown key" in res.output


def test_unknown_model_exits_2(workdir):
    cfg = _config(workdir, models=[{"name": "ewma"}, {"name": "nope"}])
    res = runner.invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "models.1" in res.output and "unknown model 'nope'" in res.output


def test_file_store_refused(workdir):
    cfg = _config(workdir, tracking_uri=f"file://{workdir / 'mlruns'}")
    res = runner.invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2 and "plain file store" in res.output


def test_missing_config_file(workdir):
    res = runner.invoke(app, ["train", "--config", "nope.yaml"])
    assert res.exit_code == 2 and "config file not found" in res.output


@pytest.mark.slow
def test_demo_config_end_to_end(tmp_path, monkeypatch):
    """configs/train_demo.yaml on bundled BTC (ewma, garch, har, gru): about a minute on 2 cores."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    res = runner.invoke(app, ["train", "--config", str(root / "configs" / "train_demo.yaml")])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp_path / "artifacts" / "train").iterdir())
    ev = json.loads((run / "evaluation.json").read_text())
    btc = ev["assets"]["bundled:bitstamp/BTC"]
    assert set(btc["models"]) == {"ewma", "garch", "har", "gru"}
    assert btc["cut"] == "2018-01-01" and btc["champion"] in btc["models"]
    for m in btc["models"].values():
        assert m["held_out"]["n"] > 1000
