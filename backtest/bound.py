"""The ``bound``: the perfect-foresight cohort optimizer that marks the limit of entry-IM policies.

For each bar's cohort of new positions the entry IM is picked from a grid knowing the future path, with
one Lagrange multiplier trading collateral against one objective (liquidations or bad debt). Scored in the
frozen setting (volume slippage off, bad debt before the fund) where cohorts are independent, so it is the
best of all entry-IM paths on its grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from backtest.simulation import BacktestConfig, run_backtest
from margin.path import MarginPath
from margin.policies import PolicyContext

__all__ = ["CohortTable", "cohort_table", "BoundPolicy", "solve_lambda", "bound_path", "DEFAULT_IM_GRID"]

#: IM grid of the bound and of the static levels (fractions of notional).
DEFAULT_IM_GRID: tuple[float, ...] = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.5)


@dataclass(frozen=True)
class CohortTable:
    """Per cohort (bar of entry) × IM grid level outcomes in the frozen setting (entry-fixed MM).

    ``liquidations``, ``bad_debt``, ``collateral`` (USD·bars): arrays ``(n_bars, n_grid)``; ``exposure``
    (USD·bars, the same for every level) per cohort; ``grid`` the IM levels.
    """

    grid: np.ndarray
    liquidations: np.ndarray
    bad_debt: np.ndarray
    collateral: np.ndarray
    exposure: np.ndarray
    has_cohort: np.ndarray

    def metric(self, objective: str) -> np.ndarray:
        if objective not in ("liquidations", "bad_debt"):
            raise ValueError(f"bound objective must be 'liquidations' or 'bad_debt', got {objective!r}")
        return self.liquidations if objective == "liquidations" else self.bad_debt

    def choose(self, objective: str, lam: float) -> np.ndarray:
        """Grid index per cohort minimising ``metric + lam × collateral`` (ties: the lower IM)."""
        score = self.metric(objective) + lam * self.collateral
        return np.argmin(score, axis=1)

    def totals(self, objective: str, choice: np.ndarray) -> tuple[float, float]:
        rows = np.arange(choice.size)
        return (float(self.metric(objective)[rows, choice].sum()), float(self.collateral[rows, choice].sum()))


def cohort_table(bars: pd.DataFrame, population: Any, backtest_cfg: Any, grid: Sequence[float],
                 mm_fraction: float, *, start: Any = None, end: Any = None) -> CohortTable:
    """Backtest every grid level (static IM, MM fixed at entry, frozen setting) and sum outcomes per cohort."""
    cfg = (backtest_cfg or BacktestConfig()).frozen_copy()
    times = pd.DatetimeIndex(bars.index)
    n = len(times)
    gr = np.asarray(sorted(float(x) for x in grid))
    L = np.zeros((n, gr.size))
    B = np.zeros((n, gr.size))
    C = np.zeros((n, gr.size))
    E = np.zeros(n)
    has = np.zeros(n, dtype=bool)
    for j, im in enumerate(gr):
        path = MarginPath(times=times, im_rate=np.full(n, im), mm_rate=np.full(n, mm_fraction * im),
                          policy=f"static_{im:g}", mm_binds="entry")
        res = run_backtest(bars, path, population, cfg, start=start, end=end, per_position=True)
        pp = res.per_position
        ob = pp["open_bar"]
        L[:, j] = np.bincount(ob, weights=pp["liquidations"], minlength=n)
        B[:, j] = np.bincount(ob, weights=pp["bad_debt"], minlength=n)
        C[:, j] = np.bincount(ob, weights=pp["collateral"], minlength=n)
        if j == 0:
            E = np.bincount(ob, weights=pp["exposure"], minlength=n).astype(np.float64)
            has = np.bincount(ob, minlength=n) > 0
    return CohortTable(grid=gr, liquidations=L, bad_debt=B, collateral=C, exposure=E, has_cohort=has)


@dataclass(frozen=True)
class BoundPolicy:
    """Perfect-foresight cohort optimizer (not deployable): the limit for entry-IM policies.

    For each bar's cohort of new positions it picks the entry IM on ``grid`` that minimises
    ``metric + lam × collateral_locked`` knowing the future (metric: ``objective`` = liquidations or
    bad_debt); MM = ``mm_fraction × entry IM`` fixed for the position's life. In the frozen setting
    (``BacktestConfig.frozen``) cohorts are independent, so the path is the best of all entry-IM paths on
    its grid for its collateral. Give ``lam`` directly, or ``target_avg_collateral`` to solve for the
    largest collateral not above it (bisection on ``lam``).
    """

    population: Any
    backtest_cfg: Any = None
    grid: tuple[float, ...] = DEFAULT_IM_GRID
    objective: Literal["liquidations", "bad_debt"] = "liquidations"
    lam: float | None = None
    target_avg_collateral: float | None = None
    start: Any = "cut"
    end: Any = None
    mm_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.objective not in ("liquidations", "bad_debt"):
            raise ValueError(f"bound objective must be 'liquidations' or 'bad_debt', got {self.objective!r}")
        if self.lam is None and self.target_avg_collateral is None:
            object.__setattr__(self, "lam", 0.0)
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"bound lam must be >= 0, got {self.lam!r}")

    @property
    def name(self) -> str:
        return f"bound_{self.objective}"

    def table(self, ctx: PolicyContext) -> CohortTable:
        start = ctx.cut if self.start == "cut" else self.start
        frac = ctx.controls.mm_fraction if self.mm_fraction is None else self.mm_fraction
        return cohort_table(ctx.bars, self.population, self.backtest_cfg, self.grid, frac, start=start, end=self.end)

    def path(self, ctx: PolicyContext, table: CohortTable | None = None) -> MarginPath:
        tab = table if table is not None else self.table(ctx)
        lam = self.lam if self.target_avg_collateral is None else solve_lambda(
            tab, self.objective, self.target_avg_collateral)
        return bound_path(ctx, tab, self.objective, lam, self.mm_fraction, name=self.name)


def solve_lambda(tab: CohortTable, objective: str, target_avg_collateral: float, iters: int = 80) -> float:
    """Smallest ``lam`` whose bound uses at most ``target_avg_collateral`` (collateral / exposure)."""
    expo = float(tab.exposure.sum())
    if expo <= 0:
        return 0.0

    def avg(lam: float) -> float:
        return tab.totals(objective, tab.choose(objective, lam))[1] / expo

    if avg(0.0) <= target_avg_collateral:
        return 0.0
    hi = 1e-15
    while avg(hi) > target_avg_collateral and hi < 1e30:
        hi *= 10.0
    lo = hi / 10.0
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if avg(mid) > target_avg_collateral:
            lo = mid
        else:
            hi = mid
    return hi


def bound_path(ctx: PolicyContext, tab: CohortTable, objective: str, lam: float,
               mm_fraction: float | None = None, name: str | None = None) -> MarginPath:
    """The bound's margin path for one ``lam`` (bars without a cohort carry the previous level)."""
    choice = tab.choose(objective, lam)
    im = tab.grid[choice].astype(np.float64)
    s = pd.Series(np.where(tab.has_cohort, im, np.nan)).ffill().bfill()
    im = s.fillna(float(np.median(tab.grid))).to_numpy()
    frac = ctx.controls.mm_fraction if mm_fraction is None else mm_fraction
    metric, coll = tab.totals(objective, choice)
    expo = float(tab.exposure.sum())
    meta = {"objective": objective, "lam": lam, "grid": tab.grid.tolist(), "deployable": False,
            "predicted_metric": metric, "predicted_collateral": coll,
            "predicted_avg_collateral": coll / expo if expo > 0 else float("nan"),
            "scored_in": "frozen setting (volume slippage off, bad debt before the fund, MM fixed at entry)"}
    return MarginPath(times=ctx.times, im_rate=im, mm_rate=frac * im, policy=name or f"bound_{objective}",
                      meta=meta, mm_binds="entry")
