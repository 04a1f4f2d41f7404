"""Backtests of one asset: the headline at capital budgets (backtest.headline), coverage tests, sensitivity.

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
from volmargin.run_inputs import AssetInputs

__all__ = [
    "VAR_POLICIES",
    "AssetOutcome",
    "build_controls",
    "build_population_config",
    "build_backtest_config",
    "headline_settings",
    "check_policy_settings",
    "horizon_breaches",
    "evaluate_asset",
    "evaluate_assets",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Policies whose margin is a VaR/ES quantile at a stated confidence: Basel traffic light applies.
VAR_POLICIES = ("ewma_ccp", "garch_fhs")


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
    """The backtests of one asset on its held-out bars.

    ``headline`` (:class:`backtest.headline.AssetHeadline`): every budget comparison, scored in the frozen
    setting (volume slippage off, so positions are independent and the bound holds). ``results``: the rival
    policies as configured (unscaled) in the normal setting (volume slippage, top-ups, fees, funding), for
    their coverage tests and the crash days; ``paths`` their margin paths.
    """

    inputs: AssetInputs
    paths: dict[str, Any]
    results: dict[str, Any]
    coverage: dict[str, dict[str, Any]]
    headline: Any
    sensitivity: list[dict[str, Any]]
    seconds: float


def headline_settings(cfg: RunConfig) -> Any:
    """``backtest.headline.HeadlineSettings`` from ``budgets``, ``bad_debt_tolerance`` and ``policies``."""
    from backtest.budgets import MmRule
    from backtest.headline import HeadlineSettings

    pol = cfg.policies
    sp = pol.static_pairs
    rules = tuple([MmRule("fraction", f) for f in sp.mm_fractions] + [MmRule("fixed", m) for m in sp.mm_fixed])
    pred = dict(pol.predictive)
    cap = pred.pop("max_im_increase_5d", None)
    fit_bars = pred.pop("fit_bars", None)
    return HeadlineSettings(budgets=tuple(cfg.budgets), bad_debt_tolerance=cfg.bad_debt_tolerance,
                            im_grid=tuple(sp.im), rules=rules, fit=pred, increase_cap=cap, fit_bars=fit_bars)


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



def evaluate_asset(
    inp: AssetInputs,
    cfg: RunConfig,
    *,
    population_overrides: Mapping[str, Any] | None = None,
    backtest_overrides: Mapping[str, Any] | None = None,
    sensitivity: bool = False,
    progress: Progress | None = None,
) -> AssetOutcome:
    """The headline at every budget, the rivals' coverage tests and (optionally) the sensitivity rows."""
    from backtest.factory import make_policy
    from backtest.headline import evaluate_headline
    from backtest.population import generate_population
    from backtest.simulation import run_backtest
    from margin.policies import PolicyContext

    t0 = time.perf_counter()
    controls = build_controls(cfg)
    ctx = PolicyContext(bars=inp.bars, forecast=inp.forecast, regime_probs=inp.regime_probs, cut=inp.cut,
                        controls=controls)
    population = generate_population(len(inp.bars), build_population_config(cfg, population_overrides),
                                     volume=inp.bars["volume"].to_numpy(dtype=float))
    bt = build_backtest_config(cfg, backtest_overrides)
    pol = cfg.policies
    paths = {
        "ewma_ccp": make_policy("ewma_ccp", **pol.ewma_ccp).path(ctx),
        "garch_fhs": make_policy("garch_fhs", **{"seed": cfg.seed, **pol.garch_fhs}).path(ctx),
        "oracle_vol": make_policy("oracle_vol", **pol.oracle_vol).path(ctx),
    }
    results = {name: run_backtest(inp.bars, p, population, bt, start=inp.cut) for name, p in paths.items()}
    coverage = {name: _coverage(name, paths[name], res, inp) for name, res in results.items()}
    settings = headline_settings(cfg)
    n_b = len(settings.budgets)
    done = 0

    def tick(_msg: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"budgets {inp.asset}", min(done, n_b), n_b)

    rivals = {k: v for k, v in paths.items() if k in ("ewma_ccp", "garch_fhs")}
    head = evaluate_headline(ctx, population, bt.frozen_copy(), rivals, settings, progress=tick)
    sens: list[dict[str, Any]] = []
    if sensitivity and cfg.sensitivity.enabled:
        sens = _sensitivity(inp, cfg, head)
    return AssetOutcome(inputs=inp, paths=paths, results=results, coverage=coverage, headline=head,
                        sensitivity=sens, seconds=time.perf_counter() - t0)


def _sensitivity(inp: AssetInputs, cfg: RunConfig, head: Any) -> list[dict[str, Any]]:
    """One row per varied assumption: the predictive policy fitted at the median budget (parameters from the
    base fit) and the static pair of the base's best MM rule at its collateral, both under the assumption
    (frozen setting, as the headline)."""
    from backtest.budgets import MmRule, StaticEnvelope, budget_key
    from backtest.population import generate_population
    from backtest.simulation import run_backtest

    budgets = sorted(cfg.budgets)
    key = budget_key(budgets[len(budgets) // 2])
    path = head.paths[key]["predictive"]
    base_static = head.budgets[key].get("best_static") or {}
    rule_s = str(base_static.get("mm_rule", "0.5×IM"))
    rule = (MmRule("fraction", float(rule_s.removesuffix("×IM"))) if rule_s.endswith("×IM")
            else MmRule("fixed", float(rule_s)))
    variants: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
        ({"assumption": "base", "value": None}, {}, {})]
    for dotted, values in cfg.sensitivity.vary.items():
        section, _, k = dotted.partition(".")
        for v in values:
            variants.append(({"assumption": dotted, "value": v}, {k: v} if section == "population" else {},
                             {k: v} if section == "backtest" else {}))
    rows = []
    for row, pov, bov in variants:
        pop = generate_population(len(inp.bars), build_population_config(cfg, pov),
                                  volume=inp.bars["volume"].to_numpy(dtype=float))
        bt = build_backtest_config(cfg, bov).frozen_copy()
        res = run_backtest(inp.bars, path, pop, bt, start=inp.cut)
        env = StaticEnvelope(inp.bars, pop, bt, [rule], tuple(cfg.policies.static_pairs.im), start=inp.cut)
        st = env.solve(rule, float(res.avg_collateral))
        rows.append({"asset": inp.asset, "budget": key, **row, "liquidations": int(res.liquidations),
                     "bad_debt": float(res.bad_debt), "avg_collateral": float(res.avg_collateral),
                     "static_pair": None if st is None else f"IM {100 * st.im:.2f}%, MM {100 * st.mm:.2f}%",
                     "static_liquidations": None if st is None else st.liquidations,
                     "static_bad_debt": None if st is None else st.bad_debt})
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
    allowed = {k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY} - {
        "target_avg_collateral", "target_avg_im", "bad_debt_allowance", "start_from", "start"} | {"fit_bars"}
    unknown = sorted(set(pol.predictive) - allowed)
    if unknown:
        raise ValueError(f"policies.predictive: unknown key(s) {unknown}; known: {sorted(allowed)}")
    cap = pol.predictive.get("max_im_increase_5d")
    if cap is not None and cap != "ewma_ccp" and not is_increase_cap(cap):
        raise ValueError(f"policies.predictive.max_im_increase_5d must be a fraction > 0 or 'ewma_ccp', got {cap!r}")
    headline_settings(cfg)


def _evaluate_task(task: tuple[Any, ...]) -> Any:
    """Executor entry point (module level so that it pickles): one asset's backtests, or (a task tagged
    ``"portfolio"``) the portfolio comparison; no MLflow."""
    if isinstance(task[0], str) and task[0] == "portfolio":
        from volmargin.run_portfolio import evaluate_portfolio

        _, inputs, cfg = task
        return evaluate_portfolio(cfg, inputs)
    inp, cfg, sens = task
    return evaluate_asset(inp, cfg, sensitivity=sens)


def evaluate_assets(
    cfg: RunConfig, inputs: Mapping[str, AssetInputs], *, progress: Progress | None = None
) -> tuple[dict[str, AssetOutcome], Any]:
    """Evaluate every asset, in parallel through ``volmargin.executor`` when ``training.executor.workers``
    > 1 (workers compute and return; only the driver writes files and MLflow). Ordered as ``cfg.datasets``.

    The portfolio comparison (:func:`volmargin.run_portfolio.evaluate_portfolio`) runs too, as the last task of
    the same pool (so it fills the worker that the per-asset tasks leave idle). Returns
    ``(outcomes, portfolio_outcome)``.
    """
    from volmargin.executor import TaskError, make_executor
    from volmargin.run_portfolio import evaluate_portfolio

    sens_assets = set(cfg.sensitivity.assets or [inputs[cfg.datasets[0]].asset])
    ex = cfg.training.executor
    done: dict[str, AssetOutcome] = {}
    pf: Any = None
    if ex.workers > 1 and len(cfg.datasets) > 1:
        executor = make_executor(ex.backend, ex.workers, ex.address)
        tasks: list[tuple[Any, ...]] = [(inputs[ds], cfg, inputs[ds].asset in sens_assets) for ds in cfg.datasets]
        with_pf = cfg.portfolio.enabled
        if with_pf:
            tasks.append(("portfolio", dict(inputs), cfg))
        stage = "backtests (assets and portfolio, in parallel)" if with_pf else "backtests (assets, in parallel)"
        if progress:
            progress(stage, 0, len(tasks))
        n_done = 0
        try:
            for i, res in executor.map_unordered(_evaluate_task, tasks):
                n_done += 1
                if i == len(cfg.datasets):
                    pf = res
                    log.info("portfolio comparison done in %.1fs", res.seconds)
                else:
                    done[cfg.datasets[i]] = res
                    log.info("%s evaluated in %.1fs", res.inputs.asset, res.seconds)
                if progress:
                    progress(stage, n_done, len(tasks))
        except TaskError as exc:
            if isinstance(exc.__cause__, ValueError | KeyError | TypeError | FileNotFoundError):
                raise exc.__cause__ from None
            raise
    else:
        for ds in cfg.datasets:
            inp = inputs[ds]
            done[ds] = evaluate_asset(inp, cfg, sensitivity=inp.asset in sens_assets, progress=progress)
            log.info("%s evaluated in %.1fs", inp.asset, done[ds].seconds)
    if pf is None:  # sequential, or disabled (nothing to compute)
        pf = evaluate_portfolio(cfg, inputs, progress=progress)
    return {ds: done[ds] for ds in cfg.datasets}, pf
