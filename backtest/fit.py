"""The fit of the ``predictive`` policy: a search over its parameters scored by the simulation before the cut.

:func:`fit_predictive` chooses :class:`margin.predictive.PredictivePolicy`'s parameters on the bars before
the cut only, minimising ``bad_debt + α × liquidations + β × collateral_locked`` from
:func:`backtest.simulation.run_backtest` under the controls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backtest.simulation import BacktestConfig, bars_per_day, run_backtest
from margin.path import MarginPath
from margin.policies import PolicyContext
from margin.predictive import PredictivePolicy, is_increase_cap

__all__ = ["fit_predictive"]

log = logging.getLogger(__name__)


def fit_predictive(
    ctx: PolicyContext,
    population: Any,
    backtest_cfg: Any = None,
    objective_weights: Mapping[str, float] | None = None,
    *,
    grid: Mapping[str, Sequence[float]] | None = None,
    max_positions: int | None = 20_000,
    rounds: int = 2,
    refine: bool = True,
    target_avg_im: float | None = None,
    target_avg_collateral: float | None = None,
    bad_debt_allowance: float = 0.0,
    bad_debt_weight: float = 1.0,
    start_from: Mapping[str, Any] | None = None,
    max_im_increase_5d: float | None = None,
    start: Any = None,
) -> PredictivePolicy:
    """Fit :class:`PredictivePolicy` on origins BEFORE ``ctx.cut`` by coordinate search over a grid.

    Objective (USD): ``bad_debt + alpha × liquidations + beta × collateral_locked`` from
    :func:`backtest.simulation.run_backtest` on the window ``[start, cut)`` under the context's controls
    (positions still open at the cut close there: nothing after the cut is seen). ``objective_weights``:
    ``alpha`` (USD per liquidation, default 1 % of the median notional) and ``beta`` (USD per USD·bar of
    collateral; default ``capital_cost_annual`` (0.10) per year converted with the bar length).

    The search: coordinate descent over ``grid`` (``rounds`` passes over level, power, stress, omega, floor,
    release, mm_binds, mm_k and mm_floor, keeping every improvement), then (``refine``) a finer look at level
    and power between their grid neighbours. With ``target_avg_im`` the level is not searched: for every candidate shape it is
    solved so that the controlled IM averages ``target_avg_im`` over the bars before the cut, so the fit
    picks the best SHAPE at the capital of ``static_<target_avg_im>`` (the claim compares policies at equal
    collateral). With ``max_im_increase_5d`` (a fraction) a candidate whose controlled IM rises by more than
    that within 5 days anywhere in the fit window is infeasible (a procyclicality constraint set before the
    cut, e.g. at the EWMA-CCP policy's own pre-cut increase). Returns the fitted policy; ``policy.fitted``
    records the weights, the best objective and its parts, the number of evaluations and the search path.

    Budget mode (``target_avg_collateral``, a fraction of exposure as ``BacktestResult.avg_collateral``): the
    level is solved for every candidate shape so that the run before the cut locks that collateral (bracket
    and secant steps with the simulation, to within 0.2 points), and the objective becomes the headline's:
    ``liquidations + bad_debt_weight × max(0, bad_debt - bad_debt_allowance)`` (bad debt in USD, so the default
    weight prices one USD of bad debt above the allowance like one liquidation). ``start_from``: the shape
    the search starts at (e.g. the fit at a neighbouring budget).
    """
    if ctx.cut is None:
        raise ValueError("fit_predictive needs ctx.cut (parameters are fitted on origins before it)")
    if max_im_increase_5d is not None and not is_increase_cap(max_im_increase_5d):
        raise ValueError(f"max_im_increase_5d must be a fraction > 0, got {max_im_increase_5d!r} (the job resolves "
                         "'ewma_ccp' to that policy's pre-cut increase before calling fit_predictive)")
    cfg = backtest_cfg or BacktestConfig()
    k = ctx.cut_index()
    if k < 3:
        raise ValueError(f"fit_predictive needs at least 3 bars before the cut {ctx.cut}, got {k}")
    w = dict(objective_weights or {})
    unknown = set(w) - {"alpha", "beta", "capital_cost_annual"}
    if unknown:
        raise ValueError(f"objective_weights has unknown keys {sorted(unknown)}; valid: alpha, beta, capital_cost_annual")
    alpha = float(w.get("alpha", 0.01 * population.cfg.notional_median))
    bpy = 365.0 * bars_per_day(ctx.times)
    beta = float(w.get("beta", float(w.get("capital_cost_annual", 0.10)) / bpy))
    pop = population
    if max_positions is not None and len(pop) > max_positions:
        rng = np.random.default_rng(pop.cfg.seed + 7919)
        pop = pop.subset(rng.choice(len(pop), size=max_positions, replace=False))
    scale = len(population) / len(pop)
    feats = PredictivePolicy.features(ctx)
    base = PredictivePolicy(floor=ctx.controls.floor)
    ref = float(np.median(base.sigma(feats)[:k]))
    g = {
        "level": (0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.4, 0.5),
        "power": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
        "stress": (0.0, 0.25, 0.5, 1.0, 2.0),
        "omega": (0.0, 0.5, 1.0),
        "floor": tuple(sorted({ctx.controls.floor, 0.02, 0.03, 0.05, 0.08})),
        "release": (1.0, 0.2, 0.05, 0.02),
        "mm_binds": ("path", "entry"),
        "mm_k": (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
        "mm_floor": (0.0, 0.02, 0.03, 0.05, 0.08),
        "mm_fraction": (None,),
    }
    if grid:
        g.update({k_: tuple(v) for k_, v in grid.items()})
    if not np.any(feats["stress"] > 0):
        g["stress"] = (0.0,)
    end = ctx.bars.index[k] if k < len(ctx.bars) else None
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    names: tuple[str, ...] = ("level", "power", "stress", "omega", "floor", "release", "mm_binds", "mm_k",
                              "mm_floor", "mm_fraction")
    if target_avg_im is not None and target_avg_collateral is not None:
        raise ValueError("give target_avg_im or target_avg_collateral, not both")
    if target_avg_collateral is not None:
        if not 0.0 < target_avg_collateral <= 1.0:
            raise ValueError(f"target_avg_collateral must be in (0, 1], got {target_avg_collateral!r}")
        names = names[1:]
        g["level"] = (0.10,)
        if not grid:  # a leaner default search: every candidate costs a level solve (2-4 simulations)
            g.update({"power": (0.0, 0.5, 1.0), "stress": (0.0, 0.5, 1.0), "omega": (0.0, 0.5, 1.0),
                      "release": (1.0, 0.05), "mm_binds": ("path",), "mm_k": (0.0, 0.5, 1.5, 3.0),
                      "mm_floor": (0.0, 0.035, 0.05, 0.08), "mm_fraction": (None, 0.25, 0.5)})
            if not np.any(feats["stress"] > 0):
                g["stress"] = (0.0,)
        g["floor"] = tuple(f for f in g["floor"] if f <= target_avg_collateral) or (ctx.controls.floor,)
    if target_avg_im is not None:
        if not 0.0 < target_avg_im <= 1.0:
            raise ValueError(f"target_avg_im must be in (0, 1], got {target_avg_im!r}")
        names = names[1:]
        g["level"] = (float(target_avg_im),)
        # a floor above the target would set the IM by itself (the level solve could not reach the target)
        g["floor"] = tuple(f for f in g["floor"] if f <= target_avg_im) or (min(ctx.controls.floor, target_avg_im),)

    def solve_level(p: dict[str, Any]) -> tuple[float, MarginPath]:
        lv = float(p["level"])
        path = PredictivePolicy(**{**p, "level": lv}, sigma_ref=ref).path(ctx)
        for _ in range(8):
            m = float(np.mean(path.im_rate[:k]))
            if abs(m / target_avg_im - 1.0) < 1e-3:
                break
            lv = min(max(lv * target_avg_im / m, 1e-4), 10.0)
            path = PredictivePolicy(**{**p, "level": lv}, sigma_ref=ref).path(ctx)
        return lv, path

    level_memo: list[float] = []

    def solve_collateral(p: dict[str, Any]) -> tuple[float, Any]:
        """Level whose pre-cut run locks ``target_avg_collateral`` (collateral grows with the level)."""
        tgt = float(target_avg_collateral)  # type: ignore[arg-type]

        def run_at(lv: float) -> Any:
            return run_backtest(ctx.bars, PredictivePolicy(**{**p, "level": lv}, sigma_ref=ref).path(ctx), pop, cfg,
                                start=start, end=end)

        lv = level_memo[-1] if level_memo else tgt
        res = run_at(lv)
        lo = hi = None
        for _ in range(12):
            c = res.avg_collateral
            if abs(c - tgt) <= 2e-3:
                break
            if c < tgt:
                lo = (lv, c, res)
            else:
                hi = (lv, c, res)
            if lo is not None and hi is not None:
                w = (tgt - lo[1]) / (hi[1] - lo[1])
                nxt = lo[0] + min(max(w, 0.1), 0.9) * (hi[0] - lo[0])
            else:
                nxt = lv * (tgt / max(c, 1e-6)) ** 1.5
            nxt = min(max(nxt, 1e-3), 5.0)
            if nxt == lv:
                break
            lv = nxt
            res = run_at(lv)
        level_memo.append(lv)
        return lv, res

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        key = tuple(p[n] for n in names)
        if key not in cache:
            if target_avg_collateral is not None:
                lv, res = solve_collateral(p)
            else:
                if target_avg_im is None:
                    lv, path = p["level"], PredictivePolicy(**p, sigma_ref=ref).path(ctx)
                else:
                    lv, path = solve_level(p)
                res = run_backtest(ctx.bars, path, pop, cfg, start=start, end=end)
            if target_avg_collateral is not None:
                excess = max(0.0, scale * res.bad_debt - bad_debt_allowance)
                obj = scale * res.liquidations + bad_debt_weight * excess
                if abs(res.avg_collateral - target_avg_collateral) > 5e-3:
                    obj = math.inf  # the level cannot bring this shape to the budget
            else:
                obj = scale * (res.bad_debt + alpha * res.liquidations + beta * res.collateral_locked)
            if max_im_increase_5d is not None and res.max_im_increase_5d > max_im_increase_5d * (1 + 1e-9):
                obj = math.inf  # breaks the procyclicality constraint
            cache[key] = {"objective": obj, "level": lv, "bad_debt": scale * res.bad_debt,
                          "liquidations": scale * res.liquidations,
                          "collateral_locked": scale * res.collateral_locked, "avg_collateral": res.avg_collateral,
                          "max_im_increase_5d": res.max_im_increase_5d}
        return cache[key]

    def better(r: dict[str, float], b: dict[str, float]) -> bool:
        if not math.isfinite(b["objective"]):  # an infeasible incumbent: anything feasible is better
            return math.isfinite(r["objective"])
        return r["objective"] < b["objective"] - 1e-9 * max(1.0, abs(b["objective"]))

    cur = {"level": 0.10, "power": 0.5, "stress": 0.0, "omega": 0.5, "floor": ctx.controls.floor, "release": 1.0,
           "mm_binds": "path", "mm_k": 0.0, "mm_floor": 0.0, "mm_fraction": None}
    if start_from:
        cur.update({k: v for k, v in start_from.items() if k in cur})
    for n in names:
        if cur[n] not in g[n]:
            cur[n] = g[n][len(g[n]) // 2]
    best = evaluate(cur)
    trace = [{**cur, **best}]
    for _ in range(max(int(rounds), 1)):
        improved = False
        for n in names:
            for v in g[n]:
                cand = {**cur, n: v}
                r = evaluate(cand)
                if better(r, best):
                    cur, best, improved = cand, r, True
                    trace.append({**cur, **best})
        if not improved:
            break
    # refine the continuous parameters between their grid neighbours (three points on each side)
    for n in ("level", "power"):
        if refine and len(g[n]) > 1 and n in names:
            vals = sorted(g[n])
            i = vals.index(cur[n]) if cur[n] in vals else int(np.argmin(np.abs(np.asarray(vals) - cur[n])))
            lo_v, hi_v = vals[max(i - 1, 0)], vals[min(i + 1, len(vals) - 1)]
            for v in np.unique(np.r_[np.linspace(lo_v, cur[n], 4)[1:-1], np.linspace(cur[n], hi_v, 4)[1:-1]]):
                cand = {**cur, n: float(v)}
                r = evaluate(cand)
                if better(r, best):
                    cur, best = cand, r
                    trace.append({**cur, **best})
    cur = {**cur, "level": float(best["level"])}
    if not math.isfinite(best["objective"]):
        if target_avg_collateral is not None:
            raise ValueError(f"no candidate on the grid locks avg collateral {target_avg_collateral!r} before the cut"
                             f" (within 0.5 points) while meeting max_im_increase_5d={max_im_increase_5d!r}")
        raise ValueError(f"max_im_increase_5d={max_im_increase_5d!r}: no candidate on the grid meets it before the cut")
    fitted = {"alpha": alpha, "beta": beta, "target_avg_im": target_avg_im, "max_im_increase_5d": max_im_increase_5d,
              "target_avg_collateral": target_avg_collateral, "bad_debt_allowance": bad_debt_allowance,
              "objective": best, "evaluations": len(cache), "trace": trace,
              "n_positions_fit": len(pop), "fit_end": str(end), "sigma_ref": ref}
    log.info("predictive fitted: %s objective %.4g (%d evaluations)", cur, best["objective"], len(cache))
    return PredictivePolicy(**cur, sigma_ref=ref, fitted=fitted)
