"""MLflow tracking of training jobs (driver only: workers never write to the store).

Layout: one experiment per training config (``TrainConfig.name``); one parent run per job; a nested run per
asset and, inside it, a nested run per model. Each model run gets its specification and schedule as
params, pre-cut / held-out metrics, per-fold metrics (``step`` = fold index), the walk-forward forecast
table as parquet, and two plots (forecast vs proxy; rolling QLIKE). The job's ``evaluation.json`` is
logged on the parent run.

Tracking URI: the config's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``.
A plain file store (``file:`` URI or a bare path) is refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_pipelines.atomic import atomic_write_parquet, atomic_write_text
from training.walk_forward import WalkForwardResult

__all__ = [
    "DEFAULT_TRACKING_URI",
    "resolve_tracking_uri",
    "use_experiment",
    "atomic_write_text",
    "atomic_write_parquet",
    "flatten_metrics",
    "mlflow_key",
    "TrainingTracker",
    "plot_forecast_vs_proxy",
    "plot_rolling_qlike",
    "log_fitted_model",
]

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def resolve_tracking_uri(uri: str | None = None, *, allow_file_store: bool = False) -> str:
    """Tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``.

    Raises
    ------
    ValueError
        A plain file store (``file:...`` or a path without a scheme) without ``allow_file_store``.
    """
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = resolved.split(":", 1)[0] if "://" in resolved or resolved.startswith("file:") else ""
    is_file = scheme in ("", "file") or (len(scheme) == 1 and resolved[1:3] == ":\\")
    if is_file and not allow_file_store:
        raise ValueError(
            f"tracking_uri {resolved!r} is a plain file store; use a database URI such as "
            f"{DEFAULT_TRACKING_URI!r}, or set allow_file_store: true"
        )
    return resolved


def use_experiment(name: str, tracking_uri: str) -> str:
    """Point MLflow at ``tracking_uri`` and experiment ``name`` (created if missing); returns its id.

    A new experiment in a SQLite store keeps its artifacts in ``mlruns/<name>/`` beside the database file, so a store
    and its artifacts stay together (MLflow's default is ``./mlruns`` of whatever directory the process runs
    in: a job pointed at another directory's database would scatter artifacts into the current one). Existing
    experiments keep their artifact location; other stores use MLflow's default.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    root = _sqlite_artifact_root(tracking_uri, name)
    if root is not None and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=root)
        except MlflowException:  # created meanwhile by another process: use it as it is
            pass
    return mlflow.set_experiment(name).experiment_id


def _sqlite_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """``file:`` URI of ``mlruns/<experiment>`` beside the database of a ``sqlite:///PATH`` URI; None for other
    stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlruns" / _safe(experiment)).as_uri()


def flatten_metrics(entry: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of a nested evaluation dict as ``a.b.c -> value`` (MLflow metric names)."""
    out: dict[str, float] = {}
    for k, v in entry.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, name + "."))
        elif isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, int | float | np.floating | np.integer) and np.isfinite(v):
            out[name] = float(v)
    return out


# ---------------------------------------------------------------------------- plots
def plot_forecast_vs_proxy(res: WalkForwardResult, path: str | Path) -> Path:
    """Step-1 forecast volatility against the proxy's (square roots, log scale), cut marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    idx = res.forecast.origins
    ax.plot(idx, np.sqrt(res.targets["y.1"].to_numpy()), lw=0.5, color="0.6", label=f"proxy ({res.proxy}), next bar")
    ax.plot(idx, np.sqrt(res.forecast.variance[:, 0]), lw=1.0, color="C0", label=f"{res.model} forecast h.1")
    ax.axvline(res.cut, color="C3", ls="--", lw=1, label="cut")
    ax.set_yscale("log")
    ax.set_ylabel("volatility per bar (decimal)")
    ax.set_title(f"{res.asset}: {res.model} walk-forward forecast vs proxy")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def plot_rolling_qlike(results: Mapping[str, WalkForwardResult], path: str | Path, window: int = 60) -> Path:
    """Rolling mean (``window`` origins) of each model's per-origin QLIKE over time, cut marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.evaluation import row_losses

    fig, ax = plt.subplots(figsize=(10, 4))
    cut = None
    for k, res in results.items():
        s = row_losses(res).rolling(window, min_periods=max(2, window // 2)).mean()
        ax.plot(s.index, s.to_numpy(), lw=1.0, label=k)
        cut = res.cut
    if cut is not None:
        ax.axvline(cut, color="C3", ls="--", lw=1, label="cut")
    ax.set_ylabel(f"QLIKE, rolling {window}")
    ax.set_title("QLIKE over time")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


# ---------------------------------------------------------------------------- model logging
def log_fitted_model(model: Any, *, name: str, example_bars: pd.DataFrame | None = None, horizon: int = 1) -> Any:
    """Log a fitted forecaster on the active run through the models' pyfunc wrapper.

    ``models.pyfunc.log_forecaster`` logs it with ``name=`` and a signature inferred from
    ``example_bars`` (a few feature bars). Returns its ``ModelInfo`` (``model_uri``), or None when the
    wrapper is not available.
    """
    try:
        from models.pyfunc import log_forecaster
    except ModuleNotFoundError:
        log.warning("models.pyfunc.log_forecaster is not available; model %s not logged", name)
        return None
    return log_forecaster(model, name=name, input_example=example_bars, horizon=int(horizon))


# ---------------------------------------------------------------------------- tracker
class TrainingTracker:
    """Logs one training job to MLflow: parent run, nested asset runs, nested model runs.

    Parameters
    ----------
    experiment : str
        Experiment name (the training config's ``name``).
    tracking_uri : str
        Resolved tracking URI (see :func:`resolve_tracking_uri`).
    """

    def __init__(self, experiment: str, tracking_uri: str) -> None:
        import mlflow

        self.experiment = experiment
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self._mlflow = mlflow
        self.parent_run_id: str | None = None

    def start(self, *, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """Start the parent run; returns its id."""
        mlflow = self._mlflow
        use_experiment(self.experiment, self.tracking_uri)
        run = mlflow.start_run(run_name=run_name, tags={mlflow_key(k): v for k, v in (tags or {}).items()})
        self.parent_run_id = run.info.run_id
        mlflow.log_params({mlflow_key(k): _param(v) for k, v in params.items()})
        return run.info.run_id

    def end(self, status: str = "FINISHED") -> None:
        """End every run still active (nested first)."""
        mlflow = self._mlflow
        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)

    def log_asset(
        self,
        asset: str,
        results: Mapping[str, WalkForwardResult],
        evaluation: Mapping[str, Any],
        *,
        out_dir: Path,
        params: Mapping[str, Any],
        fitted_models: Mapping[str, Any] | None = None,
        log_model_for: str | None = None,
        example_bars: pd.DataFrame | None = None,
    ) -> dict[str, Any]:
        """Nested run for one asset with one nested run per model; returns ``{"run_id", "models": {key: {...}}}``.

        The forecast table of each model is written to ``out_dir/forecasts/<asset>/<key>.parquet`` and logged;
        the fitted model of ``log_model_for`` is logged with the pyfunc wrapper (for registration), its
        signature inferred from ``example_bars`` (the last feature bars).
        """
        mlflow = self._mlflow
        info: dict[str, Any] = {"models": {}}
        safe_asset = _safe(asset)
        with mlflow.start_run(run_name=asset, nested=True, tags={"asset": asset}) as arun:
            info["run_id"] = arun.info.run_id
            mlflow.log_params({k: _param(v) for k, v in params.items()})
            mlflow.log_dict(dict(evaluation), "evaluation_asset.json")
            plot = plot_rolling_qlike(results, out_dir / "plots" / safe_asset / "rolling_qlike.png")
            mlflow.log_artifact(str(plot), artifact_path="plots")
            for key, res in results.items():
                ev = evaluation["models"][key]
                with mlflow.start_run(run_name=f"{asset}/{key}", nested=True, tags={"asset": asset, "model": key}) as mrun:
                    mlflow.log_params(
                        {
                            "model": res.spec["name"],
                            "model_key": key,
                            "model_params": _param(res.spec["params"]),
                            "spec_hash": res.spec["version"],
                            "cut": str(res.cut.date()),
                            "proxy": res.proxy,
                            "horizon": res.forecast.horizon,
                        }
                    )
                    metrics = flatten_metrics({"pre_cut": ev.get("pre_cut", {}), "held_out": ev.get("held_out", {})})
                    metrics["fallbacks"] = float(res.n_fallbacks)
                    metrics["seconds"] = float(res.seconds)
                    mlflow.log_metrics(metrics)
                    self._log_folds(mrun.info.run_id, res)
                    table_path = atomic_write_parquet(res.table(), out_dir / "forecasts" / safe_asset / f"{_safe(key)}.parquet")
                    mlflow.log_artifact(str(table_path), artifact_path="forecast")
                    fig = plot_forecast_vs_proxy(res, out_dir / "plots" / safe_asset / f"{_safe(key)}_forecast.png")
                    mlflow.log_artifact(str(fig), artifact_path="plots")
                    mlflow.log_dict({"folds": [f.to_dict() for f in res.folds]}, "folds.json")
                    entry: dict[str, Any] = {
                        "run_id": mrun.info.run_id,
                        "forecast_table": str(Path(table_path).resolve()),  # absolute: found from any cwd
                        "forecast_artifact": f"runs:/{mrun.info.run_id}/forecast/{table_path.name}",
                        "model_uri": None,
                    }
                    if key == log_model_for and fitted_models and fitted_models.get(key) is not None:
                        mi = log_fitted_model(
                            fitted_models[key], name="model", example_bars=example_bars, horizon=res.forecast.horizon
                        )
                        entry["model_uri"] = getattr(mi, "model_uri", None)
                    info["models"][key] = entry
        return info

    def _log_folds(self, run_id: str, res: WalkForwardResult) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from training.evaluation import row_losses

        losses = row_losses(res)
        ts = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
        metrics = []
        start = 0
        for f in res.folds:
            seg = losses.iloc[start : start + f.n_origins]
            start += f.n_origins
            val = float(np.nanmean(seg.to_numpy())) if np.isfinite(seg.to_numpy()).any() else None
            if val is not None and np.isfinite(val):
                metrics.append(Metric("fold_qlike", val, ts, f.fold))
            metrics.append(Metric("fold_fit_seconds", float(f.fit_seconds), ts, f.fold))
            metrics.append(Metric("fold_fallbacks", float(f.fallbacks), ts, f.fold))
            metrics.append(Metric("fold_post_cut", float(f.post_cut), ts, f.fold))
        client = MlflowClient(self.tracking_uri)
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i : i + 900])

    def log_job_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file on the parent run."""
        if self.parent_run_id is None:
            raise RuntimeError("start() the parent run first")
        from mlflow.tracking import MlflowClient

        MlflowClient(self.tracking_uri).log_artifact(self.parent_run_id, str(path), artifact_path)

    def set_job_tags(self, tags: Mapping[str, str]) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("start() the parent run first")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        for k, v in tags.items():
            client.set_tag(self.parent_run_id, mlflow_key(k), str(v)[:5000])


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow param/metric/tag key: characters MLflow refuses (anything but letters, digits, ``_``,
    ``-``, ``.``, space, ``:`` and ``/``; e.g. the ``#`` of ``csv:prices.csv#SOL``) become ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def _param(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s[:6000]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
