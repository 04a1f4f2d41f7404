"""The headline comparison of one asset at capital budgets: best static pair, bound, rivals, predictive, ablation.

For each budget ``b`` (an average collateral, as :class:`backtest.simulation.BacktestResult.avg_collateral`):

* ``best_static``: the best static (IM, MM) pair locking ``b`` on the held-out bars (:class:`StaticEnvelope`);
* ``bound``: the clairvoyant relaxation's liquidations at ``b`` (:mod:`backtest.bound`; bad debt 0);
* ``ewma_ccp``, ``garch_fhs``: each scaled BEFORE the cut so that its pre-cut run locks ``b``, then run on the
  held-out bars; the ``predictive`` policy fitted before the cut at ``b`` (:func:`backtest.fit.fit_predictive`
  in budget mode). Each is compared at ITS OWN held-out collateral ``c``: the best static pair and the bound
  are taken at ``c``, and ``share_of_bound = (L_static(c) - L) / (L_static(c) - L_bound(c))``;
* ``ablation``: the fitted predictive mapping run with the champion's forecast, with a constant variance
  (the pre-cut unconditional variance, regime probabilities fixed at their pre-cut mean) and with the
  realised future variance (each step's squared log return), on the held-out bars.

Every run is in the comparison setting passed in (the job passes the frozen setting, where the bound holds).
Nothing here reads the held-out bars to choose a parameter: scales, fits and the bad-debt allowance are set
before the cut; the held-out bars only score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest.bound import ClairvoyantBound, clairvoyant_bound
from backtest.budgets import MmRule, StaticEnvelope, budget_key, scale_to_budget, scaled_path, share_of_bound
from backtest.fit import fit_predictive
from backtest.population import Population
from backtest.simulation import BacktestConfig, BacktestResult, bars_per_day, max_increase, run_backtest
from margin.path import MarginPath
from margin.policies import PolicyContext
from models.base import VolatilityForecast

__all__ = ["HeadlineSettings", "AssetHeadline", "evaluate_headline", "ablation_forecasts", "headline_checks", "RIVALS"]

log = logging.getLogger(__name__)

#: Deployable rivals scaled to each budget.
RIVALS: tuple[str, ...] = ("ewma_ccp", "garch_fhs")


@dataclass(frozen=True)
class HeadlineSettings:
    """What :func:`evaluate_headline` compares (the job builds it from ``policies:`` in the config)."""

    budgets: tuple[float, ...] = (0.125, 0.15, 0.20, 0.25, 0.30)
    bad_debt_tolerance: float = 0.0
    im_grid: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.7)
    rules: tuple[MmRule, ...] = (MmRule("fraction", 0.25), MmRule("fraction", 0.5), MmRule("fixed", 0.02),
                                 MmRule("fixed", 0.035), MmRule("fixed", 0.05), MmRule("fixed", 0.08))
    #: at the budgets after the first fitted one, only these are searched (warm start from the neighbour's fit)
    refit: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: {
        "power": (0.0, 0.5, 1.0), "mm_k": (0.0, 0.5, 1.5, 3.0), "mm_fraction": (None, 0.25, 0.5)})
    fit: Mapping[str, Any] = field(default_factory=dict)
    increase_cap: str | float | None = "ewma_ccp"
    #: bars before the cut that the scales and the fit see (None: all of them)
    fit_bars: int | None = None

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("budgets must name at least one average collateral")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget must be in (0, 1] (average collateral / exposure), got {b!r}")
        if self.fit_bars is not None and self.fit_bars < 50:
            raise ValueError(f"fit_bars must be >= 50 bars (or null: all before the cut), got {self.fit_bars!r}")
        if self.bad_debt_tolerance < 0:
            raise ValueError(f"bad_debt_tolerance must be >= 0 USD, got {self.bad_debt_tolerance!r}")


@dataclass(frozen=True)
class AssetHeadline:
    """Per budget (keys as :func:`budget_key`): ``budgets[b]`` and ``ablation[b]`` as in ``summary.json``;
    ``paths[b][policy]`` the held-out paths; ``fitted[b]`` the predictive parameters; ``envelope`` rows
    ``(rule, im, mm, avg_collateral, liquidations, bad_debt)`` of every static run (the frontier plot);
    ``bound_curve`` the bound at a ladder of collateral levels; ``runs`` how many simulations were made."""

    budgets: dict[str, dict[str, Any]]
    ablation: dict[str, dict[str, Any]]
    paths: dict[str, dict[str, MarginPath]]
    fitted: dict[str, dict[str, Any]]
    envelope: pd.DataFrame
    bound_curve: pd.DataFrame
    runs: int


def _outcome(r: BacktestResult) -> dict[str, Any]:
    return {"liquidations": int(r.liquidations), "bad_debt": float(r.bad_debt),
            "avg_collateral": float(r.avg_collateral)}


def ablation_forecasts(ctx: PolicyContext) -> dict[str, tuple[VolatilityForecast | None, pd.DataFrame | None]]:
    """The forecast and regime inputs of the three ablation runs (``forecast``, ``constant_variance``,
    ``realised_variance``); see the module docstring."""
    fc = ctx.forecast
    out: dict[str, tuple[VolatilityForecast | None, pd.DataFrame | None]] = {"forecast": (fc, ctx.regime_probs)}
    k = ctx.cut_index()
    r = ctx.returns()
    H = fc.horizon if fc is not None else 1
    n = len(ctx.bars)
    pre = r[1:max(k, 2)]
    v0 = float(np.mean(pre**2)) if pre.size else 1e-4
    probs = None
    if ctx.regime_probs is not None:
        rp = ctx.regime_probs
        mean = rp[rp.index < ctx.cut].mean() if ctx.cut is not None else rp.mean()
        probs = pd.DataFrame(np.tile(mean.to_numpy(), (n, 1)), index=ctx.times, columns=rp.columns)
    regime_fixed = None
    names = None
    if fc is not None and fc.regime_probs is not None:
        pos = fc.origins < ctx.cut if ctx.cut is not None else np.ones(len(fc.origins), dtype=bool)
        regime_fixed = np.tile(fc.regime_probs[pos].mean(axis=0), (n, 1))
        names = fc.regime_names
    const = VolatilityForecast(origins=ctx.times, variance=np.full((n, H), v0), model="constant_variance",
                               regime_probs=regime_fixed, regime_names=names)
    fut = np.full((n, H), np.nan)
    for h in range(1, H + 1):
        fut[: n - h, h - 1] = r[h:] ** 2
    fut = pd.DataFrame(fut).ffill().to_numpy()
    fut = np.where(np.isfinite(fut), fut, v0)
    fut = np.maximum(fut, v0 * 1e-3)
    real = VolatilityForecast(origins=ctx.times, variance=fut, model="realised_variance",
                              regime_probs=None if fc is None else fc.regime_probs, regime_names=names)
    out["constant_variance"] = (const, probs)
    out["realised_variance"] = (real, ctx.regime_probs)
    return out


def evaluate_headline(
    ctx: PolicyContext,
    population: Population,
    cfg: BacktestConfig,
    rivals: Mapping[str, MarginPath],
    settings: HeadlineSettings,
    *,
    progress: Callable[[str], None] | None = None,
) -> AssetHeadline:
    """Run the headline comparison of one asset (see the module docstring).

    Parameters
    ----------
    ctx : PolicyContext
        Bars, the champion's forecast, regime probabilities, the cut and the controls.
    population : Population
        The seeded population (drawn over all bars).
    cfg : BacktestConfig
        The comparison setting (the job: frozen).
    rivals : mapping
        Unscaled paths of the rival policies (``ewma_ccp``, ``garch_fhs``) built on ``ctx``.
    settings : HeadlineSettings
    """
    if ctx.cut is None:
        raise ValueError("the headline needs ctx.cut (fits before it, scores after it)")
    bars = ctx.bars
    k = ctx.cut_index()
    if k < 3 or k >= len(bars) - 2:
        raise ValueError(f"the cut {ctx.cut} leaves {k} bars before and {len(bars) - k} after it; need >= 3 and >= 2")
    cut_t = bars.index[k]
    pre_start = None if settings.fit_bars is None else bars.index[max(0, k - int(settings.fit_bars))]
    tol = settings.bad_debt_tolerance
    env = StaticEnvelope(bars, population, cfg, settings.rules, settings.im_grid, start=cut_t)
    bound: ClairvoyantBound = clairvoyant_bound(bars, population, cfg, start=cut_t)
    n_runs = 0

    def held(path: MarginPath) -> BacktestResult:
        nonlocal n_runs
        n_runs += 1
        return run_backtest(bars, path, population, cfg, start=cut_t)

    def pre(path: MarginPath) -> BacktestResult:
        nonlocal n_runs
        n_runs += 1
        return run_backtest(bars, path, population, cfg, start=pre_start, end=cut_t)

    def at_own(r: BacktestResult, max5d: float) -> dict[str, Any]:
        c = float(r.avg_collateral)
        st, _ = env.best_at(c, tol, refine_top=2)
        bp = bound.at(c)
        share, why = share_of_bound(None if st is None else st.liquidations, r.liquidations,
                                    None if not math.isfinite(bp.liquidations) else bp.liquidations,
                                    bad_debt_policy=r.bad_debt, bad_debt_static=None if st is None else st.bad_debt,
                                    tolerance=tol)
        if st is None:
            why = f"no static pair locks {c:.4f} (within {env.tol:g})"
        return {**_outcome(r), "share_of_bound": share, "max_im_increase_5d": float(max5d),
                "best_static_here": None if st is None else st.to_dict(),
                "bound_here": None if not math.isfinite(bp.liquidations) else bp.liquidations,
                **({"reason": why} if why else {})}

    bpd = bars_per_day(ctx.times)
    w5 = round(5 * bpd)
    out: dict[str, dict[str, Any]] = {}
    abl: dict[str, dict[str, Any]] = {}
    paths: dict[str, dict[str, MarginPath]] = {}
    fitted: dict[str, dict[str, Any]] = {}
    abl_inputs = ablation_forecasts(ctx)
    prev_shape: dict[str, Any] | None = None
    fit_kw = dict(settings.fit)
    # the full search at the median budget, then outward, each fit starting from its neighbour's shape
    med = float(np.median(settings.budgets))
    order = sorted(settings.budgets, key=lambda x: (abs(x - med), x))
    searched = ("level", "power", "stress", "omega", "floor", "release", "mm_binds", "mm_k", "mm_floor",
                "mm_fraction")
    for b in order:
        key = budget_key(b)
        if progress:
            progress(f"budget {key}")
        st, pairs = env.best_at(b, tol, refine_top=2)
        bp = bound.at(b)
        entry: dict[str, Any] = {
            "best_static": None if st is None else st.to_dict(),
            "static_pairs": [p.to_dict() for p in pairs],
            "bound": {"liquidations": bp.liquidations if math.isfinite(bp.liquidations) else None, "bad_debt": 0.0,
                      "avg_collateral": b, **({"reason": bp.reason} if bp.reason else {})},
        }
        paths[key] = {}
        for name in RIVALS:
            if name not in rivals:
                continue
            scale, _ = scale_to_budget(lambda s, nm=name: pre(scaled_path(rivals[nm], s, ctx.controls)), b)
            p = scaled_path(rivals[name], scale, ctx.controls)
            paths[key][name] = p
            entry[name] = {**at_own(held(p), max_increase(p.im_rate[k:], w5)), "scale": scale}
        cap = settings.increase_cap
        if cap == "ewma_ccp" and "ewma_ccp" in paths[key]:
            k0 = 0 if pre_start is None else int(bars.index.searchsorted(pre_start))
            cap = max_increase(paths[key]["ewma_ccp"].im_rate[k0:k], w5)
        elif cap == "ewma_ccp":
            cap = None
        kw = dict(fit_kw)
        if prev_shape is not None and settings.refit:
            near = min(fitted, key=lambda kk: abs(float(kk) - b))
            prev_shape = fitted[near]
            fixed = {n: (prev_shape.get(n),) for n in searched if n not in settings.refit and n != "level"}
            kw["grid"] = {**fixed, **{n: tuple(v) for n, v in settings.refit.items()}}
            kw["rounds"] = 1
        pol = fit_predictive(ctx, population, cfg, target_avg_collateral=b, bad_debt_allowance=tol,
                             max_im_increase_5d=cap, start_from=prev_shape, start=pre_start, **kw)
        prev_shape = {**pol.params(), "mm_binds": pol.mm_binds, "mm_fraction": pol.mm_fraction}
        p = pol.path(ctx)
        paths[key]["predictive"] = p
        entry["predictive"] = at_own(held(p), max_increase(p.im_rate[k:], w5))
        fitted[key] = {**{kk: (round(v, 6) if isinstance(v, float) else v) for kk, v in pol.params().items()},
                       "mm_binds": pol.mm_binds, "mm_fraction": pol.mm_fraction,
                       "evaluations": pol.fitted.get("evaluations"),
                       "pre_cut_avg_collateral": pol.fitted.get("objective", {}).get("avg_collateral"),
                       "max_im_increase_5d_cap": cap}
        n_runs += int(pol.fitted.get("evaluations") or 0)
        out[key] = entry
        abl[key] = {}
        for how, (fc, probs) in abl_inputs.items():
            if how == "forecast":  # the run above
                abl[key][how] = {k_: entry["predictive"][k_] for k_ in ("liquidations", "bad_debt", "avg_collateral")}
                continue
            cx = replace(ctx, forecast=fc, regime_probs=probs)
            abl[key][how] = _outcome(held(replace(pol, name=f"predictive[{how}]").path(cx)))
    env_rows = env.runs_table()
    ladder = np.unique(np.r_[np.linspace(0.08, 0.5, 22), np.asarray(settings.budgets)])
    bc = [bound.at(float(c)) for c in ladder]
    bound_curve = pd.DataFrame({"avg_collateral": ladder, "liquidations": [x.liquidations for x in bc]})
    keys = [budget_key(b) for b in settings.budgets]
    out, abl = {k_: out[k_] for k_ in keys}, {k_: abl[k_] for k_ in keys}
    return AssetHeadline(budgets=out, ablation=abl, paths=paths, fitted=fitted, envelope=env_rows,
                         bound_curve=bound_curve, runs=n_runs + env.n_runs)


def headline_checks(budget: Mapping[str, Any], tolerance: float = 0.0) -> dict[str, Any]:
    """The target at one budget: share >= 0.5 with bad debt no larger than the best static's, beats both rivals
    (a larger share of the bound, or a defined share where the rival's is undefined) and a 5-day IM increase no
    larger than ``ewma_ccp``'s. Returns each check (True/False/None) and ``met``."""
    pred = budget.get("predictive") or {}
    share = pred.get("share_of_bound")
    checks: dict[str, Any] = {"half_of_bound": None if share is None else bool(share >= 0.5)}
    for r in RIVALS:
        rv = budget.get(r)
        if rv is None:
            checks[f"beats_{r}"] = None
            continue
        rs = rv.get("share_of_bound")
        checks[f"beats_{r}"] = (share is not None) and (rs is None or share > rs)
    e = budget.get("ewma_ccp")
    checks["procyclicality"] = None if e is None else bool(pred.get("max_im_increase_5d", math.inf)
                                                            <= e.get("max_im_increase_5d", -math.inf) + 1e-12)
    checks["met"] = all(v is True for v in checks.values())
    return checks
