"""The stress suite of configs/stress.yaml: scenarios × policies, contagion across venues, reverse stress.

:func:`load_settings` validates the YAML mapping (errors name the field and the value); :func:`run_suite`
returns the content of ``stress.json``::

    {"scenarios": {<scenario>: {"kind", "meta", "budget", "policies": {<policy>: {cascade_depth,
      liquidated_notional, impact_from_liquidations, bad_debt, fund_min, cover2_ok, self_inflicted_share,
      details, budget}}, "ranking"}},
     "reverse_stress": {<policy>: {"shock_size", ...}}, "headline": {...}, "settings": {...}}

plus the per-bar series for the report (``series``, not part of the JSON). Every policy of a scenario is
brought to the capital budget (``budget.collateral``, an average collateral) on the bars before its window
(:mod:`stress.budget`); its ``budget`` entry records the pre-window average collateral it locks. A policy's
rank in a scenario orders by liquidated notional, then bad debt (less is better): the policy that amplifies
the cascade least.

The runs are independent tasks (:func:`build_task`, :func:`run_task`: module-level functions of picklable
arguments) handed to a ``map_fn``: one after the other here by default; ``volmargin stress --workers N`` or
``--ray-address`` passes volmargin's executor (local processes or Ray). This stage never imports volmargin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from backtest.population import PopulationConfig
from backtest.simulation import BacktestConfig
from data_pipelines.pipeline import prepare_dataset
from margin.controls import Controls
from margin.params import LiquidationSettings
from margin.policies import PolicyContext
from stress.agents import AgentConfig
from stress.budget import BudgetSettings, collateral_spread, config_section
from stress.cascade import CascadeConfig
from stress.compare import (
    PolicySpec,
    build_policy,
    forecast_for,
    reverse_stress,
    self_inflicted,
    stress_policy,
)
from stress.impact import ImpactModel, Oracle
from stress.scenarios import (
    Scenario,
    calm_start,
    joint_prices,
    largest_daily_crashes,
    shock_drop,
    vol_multiply,
    worst_intraday_drop,
)
from stress.venues import VenueConfig, run_contagion

log = logging.getLogger(__name__)

__all__ = ["StressSettings", "load_settings", "run_suite", "build_scenarios", "build_task", "run_task",
           "contagion_policy", "sequential_map", "MapFn"]

Progress = Callable[[str, int, int], None]


def _sub(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, Mapping):
        raise ValueError(f"stress config: {key} must be a mapping, got {v!r}")
    return dict(v)


@dataclass(frozen=True)
class StressSettings:
    """Validated configs/stress.yaml (see docs/stress.md for every key)."""

    name: str
    population: PopulationConfig
    cascade: CascadeConfig
    controls: Controls
    policies: tuple[PolicySpec, ...]
    scenarios: dict[str, Any]
    reverse: dict[str, Any]
    venues: VenueConfig
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    feedback_rounds: int = 1
    raw: dict[str, Any] = field(default_factory=dict)


def load_settings(d: Mapping[str, Any]) -> StressSettings:
    """Build :class:`StressSettings` from the YAML mapping."""
    if not isinstance(d, Mapping):
        raise ValueError(f"stress config must be a mapping, got {type(d).__name__}")
    known = {"name", "population", "backtest", "liquidation", "controls", "impact", "oracle", "agents", "max_waves",
             "feedback_rounds", "policies", "scenarios", "reverse", "venues", "tracking", "budget"}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"stress config has unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    liq = config_section(LiquidationSettings, _sub(d, "liquidation"), "liquidation")
    bt = config_section(BacktestConfig, {**_sub(d, "backtest"), "liquidation": liq}, "backtest")
    ccfg = CascadeConfig(backtest=bt, impact=config_section(ImpactModel, _sub(d, "impact"), "impact"),
                         oracle=config_section(Oracle, _sub(d, "oracle"), "oracle"),
                         agents=config_section(AgentConfig, _sub(d, "agents"), "agents"),
                         max_waves=int(d.get("max_waves", 100)))
    pols = d.get("policies")
    if not isinstance(pols, list) or not pols:
        raise ValueError(f"stress config: policies must be a non-empty list, got {pols!r}")
    specs = tuple(PolicySpec.from_dict(p, i) for i, p in enumerate(pols))
    names = [s.name for s in specs]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"stress config: policies has duplicate names {dup}")
    fb = d.get("feedback_rounds", 1)
    if not isinstance(fb, int) or fb < 0:
        raise ValueError(f"stress config: feedback_rounds must be an integer >= 0, got {fb!r}")
    budget = BudgetSettings.from_dict(d.get("budget"))
    scenarios = _sub(d, "scenarios")
    for g, v in scenarios.items():
        cb = v.get("calibration_bars") if isinstance(v, Mapping) else None
        if cb is not None and (isinstance(cb, bool) or not isinstance(cb, int) or cb < 10):
            raise ValueError(f"stress config: scenarios.{g}.calibration_bars must be an integer >= 10, got {cb!r}")
    venues = _sub(d, "venues")
    if "liquidation" in venues:
        venues["liquidation"] = config_section(LiquidationSettings, venues["liquidation"], "venues.liquidation")
    return StressSettings(
        name=str(d.get("name", "stress")),
        population=PopulationConfig.from_dict(_sub(d, "population")),
        cascade=ccfg, controls=Controls.from_dict(_sub(d, "controls")), policies=specs,
        scenarios=scenarios, reverse=_sub(d, "reverse"), venues=config_section(VenueConfig, venues, "venues"),
        budget=budget, feedback_rounds=fb, raw=dict(d),
    )


#: keys of a scenario group that are not the scenario builder's: population overrides, the budget's calibration
GROUP_KEYS = ("population", "calibration_bars")


def build_scenarios(sc: Mapping[str, Any]) -> tuple[list[tuple[Scenario, str]], dict[str, Scenario]]:
    """Single-market scenarios (each with its group's name: ``daily_crashes``, ``intraday``, ``hypothetical``)
    and the named bases for reverse stress."""
    out: list[tuple[Scenario, str]] = []
    bases: dict[str, Scenario] = {}
    if "daily_crashes" in sc:
        c = {k: v for k, v in sc["daily_crashes"].items() if k not in GROUP_KEYS}
        bars = prepare_dataset(c.pop("source", "bundled:bitstamp/BTC")).bars
        for s in largest_daily_crashes(bars, **c):
            out.append((s, "daily_crashes"))
    if "intraday" in sc:
        c = {k: v for k, v in sc["intraday"].items() if k not in GROUP_KEYS}
        bars = prepare_dataset(c.pop("source", "bundled:tsd/BTC-15m")).bars
        out.append((worst_intraday_drop(bars, **c), "intraday"))
    if "hypothetical" in sc:
        c = {k: v for k, v in sc["hypothetical"].items() if k not in GROUP_KEYS}
        bars = prepare_dataset(c.pop("source", "bundled:tsd/BTC-15m")).bars
        lead, tail = int(c.pop("lead", 192)), int(c.pop("tail", 96))
        i = calm_start(bars, lead=lead, tail=tail)
        base = Scenario(name="calm_base", kind="hypothetical", bars=bars.iloc[: i + tail + 1][["open", "high", "low", "close", "volume"]],
                        start=i - lead, shock=i, end=i + tail, meta={"time": str(bars.index[i])})
        bases["hypothetical"] = base
        drop = c.pop("drop", None)
        if drop:
            out.append((shock_drop(base, float(drop["size"]), int(drop["bars"]),
                                   name=f"drop_{round(100 * float(drop['size']))}pct_{int(drop['bars'])}bars"), "hypothetical"))
        vf = c.pop("vol_factor", None)
        if vf:
            out.append((vol_multiply(base, float(vf)), "hypothetical"))
        if c:
            raise ValueError(f"stress config: scenarios.hypothetical has unknown keys {sorted(c)}")
    return out, bases


@dataclass(frozen=True)
class _ContagionCase:
    """One contagion case: the joint window (the policies' rates are computed on it per task)."""

    name: str
    meta: dict[str, Any]
    window: pd.DataFrame
    k0: int
    venues: VenueConfig


def _contagion_cases(sc: Mapping[str, Any], s: StressSettings) -> tuple[list[_ContagionCase], pd.DataFrame,
                                                                        pd.DataFrame]:
    c = dict(sc)
    btc = prepare_dataset(c.pop("btc", "bundled:bitstamp/BTC")).bars
    eth = prepare_dataset(c.pop("eth", "bundled:coinbase-pro/ETH")).bars
    lead, tail = int(c.pop("lead", 30)), int(c.pop("tail", 10))
    cases = c.pop("cases", {})
    if c:
        raise ValueError(f"stress config: scenarios.contagion has unknown keys {sorted(c)}")
    joint = pd.concat({"BTC": btc["close"], "ETH": eth["close"]}, axis=1, join="inner")
    r = joint["BTC"].pct_change().to_numpy().copy()
    r[: max(lead, 120)] = np.inf
    r[len(r) - tail:] = np.inf
    shock = int(np.argmin(r))
    out: list[_ContagionCase] = []
    for case, spec in cases.items():
        spec = dict(spec or {})
        outage = spec.pop("bridge_outage", False)
        pr = joint_prices(joint["BTC"], joint["ETH"], shock, **spec)
        window = pr.iloc[shock - lead: shock + tail + 1]
        out.append(_ContagionCase(name=f"contagion_{case}", window=window, k0=lead,
                                  meta={"shock": str(joint.index[shock]), **spec, "bridge_outage": bool(outage)},
                                  venues=replace(s.venues, bridge_outage_bar=lead if outage else None)))
    # only the bars up to the last window are needed by the tasks
    last = max((cs.window.index[-1] for cs in out), default=joint.index[-1])
    return out, btc.loc[btc.index <= last], eth.loc[eth.index <= last]


def contagion_policy(case: _ContagionCase, btc: pd.DataFrame, eth: pd.DataFrame, policy: Any,
                     s: StressSettings) -> dict[str, Any]:
    """One policy on one contagion case: its rates on each asset's bars, the venues' run and the frozen one."""
    window, k0 = case.window, case.k0
    rates = {}
    for a, src in (("BTC", btc), ("ETH", eth)):
        b = src.loc[src.index <= window.index[-1]].copy()
        b.loc[window.index, "close"] = window[a].to_numpy()
        k = int(b.index.get_indexer([window.index[0]])[0])
        fc, _ = forecast_for(b, k)
        path = policy.path(PolicyContext(bars=b, forecast=fc, controls=s.controls))
        pos = b.index.get_indexer(window.index)
        rates[a] = (path.im_rate[pos], path.mm_rate[pos])
    res = run_contagion(window, rates, case.venues, s.cascade.impact)
    frozen = {a: (np.where(np.arange(len(window)) >= k0, im[k0 - 1], im),
                  np.where(np.arange(len(window)) >= k0, mm[k0 - 1], mm)) for a, (im, mm) in rates.items()}
    res_f = run_contagion(window, frozen, case.venues, s.cascade.impact)
    liq, liq_f = res.liquidated_notional, res_f.liquidated_notional
    assert res.liquidated_by_trader is not None and res_f.liquidated_by_trader is not None
    share = self_inflicted(res.liquidated_by_trader, res_f.liquidated_by_trader)
    return {
        "cascade_depth": res.cascade_depth, "liquidated_notional": liq,
        "impact_from_liquidations": res.impact_from_liquidations, "bad_debt": res.bad_debt,
        "fund_min": res.fund_min, "cover2_ok": bool(res.cover2_fund >= res.cover2_need),
        "self_inflicted_share": share,
        "details": {"perp_liquidated_notional": res.perp_liquidated_notional,
                    "lending_liquidated_notional": res.lending_liquidated_notional,
                    "perp_bad_debt": res.perp_bad_debt, "lending_bad_debt": res.lending_bad_debt,
                    "liquidated_notional_frozen": liq_f, "self_inflicted_notional": share * liq,
                    "net_response_share": (liq - liq_f) / liq if liq > 0 else 0.0,
                    "cover2_need": res.cover2_need, "conservation": res.conservation()},
        "series": res.series,
    }


def _ranking(per_policy: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted(per_policy, key=lambda p: (per_policy[p]["liquidated_notional"], per_policy[p]["bad_debt"], p))


def _group(s: StressSettings, group: str) -> tuple[PopulationConfig, int]:
    """The population and the budget's calibration length of a scenario group (its overrides applied)."""
    g = s.scenarios.get(group) or {}
    ov = dict(g.get("population") or {})
    return (s.population.with_(**ov) if ov else s.population), int(g.get("calibration_bars")
                                                                    or s.budget.calibration_bars)


def _budget_summary(s: StressSettings, records: Mapping[str, Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    first = next(iter(records.values()))
    return {"target": s.budget.collateral, "tol": s.budget.tol, "calibration": first["calibration"],
            "pre_window_avg_collateral": {p: r["pre_window_avg_collateral"] for p, r in records.items()},
            "spread": collateral_spread(list(records.values())), **extra}


# ------------------------------------------------------------------------------------------------- tasks
#: ``map_fn(fn, tasks) -> [fn(task) for task in tasks]`` in task order (an executor's ``map``); ``fn`` is a
#: module-level function and the tasks are picklable, so the tasks can run in other processes
MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def sequential_map(progress: Progress | None = None) -> MapFn:
    """The default ``map_fn``: the tasks one after the other in this process, with a progress bar per call
    (``policies`` for the builds, ``stress runs`` for the rest)."""
    def map_fn(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        label = "policies" if fn is build_task else "stress runs"
        out = []
        for i, t in enumerate(tasks):
            out.append(fn(t))
            if progress:
                progress(label, i + 1, len(tasks))
        return out

    return map_fn


def _one_thread(fn: Callable[[], Any]) -> Any:
    # BLAS on one thread in every task, wherever it runs: a GARCH fit with two BLAS threads differs from a
    # one-thread fit in the fifth significant digit, so the driver, a local pool and Ray give the same numbers
    with threadpool_limits(1):
        return fn()


def build_task(task: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
    """Task: :func:`stress.compare.build_policy` of one policy on the bars before one window."""
    spec, scn, pop_cfg, ccfg, controls, budget, n_cal = task
    return _one_thread(lambda: build_policy(spec, scn, pop_cfg, ccfg, controls, budget, n_cal))


def run_task(task: tuple[Any, ...]) -> dict[str, Any]:
    """Task: one policy on one scenario (``scenario``), one contagion case (``contagion``) or its reverse stress
    (``reverse``)."""
    kind, *args = task
    if kind == "scenario":
        scn, pol, pop_cfg, ccfg, controls, rounds = args
        return _one_thread(lambda: stress_policy(scn, pol, pop_cfg, ccfg, controls, rounds))
    if kind == "contagion":
        case, btc, eth, pol, s = args
        return _one_thread(lambda: contagion_policy(case, btc, eth, pol, s))
    if kind == "reverse":
        base, pol, pop_cfg, ccfg, controls, rv = args
        return _one_thread(lambda: reverse_stress(base, pol, pop_cfg, ccfg, controls, **rv))
    raise ValueError(f"unknown stress task kind {kind!r}")


def run_suite(s: StressSettings, progress: Progress | None = None, map_fn: MapFn | None = None) -> dict[str, Any]:
    """Run every scenario for every policy (each at the capital budget before the window), the contagion cases
    and the reverse stress test.

    The work is two lists of independent tasks handed to ``map_fn`` (default: one after the other in this
    process): the policies, built once per policy and bars before a window (:func:`build_task`; the scenarios
    of a group and the reverse stress share them), then every scenario × policy, contagion case × policy and
    reverse stress per policy (:func:`run_task`). Each task runs with one BLAS thread, so any ``map_fn`` that
    returns ``fn(task)`` in task order gives the same numbers.
    """
    if map_fn is None:
        map_fn = sequential_map(progress)

    scen, bases = build_scenarios({k: v for k, v in s.scenarios.items() if k != "contagion"})
    rv = dict(s.reverse)
    base_name = str(rv.pop("base", "hypothetical"))
    base = None
    if s.reverse:
        base = bases.get(base_name)
        if base is None:
            raise ValueError(f"stress config: reverse.base must name a scenario group with a base (hypothetical), "
                             f"got {s.reverse.get('base')!r}")
    if "contagion" in s.scenarios and not scen:
        raise ValueError("stress config: scenarios.contagion uses the policies of the first single-market "
                         "scenario (daily_crashes); configure one")

    # 1. the policies: once per (policy, bars before the window), the first scenario with those bars builds them
    keys: dict[tuple[str, str, str], int] = {}
    builds: list[tuple[Any, ...]] = []

    def key_of(spec: PolicySpec, scn: Scenario, group: str) -> int:
        k = (spec.name, str(scn.bars.index[0]), str(scn.bars.index[scn.start]))
        if k not in keys:
            pop_cfg, n_cal = _group(s, group)
            keys[k] = len(builds)
            builds.append((spec, scn, pop_cfg, s.cascade, s.controls, s.budget, n_cal))
        return keys[k]

    scen_keys = [[key_of(spec, scn, group) for spec in s.policies] for scn, group in scen]
    rev_keys = [key_of(spec, base, base_name) for spec in s.policies] if base is not None else []
    built = map_fn(build_task, builds)

    # 2. every scenario × policy, contagion case × policy and reverse stress per policy
    tasks: list[tuple[Any, ...]] = []
    for (scn, group), ks in zip(scen, scen_keys, strict=True):
        pop_cfg, _ = _group(s, group)
        tasks += [("scenario", scn, built[k][0], pop_cfg, s.cascade, s.controls, s.feedback_rounds) for k in ks]
    cases: list[_ContagionCase] = []
    if "contagion" in s.scenarios:
        cases, btc, eth = _contagion_cases(s.scenarios["contagion"], s)
        tasks += [("contagion", case, btc, eth, built[k][0], s) for case in cases for k in scen_keys[0]]
    if base is not None:
        pop_cfg, _ = _group(s, base_name)
        tasks += [("reverse", base, built[k][0], pop_cfg, s.cascade, s.controls, rv) for k in rev_keys]
    done = iter(map_fn(run_task, tasks))

    names = [spec.name for spec in s.policies]
    results: dict[str, Any] = {}
    for (scn, _group_name), ks in zip(scen, scen_keys, strict=True):
        recs = {p: built[k][1] for p, k in zip(names, ks, strict=True)}
        per = {p: {**next(done), "budget": recs[p]} for p in names}
        results[scn.name] = {"kind": scn.kind, "meta": scn.meta, "budget": _budget_summary(s, recs),
                             "policies": per, "ranking": _ranking(per)}
    if cases:
        name0 = scen[0][0].name
        recs0 = {p: built[k][1] for p, k in zip(names, scen_keys[0], strict=True)}
        for case in cases:
            per = {p: {**next(done), "budget": {**recs0[p], "calibrated_on": name0}} for p in names}
            results[case.name] = {"kind": "contagion", "meta": case.meta, "policies": per,
                                  "budget": _budget_summary(s, recs0, calibrated_on=name0), "ranking": _ranking(per)}
    reverse = {p: next(done) for p in names} if base is not None else {}
    return {"scenarios": results, "reverse_stress": reverse,
            "headline": headline(results, reverse, s.budget.collateral)}


def headline(results: Mapping[str, Any], reverse: Mapping[str, Any], budget: float | None = None) -> dict[str, Any]:
    """Which policy amplifies cascades least: the best mean rank over the scenarios (ties: total liquidated
    notional), with its wins, its liquidated notional against the others' and the reverse-stress sizes; with a
    ``budget``, the capital every policy was brought to before the windows (and the largest spread)."""
    wins: dict[str, int] = {}
    ranks: dict[str, list[int]] = {}
    total: dict[str, float] = {}
    bad: dict[str, float] = {}
    self_inf: dict[str, list[float]] = {}
    coll: dict[str, list[float]] = {}
    spread = 0.0
    for r in results.values():
        if r["ranking"]:
            wins[r["ranking"][0]] = wins.get(r["ranking"][0], 0) + 1
        for i, p in enumerate(r["ranking"]):
            ranks.setdefault(p, []).append(i + 1)
        for p, m in r["policies"].items():
            total[p] = total.get(p, 0.0) + float(m["liquidated_notional"])
            bad[p] = bad.get(p, 0.0) + float(m["bad_debt"])
            self_inf.setdefault(p, []).append(float(m["self_inflicted_share"]))
            if m.get("budget"):
                coll.setdefault(p, []).append(float(m["budget"]["pre_window_avg_collateral"]))
        if r.get("budget"):
            spread = max(spread, float(r["budget"]["spread"]))
    if not total:
        return {}
    mean_rank = {p: float(np.mean(v)) for p, v in ranks.items()}
    best = min(total, key=lambda p: (mean_rank[p], total[p]))
    others = ", ".join(f"{p} {mean_rank[p]:.2f} ({total[p]:,.0f} USD)" for p in sorted(total, key=lambda p: mean_rank[p])
                       if p != best)
    capital = ""
    if budget is not None and coll:
        lo = min(min(v) for v in coll.values())
        hi = max(max(v) for v in coll.values())
        capital = (f"At equal capital (every policy locks {100 * budget:.1f}% average collateral on the bars before "
                   f"each window: {100 * lo:.2f}-{100 * hi:.2f}%, at most {100 * spread:.2f} points apart within a "
                   "scenario), ")
    return {
        "least_amplifying": best,
        "mean_rank": mean_rank,
        "wins": wins,
        "total_liquidated_notional": total,
        "total_bad_debt": bad,
        "mean_self_inflicted_share": {p: float(np.mean(v)) for p, v in self_inf.items()},
        "reverse_stress_shock": {p: v.get("shock_size") for p, v in reverse.items()},
        "budget": {"target": budget, "max_spread": spread,
                   "mean_pre_window_avg_collateral": {p: float(np.mean(v)) for p, v in coll.items()}},
        "statement": (f"{capital}{best} amplifies cascades least: mean rank {mean_rank[best]:.2f} over "
                      f"{len(results)} scenarios, first in {wins.get(best, 0)}, {total[best]:,.0f} USD liquidated in "
                      f"all (others: {others})"),
    }
