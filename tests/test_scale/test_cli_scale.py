"""`volmargin train --ray-address` and `volmargin hpo` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from data_pipelines.synthetic import simulate
from volmargin.cli import app
from volmargin.commands.train import executor_override
from volmargin.config import ExecutorConfig

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from volmargin.commands._common import console, err_console

    monkeypatch.setattr(console, "width", 250)
    monkeypatch.setattr(err_console, "width", 250)
    bars = simulate(600, seed=21, start="2015-01-01").bars
    bars.index = bars.index.strftime("%Y-%m-%d")
    bars.rename_axis("time").reset_index().to_csv(tmp_path / "SYN.csv", index=False)
    return tmp_path


def _write(workdir: Path, name: str, cfg: dict) -> Path:
    p = workdir / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _hpo_cfg(workdir: Path, db: str = "", **over) -> Path:
    cfg = {
        "name": "cli-hpo",
        "dataset": f"csv:{workdir / 'SYN.csv'}",
        "cut": "2016-06-01",
        "horizon": 2,
        "walk_forward": {"min_train": 250, "refit_every": 100},
        "model": {"name": "ewma"},
        "search_space": {"lam": {"type": "float", "low": 0.85, "high": 0.99}},
        "n_trials": 5,
        "sampler": "tpe",
        "tracking_uri": db or f"sqlite:///{workdir / 'mlruns.db'}",
        "executor": {"backend": "local", "workers": 1},
    }
    cfg.update(over)
    return _write(workdir, "hpo.yaml", cfg)


def test_hpo_search_logs_every_trial(workdir, mlflow_db):
    res = runner.invoke(app, ["hpo", "--config", str(_hpo_cfg(workdir, mlflow_db)), "--trials", "3", "--no-promote"])
    assert res.exit_code == 0, res.output
    assert "best: trial" in res.output and "search run" in res.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name("cli-hpo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("job") == "hpo"]
    assert len(parents) == 1 and parents[0].data.params["n_trials"] == "3"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == 3 and all("qlike_pre_cut" in r.data.metrics for r in kids)


def test_hpo_config_errors_name_the_key(workdir):
    res = runner.invoke(app, ["hpo", "--config", str(_hpo_cfg(workdir, n_trals=3))])
    assert res.exit_code == 2 and "unknown key 'n_trals'" in res.output
    res = runner.invoke(app, ["hpo", "--config", str(_hpo_cfg(workdir)), "--workers", "0"])
    assert res.exit_code == 2 and "--workers must be >= 1, got 0" in res.output
    res = runner.invoke(app, ["hpo", "--config", str(_hpo_cfg(workdir)), "--ray-address", " "])
    assert res.exit_code == 2 and "--ray-address must not be empty" in res.output


def test_executor_override():
    base = ExecutorConfig(workers=2)
    assert executor_override(base, None, None) == base
    ray = executor_override(base, 3, "ray://head:10001")
    assert (ray.backend, ray.workers, ray.address) == ("ray", 3, "ray://head:10001")


@pytest.mark.slow  # two full training jobs with MLflow logging (~30 s on a quiet 2-core machine)
def test_train_on_ray_equals_train_local(workdir, ray_local):
    """The same training config run locally and with --ray-address: the same evaluation numbers."""
    cfg = {
        "name": "cli-ray", "seed": 3, "datasets": [f"csv:{workdir / 'SYN.csv'}"], "cut": "2016-06-01", "horizon": 2,
        "walk_forward": {"min_train": 250, "refit_every": 100}, "models": [{"name": "ewma"}, {"name": "har"}],
        "promotion": {"mcs_reps": 100, "register_models": False},
        "tracking_uri": f"sqlite:///{workdir / 'mlruns.db'}",
    }
    evals = []
    for extra in ([], ["--ray-address", "auto", "--workers", "2"]):
        res = runner.invoke(app, ["train", "--config", str(_write(workdir, "train.yaml", cfg)), *extra])
        assert res.exit_code == 0, res.output
        path = next(line.split("evaluation: ", 1)[1].strip() for line in res.output.splitlines()
                    if line.startswith("evaluation: "))
        evals.append(json.loads(Path(path).read_text())["assets"][f"csv:{workdir / 'SYN.csv'}"])
    assert ray_local.is_initialized()  # the CLI used the running instance and left it up
    for key in ("ewma", "har"):
        for sample in ("pre_cut", "held_out"):
            assert evals[0]["models"][key][sample]["qlike"] == evals[1]["models"][key][sample]["qlike"]
