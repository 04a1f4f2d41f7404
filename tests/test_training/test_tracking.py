"""training.tracking: URI resolution, atomic writes, metric flattening, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.tracking import (
    DEFAULT_TRACKING_URI,
    atomic_write_parquet,
    atomic_write_text,
    flatten_metrics,
    resolve_tracking_uri,
    use_experiment,
)


class TestTrackingUri:
    def test_default_env_and_explicit(self, monkeypatch):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert resolve_tracking_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///mlruns.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
        assert resolve_tracking_uri(None) == "sqlite:///other.db"
        assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"

    @pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mlruns", "./mlruns", "/abs/mlruns"])
    def test_file_store_refused_unless_allowed(self, uri):
        with pytest.raises(ValueError, match="plain file store"):
            resolve_tracking_uri(uri)
        assert resolve_tracking_uri(uri, allow_file_store=True) == uri


class TestAtomicWrites:
    def test_text_and_parquet(self, tmp_path):
        p = atomic_write_text(tmp_path / "d" / "x.json", '{"a": 1}')
        assert p.read_text() == '{"a": 1}'
        df = pd.DataFrame({"h.1": [1e-4, 2e-4]}, index=pd.date_range("2020", periods=2, tz="UTC"))
        q = atomic_write_parquet(df, tmp_path / "d" / "t.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(q), df, check_freq=False)
        assert sorted(x.name for x in (tmp_path / "d").iterdir()) == ["t.parquet", "x.json"]
        import os

        mask = os.umask(0)
        os.umask(mask)
        assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)

    def test_failed_write_leaves_no_file(self, tmp_path):
        class Boom(pd.DataFrame):
            def to_parquet(self, *a, **k):
                raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            atomic_write_parquet(Boom({"a": [1]}), tmp_path / "t.parquet")
        assert list(tmp_path.iterdir()) == []


def test_flatten_metrics():
    out = flatten_metrics({"pre_cut": {"qlike": 0.5, "n": 3, "in_mcs": True, "tl": "green", "x": None,
                                       "nan": float("nan"), "var": {"0.99": {"p_uc": 0.2}}}})
    assert out == {"pre_cut.qlike": 0.5, "pre_cut.n": 3.0, "pre_cut.in_mcs": 1.0, "pre_cut.var.0.99.p_uc": 0.2}


def test_plots_written(tmp_path):
    from test_walk_forward import make_task, synthetic_frame

    from training.tracking import plot_forecast_vs_proxy, plot_rolling_qlike
    from training.walk_forward import walk_forward

    res = walk_forward(make_task(synthetic_frame(200)))
    a = plot_forecast_vs_proxy(res, tmp_path / "f.png")
    b = plot_rolling_qlike({"ewma": res}, tmp_path / "q.png", window=20)
    assert a.stat().st_size > 1000 and b.stat().st_size > 1000
    assert np.all(res.forecast.variance > 0)


def test_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store, elsewhere = tmp_path / "store", tmp_path / "cwd"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would put artifacts in ./mlruns of this directory
    uri = f"sqlite:///{store / 'runs.db'}"
    exp_id = use_experiment("placement", uri)
    assert use_experiment("placement", uri) == exp_id  # existing experiment: selected, not created again
    assert mlflow.get_experiment(exp_id).artifact_location == (store / "mlruns" / "placement").as_uri()
    with mlflow.start_run() as run:
        mlflow.log_text("x", "note.txt")
    logged = [p for p in (store / "mlruns").rglob("note.txt") if run.info.run_id in p.parts]
    assert [p.read_text() for p in logged] == ["x"]
    assert not (elsewhere / "mlruns").exists()
