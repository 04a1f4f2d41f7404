"""MLflow pyfunc wrapper around a fitted forecaster.

The fitted forecaster (numpy state, arch parameters, torch modules) is pickled as an artifact of the
logged model. ``predict(model_input, params={"horizon": H})`` takes a frame of *new* feature bars
(the feature contract of ``data_pipelines.features.build_features``; the bar time either as the
index or as a ``time`` column), feeds them one by one through ``update`` (no refit) and returns the
forecast table: one row per new bar (its time in ``origin``), columns ``h.1 … h.H`` of per-step
variance in decimal log-return units, plus regime-probability and quantile columns when the model
produces them. Bars at or before the last bar the model has seen are ignored; with no new bar the
table has one row, the forecast from the last bar seen. The wrapped forecaster itself is never
modified (each call works on a copy).
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from models.base import Forecaster, VolatilityForecast

__all__ = ["ForecasterPyfunc", "log_forecaster", "load_forecaster", "to_model_input"]

try:  # mlflow is a dependency of the project, but keep the models importable without it
    import mlflow
    from mlflow.pyfunc import PythonModel
except ModuleNotFoundError:  # pragma: no cover
    mlflow = None
    PythonModel = object  # type: ignore[assignment,misc]

ARTIFACT_KEY = "forecaster"


def to_model_input(frame: pd.DataFrame) -> pd.DataFrame:
    """Feature frame → pyfunc input: the UTC index becomes a naive-UTC ``time`` column, bools stay."""
    df = frame.copy()
    idx = pd.DatetimeIndex(df.index)
    idx = idx.tz_convert("UTC").tz_localize(None) if idx.tz is not None else idx
    df.insert(0, "time", idx.astype("datetime64[ns]"))
    df = df.reset_index(drop=True)
    for c in df.columns:
        if c != "time" and df[c].dtype != bool:
            df[c] = df[c].astype("float64")
    return df


def _from_model_input(model_input: Any) -> pd.DataFrame:
    df = pd.DataFrame(model_input).copy()
    if "time" in df.columns:
        t = pd.to_datetime(df.pop("time"), utc=True)
        df.index = pd.DatetimeIndex(t)
    elif not isinstance(df.index, pd.DatetimeIndex):
        raise ValueError("model_input needs a 'time' column or a DatetimeIndex with the bar times")
    idx = pd.DatetimeIndex(df.index)
    df.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
    return df.sort_index()


def forecast_table(forecaster: Forecaster, new_bars: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Update a copy of ``forecaster`` bar by bar with ``new_bars``; one forecast row per new bar."""
    f = copy.deepcopy(forecaster)
    new = new_bars[new_bars.index > f.last_time_]
    parts: list[VolatilityForecast] = []
    if len(new) == 0:
        parts.append(f.predict_variance(horizon))
    for i in range(len(new)):
        f.update(new.iloc[i : i + 1])
        parts.append(f.predict_variance(horizon))
    out = VolatilityForecast.stack(parts).to_long_frame()
    out.index = out.index.tz_convert("UTC").tz_localize(None)
    out.index.name = "origin"
    return out.reset_index()


class ForecasterPyfunc(PythonModel):  # type: ignore[misc,valid-type]
    """``mlflow.pyfunc.PythonModel`` serving a fitted :class:`models.base.Forecaster`."""

    def __init__(self, forecaster: Forecaster | None = None, default_horizon: int = 1) -> None:
        self.forecaster = forecaster
        self.default_horizon = int(default_horizon)

    def __getstate__(self) -> dict[str, Any]:
        # the forecaster travels as its own artifact, not inside the python_model pickle
        return {"forecaster": None, "default_horizon": self.default_horizon}

    def load_context(self, context: Any) -> None:
        config = getattr(context, "model_config", None) or {}
        if "default_horizon" in config:  # logged from code: the horizon comes as model_config
            self.default_horizon = int(config["default_horizon"])
        with open(context.artifacts[ARTIFACT_KEY], "rb") as fh:
            self.forecaster = pickle.load(fh)  # noqa: S301 - written by log_forecaster

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.forecaster is None:
            raise RuntimeError("no forecaster loaded")
        horizon = int((params or {}).get("horizon", self.default_horizon))
        if horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon}")
        return forecast_table(self.forecaster, _from_model_input(model_input), horizon)


def log_forecaster(
    forecaster: Forecaster,
    *,
    name: str = "model",
    input_example: pd.DataFrame | None = None,
    horizon: int = 1,
    registered_model_name: str | None = None,
) -> Any:
    """Log a fitted forecaster as an MLflow pyfunc model on the active run (or a new one).

    Parameters
    ----------
    forecaster : Forecaster
        A fitted forecaster.
    name : str
        Model name inside the run (MLflow 3 ``name=``).
    input_example : pd.DataFrame, optional
        A few feature bars (DatetimeIndex or ``time`` column); used for the signature and stored
        as the input example. Without it the model is logged without a signature.
    horizon : int
        Default forecast horizon (overridable per call with ``params={"horizon": H}``).
    registered_model_name : str, optional
        Also register the model under this name.

    Returns
    -------
    mlflow.models.model.ModelInfo
    """
    if mlflow is None:  # pragma: no cover
        raise ModuleNotFoundError("mlflow is needed to log a forecaster")
    if not isinstance(forecaster, Forecaster):
        raise TypeError(f"forecaster must be a models.base.Forecaster, got {type(forecaster).__name__}")
    forecaster._check_fitted()
    from mlflow.models import infer_signature

    signature = example = None
    if input_example is not None:
        example = input_example if "time" in input_example.columns else to_model_input(input_example)
        out = forecast_table(forecaster, _from_model_input(example), int(horizon))
        signature = infer_signature(example, out, params={"horizon": int(horizon)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "forecaster.pkl"
        part = path.with_suffix(".pkl.part")
        with open(part, "wb") as fh:
            pickle.dump(forecaster, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(part, path)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: nothing cloudpickled
            model_config={"default_horizon": int(horizon)},
            artifacts={ARTIFACT_KEY: str(path)},
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    """Pinned requirements of the wrapped models (skips MLflow's slow import-tracing inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "numpy", "pandas", "scipy", "arch", "scikit-learn", "torch", "cloudpickle"):
        try:
            v = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            continue
        reqs.append(f"{pkg}=={v.split('+')[0]}")
    return reqs


def load_forecaster(model_uri: str) -> Forecaster:
    """The fitted forecaster inside a model logged by :func:`log_forecaster`."""
    if mlflow is None:  # pragma: no cover
        raise ModuleNotFoundError("mlflow is needed to load a forecaster")
    wrapper = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    f = wrapper.forecaster
    if not isinstance(f, Forecaster):
        raise TypeError(f"{model_uri} does not hold a volmargin forecaster")
    return f

