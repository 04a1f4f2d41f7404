"""Backtests of one asset: policies, the frozen-setting bound, frontiers, coverage tests and sensitivity.

Used by :mod:`volmargin.run`; workers of ``volmargin.executor`` run :func:`evaluate_asset` and return an
:class:`AssetOutcome` (they never write files or MLflow).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from volmargin.config import RunConfig
from volmargin.report import finite_or_none
from volmargin.run_inputs import AssetInputs

__all__ = [
    "VAR_POLICIES",
    "ADAPTIVE",
    "BOUND_OBJECTIVES",
    "AssetOutcome",
    "static_name",
    "build_controls",
    "build_population_config",
    "build_backtest_config",
    "check_policy_settings",
    "scaled_path",
    "horizon_breaches",
    "evaluate_asset",
    "evaluate_assets",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Policies whose margin is a VaR/ES quantile at a stated confidence: Basel traffic light applies.
VAR_POLICIES = ("ewma_ccp", "garch_fhs")
#: Adaptive families swept along ``policies.frontier_scales``.
ADAPTIVE = ("ewma_ccp", "garch_fhs", "predictive", "oracle_vol")
BOUND_OBJECTIVES = ("liquidations", "bad_debt")


def static_name(level: float) -> str:
    """Policy name of a static IM level: ``static_0.10``, ``static_0.125``."""
    s = f"{level:.2f}"
    return f"static_{s}" if float(s) == level else f"static_{level:g}"


# ---------------------------------------------------------------------------- margin-side settings
def build_controls(cfg: RunConfig) -> Any:
    """``margin.controls.Controls`` from the config."""
    return cfg.controls.build()


def build_population_config(cfg: RunConfig, overrides: Mapping[str, Any] | None = None) -> Any:
    """``backtest.population.PopulationConfig`` from the ``population`` section (seed from ``seed``)."""
    return cfg.population.build(cfg.seed, overrides)


def build_backtest_config(cfg: RunConfig, overrides: Mapping[str, Any] | None = None) -> Any:
    """``backtest.simulation.BacktestConfig`` from the ``backtest`` section (``liquidation`` as a mapping)."""
    return cfg.backtest.build(overrides)


# ---------------------------------------------------------------------------- one asset
@dataclass(frozen=True)
class AssetOutcome:
    """Backtests and comparisons of one asset on its held-out bars.

    ``results`` are scored in the normal setting (volume slippage on, top-ups, fees, funding);
    ``frozen`` in the bound's frozen setting (volume slippage off, bad debt before the fund), where the
    shares of the bound are computed. ``comparison`` holds the summary's four numbers per policy;
    ``reasons`` says why a number is null.
    """

    inputs: AssetInputs
    paths: dict[str, Any]
    results: dict[str, Any]
    frozen: dict[str, Any]
    frontiers: dict[str, Any]
    frontiers_frozen: dict[str, Any]
    comparison: dict[str, dict[str, Any]]
    reasons: dict[str, dict[str, str]]
    coverage: dict[str, dict[str, Any]]
    predictive_params: dict[str, Any]
    sensitivity: list[dict[str, Any]]
    seconds: float


def scaled_path(path: Any, scale: float, controls: Any, *, deployable: bool = True) -> Any:
    """``path`` with IM multiplied by ``scale`` (a frontier point of its family).

    Deployable paths go through the controls again (the change cap is relative, so scaling keeps it;
    the floor and ceiling clip); references keep their MM rule.
    """
    from margin.controls import apply_controls
    from margin.path import MarginPath

    im = np.minimum(np.asarray(path.im_rate) * scale, 1.0)
    meta = {**path.meta, "frontier_scale": scale}
    if deployable:
        cp = apply_controls(im, controls)
        return MarginPath(times=path.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=path.policy, meta=meta,
                          mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar)
    mm = np.minimum(np.asarray(path.mm_rate) * scale, im)
    return MarginPath(times=path.times, im_rate=im, mm_rate=mm, policy=path.policy, meta=meta, mm_binds=path.mm_binds)


def _bound_frontier(tab: Any, objective: str, targets: list[float]) -> Any:
    """Bound frontier (one objective) from its cohort table: one point per collateral target."""
    from backtest.bound import solve_lambda
    from backtest.frontier import Frontier, FrontierPoint

    expo = float(tab.exposure.sum())
    pts = []
    lams = sorted({0.0, *(solve_lambda(tab, objective, t) for t in targets)})
    for lam in lams:
        ch = tab.choose(objective, lam)
        r = np.arange(ch.size)
        coll = float(tab.collateral[r, ch].sum())
        pts.append(FrontierPoint(scale=float(lam), avg_collateral=coll / expo if expo > 0 else float("nan"),
                                 liquidations=float(tab.liquidations[r, ch].sum()),
                                 bad_debt=float(tab.bad_debt[r, ch].sum()), policy=f"bound_{objective}"))
    return Frontier(family=f"bound_{objective}", points=tuple(pts))


def horizon_breaches(close: np.ndarray, im: np.ndarray, first: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Exceptions of the IM over non-overlapping ``horizon``-bar windows from bar ``first`` on.

    Window ``k`` starts at bar ``t = first + k * horizon`` with the IM published at its close; a long
    (short) breach is a loss ``1 - C[t+h]/C[t]`` (``C[t+h]/C[t] - 1``) larger than ``im[t]``, per unit of
    notional. Windows do not overlap, so independent exceptions stay independent (Kupiec, Christoffersen).
    """
    c = np.asarray(close, dtype=np.float64)
    starts = np.arange(first, c.size - horizon, horizon)
    ratio = c[starts + horizon] / c[starts]
    m = np.asarray(im, dtype=np.float64)[starts]
    return (1.0 - ratio) > m, (ratio - 1.0) > m


def _coverage(name: str, path: Any, res: Any, inp: AssetInputs) -> dict[str, Any]:
    """Coverage tests on margin breaches over the held-out bars.

    Every policy: the backtester's one-bar breach series (close-to-close loss of a 1-unit long or short
    beyond the IM published before the bar): breach rate and Christoffersen independence. The VaR-based
    policies (``ewma_ccp``, ``garch_fhs``) state a confidence ``c`` and a horizon ``h``: their IM is tested
    on non-overlapping ``h``-bar windows (:func:`horizon_breaches`), each side against ``p = 1 - c``
    (Kupiec, Christoffersen) with a Basel traffic light scaled to the number of windows by binomial
    quantiles (``training.tests.traffic_light``); the worse side is reported. Other policies state no
    confidence: traffic light null.
    """
    from training.tests import christoffersen_independence, coverage_test, traffic_light

    cut = inp.cut
    br = res.breaches
    br = br[pd.DatetimeIndex(br.index) >= cut] if len(br) else br
    out: dict[str, Any] = {"n": int(len(br))}
    if len(br) < 2:
        out.update({"traffic_light": None, "reason": "fewer than 2 held-out bars"})
        return out
    both = br["breach_im"].to_numpy(dtype=bool)
    out["breach_rate"] = float(both.mean())
    out["christoffersen_p"] = christoffersen_independence(both)[1]
    meta = path.meta if isinstance(path.meta, dict) else {}
    conf = meta.get("confidence")
    if name in VAR_POLICIES and conf is not None:
        p = 1.0 - float(conf)
        h = int(meta.get("horizon", 1))
        first = int(pd.DatetimeIndex(inp.bars.index).searchsorted(cut))
        longs, shorts = horizon_breaches(inp.bars["close"].to_numpy(dtype=float), path.im_rate, first, h)
        if len(longs) < 2:
            out.update({"traffic_light": None, "reason": f"fewer than 2 held-out {h}-bar windows"})
            return out
        zones = {"green": 0, "yellow": 1, "red": 2}
        worst = None
        for side, b in (("long", longs), ("short", shorts)):
            ct = coverage_test(b, p).to_dict()
            ct["traffic_light"] = traffic_light(b, p=p).value
            out[side] = ct
            if worst is None or zones[ct["traffic_light"]] > zones[worst[1]["traffic_light"]]:
                worst = (side, ct)
        assert worst is not None
        out.update({"p": p, "horizon": h, "windows": int(len(longs)), "worst_side": worst[0],
                    "traffic_light": worst[1]["traffic_light"], "kupiec_p": worst[1]["p_uc"],
                    "christoffersen_p": worst[1]["p_ind"]})
    else:
        out["traffic_light"] = None
    return out


def _crash_days(bars: pd.DataFrame, cut: pd.Timestamp, results: Mapping[str, Any], k: int = 6) -> pd.DataFrame:
    """The ``k`` largest close-to-close drops after the cut with each policy's liquidations that bar."""
    close = bars["close"].astype(float)
    r = np.log(close).diff()
    r = r[r.index >= cut].dropna()
    worst = r.nsmallest(min(k, len(r)))
    df = pd.DataFrame({"return": np.expm1(worst)}, index=worst.index)
    df.index.name = "bar"
    for name, res in results.items():
        s = res.series["liquidations"] if "liquidations" in res.series else None
        if s is not None:
            df[f"liq.{name}"] = s.reindex(df.index).fillna(0).astype(int).to_numpy()
    df.index = [t.strftime("%Y-%m-%d %H:%M") if t.hour or t.minute else t.strftime("%Y-%m-%d") for t in df.index]
    df.index.name = "bar"
    return df


def _compare_entry(norm: Mapping[str, Any], froz: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    entry = {
        "liquidations_change": finite_or_none(norm.get("liquidations_change")),
        "bad_debt_change": finite_or_none(norm.get("bad_debt_change")),
        "share_of_bound_liquidations": finite_or_none(froz.get("share_of_bound_liquidations")),
        "share_of_bound_bad_debt": finite_or_none(froz.get("share_of_bound_bad_debt")),
    }
    if "best_static_liquidations" in norm:  # the static reference at the policy's collateral (refined frontier)
        entry["best_static_liquidations"] = finite_or_none(norm.get("best_static_liquidations"))
        entry["best_static_bad_debt"] = finite_or_none(norm.get("best_static_bad_debt"))
        entry["static_bracket"] = norm.get("static_bracket")
    reasons = {}
    for k in ("liquidations_change", "bad_debt_change"):
        if entry[k] is None:
            reasons[k] = str((norm.get("reasons") or {}).get(k, "undefined"))
    for k in ("share_of_bound_liquidations", "share_of_bound_bad_debt"):
        if entry[k] is None:
            reasons[k] = str((froz.get("reasons") or {}).get(k, "undefined"))
    return entry, reasons


def evaluate_asset(
    inp: AssetInputs,
    cfg: RunConfig,
    *,
    population_overrides: Mapping[str, Any] | None = None,
    backtest_overrides: Mapping[str, Any] | None = None,
    sensitivity: bool = False,
    progress: Progress | None = None,
) -> AssetOutcome:
    """Fit, backtest and compare every policy on one asset (see the module docstring)."""
    from backtest.factory import make_policy
    from backtest.fit import fit_predictive
    from backtest.frontier import compare, frontier_from_results
    from backtest.population import generate_population
    from backtest.simulation import run_backtest
    from margin.policies import PolicyContext

    t0 = time.perf_counter()
    controls = build_controls(cfg)
    ctx = PolicyContext(bars=inp.bars, forecast=inp.forecast, regime_probs=inp.regime_probs, cut=inp.cut,
                        controls=controls)
    pop_cfg = build_population_config(cfg, population_overrides)
    population = generate_population(len(inp.bars), pop_cfg, volume=inp.bars["volume"].to_numpy(dtype=float))
    bt = build_backtest_config(cfg, backtest_overrides)
    btf = bt.frozen_copy()
    levels = list(cfg.policies.static_levels)
    pol = cfg.policies
    steps = len(levels) + 12  # fit, one per path, two bounds, four frontier sweeps, sensitivity
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"backtests {inp.asset}", done, steps)

    def run(path: Any, c: Any = bt) -> Any:
        return run_backtest(inp.bars, path, population, c, start=inp.cut)

    paths: dict[str, Any] = {}
    for lv in levels:
        paths[static_name(lv)] = make_policy(static_name(lv)).path(ctx)
    paths["ewma_ccp"] = make_policy("ewma_ccp", **pol.ewma_ccp).path(ctx)
    paths["garch_fhs"] = make_policy("garch_fhs", **{"seed": cfg.seed, **pol.garch_fhs}).path(ctx)
    pred_cfg = dict(pol.predictive)
    if pred_cfg.get("max_im_increase_5d") == "ewma_ccp":
        # the constraint at the EWMA-CCP policy's own largest 5-day increase before the cut
        from backtest.simulation import bars_per_day, max_increase

        k = ctx.cut_index()
        pred_cfg["max_im_increase_5d"] = max_increase(paths["ewma_ccp"].im_rate[:k], round(5 * bars_per_day(ctx.times)))
    predictive = fit_predictive(ctx, population, bt, pol.objective.weights(), **pred_cfg)
    tick()
    paths["predictive"] = predictive.path(ctx)
    paths["oracle_vol"] = make_policy("oracle_vol", **pol.oracle_vol).path(ctx)
    results: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for name, path in paths.items():
        results[name] = run(path)
        frozen[name] = run(path, btf)
        tick()
    static_front = frontier_from_results("static", {lv: results[static_name(lv)] for lv in levels})
    static_front_f = frontier_from_results("static", {lv: frozen[static_name(lv)] for lv in levels})
    frontiers: dict[str, Any] = {"static": static_front}
    frontiers_f: dict[str, Any] = {"static": static_front_f}
    # the bound: cohort table in the frozen setting on the held-out window, one frontier per objective
    bcfg = dict(pol.bound)
    grid = tuple(bcfg.pop("grid", levels))
    bound = make_policy("bound_liquidations", population=population, backtest_cfg=bt, grid=grid, **bcfg)
    tab = bound.table(ctx)
    targets = [frozen[static_name(lv)].avg_collateral for lv in levels]
    bound_fronts = {obj: _bound_frontier(tab, obj, targets) for obj in BOUND_OBJECTIVES}
    for obj in BOUND_OBJECTIVES:
        frontiers_f[f"bound_{obj}"] = bound_fronts[obj]
        b = make_policy(f"bound_{obj}", population=population, backtest_cfg=bt, grid=grid,
                        target_avg_collateral=frozen["predictive"].avg_collateral, **bcfg)
        paths[f"bound_{obj}"] = b.path(ctx, table=tab)
        frozen[f"bound_{obj}"] = run(paths[f"bound_{obj}"], btf)
        results[f"bound_{obj}"] = frozen[f"bound_{obj}"]  # the bound is only defined in the frozen setting
        tick()
    comparison: dict[str, dict[str, Any]] = {}
    reasons: dict[str, dict[str, str]] = {}
    def run_static(level: float, c: Any = bt) -> Any:
        # a static level between two grid points: the static frontier is convex in collateral, so the chord
        # between distant levels lies above it and would credit a policy with a gain it does not have
        return run(make_policy(static_name(level)).path(ctx), c)

    for name in ADAPTIVE:
        entry, why = _compare_entry(
            compare(results[name], static_front, run_static=run_static),
            compare(frozen[name], static_front_f, bound_fronts, run_static=lambda lv: run_static(lv, btf)),
        )
        comparison[f"{name}_vs_best_static"] = entry
        if why:
            reasons[f"{name}_vs_best_static"] = why
    bl = compare(frozen["bound_liquidations"], static_front_f, bound_fronts)
    bd = compare(frozen["bound_bad_debt"], static_front_f, bound_fronts)
    entry, why = _compare_entry(
        {"liquidations_change": bl["liquidations_change"], "bad_debt_change": bd["bad_debt_change"],
         "reasons": {"liquidations_change": bl["reasons"].get("liquidations_change"),
                     "bad_debt_change": bd["reasons"].get("bad_debt_change")}},
        {"share_of_bound_liquidations": bl["share_of_bound_liquidations"],
         "share_of_bound_bad_debt": bd["share_of_bound_bad_debt"],
         "reasons": {"share_of_bound_liquidations": bl["reasons"].get("share_of_bound_liquidations"),
                     "share_of_bound_bad_debt": bd["reasons"].get("share_of_bound_bad_debt")}},
    )
    comparison["bound_vs_best_static"] = entry
    if why:
        reasons["bound_vs_best_static"] = why
    # frontier sweeps of the adaptive families (normal setting)
    for name in ADAPTIVE:
        scaled = {1.0: results[name]}
        for s in pol.frontier_scales:
            if s != 1.0:
                scaled[s] = run(scaled_path(paths[name], s, controls, deployable=name != "oracle_vol"))
        frontiers[name] = frontier_from_results(name, scaled)
        tick()
    coverage = {name: _coverage(name, paths[name], res, inp) for name, res in results.items()}
    sens: list[dict[str, Any]] = []
    if sensitivity and cfg.sensitivity.enabled:
        sens = _sensitivity(inp, cfg, ctx, paths["predictive"])
    tick()
    fitted = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in predictive.params().items()}
    fitted.update({k: predictive.fitted.get(k) for k in ("alpha", "beta", "evaluations", "n_positions_fit")})
    return AssetOutcome(
        inputs=inp, paths=paths, results=results, frozen=frozen, frontiers=frontiers, frontiers_frozen=frontiers_f,
        comparison=comparison, reasons=reasons, coverage=coverage, predictive_params=fitted, sensitivity=sens,
        seconds=time.perf_counter() - t0,
    )


def _sensitivity(inp: AssetInputs, cfg: RunConfig, ctx: Any, predictive_path: Any) -> list[dict[str, Any]]:
    """One row per varied assumption value: the predictive policy (parameters from the base fit) against
    the static frontier recomputed under that assumption."""
    from backtest.factory import make_policy
    from backtest.frontier import compare, frontier_from_results
    from backtest.population import generate_population
    from backtest.simulation import run_backtest

    rows = []
    levels = list(cfg.policies.static_levels)
    static_paths = {lv: make_policy(static_name(lv)).path(ctx) for lv in levels}
    base = {"assumption": "base", "value": None}
    variants: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [(base, {}, {})]
    for path, values in cfg.sensitivity.vary.items():
        section, _, key = path.partition(".")
        for v in values:
            row = {"assumption": path, "value": v}
            variants.append((row, {key: v} if section == "population" else {}, {key: v} if section == "backtest" else {}))
    for row, pov, bov in variants:
        pop = generate_population(len(inp.bars), build_population_config(cfg, pov),
                                  volume=inp.bars["volume"].to_numpy(dtype=float))
        bt = build_backtest_config(cfg, bov)
        st = {lv: run_backtest(inp.bars, p, pop, bt, start=inp.cut) for lv, p in static_paths.items()}
        front = frontier_from_results("static", st)
        res = run_backtest(inp.bars, predictive_path, pop, bt, start=inp.cut)
        c = compare(res, front)
        rows.append({"asset": inp.asset, **row, "liquidations": int(res.liquidations), "bad_debt": float(res.bad_debt),
                     "avg_collateral": float(res.avg_collateral),
                     "liquidations_change": finite_or_none(c["liquidations_change"]),
                     "bad_debt_change": finite_or_none(c["bad_debt_change"]), "note": c.get("reason")})
    return rows


def check_policy_settings(cfg: RunConfig) -> None:
    """Build every configured policy once (cheap), so a bad setting fails before any work."""
    import inspect

    from backtest.factory import make_policy
    from backtest.fit import fit_predictive
    from margin.predictive import is_increase_cap

    pol = cfg.policies
    for name in ("ewma_ccp", "garch_fhs", "oracle_vol"):
        try:
            make_policy(name, **getattr(pol, name))
        except ValueError as exc:
            raise ValueError(f"policies.{name}: {exc}") from None
    params = inspect.signature(fit_predictive).parameters
    allowed = {k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(pol.predictive) - allowed)
    if unknown:
        raise ValueError(f"policies.predictive: unknown key(s) {unknown}; known: {sorted(allowed)}")
    cap = pol.predictive.get("max_im_increase_5d")
    if cap is not None and cap != "ewma_ccp" and not is_increase_cap(cap):
        raise ValueError(f"policies.predictive.max_im_increase_5d must be a fraction > 0 or 'ewma_ccp', got {cap!r}")
    bound = {k: v for k, v in pol.bound.items() if k != "grid"}
    try:
        make_policy("bound_liquidations", population=None, **bound)
    except ValueError as exc:
        raise ValueError(f"policies.bound: {exc}") from None


def _evaluate_task(task: tuple[AssetInputs, RunConfig, bool]) -> AssetOutcome:
    """Executor entry point (module level so that it pickles): one asset's backtests, no MLflow."""
    inp, cfg, sens = task
    return evaluate_asset(inp, cfg, sensitivity=sens)


def evaluate_assets(
    cfg: RunConfig, inputs: Mapping[str, AssetInputs], *, progress: Progress | None = None
) -> dict[str, AssetOutcome]:
    """Evaluate every asset, in parallel through ``volmargin.executor`` when ``training.executor.workers``
    > 1 (workers compute and return; only the driver writes files and MLflow). Ordered as ``cfg.datasets``."""
    from volmargin.executor import TaskError, make_executor

    sens_assets = set(cfg.sensitivity.assets or [inputs[cfg.datasets[0]].asset])
    ex = cfg.training.executor
    done: dict[str, AssetOutcome] = {}
    if ex.workers > 1 and len(cfg.datasets) > 1:
        executor = make_executor(ex.backend, ex.workers, ex.address)
        tasks = [(inputs[ds], cfg, inputs[ds].asset in sens_assets) for ds in cfg.datasets]
        if progress:
            progress("backtests (assets, in parallel)", 0, len(tasks))
        try:
            for i, res in executor.map_unordered(_evaluate_task, tasks):
                done[cfg.datasets[i]] = res
                log.info("%s evaluated in %.1fs", res.inputs.asset, res.seconds)
                if progress:
                    progress("backtests (assets, in parallel)", len(done), len(tasks))
        except TaskError as exc:
            if isinstance(exc.__cause__, ValueError | KeyError | TypeError | FileNotFoundError):
                raise exc.__cause__ from None
            raise
    else:
        for ds in cfg.datasets:
            inp = inputs[ds]
            done[ds] = evaluate_asset(inp, cfg, sensitivity=inp.asset in sens_assets, progress=progress)
            log.info("%s evaluated in %.1fs", inp.asset, done[ds].seconds)
    return {ds: done[ds] for ds in cfg.datasets}
