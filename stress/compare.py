"""Policies under stress: a registry of policy kinds, one scenario per policy, the counterfactual, reverse stress.

For one scenario and one policy (:func:`stress_policy`):

1. the population (:func:`backtest.population.generate_population`, drawn over the window and placed at its
   start) and the policy's :class:`margin.path.MarginPath` on the exogenous bars;
2. :func:`stress.cascade.run_cascade`; with ``feedback_rounds`` the policy then sees the prices its cascade
   made (history + the market's bars after impact) and the run is repeated with its new path (the
   procyclicality loop: margin raised in the spike that its own liquidations deepened);
3. the counterfactual: the same run (same bars, same population) with the policy's IM and MM frozen from the
   shock on at the values it published at the close before the shock. ``self_inflicted_share`` is the share
   of the liquidated notional ``L`` that the policy's own margin moves caused, position by position:
   ``sum_i max(L_i - L_i^frozen, 0) / L`` (:func:`self_inflicted`), ``L_i`` what position ``i`` lost to
   liquidation. A raised MM liquidates open positions the frozen margin would have kept (and their flow
   deepens the cascade); a raised IM makes positions opening after the shock safer. The two act on different
   positions, so a net ``(L - L_frozen) / L`` nets the harm against the protection and reads 0 whenever the
   protection is larger (it is kept in ``details.net_response_share``, signed: < 0 when the response saved
   more than it liquidated);
4. Cover-2: the open book at the shock's open, each position's loss past its margin at the worst market
   price of the window (its side's adverse extreme); ``cover2_ok`` when the fund at the shock covers the
   two largest.

:func:`reverse_stress` bisects the size of an instantaneous drop at the shock for the smallest one that
empties the insurance fund (``fund_min <= 0``) under a policy.

Policy kinds (:data:`POLICY_KINDS`): ``static`` (the best (IM, MM) pair at the capital budget, or a given
``params.im``), ``ewma_ccp``, ``garch_fhs``, ``predictive`` (given parameters, or ``fit``:
:func:`backtest.fit.fit_predictive` at the budget on the bars before the window), ``dynamic_grid`` (the dynamic
portfolio grid as the IM/MM rates of one linear perp, :mod:`stress.grid`); a new kind is one builder added
with :func:`register_policy_kind`. :func:`build_policy` builds
a policy from the bars before the window and brings it to the capital budget (:mod:`stress.budget`), so the
policies of a comparison lock the same average collateral before the window.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest.factory import make_policy
from backtest.fit import fit_predictive
from backtest.population import Population, PopulationConfig
from margin.controls import Controls
from margin.path import MarginPath
from margin.policies import PolicyContext, StaticPolicy
from models.base import VolatilityForecast
from models.garch import ArchForecaster
from stress.budget import (
    BudgetSettings,
    Calibration,
    ScaledPolicy,
    bring_to_budget,
    calibration,
    place_population,
)
from stress.cascade import CascadeConfig, CascadeResult, run_cascade
from stress.grid import GridPerpPolicy, build_dynamic_grid
from stress.scenarios import Scenario, shock_drop

log = logging.getLogger(__name__)

__all__ = ["PolicySpec", "POLICY_KINDS", "register_policy_kind", "build_policy", "freeze_path", "self_inflicted",
           "cover2", "stress_policy", "reverse_stress", "KEYS"]

#: The metrics stress.json holds per scenario and policy.
KEYS: tuple[str, ...] = ("cascade_depth", "liquidated_notional", "impact_from_liquidations", "bad_debt", "fund_min",
                         "cover2_ok", "self_inflicted_share")


@dataclass(frozen=True)
class PolicySpec:
    """One entry of ``policies:`` in configs/stress.yaml: ``name``, ``kind``, ``params`` and ``fit``."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], i: int = 0) -> PolicySpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"policies[{i}] must be a mapping with name and kind, got {d!r}")
        if "budget" in d:
            raise ValueError(f"policies[{i}].budget is not a policy key (got {d['budget']!r}): the capital budget is "
                             "the top-level budget.collateral, the same for every policy")
        unknown = set(d) - {"name", "kind", "params", "fit"}
        if unknown:
            raise ValueError(f"policies[{i}] has unknown keys {sorted(unknown)}; valid: name, kind, params, fit")
        kind = d.get("kind")
        if kind not in POLICY_KINDS:
            raise ValueError(f"policies[{i}].kind must be one of {sorted(POLICY_KINDS)}, got {kind!r}")
        name = str(d.get("name") or kind)
        return cls(name=name, kind=str(kind), params=dict(d.get("params") or {}), fit=d.get("fit"))


#: builder(spec, calibration) -> policy; it sees only the bars before the window (:class:`stress.budget.Calibration`:
#: the context with ``cut`` at the window's first bar, the pre-window population and run, the budget)
Builder = Callable[[PolicySpec, Calibration], Any]


def _static(spec: PolicySpec, cal: Calibration) -> Any:
    p = dict(spec.params)
    if "im" in p:
        return StaticPolicy(**p)  # a given pair: scaled to the budget like any other policy
    if cal.budget is None:
        raise ValueError(f"policy {spec.name!r} (static) needs params.im or a top-level budget")
    if p:
        raise ValueError(f"policy {spec.name!r} (static at the budget) takes no params (got {sorted(p)}): the "
                         "envelope chooses the pair over budget.im_grid, budget.mm_fractions and budget.mm_fixed")
    pair, _ = cal.envelope().best_at(cal.budget, cal.settings.bad_debt_tolerance, refine_top=2)
    if pair is None:
        raise ValueError(f"policy {spec.name!r}: no static pair locks avg collateral {cal.budget!r} on the "
                         f"{cal.cut - cal.start} bars before {cal.ctx.cut}")
    return StaticPolicy(im=pair.im, mm=pair.mm)


def _named(kind: str) -> Builder:
    def build(spec: PolicySpec, cal: Calibration) -> Any:
        return make_policy(kind, **dict(spec.params))
    return build


def _predictive(spec: PolicySpec, cal: Calibration) -> Any:
    if spec.fit is None:
        return make_policy("predictive", **dict(spec.params))
    kw = dict(spec.fit)
    if cal.budget is not None:
        if "target_avg_im" in kw:
            raise ValueError(f"policy {spec.name!r}: fit.target_avg_im conflicts with the budget (average collateral "
                             f"{cal.budget!r}); remove it")
        kw.setdefault("target_avg_collateral", cal.budget)
        kw.setdefault("bad_debt_allowance", cal.settings.bad_debt_tolerance)
    return fit_predictive(cal.ctx, cal.population, cal.cfg, start=cal.ctx.bars.index[cal.start], **kw)


#: kind -> builder(spec, calibration)
POLICY_KINDS: dict[str, Builder] = {
    "static": _static,
    "ewma_ccp": _named("ewma_ccp"),
    "garch_fhs": _named("garch_fhs"),
    "predictive": _predictive,
    "dynamic_grid": build_dynamic_grid,
}


def register_policy_kind(kind: str, builder: Builder) -> None:
    """Add a policy kind to :data:`POLICY_KINDS` (a worker process of the executor imports this module afresh:
    register at import time of a module the config's policies need, as ``dynamic_grid`` is)."""
    if kind in POLICY_KINDS:
        raise ValueError(f"policy kind {kind!r} is already registered")
    POLICY_KINDS[kind] = builder


def _returns(bars: pd.DataFrame) -> pd.DataFrame:
    c = bars["close"].to_numpy(dtype=np.float64)
    r = np.zeros_like(c)
    r[1:] = np.diff(np.log(c))
    return pd.DataFrame({"ret": r}, index=bars.index)


def forecast_for(bars: pd.DataFrame, cut: int, model: ArchForecaster | None = None) -> tuple[VolatilityForecast, ArchForecaster]:
    """One-step GARCH(1,1)-t forecasts at every bar: fitted on the bars before ``cut``, then filtered over
    ``bars`` with the parameters fixed (:meth:`models.base.Forecaster.filter`); ``std_resid`` are the
    standardized returns before the cut (for filtered historical simulation)."""
    fr = _returns(bars)
    if model is None:
        model = ArchForecaster(dist="t").fit(fr.iloc[:cut])
    model.filter(fr)
    cv = np.maximum(model.conditional_variance().to_numpy(), 1e-14)
    var = np.concatenate((cv[1:], cv[-1:]))  # origin t forecasts bar t + 1
    z = fr["ret"].to_numpy()[1:cut] / np.sqrt(cv[1:cut])
    fc = VolatilityForecast(origins=bars.index, variance=var[:, None], model="garch", std_resid=z)
    return fc, model


def context(bars: pd.DataFrame, scn: Scenario, controls: Controls, model: ArchForecaster | None = None,
            cut: bool = False) -> tuple[PolicyContext, ArchForecaster]:
    """Policy context on ``bars`` with the scenario's GARCH forecast (parameters fitted before the window)."""
    fc, model = forecast_for(bars, scn.start, model)
    return PolicyContext(bars=bars, forecast=fc, controls=controls,
                         cut=bars.index[scn.start] if cut else None), model


def build_policy(spec: PolicySpec, scn: Scenario, pop_cfg: PopulationConfig, ccfg: CascadeConfig,
                 controls: Controls, budget: BudgetSettings | None = None,
                 calibration_bars: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The policy of ``spec`` for ``scn`` at the capital budget, and the record of its pre-window run.

    Anything fitted or scaled sees only the bars before the window (:mod:`stress.budget`).
    """
    budget = budget or BudgetSettings()
    ctx, _ = context(scn.bars, scn, controls, cut=True)
    cal = calibration(ctx, pop_cfg, ccfg.backtest, budget, calibration_bars)
    pol = POLICY_KINDS[spec.kind](spec, cal)
    # how the builder already aimed at the budget; anything else is scaled by bring_to_budget
    if spec.kind == "static" and "im" not in spec.params:
        aim = "static_envelope"
    elif spec.kind in ("predictive", "dynamic_grid") and spec.fit is not None:
        aim = "fit"
    else:
        aim = "as_built"
    pol, rec = bring_to_budget(pol, cal, aim)
    inner = pol.policy if isinstance(pol, ScaledPolicy) else pol
    if isinstance(inner, StaticPolicy):
        rec["pair"] = {"im": inner.im, "mm": inner.mm, "mm_fraction": inner.mm_fraction}
    fitted = getattr(inner, "fitted", None)
    if isinstance(fitted, Mapping) and fitted.get("objective"):
        rec["fit"] = {"evaluations": fitted.get("evaluations"),
                      "fit_avg_collateral": fitted["objective"].get("avg_collateral"),
                      "params": inner.params() if hasattr(inner, "params") else None}
    if isinstance(inner, GridPerpPolicy):
        rec["grid"] = inner.params()
        rec.setdefault("scale", inner.scale)
    rec["policy"] = getattr(pol, "name", spec.name)
    return pol, rec


def freeze_path(path: MarginPath, shock: int) -> MarginPath:
    """``path`` with IM and MM held from bar ``shock`` on at their values at the close of ``shock - 1``.

    Everything published up to the close of ``shock - 1`` is kept (the margin calls at that close see its
    pending MM, as in the run it is compared with); nothing is announced from the shock on.
    """
    im = np.array(path.im_rate)
    mm = np.array(path.mm_rate)
    im[shock:] = im[shock - 1]
    mm[shock:] = mm[shock - 1]
    pend = None
    if path.mm_pending is not None:
        pend = np.array(path.mm_pending)
        pend[shock:] = np.nan
    eff = None if path.mm_effective_bar is None else np.where(np.arange(len(im)) >= shock, -1,
                                                                np.asarray(path.mm_effective_bar))
    return MarginPath(times=path.times, im_rate=im, mm_rate=mm, policy=f"{path.policy}_frozen", meta=path.meta,
                      mm_pending=pend, mm_effective_bar=eff, mm_binds=path.mm_binds)


def self_inflicted(liquidated: np.ndarray, liquidated_frozen: np.ndarray) -> float:
    """Share of the liquidated notional that the policy's margin moves caused (see the module docstring).

    Parameters
    ----------
    liquidated, liquidated_frozen : np.ndarray
        Liquidated notional per position (USD), in the run and in its frozen counterfactual (same positions).

    Returns
    -------
    float
        ``sum(max(liquidated - liquidated_frozen, 0)) / sum(liquidated)`` in [0, 1]; 0 when nothing was liquidated.
    """
    a = np.asarray(liquidated, dtype=np.float64)
    b = np.asarray(liquidated_frozen, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"liquidated and liquidated_frozen must be per position of the same run, got shapes "
                         f"{a.shape} and {b.shape}")
    total = float(a.sum())
    return float(np.maximum(a - b, 0.0).sum()) / total if total > 0 else 0.0


def cover2(res: CascadeResult) -> dict[str, float | bool]:
    """Cover-2 from the run's snapshot at the shock: the fund against its two largest losses past margin."""
    snap = res.snapshot
    if snap is None:
        raise ValueError("cover2 needs a run with cascade.snapshot_bar set (the shock bar)")
    mb = res.market_bars.loc[res.market_bars.index >= res.series.index[0]]
    lo, hi = float(mb["low"].min()), float(mb["high"].max())
    lo = min(lo, float(res.series["mark_low"].min()))
    worst = np.where(snap["side"] > 0, lo, hi)
    loss = -(snap["margin"] + snap["side"] * snap["qty"] * (worst - snap["entry"]))
    top2 = np.sort(np.maximum(loss, 0.0))[-2:] if loss.size else np.zeros(0)
    need = float(top2.sum())
    return {"cover2_ok": bool(snap["fund"] >= need), "cover2_need": need, "fund_at_shock": float(snap["fund"])}


def _run(scn: Scenario, path: MarginPath, pop: Population, ccfg: CascadeConfig,
         per_position: bool = False) -> CascadeResult:
    start, end = scn.window
    return run_cascade(scn.bars, path, pop, replace(ccfg, snapshot_bar=scn.shock), start=start, end=end,
                       per_position=per_position)


def _realised_bars(scn: Scenario, res: CascadeResult) -> pd.DataFrame:
    b = scn.bars.copy()
    mb = res.market_bars
    for c in ("open", "high", "low", "close"):
        b.loc[mb.index, c] = mb[c].to_numpy()
    return b


def stress_policy(scn: Scenario, policy: Any, pop_cfg: PopulationConfig, ccfg: CascadeConfig, controls: Controls,
                  feedback_rounds: int = 1) -> dict[str, Any]:
    """Run ``policy`` on ``scn`` (see the module docstring); returns the :data:`KEYS` and details."""
    pop = place_population(len(scn.bars), scn.start, scn.end, pop_cfg)
    bars = scn.bars
    ctx, model = context(bars, scn, controls)
    path = policy.path(ctx)
    rounds = int(feedback_rounds)
    res = _run(scn, path, pop, ccfg, per_position=rounds == 0)
    for r in range(rounds):
        bars = _realised_bars(scn, res)
        path = policy.path(context(bars, scn, controls, model)[0])
        res = _run(scn, path, pop, ccfg, per_position=r == rounds - 1)
    frozen = _run(scn, freeze_path(path, scn.shock), pop, ccfg, per_position=True)
    liq, liq_f = res.liquidated_notional, frozen.liquidated_notional
    assert res.per_position is not None and frozen.per_position is not None
    share = self_inflicted(res.per_position["liquidated_notional"], frozen.per_position["liquidated_notional"])
    c2 = cover2(res)
    w = slice(scn.start, scn.end + 1)
    return {
        "cascade_depth": res.cascade_depth,
        "liquidated_notional": liq,
        "impact_from_liquidations": res.impact_from_liquidations,
        "bad_debt": res.bad_debt,
        "fund_min": res.fund_min,
        "cover2_ok": c2["cover2_ok"],
        "self_inflicted_share": share,
        "details": {"liquidations": res.liquidations, "liquidated_notional_frozen": liq_f,
                    "bad_debt_frozen": frozen.bad_debt, "self_inflicted_notional": share * liq,
                    "net_response_share": (liq - liq_f) / liq if liq > 0 else 0.0, "cover2_need": c2["cover2_need"],
                    "fund_at_shock": c2["fund_at_shock"], "uncovered_bad_debt": res.uncovered_bad_debt,
                    "im_at_shock": float(path.im_rate[scn.shock - 1]), "im_max": float(np.max(path.im_rate[w])),
                    "mm_at_shock": float(path.mm_rate[scn.shock - 1]), "mm_max": float(np.max(path.mm_rate[w])),
                    "ledger_residual": res.ledger_residual, "n_positions": res.n_positions},
        "series": pd.DataFrame({"mark_close": res.series["mark_close"], "exog_close": res.series["exog_close"],
                                "fund": res.series["fund"], "liquidated_notional": res.series["liquidated_notional"],
                                "waves": res.series["waves"], "im": path.im_rate[w], "mm": path.mm_rate[w]}),
    }


def reverse_stress(base: Scenario, policy: Any, pop_cfg: PopulationConfig, ccfg: CascadeConfig, controls: Controls,
                   shock_bars: int = 1, max_size: float = 0.9, tol: float = 0.005) -> dict[str, Any]:
    """Smallest drop (fraction, over ``shock_bars`` bars at ``base.shock``) that empties the fund.

    Bisection on ``[0, max_size]`` for ``fund_min <= 0``; ``shock_size`` is ``None`` when even ``max_size``
    leaves the fund above zero. The policy's path is computed on the shocked bars (it sees the drop as
    it happens, like any publish).
    """
    pop = place_population(len(base.bars), base.start, base.end, pop_cfg)
    _, model = context(base.bars, base, controls)

    def fund_min(size: float) -> float:
        scn = shock_drop(base, size, shock_bars)
        path = policy.path(context(scn.bars, scn, controls, model)[0])
        return _run(scn, path, pop, ccfg).fund_min

    hi_f = fund_min(max_size)
    if hi_f > 0:
        return {"shock_size": None, "fund_min_at_max": hi_f, "evaluations": 1}
    lo, hi, k = 0.0, max_size, 1
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        k += 1
        if fund_min(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return {"shock_size": hi, "fund_min_at_max": hi_f, "evaluations": k,
            "bracket": [lo, hi] if math.isfinite(lo) else None}
