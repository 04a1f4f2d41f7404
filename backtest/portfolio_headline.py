"""The portfolio-margin headline at capital budgets: best static grid, the clairvoyant bound, ``dynamic_grid``.

Mirrors :mod:`backtest.headline` on the multi-instrument accounts of :mod:`backtest.portfolio_population`, run
through the engine by :func:`backtest.portfolio_backtest.run_portfolio_backtest`. For each budget ``b`` (an
``avg_collateral``: collateral locked / policy-independent exposure):

* ``best_static``: the static grid family is one spot range for every bar and underlying, vol shocks fixed, and an
  MM fraction from ``static_mm_fractions``; for each fraction the range that locks ``b`` on the held-out bars is
  solved (secant steps in log range seeded with the runs of the other levels), and the best (fewest liquidations with bad debt <= tolerance;
  when none qualifies, the least bad debt) is the baseline;
* ``bound``: :class:`PortfolioBound` (below) at ``b``;
* ``dynamic_grid``: :class:`margin.dynamic_grid.DynamicGridPolicy` fitted on the bars BEFORE the cut: for each
  shape of ``fit_grid`` the level ``k`` is solved so the pre-cut run locks ``b``, and the shape with the least
  ``liquidations + bad_debt_weight × max(0, bad_debt - tolerance)`` before the cut wins; it is then run on the
  held-out bars and compared at its OWN held-out collateral ``c`` with the best static grid and the bound at ``c``:
  ``share_of_bound = (L_static(c) - L) / (L_static(c) - L_bound(c))`` (:func:`backtest.budgets.share_of_bound`);
* ``ablation``: the fitted mapping run with a constant variance (each asset's pre-cut mean squared return;
  regime probabilities fixed at their pre-cut mean) on the held-out bars.

The bound (why no deployable grid policy can beat it). A deployable policy, whatever its grids, controls and engine
mode, does one of two things to each account-cycle (a book held from its cycle's first close to its last):

* it **never liquidates it**: then the account's health stayed above 1 at every close, so its market-value equity
  (collateral at market + the book's P&L since opening) stayed positive, which needs deposits (the opening
  deposit in the account's collateral asset, top-ups in USDC if the account answers calls) covering the book's
  loss at every close; and the opening deposit is at least ``L_a = buffer × min_posted × gross notional`` (value
  after haircuts) whatever the grid. The least collateral locked (USD at posting × bars) under these necessary
  conditions is ``S_a`` (solved exactly per account: the opening deposit on its breakpoints, top-ups as the running
  maximum of the shortfall);
* it **liquidates it** (at least once): one liquidation, and at least ``L_a`` locked for at least one bar.

The bound picks, per account-cycle and with perfect foresight, the cheaper of *survive* (0 liquidations, ``S_a``) and
*liquidate* (1 liquidation, ``L_a × 1 bar``), with no bad debt, under the total collateral of the budget. Every
liquidation saved costs ``S_a - L_a``, so sorting these costs solves it exactly (a unit-value knapsack). Any
deployable run at collateral ``c`` liquidates a set of accounts, and the bound can choose that same set at no more
collateral, so ``L_bound(c) <= L_policy`` and its bad debt (0) is no larger: a share above 1 would be a bug (tested
on static and dynamic runs, account by account for the collateral lemma). It is loose on purpose: it ignores that
the grid must be one per market and bar.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest.budgets import budget_key, share_of_bound
from backtest.portfolio_backtest import (
    PortfolioBacktestConfig,
    PortfolioBacktestResult,
    _slot_factor,
    cycle_window,
    run_portfolio_backtest,
)
from backtest.portfolio_population import AccountPopulation, AccountPopulationConfig, generate_accounts
from margin.controls import Controls
from margin.dynamic_grid import DynamicGridPolicy, GridPath, static_grid_path
from margin.policies import PolicyContext
from models.base import VolatilityForecast

__all__ = ["PortfolioBound", "portfolio_bound", "portfolio_headline", "PortfolioHeadlineSettings", "common_closes"]

log = logging.getLogger(__name__)


def _outcome(r: PortfolioBacktestResult) -> dict[str, Any]:
    return {"liquidations": int(r.liquidations), "bad_debt": float(r.bad_debt), "avg_collateral": float(r.avg_collateral)}


# ------------------------------------------------------------------------------------------------ the bound
@dataclass(frozen=True)
class PortfolioBound:
    """Per account-cycle costs of the clairvoyant relaxation (see the module docstring).

    ``survive`` (S_a) and ``liquidate`` (L_a) in USD·bars, ``exposure`` the population's (USD·bars).
    """

    survive: np.ndarray
    liquidate: np.ndarray
    exposure: float

    def at(self, avg_collateral: float) -> int:
        """Fewest liquidations at a collateral level (all account-cycles liquidated when it is below the least
        any policy can lock)."""
        budget = avg_collateral * self.exposure - float(self.liquidate.sum())
        n = len(self.survive)
        if budget < 0:
            return n
        extra = np.sort(np.maximum(self.survive - self.liquidate, 0.0))
        saved = int(np.searchsorted(np.cumsum(extra), budget, side="right"))
        return n - saved


def portfolio_bound(pop: AccountPopulation, cfg: PortfolioBacktestConfig | None = None, *, start: int = 0,
                    end: int | None = None) -> PortfolioBound:
    """The bound's per account-cycle costs on the cycles of ``[start, end)`` (as :func:`run_portfolio_backtest`)."""
    cfg = cfg or PortfolioBacktestConfig()
    factor = _slot_factor(cfg)
    fac = factor[pop.slot]
    surv, liq = [], []
    exposure = 0.0
    for book in cycle_window(pop, start, end):
        s, e = book.start, book.stop
        u_of = np.array([pop.underlyings.index(x.underlying) for x in book.instruments])
        cms, _ = book.mark_path(pop.closes, pop.iv, pop.times, pop.underlyings, s, e)  # (B+1, I)
        pnl_rows = book.positions @ (cms[1:] - cms[0]).T  # (R, B)
        pnl = np.zeros((pop.n_pools, e - s))
        np.add.at(pnl, pop.pool_index, pnl_rows)
        gross = np.bincount(pop.pool_index, weights=np.abs(book.positions) @ pop.closes[s][u_of], minlength=pop.n_pools)
        exposure += float((gross * (e - s)).sum())
        low = pop.buffer * cfg.min_posted * gross / fac  # least opening deposit (USD at posting)
        # value of one USD deposited at s in the account's asset, at each close
        px = np.c_[np.ones(len(pop.times)), np.ones(len(pop.times)),
                   pop.closes[:, pop.underlyings.index("BTC")] if "BTC" in pop.underlyings else np.ones(len(pop.times)),
                   pop.closes[:, pop.underlyings.index("ETH")] if "ETH" in pop.underlyings else np.ones(len(pop.times)),
                   np.ones(len(pop.times))]
        ratio = (px[s + 1:e + 1] / px[s])[:, pop.slot].T  # (P, B)
        need = np.maximum(-pnl, 0.0)  # market value the deposits must cover at each close
        # no top-ups: the opening deposit alone covers every close
        p_only = np.maximum(low, (need / ratio).max(axis=1))
        cost = p_only * (e - s)
        tu = np.flatnonzero(pop.tops_up & (gross > 0))
        if tu.size:  # top-ups (USDC): try each breakpoint of the opening deposit
            cand = np.concatenate([low[tu, None], need[tu] / ratio[tu]], axis=1)  # (n, B + 1)
            cand = np.maximum(cand, low[tu, None])
            best = cost[tu].copy()
            for j in range(cand.shape[1]):
                p0 = cand[:, j]
                short = np.maximum(need[tu] - p0[:, None] * ratio[tu], 0.0)
                top = np.maximum.accumulate(short, axis=1)
                best = np.minimum(best, p0 * (e - s) + top.sum(axis=1))
            cost[tu] = best
        alive = gross > 0
        surv.append(cost[alive])
        liq.append(low[alive] * 1.0)
    if not surv:
        return PortfolioBound(np.zeros(0), np.zeros(0), 0.0)
    return PortfolioBound(np.concatenate(surv), np.concatenate(liq), exposure)


# --------------------------------------------------------------------------------------------- the headline
@dataclass(frozen=True)
class PortfolioHeadlineSettings:
    """What :func:`portfolio_headline` compares."""

    budgets: tuple[float, ...] = (0.125, 0.15, 0.20, 0.25, 0.30)
    bad_debt_tolerance: float = 0.0
    bad_debt_weight: float = 10.0
    static_mm_fractions: tuple[float, ...] = (0.5, 0.8)
    static_vol_shock: float = 0.25
    static_start_range: float = 0.15
    fit_grid: tuple[dict[str, Any], ...] = (
        {"vol_k": 2.0, "stress_slope": 1.0, "mm_fraction": 0.8},
        {"vol_k": 2.0, "stress_slope": 1.0, "mm_fraction": 0.5},
        {"vol_k": 1.0, "stress_slope": 0.0, "mm_fraction": 0.8},
        {"vol_k": 3.0, "stress_slope": 2.0, "mm_fraction": 0.8},
    )
    base_policy: DynamicGridPolicy = DynamicGridPolicy()
    collateral_tol: float = 2e-3


def common_closes(bars: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Closes of every asset on the bars they share (inner join of the UTC indexes), one column per asset.

    A timestamp repeated within an asset keeps its last row."""
    cols = {}
    for a, df in bars.items():
        c = {str(k).lower(): k for k in df.columns}
        if "close" not in c:
            raise ValueError(f"bars[{a!r}] must have a 'close' column, got {list(df.columns)}")
        s = df[c["close"]].astype(float)
        idx = pd.DatetimeIndex(s.index)
        s.index = idx.tz_localize("UTC") if idx.tz is None else idx.tz_convert("UTC")
        cols[a] = s[~s.index.duplicated(keep="last")].sort_index()  # a repeated bar: its last row
    out = pd.concat(cols, axis=1, join="inner").dropna()
    if len(out) < 10:
        raise ValueError(f"the assets share only {len(out)} bars")
    return out


def _contexts(closes: pd.DataFrame, forecasts: Mapping[str, VolatilityForecast],
              regime_probs: Mapping[str, pd.DataFrame | None] | None, cut: pd.Timestamp | None,
              controls: Controls) -> dict[str, PolicyContext]:
    return {a: PolicyContext(bars=pd.DataFrame({"close": closes[a]}), forecast=forecasts.get(a),
                             regime_probs=None if regime_probs is None else regime_probs.get(a), cut=cut,
                             controls=controls)
            for a in closes.columns}


def _constant_contexts(ctx: Mapping[str, PolicyContext], k: int) -> dict[str, PolicyContext]:
    """The ablation's inputs: each asset's pre-cut mean squared return as a constant forecast, regime
    probabilities fixed at their pre-cut mean."""
    out = {}
    for a, c in ctx.items():
        r = c.returns()
        v0 = float(np.mean(r[1:max(k, 2)] ** 2)) or 1e-4
        h = c.forecast.horizon if c.forecast is not None else 1
        n = len(c.bars)
        rp = None
        if c.regime_probs is not None:
            pre = c.regime_probs[c.regime_probs.index < c.cut]
            rp = pd.DataFrame(np.tile(pre.mean().to_numpy(), (n, 1)), index=c.times, columns=c.regime_probs.columns)
        fc_rp = names = None
        if c.forecast is not None and c.forecast.regime_probs is not None:
            pos = c.forecast.origins < c.cut
            fc_rp = np.tile(c.forecast.regime_probs[pos].mean(axis=0), (n, 1))
            names = c.forecast.regime_names
        fc = VolatilityForecast(origins=c.times, variance=np.full((n, h), v0), model="constant_variance",
                                regime_probs=fc_rp, regime_names=names)
        out[a] = replace(c, forecast=fc, regime_probs=rp)
    return out


def _solve(run: Callable[[float], PortfolioBacktestResult], target: float, seen: dict[float, PortfolioBacktestResult],
           *, start: float, lo: float, hi: float, tol: float, iters: int = 12) -> tuple[float, PortfolioBacktestResult]:
    """The ``x`` whose run locks ``target`` (collateral grows with ``x``), seeded with the runs already made.

    ``seen`` maps ``x`` to its run and is filled as the search goes, so the solves of one family at several levels
    (every budget, and each policy's own collateral) share their runs. Each step is a secant step in ``log x``
    between the closest runs on either side of ``target`` (kept inside the middle 80 % of the bracket), else a
    power step ``x (target / c)^1.2`` from the closest run; at most ``iters`` new runs. Returns the run closest
    to ``target`` (the first within ``tol`` when one is).
    """
    if not seen:
        seen[start] = run(start)

    def gap(item: tuple[float, PortfolioBacktestResult]) -> float:
        return abs(item[1].avg_collateral - target)

    for _ in range(iters):
        pts = sorted(seen.items())
        best = min(pts, key=gap)
        if gap(best) <= tol:
            return best
        below = [p for p in pts if p[1].avg_collateral < target]
        above = [p for p in pts if p[1].avg_collateral > target]
        a = max(below, key=lambda p: p[1].avg_collateral) if below else None
        b = min(above, key=lambda p: p[1].avg_collateral) if above else None
        if a is not None and b is not None and a[0] < b[0]:
            if b[0] / a[0] < 1.0 + 1e-6:
                break
            w = (target - a[1].avg_collateral) / (b[1].avg_collateral - a[1].avg_collateral)
            nxt = math.exp(math.log(a[0]) + min(max(w, 0.1), 0.9) * (math.log(b[0]) - math.log(a[0])))
        else:
            nxt = best[0] * (target / max(best[1].avg_collateral, 1e-9)) ** 1.2
        nxt = min(max(nxt, lo), hi)
        if nxt in seen:
            break
        seen[nxt] = run(nxt)
    return min(sorted(seen.items()), key=gap)


class _StaticEnvelope:
    """Static grids solved for a collateral level on one window, runs cached by (range, mm_fraction) and shared by
    the solves at every level (:func:`_solve`)."""

    def __init__(self, pop: AccountPopulation, cfg: PortfolioBacktestConfig, settings: PortfolioHeadlineSettings,
                 start: int, end: int | None) -> None:
        self.pop, self.cfg, self.st, self.start, self.end = pop, cfg, settings, start, end
        self.runs: dict[tuple[float, float], PortfolioBacktestResult] = {}
        self.seen: dict[float, dict[float, PortfolioBacktestResult]] = {m: {} for m in settings.static_mm_fractions}

    def run(self, r: float, mmf: float) -> PortfolioBacktestResult:
        key = (round(r, 10), mmf)
        if key not in self.runs:
            p = static_grid_path(self.pop.times, self.pop.underlyings, min(r, 0.95),
                                 vol_shock=self.st.static_vol_shock, mm_fraction=mmf)
            self.runs[key] = run_portfolio_backtest(self.pop, p, self.cfg, start=self.start, end=self.end)
        return self.runs[key]

    def best_at(self, c: float) -> dict[str, Any] | None:
        tol = self.st.bad_debt_tolerance
        best = None
        r0 = self.st.static_start_range
        for mmf in self.st.static_mm_fractions:
            r, res = _solve(lambda x, m=mmf: self.run(x, m), c, self.seen[mmf], start=r0, lo=0.02 * r0, hi=0.95,
                            tol=self.st.collateral_tol)
            if abs(res.avg_collateral - c) > max(self.st.collateral_tol, 0.02 * c):
                continue
            cand = {"spot_range": r, "mm_fraction": mmf, **_outcome(res)}
            if best is None:
                best = cand
                continue
            ok, bok = cand["bad_debt"] <= tol, best["bad_debt"] <= tol
            if (ok and not bok) or (ok and bok and (cand["liquidations"], cand["bad_debt"]) <
                                    (best["liquidations"], best["bad_debt"])) or (
                    not ok and not bok and cand["bad_debt"] < best["bad_debt"]):
                best = cand
        return best


def portfolio_headline(
    bars: Mapping[str, pd.DataFrame],
    forecasts: Mapping[str, VolatilityForecast],
    regime_probs: Mapping[str, pd.DataFrame | None] | None,
    cut: Any,
    seed: int,
    *,
    settings: PortfolioHeadlineSettings | None = None,
    population: AccountPopulationConfig | None = None,
    backtest: PortfolioBacktestConfig | None = None,
    controls: Controls | None = None,
    progress: Callable[[str], None] | None = None,
    paths_out: dict[str, GridPath] | None = None,
) -> dict[str, Any]:
    """The portfolio comparison at each budget (see the module docstring).

    Parameters
    ----------
    bars : mapping
        OHLC(V) bars per asset (``close`` column, UTC index); the assets' shared bars are used.
    forecasts : mapping
        The pinned champion's out-of-sample :class:`VolatilityForecast` per asset (origins = bar times).
    regime_probs : mapping, optional
        Filtered regime probabilities per asset (columns calm … stressed), or ``None``.
    cut : timestamp
        Parameters are fitted on the bars before it, every number reported is on the bars after it.
    seed : int
        Seed of the account population.
    settings, population, backtest, controls : optional
        Budgets and fit grid; the population (``seed`` overrides its seed); the backtest setting; the controls of
        the dynamic grid (default: the policy's own).
    paths_out : dict, optional
        Filled with the fitted ``dynamic_grid`` :class:`GridPath` per budget key (e.g. to ``write`` one to
        ``RUN_DIR/portfolio_grid.json`` for ``volmargin margin --params-from``).

    Returns
    -------
    dict
        ``{"<budget>": {"best_static": {...}, "bound": {...}, "dynamic_grid": {"liquidations", "bad_debt",
        "avg_collateral", "share_of_bound", ...}, "ablation": {"forecast": {...}, "constant_variance": {...}}}}``
        plus ``"_meta"`` (population size, cut index, fitted parameters).
    """
    st = settings or PortfolioHeadlineSettings()
    cfg = backtest or PortfolioBacktestConfig()
    closes = common_closes(bars)
    cut_ts = pd.Timestamp(cut)
    cut_ts = cut_ts.tz_localize("UTC") if cut_ts.tz is None else cut_ts.tz_convert("UTC")
    k = int(closes.index.searchsorted(cut_ts, side="left"))
    pcfg = replace(population or AccountPopulationConfig(n_accounts=300), seed=seed)
    if k < 2 * pcfg.cycle_bars or len(closes) - k < pcfg.cycle_bars:
        raise ValueError(f"the cut {cut_ts} leaves {k} bars before and {len(closes) - k} after it; need at least "
                         f"{2 * pcfg.cycle_bars} before and {pcfg.cycle_bars} after")
    # cycles start at the cut so that no held-out cycle began before it
    pop = generate_accounts(closes, replace(pcfg))
    ctl = controls or st.base_policy.controls
    ctx = _contexts(closes, forecasts, regime_probs, cut_ts, ctl)
    base = replace(st.base_policy, controls=ctl)
    k_cyc = min((c.start for c in pop.cycles if c.start >= k), default=len(closes) - 1)
    env = _StaticEnvelope(pop, cfg, st, k_cyc, None)
    bound = portfolio_bound(pop, cfg, start=k_cyc)
    tol = st.bad_debt_tolerance

    def held(path: GridPath) -> PortfolioBacktestResult:
        return run_portfolio_backtest(pop, path, cfg, start=k_cyc)

    def pre(path: GridPath) -> PortfolioBacktestResult:
        return run_portfolio_backtest(pop, path, cfg, start=0, end=k)

    def objective(r: PortfolioBacktestResult) -> float:
        return r.liquidations + st.bad_debt_weight * max(0.0, r.bad_debt - tol)

    shapes = {}
    seen: dict[int, dict[float, PortfolioBacktestResult]] = {}
    for j, shape in enumerate(st.fit_grid):
        pol = replace(base, **shape)
        shapes[j] = (pol, pol.path(ctx))
        seen[j] = {}
    const_ctx = _constant_contexts(ctx, k)
    out: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    for b in st.budgets:
        key = budget_key(b)
        if progress:
            progress(f"portfolio budget {key}")
        best = None
        for j, (_pol, path) in shapes.items():
            s, r = _solve(lambda x, p=path: pre(p.scaled(x, ctl)), b, seen[j], start=1.0, lo=0.02, hi=50.0,
                          tol=st.collateral_tol)
            cand = (objective(r), abs(r.avg_collateral - b), j, s, r)
            if best is None or cand[:2] < best[:2]:
                best = cand
        _, _, j, s, r_pre = best
        pol, path = shapes[j]
        p_held = path.scaled(s, ctl)
        if paths_out is not None:
            paths_out[key] = p_held
        res = held(p_held)
        c = float(res.avg_collateral)
        stat_c = env.best_at(c)
        l_bound_c = bound.at(c)
        share, why = share_of_bound(None if stat_c is None else stat_c["liquidations"], res.liquidations,
                                    float(l_bound_c), bad_debt_policy=res.bad_debt,
                                    bad_debt_static=None if stat_c is None else stat_c["bad_debt"], tolerance=tol)
        if stat_c is None:
            why = f"no static grid locks {c:.4f}"
        stat_b = env.best_at(b)
        const_path = replace(pol).path(const_ctx).scaled(s, ctl)
        out[key] = {
            "best_static": stat_b,
            "bound": {"liquidations": bound.at(b), "bad_debt": 0.0, "avg_collateral": b},
            "dynamic_grid": {**_outcome(res), "share_of_bound": share, "best_static_here": stat_c,
                             "bound_here": l_bound_c, **({"reason": why} if why else {})},
            "ablation": {"forecast": _outcome(res), "constant_variance": _outcome(held(const_path))},
        }
        fitted[key] = {**pol.params(), "k_effective": pol.k, "scale": s, "pre_cut": _outcome(r_pre)}
    out["_meta"] = {"n_accounts": pop.n_pools, "n_rows": pop.n_rows, "cycles": len(pop.cycles), "cut_index": k,
                    "held_out_first_cycle_bar": k_cyc, "account_cycles_held_out": int(len(bound.survive)),
                    "fitted": fitted, "seed": seed, "mode": cfg.mode}
    return out
