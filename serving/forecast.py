"""The forecast behind a publish: the market's registered model (or, on a fresh clone, its ``fit`` specification
fitted on the market's bars and cached) turned into out-of-sample forecast rows for the last ``window`` bars
up to the as-of time.

Where the rows come from:

* **registry** (MLflow alias or version of the market's registered model, as ``volmargin train`` promotes
  them): the version's walk-forward table (tag ``forecast_table``, or its MLflow copy) for origins it covers,
  then the fitted forecaster logged with the version (pyfunc ``model_uri``), updated bar by bar (no refit)
  through newer bars. When the version's fitted state is newer than the as-of time (a replay) and its table
  does not reach back, its specification is refitted on bars before the window (no look-ahead);
* **fit** (no such registered model, ``model.fit`` given): the specification fitted on bars before the
  window, then updated bar by bar through the window. The fitted forecaster and the rows are cached under
  ``cache_dir`` (keyed by specification and data hash), so the next publish is fast.

The standardized residuals ``r_{t+1} / sqrt(h.1_t)`` of the rows travel with the forecast (filtered historical
simulation needs them). Failures raise :class:`ModelUnavailable` (the publisher turns that into a fallback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_pipelines.atomic import atomic_write
from models.base import VolatilityForecast

__all__ = ["ModelUnavailable", "ModelForecast", "model_forecast", "lookup_registered"]

log = logging.getLogger(__name__)

_LOADED: dict[tuple[str, str], Any] = {}  # (model uri, tracking uri) -> fitted forecaster, per process


class ModelUnavailable(RuntimeError):
    """The market's model cannot be loaded or produce a forecast (the message says why)."""


@dataclass(frozen=True)
class ModelForecast:
    """Forecast rows behind one publish.

    Attributes
    ----------
    forecast : VolatilityForecast
        One row per bar origin in the window (per-step variance, decimal log returns), with ``std_resid``.
    lineage : dict
        ``model_name``, ``model_alias``, ``model_version``, ``model_source`` (registry | fitted | cache),
        ``spec``.
    """

    forecast: VolatilityForecast
    lineage: dict[str, Any]


def _spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _frame_hash(frame: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(pd.DatetimeIndex(frame.index).asi8).tobytes())
    h.update(np.ascontiguousarray(frame[["open", "high", "low", "close"]].to_numpy(dtype=np.float64)).tobytes())
    return h.hexdigest()[:24]


def _sqlite_missing(uri: str) -> bool:
    if not uri.startswith("sqlite:///"):
        return False
    return not Path(uri[len("sqlite:///"):]).is_file()


def lookup_registered(name: str, alias: str | None, version: str | None, tracking_uri: str) -> dict[str, Any] | None:
    """The registered version's tags (``spec``, ``forecast_table`` ...) and source, or None when the registry has
    no such model (or no registry database exists yet)."""
    if _sqlite_missing(tracking_uri):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version(name, str(version)) if version else client.get_model_version_by_alias(name, alias or "champion")
    except MlflowException:
        return None
    tags = dict(mv.tags or {})
    return {"version": str(mv.version), "source": mv.source, "tags": tags,
            "spec": json.loads(tags.get("spec", "{}") or "{}")}


def _load_pyfunc(uri: str, tracking_uri: str) -> Any:
    key = (uri, tracking_uri)
    if key not in _LOADED:
        import mlflow

        from models.pyfunc import load_forecaster

        mlflow.set_tracking_uri(tracking_uri)
        _LOADED[key] = load_forecaster(uri)
    return _LOADED[key]


def _load_table(path: str, artifact: str, tracking_uri: str) -> pd.DataFrame | None:
    p = Path(path) if path else None
    if (p is None or not p.is_file()) and artifact:
        import tempfile

        import mlflow

        try:
            p = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=tempfile.mkdtemp(prefix="vm-"),
                                                         tracking_uri=tracking_uri))
        except Exception as exc:  # noqa: BLE001 - any store error: no table
            log.warning("forecast table %s missing and its MLflow copy %s failed: %s", path, artifact, exc)
            return None
    if p is None or not p.is_file():
        return None
    df = pd.read_parquet(p)
    idx = pd.DatetimeIndex(df.index)
    df.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
    return df


def _rows(forecaster: Any, new: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Forecast rows (index = origin, ``h.*`` [+ ``q*``] columns) from updating ``forecaster`` through ``new``."""
    from models.pyfunc import forecast_table

    tab = forecast_table(forecaster, new, horizon)
    tab.index = pd.DatetimeIndex(pd.to_datetime(tab.pop("origin"), utc=True))
    return tab


def _fit_rows(spec: dict[str, Any], features: pd.DataFrame, window: int, horizon: int, cache: Path | None,
              market: str) -> tuple[pd.DataFrame, str]:
    """Fit ``spec`` on bars before the window (cached by spec and data), update through the window."""
    from models.base import get_forecaster

    shash = _spec_hash(spec)
    if len(features) < window + 60:
        raise ModelUnavailable(f"{market}: {len(features)} bars up to the as-of time; need at least {window + 60} "
                               f"(window {window} + 60 to fit {spec.get('name')})")
    rows_key = f"{shash}-{_frame_hash(features)}-w{window}-h{horizon}"
    rows_file = cache / market / f"rows-{rows_key}.parquet" if cache else None
    if rows_file is not None and rows_file.is_file():
        tab = pd.read_parquet(rows_file)
        tab.index = pd.DatetimeIndex(tab.index).tz_convert("UTC")
        return tab, "cache"
    fit_end = len(features) - window
    fit_frame = features.iloc[:fit_end]
    fitted_file = cache / market / f"model-{shash}-{_frame_hash(fit_frame)}.pkl" if cache else None
    forecaster = None
    source = "fitted"
    if fitted_file is not None and fitted_file.is_file():
        try:
            with open(fitted_file, "rb") as fh:
                forecaster = pickle.load(fh)  # noqa: S301 - written by this module
            source = "cache"
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is refitted
            log.warning("cached model %s unreadable (%s); refitting", fitted_file, exc)
    if forecaster is None:
        try:
            forecaster = get_forecaster(str(spec["name"]), **dict(spec.get("params") or {}))
            forecaster.fit(fit_frame)
        except Exception as exc:  # noqa: BLE001 - any fit failure means no model
            raise ModelUnavailable(f"{market}: fitting {spec.get('name')} failed: {exc}") from exc
        if fitted_file is not None:
            atomic_write(fitted_file, lambda tmp: Path(tmp).write_bytes(pickle.dumps(forecaster, protocol=5)))
    try:
        tab = _rows(forecaster, features.iloc[fit_end:], horizon)
    except Exception as exc:  # noqa: BLE001
        raise ModelUnavailable(f"{market}: forecasting with {spec.get('name')} failed: {exc}") from exc
    if rows_file is not None:
        atomic_write(rows_file, tab.to_parquet)
    return tab, source


def _to_forecast(tab: pd.DataFrame, features: pd.DataFrame, *, model: str, version: str, window: int) -> VolatilityForecast:
    tab = tab[~tab.index.duplicated(keep="last")].sort_index()
    tab = tab[tab.index <= features.index[-1]].tail(window)
    keep = [c for c in tab.columns if c.startswith("h.") or (c.startswith("q") and ".h." in c)]
    if not any(c.startswith("h.") for c in keep) or len(tab) == 0:
        raise ModelUnavailable(f"{model}: no forecast rows up to {features.index[-1]}")
    close = features["close"].astype(float)
    nxt = np.log(close.shift(-1) / close).reindex(tab.index).to_numpy(dtype=float)
    z = nxt / np.sqrt(tab["h.1"].to_numpy(dtype=float))
    df = tab[keep].copy()
    try:
        return VolatilityForecast.from_long_frame(df, model=model, version=version, std_resid=z[np.isfinite(z)])
    except ValueError as exc:
        raise ModelUnavailable(f"{model} forecast is invalid: {exc}") from None


def model_forecast(
    market: str,
    model_cfg: Any,
    features: pd.DataFrame,
    *,
    tracking_uri: str,
    cache_dir: str | Path | None,
) -> ModelForecast:
    """Forecast rows for the last ``model_cfg.window`` bars of ``features`` (see the module docstring).

    Parameters
    ----------
    market : str
        Market id (cache folder and messages).
    model_cfg : serving.markets.ModelRef
    features : pd.DataFrame
        Feature bars up to the as-of time (``build_features`` columns), UTC index.
    tracking_uri : str
        MLflow tracking/registry URI.
    cache_dir : path, optional
        Cache of fitted models and forecast rows.

    Raises
    ------
    ModelUnavailable
    """
    window, horizon = int(model_cfg.window), int(model_cfg.horizon)
    cache = Path(cache_dir) if cache_dir else None
    lineage: dict[str, Any] = {"model_name": model_cfg.name, "model_alias": model_cfg.alias if not model_cfg.version else None,
                               "model_version": model_cfg.version}
    try:
        reg = lookup_registered(model_cfg.name, model_cfg.alias, model_cfg.version, tracking_uri)
    except Exception as exc:  # noqa: BLE001 - a broken registry is a model failure
        raise ModelUnavailable(f"{market}: registry {tracking_uri} unreadable: {exc}") from exc
    if reg is None:
        if model_cfg.fit is None:
            ref = f"version {model_cfg.version}" if model_cfg.version else f"alias {model_cfg.alias!r}"
            raise ModelUnavailable(f"{market}: registered model {model_cfg.name!r} ({ref}) not found in {tracking_uri} "
                                   "and no 'fit' specification is configured")
        spec = {"name": model_cfg.fit["name"], "params": dict(model_cfg.fit.get("params") or {})}
        tab, source = _fit_rows(spec, features, window, horizon, cache, market)
        lineage.update(model_version=f"fit:{_spec_hash(spec)}", model_source=source, spec=spec)
        fc = _to_forecast(tab, features, model=str(spec["name"]), version=lineage["model_version"], window=window)
        return ModelForecast(fc, lineage)
    spec = reg["spec"] or {}
    lineage.update(model_version=reg["version"], model_source="registry", spec=spec)
    tags = reg["tags"]
    as_of = features.index[-1]
    tab = _load_table(tags.get("forecast_table", ""), tags.get("forecast_artifact", ""), tracking_uri)
    parts = []
    if tab is not None:
        h_cols = [c for c in tab.columns if c.startswith("h.")][:horizon]
        parts.append(tab.loc[tab.index <= as_of, h_cols])
    forecaster = None
    if tags.get("has_pyfunc") == "true":
        try:
            forecaster = _load_pyfunc(reg["source"], tracking_uri)
        except Exception as exc:  # noqa: BLE001 - a registered model that does not load is a failure
            raise ModelUnavailable(f"{market}: registered model {model_cfg.name} v{reg['version']} does not load "
                                   f"from {reg['source']}: {exc}") from exc
    if forecaster is not None and forecaster.last_time_ < as_of:
        new = features[features.index > forecaster.last_time_]
        if len(new) > 4 * window:
            raise ModelUnavailable(f"{market}: registered model v{reg['version']} last saw {forecaster.last_time_}, "
                                   f"{len(new)} bars before the as-of time; retrain it")
        parts.append(_rows(forecaster, new, horizon)[[f"h.{k}" for k in range(1, horizon + 1)]])
    rows = pd.concat(parts) if parts else pd.DataFrame()
    if len(rows) == 0 or (rows.index <= as_of).sum() < 30:
        if not spec.get("name"):
            raise ModelUnavailable(f"{market}: registered model {model_cfg.name} v{reg['version']} has no forecasts "
                                   f"up to {as_of} and no specification to refit")
        spec2 = {"name": spec["name"], "params": dict(spec.get("params") or {})}
        rows, _ = _fit_rows(spec2, features, window, horizon, cache, market)
        lineage["model_source"] = "registry-spec-refit"
    fc = _to_forecast(rows, features, model=str(spec.get("name") or model_cfg.name), version=reg["version"], window=window)
    return ModelForecast(fc, lineage)
