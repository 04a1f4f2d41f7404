"""Evaluation of walk-forward results: per asset and model, pre-cut and held-out scores and tests.

Rows are split by the flags of :class:`training.walk_forward.WalkForwardResult`: ``pre_cut`` (every
target bar before the cut; model selection uses these only) and ``held_out`` (from the cut plus the
embargo on; reported, never used for a choice). Both samples get the same statistics:

* QLIKE and MSE against the configured proxy over all horizon steps, and at step 1; QLIKE against the
  squared-return proxy (``sq``) at step 1, reported alongside;
* Mincer-Zarnowitz at step 1 (HAC);
* Diebold-Mariano (HAC lag ``H - 1``, HLN) on the per-origin QLIKE averaged over the steps, against every
  baseline: two-sided p-value and the one-sided p-value that the model beats the baseline;
* Hansen's MCS membership over all models (seeded);
* VaR coverage of the step-1 long VaR at each level (Kupiec, Christoffersen, conditional coverage,
  Basel traffic light at 99%): ``var`` uses the zero-mean normal quantile of the variance forecast for
  every model (the variance is what margin consumes; the promotion gate reads this one);
  ``var_model_quantiles`` uses the model's own return quantiles where it reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from training.metrics import PROXY_FLOOR, mincer_zarnowitz, mse, qlike, qlike_loss
from training.tests import coverage_test, diebold_mariano, model_confidence_set, var_breaches
from training.walk_forward import WalkForwardResult

__all__ = ["SAMPLES", "evaluate_asset", "row_losses", "var_breach_series", "held_out_table"]

log = logging.getLogger(__name__)

SAMPLES = ("pre_cut", "held_out")


def _mask(res: WalkForwardResult, sample: str) -> np.ndarray:
    if sample == "pre_cut":
        return np.asarray(res.pre_cut, dtype=bool)
    if sample == "held_out":
        return np.asarray(res.held_out, dtype=bool)
    raise ValueError(f"sample must be one of {SAMPLES}, got {sample!r}")


def row_losses(res: WalkForwardResult, sample: str | None = None) -> pd.Series:
    """Per-origin QLIKE averaged over the horizon steps with a target (NaN when none)."""
    y = res.targets.to_numpy(dtype=float)
    f = np.asarray(res.forecast.variance)
    loss = qlike_loss(y, f)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(loss)
        cnt = ok.sum(axis=1)
        row = np.where(cnt > 0, np.where(ok, loss, 0.0).sum(axis=1) / np.maximum(cnt, 1), np.nan)
    s = pd.Series(row, index=res.forecast.origins, name=res.model)
    if sample is not None:
        s = s[_mask(res, sample)]
    return s


def var_breach_series(res: WalkForwardResult, level: float, *, model_quantiles: bool = False) -> np.ndarray:
    """0/1 exceptions of the step-1 long VaR at ``level`` for every origin (NaN without a realized return).

    By default the VaR is the zero-mean normal quantile of the variance forecast (what margin consumes);
    with ``model_quantiles`` the model's own return quantile at ``1 - level`` is used when it reports one.
    """
    r = res.returns["r.1"].to_numpy(dtype=float)
    fc = res.forecast
    q_level = 1.0 - level
    if model_quantiles and fc.quantiles is not None and fc.quantile_levels is not None:
        levels = np.asarray(fc.quantile_levels)
        j = np.flatnonzero(np.isclose(levels, q_level, atol=1e-9))
        if j.size:
            q = np.asarray(fc.quantiles)[:, 0, j[0]]
            out = (r < q).astype(float)
            out[~np.isfinite(r)] = np.nan
            return out
    return var_breaches(r, np.asarray(fc.variance)[:, 0], level)


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _scores(res: WalkForwardResult, mask: np.ndarray, var_levels: Sequence[float]) -> dict[str, Any]:
    y = res.targets.to_numpy(dtype=float)[mask]
    f = np.asarray(res.forecast.variance)[mask]
    r1 = res.returns["r.1"].to_numpy(dtype=float)[mask]
    ok1 = np.isfinite(y[:, 0])
    out: dict[str, Any] = {"n": int(ok1.sum())}
    if out["n"] < 3:
        return out
    out["qlike"] = _finite(qlike(y.ravel(), f.ravel()))
    out["mse"] = _finite(mse(y.ravel(), f.ravel()))
    out["qlike_h1"] = _finite(qlike(y[:, 0], f[:, 0]))
    out["mse_h1"] = _finite(mse(y[:, 0], f[:, 0]))
    sq = np.where(np.isfinite(r1), np.maximum(r1**2, PROXY_FLOOR), np.nan)
    out["qlike_sq_h1"] = _finite(qlike(sq, f[:, 0]))
    mz = mincer_zarnowitz(y[:, 0], f[:, 0])
    out["mz"] = {k: (_finite(v) if isinstance(v, float) else v) for k, v in mz.to_dict().items()}
    out["var"] = _coverage(res, mask, var_levels, model_quantiles=False)
    if res.forecast.quantiles is not None:
        out["var_model_quantiles"] = _coverage(res, mask, var_levels, model_quantiles=True)
    return out


def _coverage(res: WalkForwardResult, mask: np.ndarray, var_levels: Sequence[float], *, model_quantiles: bool) -> dict[str, Any]:
    cov: dict[str, Any] = {}
    for lv in var_levels:
        b = var_breach_series(res, lv, model_quantiles=model_quantiles)[mask]
        b = b[np.isfinite(b)]
        if len(b) >= 2:
            c = coverage_test(b, 1.0 - lv).to_dict()
            cov[f"{lv:g}"] = {k: (_finite(v) if isinstance(v, float) else v) for k, v in c.items()}
    return cov


def evaluate_asset(
    results: Mapping[str, WalkForwardResult],
    *,
    baselines: Mapping[str, Sequence[str]] | None = None,
    var_levels: Sequence[float] = (0.95, 0.99),
    mcs_size: float = 0.10,
    mcs_reps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate every model of one asset on the pre-cut and held-out samples.

    Parameters
    ----------
    results : mapping model key -> WalkForwardResult
        Walk-forward results of one asset (same origins and cut for every model).
    baselines : mapping model key -> list of model keys, optional
        Diebold-Mariano comparisons per model (default: every other model).
    var_levels : sequence of float
        VaR confidence levels for the coverage tests.
    mcs_size, mcs_reps, seed
        Model confidence set settings (size, bootstrap replications, seed).

    Returns
    -------
    dict
        ``{"cut", "proxy", "horizon", "n_origins", "models": {key: {"pre_cut": {...}, "held_out": {...},
        "fallbacks", "seconds", "spec"}}, "mcs": {"pre_cut": {...}, "held_out": {...}}}``; JSON-serialisable.
    """
    if not results:
        raise ValueError("results is empty: nothing to evaluate")
    keys = list(results)
    first = results[keys[0]]
    for k in keys[1:]:
        if not results[k].forecast.origins.equals(first.forecast.origins):
            raise ValueError(f"models {keys[0]!r} and {k!r} have different forecast origins; use one schedule")
    H = first.forecast.horizon
    out: dict[str, Any] = {
        "asset": first.asset,
        "cut": str(first.cut.date()),
        "proxy": first.proxy,
        "horizon": H,
        "n_origins": len(first.forecast),
        "first_origin": str(first.forecast.origins[0]),
        "last_origin": str(first.forecast.origins[-1]),
        "models": {},
        "mcs": {},
    }
    losses = {s: pd.DataFrame({k: row_losses(results[k], s) for k in keys}) for s in SAMPLES}
    for k in keys:
        res = results[k]
        entry: dict[str, Any] = {
            "spec": res.spec,
            "fallbacks": res.n_fallbacks,
            "seconds": res.seconds,
            "n_folds": len(res.folds),
        }
        for s in SAMPLES:
            sc = _scores(res, _mask(res, s), var_levels)
            dm: dict[str, Any] = {}
            for b in (baselines or {}).get(k, [x for x in keys if x != k]):
                if b not in results:
                    raise KeyError(f"baseline {b!r} of model {k!r} has no results")
                la, lb = losses[s][k].to_numpy(), losses[s][b].to_numpy()
                if np.sum(np.isfinite(la) & np.isfinite(lb)) < 3:
                    continue
                two = diebold_mariano(la, lb, horizon=H)
                one = diebold_mariano(la, lb, horizon=H, alternative="less")
                dm[b] = {"stat": _finite(two.stat), "pvalue": _finite(two.pvalue), "pvalue_better": _finite(one.pvalue)}
            sc["dm"] = dm
            entry[s] = sc
        out["models"][k] = entry
    for s in SAMPLES:
        df = losses[s].dropna()
        if len(df) >= 10:
            m = model_confidence_set(df, size=mcs_size, reps=mcs_reps, seed=seed)
            out["mcs"][s] = m.to_dict()
            for k in keys:
                out["models"][k][s]["in_mcs"] = k in m.included
                out["models"][k][s]["mcs_pvalue"] = m.pvalues.get(k)
        else:
            out["mcs"][s] = None
    return out


def held_out_table(evaluation: Mapping[str, Any]) -> pd.DataFrame:
    """Flat table of the headline numbers: one row per (asset, model).

    Columns: pre-cut and held-out QLIKE and MSE, pre-cut MCS membership, held-out 99% VaR exceptions and
    traffic light.
    """
    rows = []
    for asset, ev in evaluation["assets"].items():
        for k, m in ev["models"].items():
            pre, ho = m.get("pre_cut", {}), m.get("held_out", {})
            v99 = ho.get("var", {}).get("0.99", {})
            rows.append(
                {
                    "asset": asset,
                    "model": k,
                    "qlike_pre": pre.get("qlike"),
                    "qlike_held_out": ho.get("qlike"),
                    "mse_held_out": ho.get("mse"),
                    "in_mcs_pre": pre.get("in_mcs"),
                    "n_held_out": ho.get("n"),
                    "var99_breaches": v99.get("breaches"),
                    "traffic_light": v99.get("traffic_light"),
                    "champion": k == ev.get("champion"),
                }
            )
    return pd.DataFrame(rows)
