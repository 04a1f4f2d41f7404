"""Inputs of the end-to-end job: prepared data, walk-forward training, the champion pinned at each cut,
its forecast table as a ``VolatilityForecast`` and the regime probabilities (see :mod:`volmargin.run`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.base import VolatilityForecast
from training.tracking import resolve_tracking_uri
from volmargin.config import RunConfig

__all__ = ["AssetInputs", "forecast_from_table", "load_assets"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def _utc(t: Any) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class AssetInputs:
    """Everything the margin side needs for one dataset.

    Attributes
    ----------
    dataset, asset : str
        Dataset id and its label (``BTC``, ``ETH``, ``LTC``, ``BTC-15m``).
    cut : pd.Timestamp
        UTC cut: policies are fitted on origins before it and scored on bars from it on.
    bars : pd.DataFrame
        OHLCV bars (prices in quote currency) from the first forecast origin on; UTC index.
    forecast : VolatilityForecast
        The pinned champion's walk-forward forecasts, one row per bar of ``bars``.
    regime_probs : pd.DataFrame or None
        Filtered regime probabilities per bar (calm … stressed), parameters fitted before the cut.
    champion : dict
        ``model_version``, ``model_key``, ``spec``, ``forecast_table`` (where the forecasts came from).
    quality : dict
        The dataset's ``QualityReport.to_dict()``.
    table : pd.DataFrame
        The full walk-forward table (``h.*``, ``y.*``, ``r.*``) for the report.
    """

    dataset: str
    asset: str
    cut: pd.Timestamp
    bars: pd.DataFrame
    forecast: VolatilityForecast
    regime_probs: pd.DataFrame | None
    champion: dict[str, Any]
    quality: dict[str, Any]
    table: pd.DataFrame


def _prepare(dataset: str) -> Any:
    from data_pipelines.pipeline import prepare_dataset

    return prepare_dataset(dataset, policy="repair")


def _std_resid(table: pd.DataFrame, cut: pd.Timestamp) -> np.ndarray:
    """Out-of-sample standardized residuals ``r.1 / sqrt(h.1)`` of origins whose next bar is before the cut."""
    r = table["r.1"].to_numpy(dtype=float)
    h = table["h.1"].to_numpy(dtype=float)
    idx = pd.DatetimeIndex(table.index)
    pre = np.append(np.asarray(idx[1:] < cut), False)  # the next bar (r.1's bar) lies before the cut
    z = r / np.sqrt(h)
    z = z[pre & np.isfinite(z)]
    if len(z) < 30:
        raise ValueError(f"only {len(z)} pre-cut standardized residuals; need >= 30 for filtered historical simulation")
    return z


def forecast_from_table(table: pd.DataFrame, *, model: str, version: str, cut: pd.Timestamp) -> VolatilityForecast:
    """A walk-forward table (``h.*`` [+ ``p.*``, ``q*``] columns) as a ``VolatilityForecast`` with pre-cut
    standardized residuals (for FHS)."""
    keep = [c for c in table.columns if c.startswith("h.") or c.startswith("p.") or (c.startswith("q") and ".h." in c)]
    df = table[keep].copy()
    df.index = pd.DatetimeIndex(table.index)
    if df.index.tz is None:
        df.index = df.index.tz_localize("UTC")
    return VolatilityForecast.from_long_frame(df, model=model, version=version, std_resid=_std_resid(table, cut))


def _regime_probs(cfg: RunConfig, features: pd.DataFrame, cut: pd.Timestamp) -> pd.DataFrame | None:
    """Regime model fitted on bars before the cut; filtered probabilities for every bar (NaN rows filled
    forward, leading ones uniform)."""
    if not cfg.regime.enabled:
        return None
    from models.regime import RegimeForecaster

    params = dict(cfg.regime.params)
    params.setdefault("seed", cfg.seed)
    model = RegimeForecaster(**params)
    pre = features[features.index < cut]
    model.fit(pre)
    probs = model.regime_probabilities(features)
    probs = probs.ffill().fillna(1.0 / probs.shape[1])
    return probs


def _load_table(path: str | Path, artifact: str = "", tracking_uri: str | None = None) -> pd.DataFrame:
    """A forecast table from its file, or (file gone, e.g. trained from another folder or machine) from the
    copy logged to MLflow (``runs:/...``)."""
    p = Path(path)
    if not p.is_file() and artifact:
        import tempfile

        import mlflow

        try:
            got = mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=tempfile.mkdtemp(prefix="vm-table-"),
                                                      tracking_uri=tracking_uri)
        except Exception as exc:  # noqa: BLE001 - any store error means the same thing to the caller
            raise FileNotFoundError(f"forecast table not found: {p}, and its MLflow copy {artifact} failed: {exc}") from None
        log.info("forecast table %s not found; using its MLflow copy %s", p, artifact)
        p = Path(got)
    if not p.is_file():
        raise FileNotFoundError(f"forecast table not found: {p}")
    df = pd.read_parquet(p)
    idx = pd.DatetimeIndex(df.index)
    df.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
    return df


def _saved_table(forecasts_dir: str, asset: str, dataset: str) -> tuple[pd.DataFrame, str] | None:
    root = Path(forecasts_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"forecasts_dir not found: {root}")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
    for cand in (root / f"{asset}.parquet", root / f"{safe}.parquet"):
        if cand.is_file():
            return _load_table(cand), str(cand)
    for sub in (root / asset, root / safe):
        if sub.is_dir():
            files = sorted(sub.glob("*.parquet"))
            if len(files) == 1:
                return _load_table(files[0]), str(files[0])
            if files:
                raise ValueError(
                    f"forecasts_dir {sub} holds several tables {[f.name for f in files]}; keep one per asset"
                )
    return None


def _ewma_table(cfg: RunConfig, features: pd.DataFrame, dataset: str, cut: pd.Timestamp) -> pd.DataFrame:
    """Recompute the EWMA baseline's walk-forward table (``volmargin backtest`` with nothing saved)."""
    from training.walk_forward import WalkForwardTask, walk_forward

    wf = cfg.training.walk_forward
    task = WalkForwardTask(
        asset=dataset, frame=features, model_name="ewma", model_key="ewma", params={},
        horizon=cfg.training.horizon, cut=cut, min_train=wf.min_train, refit_every=wf.refit_every,
        block=wf.block, proxy=cfg.training.proxy, seed=cfg.seed,
    )
    return walk_forward(task).table()


def _train(cfg: RunConfig, prepared: Mapping[str, Any], progress: Progress | None) -> dict[str, Any]:
    """Walk-forward training of every dataset (one training job per distinct cut); returns evaluations."""
    from training.job import run_training
    from volmargin.executor import make_executor

    groups: dict[dt.date, list[str]] = {}
    for ds in cfg.datasets:
        groups.setdefault(cfg.cut_for(ds), []).append(ds)
    evaluations: dict[str, Any] = {}
    runs: list[str] = []
    for cut, dsets in groups.items():
        tcfg = cfg.train_config(dsets, cut)

        def loader(ds: str) -> tuple[str, pd.DataFrame]:
            return prepared[ds].asset, prepared[ds].features

        def prog(stage: str, done: int, total: int) -> None:
            if progress:
                progress(f"training ({stage})", done, total)

        executor = make_executor(tcfg.executor.backend, tcfg.executor.workers, tcfg.executor.address)
        res = run_training(tcfg, loader=loader, progress=prog, executor=executor)
        runs.append(res.run_id)
        for ds, ev in res.evaluation["assets"].items():
            evaluations[ds] = ev
    return {"assets": evaluations, "training_run_ids": runs}


def load_assets(
    cfg: RunConfig, *, mode: str = "run", progress: Progress | None = None
) -> tuple[dict[str, AssetInputs], dict[str, Any]]:
    """Prepare data, train (``mode="run"``), pin the champion at each cut and build the policy inputs.

    Returns
    -------
    (inputs, training)
        ``inputs`` per dataset id; ``training`` holds the evaluations and training run ids (empty for
        ``mode="backtest"``).
    """
    if mode not in ("run", "backtest"):
        raise ValueError(f"mode must be 'run' or 'backtest', got {mode!r}")
    from training.registry import pinned_champion

    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    prepared = {}
    for i, ds in enumerate(cfg.datasets):
        prepared[ds] = _prepare(ds)
        if progress:
            progress("data", i + 1, len(cfg.datasets))
    training: dict[str, Any] = {"assets": {}, "training_run_ids": []}
    if mode == "run":
        training = _train(cfg, prepared, progress)
    inputs: dict[str, AssetInputs] = {}
    for i, ds in enumerate(cfg.datasets):
        p = prepared[ds]
        cut = _utc(cfg.cut_for(ds))
        table = None
        champion: dict[str, Any] = {}
        if mode == "backtest" and cfg.forecasts_dir:
            found = _saved_table(cfg.forecasts_dir, p.asset, ds)
            if found is None:
                raise FileNotFoundError(f"no saved forecast table for {p.asset} ({ds}) under {cfg.forecasts_dir}")
            table, src = found
            champion = {"model_version": None, "model_key": Path(src).stem, "spec": {}, "forecast_table": src}
        if table is None:
            try:
                pin = pinned_champion(ds, cfg.cut_for(ds), artifacts_dir=cfg.artifacts_dir, tracking_uri=uri)
                table = _load_table(pin.forecast_table, pin.forecast_artifact, uri)
                champion = {
                    "model_version": pin.model_version,
                    "model_key": pin.spec.get("key") or pin.spec.get("name"),
                    "spec": pin.spec,
                    "forecast_table": pin.forecast_table,
                }
            except (KeyError, FileNotFoundError) as exc:
                if mode == "run":
                    raise
                log.warning("%s: %s; recomputing the EWMA baseline", ds, exc)
                table = _ewma_table(cfg, p.features, ds, cut)
                champion = {"model_version": None, "model_key": "ewma", "spec": {"name": "ewma"},
                            "forecast_table": "recomputed"}
        forecast = forecast_from_table(
            table, model=str(champion["model_key"]), version=str(champion.get("model_version") or ""), cut=cut
        )
        bars_idx = p.bars.index if p.bars.index.tz is not None else p.bars.index.tz_localize("UTC")
        bars = p.bars.copy()
        bars.index = bars_idx
        bars = bars.loc[bars.index.isin(forecast.origins)]
        if len(bars) != len(forecast):
            keep = forecast.origins.isin(bars.index)
            forecast = forecast._take(np.asarray(keep))
        if not (bars.index > cut).any() or not (bars.index < cut).any():
            raise ValueError(f"{ds}: cut {cut.date()} must fall inside the forecast origins "
                             f"{bars.index[0].date()} .. {bars.index[-1].date()}")
        feats = p.features.copy()
        feats.index = bars_idx
        probs = _regime_probs(cfg, feats, cut)
        if probs is not None:
            probs = probs.reindex(bars.index)
        inputs[ds] = AssetInputs(
            dataset=ds, asset=p.asset, cut=cut, bars=bars[["open", "high", "low", "close", "volume"]],
            forecast=forecast, regime_probs=probs, champion=champion, quality=p.report.to_dict(),
            table=table.loc[table.index.isin(bars.index)],
        )
        if progress:
            progress("champion forecasts", i + 1, len(cfg.datasets))
    return inputs, training
