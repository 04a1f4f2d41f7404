"""The ``predictive`` margin policy: a mapping from forecasts to IM and MM, fitted before the cut.

:class:`PredictivePolicy` maps the champion's out-of-sample forecast (1-step and H-step volatility, the
quantile-implied volatility when the forecast has quantiles) and the stressed-regime probability to an IM
path, and (``mm_k``) to an MM path; :func:`fit_predictive` chooses its parameters on the bars before the
cut only, minimising ``bad_debt + α × liquidations + β × collateral_locked`` from the backtester under the
controls. Split from :mod:`margin.policies` (which re-exports both names).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import norm

from margin.controls import apply_controls
from margin.policies import (
    MarginPath,
    PolicyContext,
    aligned_stress,
    aligned_variance,
    mm_controlled,
    slow_release,
    var_to_im,
)

__all__ = ["PredictivePolicy", "fit_predictive", "is_increase_cap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictivePolicy:
    """The optimizer's mapping from forecasts to IM (then the controls; MM = ``mm_fraction × IM``).

    ``IM_raw = max(floor, level × (σ_t / sigma_ref)^power × (1 + stress × p_stressed_t))`` with
    ``σ_t = exp(ω ln σ1 + (1-ω) ln σH)`` (σ1: the 1-step forecast volatility, σH: the root mean per-step
    variance over the forecast's horizon), blended geometrically with the quantile-implied volatility
    (``quantile_weight``) when the forecast has quantiles; ``sigma_ref`` is the median σ before the cut.
    ``power < 1`` is a sub-proportional response, ``> 1`` super-proportional, 0 static.
    ``release`` (in (0, 1]): the largest relative fall of the raw IM per bar, so that margin raised in a
    volatile spell is released slowly (crashes cluster); 1 = no hold (the controls' cap still applies).
    ``mm_binds``: ``"path"`` (the MM binds on open positions, increases after the notice)
    or ``"entry"`` (each position keeps the MM of its entry bar: only new positions see changes, an
    entry-IM policy like the bound). Both are in the fit's grid.
    ``mm_k``: the MM mapping. 0 (default): ``MM = mm_fraction × IM`` as for every other policy. ``> 0``: MM
    covers a ``mm_k``-sigma one-bar move, ``MM_t = exp(mm_k σ1_t) - 1`` (σ1: the 1-step forecast volatility),
    the close-out (gap) risk a maintenance margin exists for, while IM keeps pricing the holding-horizon risk;
    it then gets the controls (change cap, notice, floor ``mm_fraction × floor``) and never exceeds IM.
    ``mm_floor`` (with ``mm_k > 0``): a floor on that MM, so that a calm forecast does not leave open
    positions with almost no buffer when a jump starts from calm (0: the controls' floor only).
    """

    level: float = 0.10
    power: float = 0.5
    stress: float = 0.0
    omega: float = 0.5
    floor: float = 0.01
    quantile_weight: float = 0.5
    release: float = 1.0
    mm_binds: Literal["path", "entry"] = "path"
    mm_k: float = 0.0
    mm_floor: float = 0.0
    sigma_ref: float | None = None
    name: str = "predictive"
    fitted: dict[str, Any] = field(default_factory=dict, compare=False)

    def params(self) -> dict[str, float]:
        """Numeric parameters (``mm_at_entry``: 1.0 when MM is fixed at entry, 0.0 when it follows the path)."""
        return {"level": self.level, "power": self.power, "stress": self.stress, "omega": self.omega,
                "floor": self.floor, "quantile_weight": self.quantile_weight, "release": self.release,
                "mm_at_entry": 1.0 if self.mm_binds == "entry" else 0.0, "mm_k": self.mm_k,
                "mm_floor": self.mm_floor,
                "sigma_ref": float("nan") if self.sigma_ref is None else self.sigma_ref}

    @staticmethod
    def features(ctx: PolicyContext) -> dict[str, np.ndarray]:
        var, has = aligned_variance(ctx)
        s1 = np.sqrt(var[:, 0])
        sh = np.sqrt(var.mean(axis=1))
        out = {"s1": s1, "sh": sh, "stress": aligned_stress(ctx), "has": has}
        fc = ctx.forecast
        if fc is not None and fc.quantiles is not None and fc.quantile_levels:
            lv = fc.quantile_levels
            pos = fc.origins.searchsorted(ctx.times, side="right") - 1
            q = fc.quantiles[np.maximum(pos, 0), 0, :]
            zl, zh = norm.ppf(lv[0]), norm.ppf(lv[-1])
            sq = np.full(len(ctx.bars), np.nan)
            if zl < 0 < zh:
                sq = np.maximum(q[:, 0] / zl, q[:, -1] / zh)
            sq = np.where((pos >= 0) & (sq > 0), sq, s1)
            out["sq"] = sq
        return out

    def sigma(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        ls = self.omega * np.log(feats["s1"]) + (1.0 - self.omega) * np.log(feats["sh"])
        if "sq" in feats:
            ls = (1.0 - self.quantile_weight) * ls + self.quantile_weight * np.log(feats["sq"])
        return np.exp(ls)

    def raw_from(self, feats: Mapping[str, np.ndarray], sigma_ref: float) -> np.ndarray:
        x = self.sigma(feats) / sigma_ref
        raw = np.maximum(self.floor, self.level * x**self.power * (1.0 + self.stress * feats["stress"]))
        if self.release < 1.0:
            raw = slow_release(raw, self.release)
        return raw

    def path(self, ctx: PolicyContext) -> MarginPath:
        feats = self.features(ctx)
        ref = self.sigma_ref
        if ref is None:
            k = ctx.cut_index()
            s = self.sigma(feats)[: max(k, 1)]
            ref = float(np.median(s))
        raw = np.minimum(self.raw_from(feats, ref), 1.0)
        raw_mm = None
        if self.mm_k > 0:
            raw_mm = np.clip(var_to_im(feats["s1"], self.mm_k), self.mm_floor, 1.0)
        meta = {**self.params(), "mm_binds": self.mm_binds, "sigma_ref": ref,
                **({"fit": self.fitted} if self.fitted else {})}
        if self.mm_binds == "entry":
            # MM fixed at entry (the MM target of the entry bar): open positions never see an MM change
            cp = apply_controls(raw, ctx.controls, raw_mm)
            return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_target,
                              policy=self.name, meta={**meta, "controls": ctx.controls.to_dict()}, mm_binds="entry")
        return mm_controlled(self.name, ctx, raw, meta, raw_mm)


def is_increase_cap(value: Any) -> bool:
    """Whether ``value`` is a usable ``max_im_increase_5d``: a number > 0 (a fraction; bools are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


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
    max_im_increase_5d: float | None = None,
    start: Any = None,
) -> PredictivePolicy:
    """Fit :class:`PredictivePolicy` on origins BEFORE ``ctx.cut`` by coordinate search over a grid.

    Objective (USD): ``bad_debt + alpha × liquidations + beta × collateral_locked`` from
    :func:`margin.backtest.run_backtest` on the window ``[start, cut)`` under the context's controls
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
    """
    from margin.backtest import BacktestConfig, bars_per_day, run_backtest

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
    }
    if grid:
        g.update({k_: tuple(v) for k_, v in grid.items()})
    if not np.any(feats["stress"] > 0):
        g["stress"] = (0.0,)
    end = ctx.bars.index[k] if k < len(ctx.bars) else None
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    names: tuple[str, ...] = ("level", "power", "stress", "omega", "floor", "release", "mm_binds", "mm_k",
                              "mm_floor")
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

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        key = tuple(p[n] for n in names)
        if key not in cache:
            if target_avg_im is None:
                lv, path = p["level"], PredictivePolicy(**p, sigma_ref=ref).path(ctx)
            else:
                lv, path = solve_level(p)
            res = run_backtest(ctx.bars, path, pop, cfg, start=start, end=end)
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
           "mm_binds": "path", "mm_k": 0.0, "mm_floor": 0.0}
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
        raise ValueError(f"max_im_increase_5d={max_im_increase_5d!r}: no candidate on the grid meets it before the cut")
    fitted = {"alpha": alpha, "beta": beta, "target_avg_im": target_avg_im, "max_im_increase_5d": max_im_increase_5d,
              "objective": best, "evaluations": len(cache), "trace": trace,
              "n_positions_fit": len(pop), "fit_end": str(end), "sigma_ref": ref}
    log.info("predictive fitted: %s objective %.4g (%d evaluations)", cur, best["objective"], len(cache))
    return PredictivePolicy(**cur, sigma_ref=ref, fitted=fitted)
