"""The predictive policy of a market and where its fitted parameters come from.

In order: ``policy.fitted_from`` (a ``volmargin run`` output folder's ``details.json``, or ``runs:/<run id>`` in
MLflow); inline ``policy.params`` (with at least ``level`` and ``power``, and no ``fit``); else a fit here, so
that a fresh clone with no earlier run publishes (``policy.params`` given are held fixed in it): :func:`backtest.fit.fit_predictive` on the ``fit.bars`` bars before the publish
window (the cut), with out-of-sample forecast rows of the market's own model (registered, or its ``fit``
specification; :func:`serving.forecast.model_forecast` on the bars before the cut), a seeded population of
``fit.positions`` positions and a reduced grid (:data:`FIT_GRID`, overridable per market). The fitted
parameters are cached under ``cache_dir/<market>/`` as JSON and reused while

* the cached cut is at or before the current cut and less than ``fit.refit_every`` before it,
* the bars it was fitted on are unchanged (content hash), the model version behind its forecast rows is the
  one publishing now, and the market's fit settings (and controls) are the same (settings hash).

:func:`predictive_policy` returns the policy and what the lineage records about the fit (source, cut, bars,
positions, evaluations, objective, parameters, data hash, model version, cache file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from data_pipelines.atomic import atomic_write_text

__all__ = ["FIT_GRID", "predictive_policy", "policy_kwargs", "fitted_params_from", "fit_market_params"]

log = logging.getLogger(__name__)

#: Keys of a fit's ``predictive_params`` that are diagnostics, not policy parameters.
_DIAGNOSTICS = ("alpha", "beta", "evaluations", "n_positions_fit")
#: Parameters that make ``policy.params`` complete, used as they are (the rest have defaults); fewer are held
#: fixed in the fit.
_REQUIRED_INLINE = ("level", "power")
#: The reduced grid of the serving fit (``fit_predictive``'s own grid is the research one): the level and
#: the response to the forecast, the release speed, MM as ``mm_fraction`` x IM (``mm_k`` 0) or covering a
#: one-sigma bar (``mm_k`` 1); MM binds on the path (the feed publishes one MM). ``floor`` is the market's
#: ``controls.floor``.
FIT_GRID: dict[str, tuple[Any, ...]] = {
    "level": (0.05, 0.075, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50),
    "power": (0.0, 0.5, 1.0),
    "stress": (0.0,),
    "omega": (0.5,),
    "release": (1.0, 0.2),
    "mm_binds": ("path",),
    "mm_k": (0.0, 1.0),
    "mm_floor": (0.0,),
}


def policy_kwargs(fitted: dict[str, Any]) -> dict[str, Any]:
    """``PredictivePolicy`` keyword arguments from a fit's ``predictive_params`` (as ``details.json`` holds them)."""
    kw = {k: v for k, v in fitted.items() if k not in _DIAGNOSTICS}
    if "mm_at_entry" in kw:
        kw["mm_binds"] = "entry" if float(kw.pop("mm_at_entry")) >= 0.5 else "path"
    sref = kw.get("sigma_ref")
    if sref is None or (isinstance(sref, float) and not math.isfinite(sref)):
        kw["sigma_ref"] = None
    if "mm_fraction" in kw:  # 0.0 (or NaN/None) in a fit's parameters: the controls' fraction
        mf = kw["mm_fraction"]
        if mf is None or not math.isfinite(float(mf)) or float(mf) <= 0.0:
            kw["mm_fraction"] = None
    return kw


def fitted_params_from(source: str, asset: str) -> dict[str, Any]:
    """The predictive policy's fitted parameters for ``asset`` from a run folder or ``runs:/<id>``.

    Raises
    ------
    FileNotFoundError
        No ``details.json`` there.
    KeyError
        The run has no predictive parameters for ``asset``.
    """
    if source.startswith("runs:/"):
        import tempfile

        import mlflow

        run_id = source[len("runs:/"):].strip("/").split("/")[0]
        got = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/details.json",
                                                  dst_path=tempfile.mkdtemp(prefix="vm-pred-"))
        path = Path(got)
    else:
        path = Path(source)
        path = path / "details.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"policy.fitted_from: {path} not found (expected a run folder with details.json)")
    details = json.loads(path.read_text(encoding="utf-8"))
    assets = details.get("assets", {})
    if asset not in assets or not assets[asset].get("predictive_params"):
        raise KeyError(f"policy.fitted_from: {path} has no predictive_params for asset {asset!r}; has {sorted(assets)}")
    return dict(assets[asset]["predictive_params"])


def _fit_controls(mcfg: Any, bar_seconds: float) -> Any:
    """The market's controls in bars (notice rounded up to whole bars) for the fit's simulation."""
    from margin.controls import Controls

    rules = mcfg.rules()
    notice = math.ceil(rules.notice_s / bar_seconds) if rules.notice_s > 0 else 0
    return Controls(floor=rules.floor, ceiling=rules.ceiling, max_change=rules.max_change, notice_bars=int(notice),
                    mm_fraction=rules.mm_fraction)


def _settings_hash(mcfg: Any) -> str:
    from serving.markets import PredictiveFitCfg

    fit = mcfg.policy.fit or PredictiveFitCfg()
    blob = {"fit": fit.model_dump(mode="json"), "grid": {k: list(v) for k, v in FIT_GRID.items()},
            "controls": mcfg.controls.model_dump(mode="json"), "input": mcfg.input, "params": mcfg.policy.params,
            "model": mcfg.model.model_dump(mode="json", exclude={"window"})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cut_name(cut: pd.Timestamp) -> str:
    return cut.strftime("%Y%m%dT%H%M%SZ")


def _fit_bars(history: pd.DataFrame, cut: pd.Timestamp, n: int) -> pd.DataFrame:
    pre = history[history.index < cut]
    return pre[["open", "high", "low", "close", "volume"]].iloc[-n:]


def _cached(mcfg: Any, history: pd.DataFrame, cut: pd.Timestamp, model_version: str | None, folder: Path,
            shash: str) -> tuple[dict[str, Any], Path] | None:
    """The newest valid cached fit (see the module docstring), or None."""
    from data_pipelines.bars import content_hash
    from serving.markets import PredictiveFitCfg, parse_duration

    fit = mcfg.policy.fit or PredictiveFitCfg()
    max_age = pd.Timedelta(seconds=parse_duration(fit.refit_every, "policy.fit.refit_every"))
    for path in sorted(folder.glob(f"predictive-{shash}-*.json"), reverse=True):  # newest cut first
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            c = pd.Timestamp(doc["cut"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cached predictive fit %s unreadable (%s); ignored", path, exc)
            continue
        if c > cut or cut - c >= max_age:
            continue
        if doc.get("model_version") != model_version:
            continue
        bars = _fit_bars(history, c, int(doc["bars"]))
        if len(bars) != int(doc["bars"]) or content_hash(bars) != doc.get("data_hash"):
            continue
        return doc, path
    return None


def fit_market_params(
    market: str,
    mcfg: Any,
    history: pd.DataFrame,
    cut: pd.Timestamp,
    *,
    tracking_uri: str,
    cache_dir: str | Path | None,
    model_version: str | None = None,
) -> dict[str, Any]:
    """Fit (or load from the cache) the market's predictive parameters on the bars before ``cut``.

    Parameters
    ----------
    market : str
        Market id (cache folder, messages).
    mcfg : serving.markets.MarketCfg
    history : pd.DataFrame
        Feature bars up to the as-of time (UTC index); only bars before ``cut`` are used.
    cut : pd.Timestamp
        The first bar of the publish window: the fit sees nothing at or after it.
    tracking_uri : str
        MLflow URI of the market's registered model.
    cache_dir : path, optional
        Where fits are cached (``<cache_dir>/<market>/predictive-*.json``); None: no cache.
    model_version : str, optional
        The model version publishing now (a cached fit made with another one is not reused).

    Returns
    -------
    dict
        ``params`` (``predictive_params`` as ``details.json`` holds them) and the lineage fields (``source``
        fitted | cache, ``cut``, ``first_bar``, ``bars``, ``positions``, ``evaluations``, ``objective``,
        ``data_hash``, ``model_version``, ``seconds``, ``cache_file``).

    Raises
    ------
    ValueError
        Too few bars before the cut, the model gives no forecast rows there, or the fit fails (the publisher
        turns this into a fallback record).
    """
    from backtest.fit import fit_predictive
    from backtest.population import PopulationConfig, generate_population
    from backtest.simulation import BacktestConfig, bars_per_day
    from data_pipelines.bars import content_hash
    from margin.policies import PolicyContext
    from serving.forecast import ModelUnavailable, model_forecast
    from serving.markets import PredictiveFitCfg

    fit = mcfg.policy.fit or PredictiveFitCfg()
    cut = pd.Timestamp(cut)
    cut = cut.tz_localize("UTC") if cut.tz is None else cut.tz_convert("UTC")
    shash = _settings_hash(mcfg)
    folder = Path(cache_dir) / market if cache_dir else None
    if folder is not None and folder.is_dir():
        hit = _cached(mcfg, history, cut, model_version, folder, shash)
        if hit is not None:
            doc, path = hit
            log.info("%s: predictive parameters from the cache %s (cut %s)", market, path.name, doc["cut"])
            return {**doc, "source": "cache", "cache_file": path.name}
    t0 = time.perf_counter()
    pre = history[history.index < cut]
    n = int(fit.bars)
    if len(pre) < n + 60:
        raise ValueError(f"policy.fit: {len(pre)} bars before the cut {cut.isoformat()}; need at least {n + 60} "
                         f"(fit.bars {n} + 60 for the model's fit): lower policy.fit.bars")
    try:
        mf = model_forecast(market, mcfg.model.model_copy(update={"window": n}), pre, tracking_uri=tracking_uri,
                            cache_dir=cache_dir)
    except ModelUnavailable as exc:
        raise ValueError(f"policy.fit: no forecast rows before the cut: {exc}") from None
    fc = mf.forecast
    bars = _fit_bars(history, cut, n)
    bars = bars[bars.index >= fc.origins[0]]
    bar_s = 86400.0 / bars_per_day(pd.DatetimeIndex(bars.index))
    ctx = PolicyContext(bars=bars, forecast=fc, cut=cut, controls=_fit_controls(mcfg, bar_s))
    pop_cfg = PopulationConfig(**{"n_positions": int(fit.positions), "seed": int(fit.seed), **fit.population})
    population = generate_population(len(bars), pop_cfg, volume=bars["volume"].to_numpy(dtype=float))
    fixed = {k: (v,) for k, v in mcfg.policy.params.items() if k in FIT_GRID or k in ("floor", "mm_fraction")}
    grid = {**FIT_GRID, "floor": (ctx.controls.floor,), **{k: tuple(v) for k, v in (fit.grid or {}).items()}, **fixed}
    policy = fit_predictive(ctx, population, BacktestConfig(), dict(fit.weights or {}), grid=grid, max_positions=None,
                            rounds=int(fit.rounds), refine=bool(fit.refine))
    params = {**policy.params(), **{k: policy.fitted.get(k) for k in _DIAGNOSTICS}}
    obj = policy.fitted.get("objective") or {}
    doc = {
        "market": market, "cut": cut.isoformat().replace("+00:00", "Z"),
        "first_bar": pd.Timestamp(bars.index[0]).isoformat().replace("+00:00", "Z"), "bars": len(bars),
        "positions": int(fit.positions), "seed": int(fit.seed), "rounds": int(fit.rounds),
        "evaluations": int(policy.fitted.get("evaluations", 0)),
        "objective": {k: (float(v) if math.isfinite(v) else None) for k, v in obj.items() if isinstance(v, int | float)},
        "data_hash": content_hash(bars), "model_version": model_version or fc.version,
        "forecast_model": fc.model, "settings_hash": shash, "seconds": round(time.perf_counter() - t0, 3),
        "params": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in params.items()},
    }
    name = None
    if folder is not None:
        path = folder / f"predictive-{shash}-{_cut_name(cut)}.json"
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True))
        name = path.name
    log.info("%s: predictive parameters fitted on %d bars before %s in %.1f s (%d evaluations)", market, len(bars),
             doc["cut"], doc["seconds"], doc["evaluations"])
    return {**doc, "source": "fitted", "cache_file": name}


def predictive_policy(
    mcfg: Any,
    params: dict[str, Any],
    ctx: Any,
    cache_dir: str | Path | None,
    *,
    market: str | None = None,
    history: pd.DataFrame | None = None,
    tracking_uri: str | None = None,
    model_version: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The market's fitted ``PredictivePolicy`` and the lineage of its parameters (see the module docstring).

    ``ctx`` is the publish context (its first bar is the cut of a fit here); ``history`` the feature bars up to
    the as-of time (needed for a fit).

    Raises
    ------
    ValueError
        No parameters and no history to fit them on, or the fit failed.
    """
    from margin.predictive import PredictivePolicy

    pol = mcfg.policy
    if pol.fitted_from:
        fitted = fitted_params_from(pol.fitted_from, mcfg.underlying)
        return PredictivePolicy(**policy_kwargs({**fitted, **params})), {"source": "fitted_from",
                                                                          "fitted_from": pol.fitted_from}
    if pol.fit is None and all(k in params for k in _REQUIRED_INLINE):
        return PredictivePolicy(**policy_kwargs(params)), {"source": "config"}
    if history is None:
        raise ValueError("policy predictive needs its fitted parameters: set policy.params or policy.fitted_from, "
                         "or publish with the market's history so that they are fitted")
    info = fit_market_params(market or mcfg.underlying, mcfg, history, pd.Timestamp(ctx.bars.index[0]),
                             tracking_uri=tracking_uri or "", cache_dir=cache_dir, model_version=model_version)
    return PredictivePolicy(**policy_kwargs({**info["params"], **params})), info
