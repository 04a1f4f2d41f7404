"""The end-to-end job behind ``volmargin run`` and ``volmargin backtest``.

``volmargin run``: data → walk-forward forecasts (the training job, logged to MLflow) → the champion pinned
at each dataset's cut (``training.registry.pinned_champion``, never the live alias) → regime probabilities
(regime model fitted before the cut, filtered after it) → the headline at each capital budget
(:mod:`backtest.headline`: best static (IM, MM) pair, the clairvoyant bound, ``ewma_ccp`` and ``garch_fhs``
scaled before the cut, the predictive policy fitted before the cut, the forecast ablation) on the held-out
bars → coverage tests on margin breaches (Kupiec, Christoffersen; Basel traffic light for the VaR-based
policies) → sensitivity table → HTML report → MLflow (one parent run: metrics, config, report and summary
as artifacts; only this driver process writes to MLflow) → ``<out>/summary.json``.

``volmargin backtest`` skips training: it reads saved walk-forward tables (``forecasts_dir``), else the
pinned champions' tables, else recomputes the EWMA baseline, and writes the same files.

``summary.json``::

    {"assets": {"<ASSET>": {
        "budgets": {"<b>": {"best_static": {"im", "mm", "liquidations", "bad_debt", "avg_collateral", ...},
                            "bound": {"liquidations", "bad_debt"},
                            "predictive" | "ewma_ccp" | "garch_fhs": {"liquidations", "bad_debt",
                                "avg_collateral", "share_of_bound", "max_im_increase_5d", ...},
                            "checks": {...}}},
        "ablation": {"<b>": {"forecast" | "constant_variance" | "realised_variance":
                                 {"liquidations", "bad_debt", "avg_collateral"}}},
        "policies": {"ewma_ccp" | "garch_fhs" | "oracle_vol": {... as configured, normal setting,
                                                               "traffic_light"}},
        "predictive_params": {"<b>": {...}}}},
     "headline": {"share_of_bound_min", "share_of_bound_mean", "budgets_met", "budgets_total", ...,
                  "portfolio_share_of_bound_min", "portfolio_budgets_met", ...},
     "portfolio": {"<b>": {"best_static", "bound", "dynamic_grid": {"liquidations", "bad_debt", "avg_collateral",
                                                                   "share_of_bound", ...},
                           "ablation", "checks"}} | {"skipped": "<reason>"},
     "mlflow_run_id": "...", "cut": {"<ASSET>": "YYYY-MM-DD"}, "config_hash": "<sha256>"}

``<b>`` is the budget as written in the config (``"0.2"``). Budget comparisons are scored in the frozen
setting (volume slippage off); ``policies`` in the normal setting. ``share_of_bound_min``/``mean`` are over
the (asset, budget) pairs where the predictive policy's share is defined (``shares_undefined`` counts the
others: more bad debt than the best static); ``budgets_met`` counts the pairs where every check passes.
``portfolio``: the portfolio-margin comparison on multi-instrument accounts over the run's daily assets
(:mod:`volmargin.run_portfolio`); its fitted grid at the median budget is written to ``<out>/portfolio_grid.json``.

Modules: :mod:`volmargin.run_inputs` (data, training, pinned champion, regime probabilities),
:mod:`volmargin.run_assets` (one asset's headline, coverage, sensitivity; run in parallel through
``volmargin.executor``), :mod:`volmargin.run_portfolio` (the portfolio comparison), this module (summary, report
data, MLflow, files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.tracking import atomic_write_text, resolve_tracking_uri
from volmargin.config import RunConfig
from volmargin.report import finite_or_none
from volmargin.run_assets import (
    VAR_POLICIES,
    AssetOutcome,
    _crash_days,
    build_backtest_config,
    build_controls,
    build_population_config,
    check_policy_settings,
    evaluate_asset,
    evaluate_assets,
    horizon_breaches,
)
from volmargin.run_inputs import AssetInputs, forecast_from_table, load_assets
from volmargin.run_portfolio import PortfolioOutcome, portfolio_headline_numbers

__all__ = [
    "VAR_POLICIES",
    "AssetInputs",
    "AssetOutcome",
    "PortfolioOutcome",
    "RunOutput",
    "build_backtest_config",
    "build_controls",
    "build_population_config",
    "build_summary",
    "check_policy_settings",
    "config_hash",
    "evaluate_asset",
    "evaluate_assets",
    "forecast_from_table",
    "horizon_breaches",
    "load_assets",
    "run_job",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of the validated config (canonical JSON, sorted keys)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------- summary
def _policy_entry(res: Any, coverage: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "liquidations": int(res.liquidations),
        "bad_debt": float(res.bad_debt),
        "avg_collateral": float(res.avg_collateral),
        "traffic_light": coverage.get("traffic_light"),
        "max_im_increase_5d": float(res.max_im_increase_5d),
        # beyond the contract: what the backtest returns, for readers of the summary alone
        "liquidated_notional": float(res.liquidated_notional),
        "fund_draw": float(res.fund_draw),
        "uncovered_bad_debt": float(res.uncovered_bad_debt),
        "max_im_increase_1d": float(res.max_im_increase_1d),
        "max_im_increase_10d": float(res.max_im_increase_10d),
        "peak_to_trough": float(res.peak_to_trough),
    }


POLICY_KEYS = ("liquidations", "bad_debt", "avg_collateral", "share_of_bound", "max_im_increase_5d")


def _budget_entry(e: Mapping[str, Any], tolerance: float) -> dict[str, Any]:
    from backtest.headline import RIVALS, headline_checks

    out: dict[str, Any] = {"best_static": e.get("best_static"), "bound": e.get("bound"),
                           "static_pairs": e.get("static_pairs", [])}
    for name in ("predictive", *RIVALS):
        if name in e:
            v = dict(e[name])
            out[name] = {**{k: v.get(k) for k in POLICY_KEYS}, **{k: v[k] for k in v if k not in POLICY_KEYS}}
    out["checks"] = headline_checks(e, tolerance)
    return out


def headline_numbers(assets: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.headline`` from the per-asset budget entries (see the module docstring)."""
    shares: list[float] = []
    undefined = met = total = 0
    for a in assets.values():
        for e in a["budgets"].values():
            total += 1
            sh = finite_or_none((e.get("predictive") or {}).get("share_of_bound"))
            if sh is None:
                undefined += 1
            else:
                shares.append(sh)
            met += int(bool(e.get("checks", {}).get("met")))
    return {"share_of_bound_min": min(shares) if shares else None,
            "share_of_bound_mean": float(np.mean(shares)) if shares else None,
            "budgets_met": met, "budgets_total": total, "shares_undefined": undefined}


def build_summary(outcomes: Mapping[str, AssetOutcome], *, run_id: str | None, cfg_hash: str,
                  tolerance: float = 0.0, portfolio: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json`` from the per-asset outcomes; see the module docstring."""
    assets: dict[str, Any] = {}
    cuts: dict[str, str] = {}
    for out in outcomes.values():
        a = out.inputs.asset
        cuts[a] = str(out.inputs.cut.date())
        h = out.headline
        assets[a] = {
            "budgets": {b: _budget_entry(e, tolerance) for b, e in h.budgets.items()},
            "ablation": h.ablation,
            "policies": {name: _policy_entry(res, out.coverage.get(name, {})) for name, res in out.results.items()},
            "predictive_params": h.fitted,
        }
    out: dict[str, Any] = {"assets": assets, "headline": headline_numbers(assets)}
    if portfolio is not None:
        out["headline"].update(portfolio_headline_numbers(portfolio))
        out["portfolio"] = dict(portfolio)
    return {**out, "mlflow_run_id": run_id, "cut": cuts, "config_hash": cfg_hash}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------------- report data
def _report_asset(out: AssetOutcome) -> Any:
    from volmargin.report import AssetReport

    inp = out.inputs
    h = out.headline
    bars = inp.bars[inp.bars.index >= inp.cut]
    r = np.log(inp.bars["close"].astype(float)).diff()
    step = pd.Series(inp.bars.index).diff().median()
    per_year = pd.Timedelta(days=365) / step if isinstance(step, pd.Timedelta) and step > pd.Timedelta(0) else 365.0
    rv = r.rolling(30, min_periods=10).std() * math.sqrt(per_year)
    series = pd.DataFrame({"close": bars["close"].astype(float), "realized_vol": rv.reindex(bars.index)})
    # margin over time at the median budget: the predictive policy, the scaled rivals, the best static pair
    keys = list(h.budgets)
    mid = keys[len(keys) // 2]
    for name, path in h.paths.get(mid, {}).items():
        series[f"im.{name}"] = pd.Series(np.asarray(path.im_rate), index=path.times).reindex(bars.index).to_numpy()
        series[f"mm.{name}"] = pd.Series(np.asarray(path.mm_rate), index=path.times).reindex(bars.index).to_numpy()
    st = h.budgets[mid].get("best_static")
    if st:
        series["im.best_static"] = st["im"]
        series["mm.best_static"] = st["mm"]
    policies = {}
    for name, res in out.results.items():
        cov = out.coverage.get(name, {})
        policies[name] = {
            **{k: float(v) for k, v in res.metrics().items()},
            "liquidations": int(res.liquidations),
            "traffic_light": cov.get("traffic_light"),
            "breach_rate": cov.get("breach_rate"),
            "kupiec_p": cov.get("kupiec_p"),
            "christoffersen_p": cov.get("christoffersen_p"),
        }
    return AssetReport(
        asset=inp.asset, dataset=inp.dataset, cut=str(inp.cut.date()), champion=inp.champion, policies=policies,
        budget_median=mid, envelope=h.envelope, bound_curve=h.bound_curve, series=series,
        crash_days=_crash_days(inp.bars, inp.cut, out.results),
    )


def _champion_quality(outcomes: Mapping[str, AssetOutcome]) -> pd.DataFrame:
    """Pre-cut and held-out QLIKE of each asset's champion table against its proxy (``y.*`` columns), for
    ``volmargin backtest`` where no training evaluation is at hand."""
    from training.metrics import qlike

    rows = []
    for o in outcomes.values():
        t = o.inputs.table
        h = sorted((c for c in t.columns if c.startswith("h.")), key=lambda c: int(c[2:]))
        y = [f"y.{c[2:]}" for c in h]
        if not set(y) <= set(t.columns):
            continue
        idx = pd.DatetimeIndex(t.index)
        steps = len(h)
        pos = np.arange(len(t))
        cut_pos = int(idx.searchsorted(o.inputs.cut))
        masks = {"pre": pos + steps < cut_pos, "held_out": pos >= cut_pos}
        row: dict[str, Any] = {"asset": o.inputs.asset, "model": o.inputs.champion.get("model_key"), "champion": True}
        for k, m in masks.items():
            row[f"qlike_{k}"] = finite_or_none(qlike(t.loc[m, y].to_numpy().ravel(), t.loc[m, h].to_numpy().ravel()))
        row["n_held_out"] = int(masks["held_out"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _forecast_quality(training: Mapping[str, Any], outcomes: Mapping[str, AssetOutcome] | None = None) -> pd.DataFrame:
    from training.evaluation import held_out_table

    if not training.get("assets"):
        return _champion_quality(outcomes or {})
    df = held_out_table({"assets": training["assets"]})
    labels = {ds: ev.get("asset_label", ds) for ds, ev in training["assets"].items()}
    df["asset"] = df["asset"].map(lambda d: labels.get(d, d))
    return df


# ---------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class RunOutput:
    """What ``run_job`` wrote."""

    out_dir: Path
    summary: dict[str, Any]
    summary_path: Path
    report_path: Path
    details_path: Path
    run_id: str
    tracking_uri: str
    seconds: float


def _flat_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    from training.tracking import mlflow_key

    out: dict[str, str] = {}
    for k, v in d.items():
        name = mlflow_key(f"{prefix}{k}")
        if isinstance(v, Mapping) and v:
            out.update(_flat_params(v, name + "."))
        else:
            out[name] = json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500]
    return out


def run_job(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    mode: str = "run",
    config_path: str | Path | None = None,
    progress: Progress | None = None,
) -> RunOutput:
    """Run the end-to-end job (``mode="run"``) or the backtest alone (``mode="backtest"``).

    Writes ``<out_dir>/summary.json``, ``report.html``, ``details.json`` and, when the portfolio comparison ran,
    ``portfolio_grid.json`` (atomically; a grid file left by an earlier run is removed otherwise) and logs one
    MLflow parent run in the experiment ``cfg.name`` (params: the flattened config; metrics: the summary's
    numbers; artifacts: config, summary, details, report, grid). Only this process writes to MLflow.
    """
    import mlflow

    from training.tracking import flatten_metrics, use_experiment
    from volmargin.report import ReportData, write_report

    t0 = time.perf_counter()
    out = Path(out_dir)
    uri = resolve_tracking_uri(cfg.tracking_uri, allow_file_store=cfg.allow_file_store)
    build_controls(cfg), build_population_config(cfg), build_backtest_config(cfg)  # fail fast on bad settings
    check_policy_settings(cfg)
    inputs, training = load_assets(cfg, mode=mode, progress=progress)
    outcomes, portfolio = evaluate_assets(cfg, inputs, progress=progress)
    chash = config_hash(cfg)
    use_experiment(cfg.name, uri)
    status = "FAILED"
    run = mlflow.start_run(run_name=f"{cfg.name}-{mode}", tags={"job": mode, "config_hash": chash})
    run_id = run.info.run_id
    try:
        summary = _json_safe(build_summary(outcomes, run_id=run_id, cfg_hash=chash, tolerance=cfg.bad_debt_tolerance,
                                           portfolio=portfolio.summary))
        sens = pd.DataFrame([r for o in outcomes.values() for r in o.sensitivity])
        details = _json_safe({
            "mode": mode,
            "training_run_ids": training.get("training_run_ids", []),
            "assets": {
                o.inputs.asset: {
                    "dataset": o.inputs.dataset,
                    "champion": o.inputs.champion,
                    "coverage": o.coverage,
                    "predictive_params": o.headline.fitted,
                    "metrics": {k: r.metrics() for k, r in o.results.items()},
                    "static_runs": o.headline.envelope.to_dict("records"),
                    "bound_curve": o.headline.bound_curve.to_dict("records"),
                    "simulations": o.headline.runs,
                    "seconds": o.seconds,
                }
                for o in outcomes.values()
            },
            "sensitivity": sens.to_dict("records"),
            "portfolio": portfolio.details or portfolio.summary,
        })
        notes = [
            "Budget comparisons are scored in the frozen setting (volume-dependent slippage off, so positions are "
            "independent; top-ups, fees and funding on; bad debt before the insurance fund), where the bound holds. "
            "The per-policy table of each asset (ewma_ccp, garch_fhs, oracle_vol as configured, unscaled) is "
            "scored in the normal setting.",
            f"Training runs: {', '.join(training.get('training_run_ids', [])) or 'none (backtest only)'}.",
        ]
        data = ReportData(
            title=f"volmargin {mode}: {cfg.name}",
            summary=summary,
            assets=[_report_asset(o) for o in outcomes.values()],
            forecast_quality=_forecast_quality(training, outcomes),
            data_quality={o.inputs.dataset: o.inputs.quality for o in outcomes.values()},
            sensitivity=sens,
            config=cfg.model_dump(mode="json"),
            notes=notes,
            portfolio=portfolio.details,
        )
        report_path = write_report(data, out / "report.html")
        summary_path = atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        details_path = atomic_write_text(out / "details.json", json.dumps(details, indent=2, default=str))
        config_json = atomic_write_text(out / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
        grid_path = portfolio.path.write(out / "portfolio_grid.json") if portfolio.path is not None else None
        if grid_path is None:
            (out / "portfolio_grid.json").unlink(missing_ok=True)  # never serve an earlier run's grid
        mlflow.log_params(dict(list(_flat_params(cfg.model_dump(mode="json")).items())[:500]))
        mlflow.set_tags({
            "training_run_ids": ",".join(training.get("training_run_ids", [])),
            **{f"champion.{o.inputs.asset}": f"{o.inputs.champion.get('model_key')} v{o.inputs.champion.get('model_version')}"
               for o in outcomes.values()},
        })
        metrics = flatten_metrics({"assets": {a: {k: v for k, v in e.items() if k != "predictive_params"}
                                              for a, e in summary["assets"].items()},
                                   "headline": summary["headline"],
                                   "portfolio": {b: e for b, e in summary.get("portfolio", {}).items() if b != "skipped"}})
        mlflow.log_metrics({k.replace("<", "").replace(">", ""): v for k, v in metrics.items()})
        for p in (summary_path, details_path, report_path, config_json, grid_path):
            if p is not None:
                mlflow.log_artifact(str(p))
        if config_path is not None and Path(config_path).is_file():
            mlflow.log_artifact(str(config_path), artifact_path="config")
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
    return RunOutput(out, summary, summary_path, report_path, details_path, run_id, uri, time.perf_counter() - t0)
