"""The portfolio-margin comparison of the end-to-end job (issue 12): multi-instrument accounts on the run's assets.

The same fair comparison as the isolated headline (:mod:`backtest.portfolio_headline`): at each budget (average
collateral) the best static grid scale, the clairvoyant bound (per account-cycle survive-or-liquidate knapsack, no
deployable grid policy can beat it) and the ``dynamic_grid`` fitted before the cut on the pinned champions'
held-out forecasts and the regime probabilities (the inputs the isolated headline used), compared at its own
held-out collateral; the ablation runs the fitted mapping on a constant variance.

``summary.json``::

    "portfolio": {"<b>": {"best_static": {"spot_range", "mm_fraction", "liquidations", "bad_debt", "avg_collateral"},
                          "bound": {"liquidations", "bad_debt", "avg_collateral"},
                          "dynamic_grid": {"liquidations", "bad_debt", "avg_collateral", "share_of_bound",
                                           "best_static_here", "bound_here", "reason"?},
                          "ablation": {"forecast" | "constant_variance": {"liquidations", "bad_debt",
                                                                          "avg_collateral"}},
                          "checks": {"half_of_bound", "met", "short_by"}}}

or ``{"skipped": "<reason>"}`` (section disabled, fewer than two daily assets sharing a cut, too few shared bars).
``details.json`` gets the assets, the cut, the population and the fitted parameters under ``portfolio``, and the
fitted grid path of the median budget is written to ``<out>/portfolio_grid.json`` (``volmargin margin
--params-from <out> --as-of T`` reads it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from volmargin.config import RunConfig
from volmargin.report import TARGET_SHARE, finite_or_none
from volmargin.run_inputs import AssetInputs

__all__ = ["PortfolioOutcome", "select_assets", "portfolio_checks", "portfolio_headline_numbers",
           "evaluate_portfolio"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class PortfolioOutcome:
    """What the portfolio step returns to the job.

    ``summary``: ``summary.portfolio`` (budget keys, or ``{"skipped": reason}``); ``details``: ``details.portfolio``;
    ``path``: the fitted ``dynamic_grid`` :class:`margin.dynamic_grid.GridPath` of budget ``budget`` (median), or
    ``None`` when skipped.
    """

    summary: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    path: Any = None
    budget: str | None = None
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return "skipped" in self.summary


def _bar_step(bars: pd.DataFrame) -> pd.Timedelta | None:
    step = pd.Series(pd.DatetimeIndex(bars.index)).diff().median()
    return step if isinstance(step, pd.Timedelta) else None


def select_assets(cfg: RunConfig, inputs: Mapping[str, AssetInputs]) -> tuple[list[AssetInputs], str | None]:
    """The assets of the comparison: ``portfolio.assets`` when given, else every daily asset of the run sharing the
    cut that most of them share (ties: the first in ``datasets``). Returns ``(assets, None)`` or ``([], reason)``."""
    by_label = {inp.asset: inp for inp in inputs.values()}
    names = cfg.portfolio.assets
    if names is not None:
        missing = [a for a in names if a not in by_label]
        if missing:
            raise ValueError(f"portfolio.assets: unknown asset(s) {missing}; the run's assets are {sorted(by_label)}")
        chosen = [by_label[a] for a in names]
        steps = {a.asset: _bar_step(a.bars) for a in chosen}
        if len(set(steps.values())) > 1:
            return [], "portfolio.assets have different bar intervals: " + ", ".join(f"{a} {s}" for a, s in steps.items())
        return chosen, None
    daily = [inp for inp in inputs.values() if _bar_step(inp.bars) == DAY]
    groups: dict[pd.Timestamp, list[AssetInputs]] = {}
    for inp in daily:
        groups.setdefault(inp.cut, []).append(inp)
    best = max(groups.values(), key=len, default=[])
    if len(best) < 2:
        return [], (f"fewer than 2 daily assets sharing a cut (daily: {[a.asset for a in daily] or 'none'}); "
                    "a portfolio needs at least two underlyings")
    return best, None


def portfolio_checks(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The target at one budget: ``dynamic_grid`` captures at least half of the bound's liquidation cut against the
    best static grid scale (at its own collateral) with bad debt no larger.

    ``half_of_bound``: True / False, or None when the share is undefined for want of a cut (the bound cuts nothing
    against the best static there, or no static grid locks that collateral); a share undefined because the
    dynamic grid leaves more bad debt than the best static is a failure. ``short_by``: ``0.5 - share`` when short.
    """
    dg = entry.get("dynamic_grid") or {}
    share = finite_or_none(dg.get("share_of_bound"))
    reason = str(dg.get("reason") or "")
    if share is None:
        passed = False if "bad debt" in reason else None
        return {"half_of_bound": passed, "met": False, "short_by": None}
    return {"half_of_bound": share >= TARGET_SHARE, "met": share >= TARGET_SHARE,
            "short_by": max(0.0, TARGET_SHARE - share) if share < TARGET_SHARE else None}


def portfolio_headline_numbers(portfolio: Mapping[str, Any]) -> dict[str, Any]:
    """Aggregates of ``summary.portfolio`` for ``summary.headline`` (new keys, prefixed ``portfolio_``)."""
    if "skipped" in portfolio:
        return {}
    shares: list[float] = []
    undefined = met = 0
    for e in portfolio.values():
        sh = finite_or_none((e.get("dynamic_grid") or {}).get("share_of_bound"))
        if sh is None:
            undefined += 1
        else:
            shares.append(sh)
        met += int(bool((e.get("checks") or {}).get("met")))
    return {"portfolio_share_of_bound_min": min(shares) if shares else None,
            "portfolio_share_of_bound_mean": float(np.mean(shares)) if shares else None,
            "portfolio_budgets_met": met, "portfolio_budgets_total": len(portfolio),
            "portfolio_shares_undefined": undefined}


def _entry(e: Mapping[str, Any]) -> dict[str, Any]:
    """A budget entry with the contract's keys first and the target's checks."""
    dg = dict(e["dynamic_grid"])
    first = ("liquidations", "bad_debt", "avg_collateral", "share_of_bound")
    out = {"best_static": e.get("best_static"), "bound": e.get("bound"),
           "dynamic_grid": {**{k: dg.get(k) for k in first}, **{k: v for k, v in dg.items() if k not in first}},
           "ablation": e.get("ablation")}
    out["checks"] = portfolio_checks(out)
    return out


def evaluate_portfolio(cfg: RunConfig, inputs: Mapping[str, AssetInputs], *,
                       progress: Progress | None = None) -> PortfolioOutcome:
    """The comparison at each budget on the selected assets (see the module docstring); skips with a reason."""
    sec = cfg.portfolio
    if not sec.enabled:
        return PortfolioOutcome({"skipped": "portfolio.enabled is false"})
    chosen, why = select_assets(cfg, inputs)
    if why is not None:
        log.info("portfolio comparison skipped: %s", why)
        return PortfolioOutcome({"skipped": why})
    from backtest.budgets import budget_key
    from backtest.portfolio_headline import common_closes, portfolio_headline

    t0 = time.perf_counter()
    cut = chosen[0].cut
    bars = {a.asset: a.bars for a in chosen}
    try:
        common_closes(bars)
    except ValueError as exc:
        return PortfolioOutcome({"skipped": f"{exc} ({', '.join(bars)})"})
    settings = sec.headline_settings(cfg.budgets, cfg.bad_debt_tolerance)
    n_b = len(settings.budgets)
    done = 0

    def tick(_msg: str) -> None:
        nonlocal done
        if progress:
            progress("portfolio (budgets)", done, n_b)
        done += 1

    paths: dict[str, Any] = {}
    try:
        res = portfolio_headline(bars, {a.asset: a.forecast for a in chosen},
                                 {a.asset: a.regime_probs for a in chosen}, cut, cfg.seed, settings=settings,
                                 population=sec.population(cfg.seed), backtest=sec.backtest(),
                                 controls=cfg.controls.build(), progress=tick, paths_out=paths)
    except ValueError as exc:
        if "leaves" not in str(exc):  # the cut leaves too few bars on one side: skip; anything else is a bug
            raise
        return PortfolioOutcome({"skipped": str(exc)})
    if progress:
        progress("portfolio (budgets)", n_b, n_b)
    meta = res.pop("_meta")
    keys = [budget_key(b) for b in settings.budgets]
    mid = keys[len(keys) // 2]
    summary = {k: _entry(res[k]) for k in keys}
    seconds = time.perf_counter() - t0
    details = {"assets": [a.asset for a in chosen], "datasets": [a.dataset for a in chosen], "cut": str(cut.date()),
               "cycle_bars": sec.cycle_bars,
               "champions": {a.asset: a.champion.get("model_key") for a in chosen}, "grid_file_budget": mid,
               "seconds": seconds, **meta}
    log.info("portfolio comparison on %s in %.1fs", ", ".join(bars), seconds)
    return PortfolioOutcome(summary, details, paths.get(mid), mid, seconds)

