"""Comparisons at a capital budget: static (IM, MM) pairs, policies scaled to a budget, the share of the bound.

A *budget* is an average collateral (``avg_collateral`` of :func:`backtest.simulation.run_backtest`: collateral
locked / exposure, a denominator that does not depend on the policy). At a collateral level ``c``:

* the **static envelope** is the best static (IM, MM) pair that locks ``c``: for every MM rule of the grid
  (a fraction of IM, or a fixed rate with MM <= IM) the IM that locks ``c`` (within ``tol`` of collateral) is
  found by bisection with the simulation, and among those pairs the one with the fewest liquidations whose
  bad debt is at most ``bad_debt_tolerance`` wins (none qualifies: the one with the least bad debt);
* a deployable policy is brought to a budget by one scale on its IM before its controls (then the controls once),
  chosen on the bars BEFORE the cut (:func:`scale_to_budget`), and compared at its own held-out collateral;
* :func:`share_of_bound` is ``(L_static - L_policy) / (L_static - L_bound)``, defined only when the policy's
  bad debt is at most ``max(tolerance, best static's)``.

Every run here is in the comparison setting the caller passes (the job uses the frozen setting, where the
bound of :mod:`backtest.bound` holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from backtest.population import Population
from backtest.simulation import BacktestConfig, BacktestResult, run_backtest
from margin.controls import Controls, apply_controls
from margin.path import MarginPath

__all__ = ["MmRule", "StaticPair", "StaticEnvelope", "scaled_path", "scale_to_budget", "share_of_bound",
           "budget_key"]


def budget_key(b: float) -> str:
    """A budget as written in the config and in ``summary.json`` (``0.2`` -> ``"0.2"``, ``0.125`` -> ``"0.125"``)."""
    return f"{float(b):g}"


@dataclass(frozen=True)
class MmRule:
    """How a static pair sets MM: ``kind="fraction"`` (MM = value × IM) or ``"fixed"`` (MM = value, <= IM)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("fraction", "fixed"):
            raise ValueError(f"MM rule kind must be 'fraction' or 'fixed', got {self.kind!r}")
        if not 0.0 < self.value <= 1.0:
            raise ValueError(f"MM rule value must be in (0, 1], got {self.value!r}")

    def mm(self, im: float) -> float | None:
        """MM for ``im`` (``None`` when a fixed MM would exceed IM: not a pair)."""
        if self.kind == "fraction":
            return self.value * im
        return self.value if self.value <= im else None

    @property
    def label(self) -> str:
        return f"{self.value:g}×IM" if self.kind == "fraction" else f"{self.value:g}"


@dataclass(frozen=True)
class StaticPair:
    """One static pair and its outcome (``avg_collateral`` as run)."""

    im: float
    mm: float
    rule: MmRule
    liquidations: int
    bad_debt: float
    avg_collateral: float

    def to_dict(self) -> dict[str, Any]:
        return {"im": self.im, "mm": self.mm, "mm_rule": self.rule.label, "liquidations": self.liquidations,
                "bad_debt": self.bad_debt, "avg_collateral": self.avg_collateral}


def _better(a: StaticPair, b: StaticPair | None, tolerance: float) -> bool:
    """Fewest liquidations among pairs with bad debt <= tolerance; else least bad debt (ties: liquidations)."""
    if b is None:
        return True
    a_ok, b_ok = a.bad_debt <= tolerance, b.bad_debt <= tolerance
    if a_ok != b_ok:
        return a_ok
    if a_ok:
        return (a.liquidations, a.bad_debt) < (b.liquidations, b.bad_debt)
    return (a.bad_debt, a.liquidations) < (b.bad_debt, b.liquidations)


@dataclass
class StaticEnvelope:
    """The best static (IM, MM) pair at any collateral level, by simulation (runs are cached).

    Parameters
    ----------
    bars, population, cfg, start, end
        What :func:`run_backtest` replays (the job: the held-out window in the frozen setting).
    rules : sequence of MmRule
        The MM rules of the grid.
    im_grid : sequence of float
        IM levels run for every rule first (they bracket a target before the bisection).
    tol : float
        A pair meets a collateral level when ``|avg_collateral - c| <= tol`` (default 0.001 = 0.1 points).
    """

    bars: pd.DataFrame
    population: Population
    cfg: BacktestConfig
    rules: Sequence[MmRule]
    im_grid: Sequence[float]
    start: Any = None
    end: Any = None
    tol: float = 1e-3
    _runs: dict[tuple[float, float], BacktestResult] = field(default_factory=dict, repr=False)

    def run(self, im: float, mm: float) -> BacktestResult:
        key = (round(float(im), 12), round(float(mm), 12))
        if key not in self._runs:
            n = len(self.bars)
            path = MarginPath(times=self.bars.index, im_rate=np.full(n, key[0]), mm_rate=np.full(n, key[1]),
                              policy=f"static_{key[0]:g}_mm{key[1]:g}")
            self._runs[key] = run_backtest(self.bars, path, self.population, self.cfg, start=self.start, end=self.end)
        return self._runs[key]

    @property
    def n_runs(self) -> int:
        return len(self._runs)

    def runs_table(self) -> pd.DataFrame:
        """Every pair run so far: ``im``, ``mm``, ``avg_collateral``, ``liquidations``, ``bad_debt``."""
        return pd.DataFrame([{"im": im, "mm": mm, "avg_collateral": r.avg_collateral, "liquidations": r.liquidations,
                              "bad_debt": r.bad_debt} for (im, mm), r in self._runs.items()],
                            columns=["im", "mm", "avg_collateral", "liquidations", "bad_debt"])

    def _pair(self, im: float, rule: MmRule) -> StaticPair | None:
        mm = rule.mm(im)
        if mm is None:
            return None
        r = self.run(im, mm)
        return StaticPair(im=float(im), mm=float(mm), rule=rule, liquidations=int(r.liquidations),
                          bad_debt=float(r.bad_debt), avg_collateral=float(r.avg_collateral))

    def solve(self, rule: MmRule, c: float, iters: int = 30) -> StaticPair | None:
        """The pair of ``rule`` that locks ``c`` (bisection on IM), or ``None`` when no IM reaches it."""
        pts = self.curve(rule)
        if not pts:
            return None
        best = min(pts, key=lambda p: abs(p.avg_collateral - c))
        if abs(best.avg_collateral - c) <= self.tol:
            return best
        below = [p for p in pts if p.avg_collateral < c]
        above = [p for p in pts if p.avg_collateral > c]
        if not below or not above:
            return None
        lo = max(below, key=lambda p: p.im)
        hi = min((p for p in above if p.im > lo.im), key=lambda p: p.im, default=None)
        if hi is None:
            return None
        for _ in range(iters):
            # secant step inside the bracket, bisection when it stalls
            w = (c - lo.avg_collateral) / (hi.avg_collateral - lo.avg_collateral)
            im = lo.im + min(max(w, 0.1), 0.9) * (hi.im - lo.im)
            p = self._pair(im, rule)
            if p is None:
                return None
            if abs(p.avg_collateral - c) <= self.tol:
                return p
            if p.avg_collateral < c:
                lo = p
            else:
                hi = p
            if hi.im - lo.im < 1e-7:
                break
        return min((lo, hi), key=lambda p: abs(p.avg_collateral - c))

    def curve(self, rule: MmRule) -> list[StaticPair]:
        """The rule's pairs on the IM grid (sorted by IM; the runs are cached)."""
        lo_im = rule.value if rule.kind == "fixed" else min(self.im_grid)
        grid = sorted({float(x) for x in self.im_grid if x >= lo_im} | {lo_im, 1.0})
        return [p for p in (self._pair(im, rule) for im in grid) if p is not None]

    def estimate(self, rule: MmRule, c: float) -> tuple[float, float] | None:
        """``(liquidations, bad_debt)`` of the rule at collateral ``c``, linear between its grid pairs."""
        pts = sorted(self.curve(rule), key=lambda p: p.avg_collateral)
        x = np.array([p.avg_collateral for p in pts])
        if x.size == 0 or not x[0] - self.tol <= c <= x[-1] + self.tol:
            return None
        liq = float(np.interp(c, x, [p.liquidations for p in pts]))
        bad = float(np.interp(c, x, [p.bad_debt for p in pts]))
        return liq, bad

    def best_at(self, c: float, bad_debt_tolerance: float = 0.0,
                refine_top: int | None = 3) -> tuple[StaticPair | None, list[StaticPair]]:
        """The best pair at collateral ``c`` (see the module docstring) and the pairs solved there.

        ``refine_top``: solve exactly (bisection with the simulation) only the rules ranked best by their
        interpolated grid curves (``None``: every rule; the tests check both give the brute-force choice).
        """
        rules = list(self.rules)
        if refine_top is not None and refine_top < len(rules):
            est = []
            for rule in rules:
                e = self.estimate(rule, c)
                if e is not None:
                    liq, bad = e
                    # rank as the final choice does: within tolerance by liquidations, else by bad debt
                    est.append(((0, liq, bad) if bad <= bad_debt_tolerance + 1.0 else (1, bad, liq), rule))
            est.sort(key=lambda t: t[0])
            rules = [r for _, r in est[:refine_top]] or rules
        pairs = [p for p in (self.solve(rule, c) for rule in rules) if p is not None]
        best: StaticPair | None = None
        for p in pairs:
            if _better(p, best, bad_debt_tolerance):
                best = p
        return best, pairs

    def brute_force_at(self, c: float, bad_debt_tolerance: float = 0.0) -> StaticPair | None:
        """Reference for the tests: every rule solved the same way, the best chosen by a plain loop."""
        best = None
        for rule in self.rules:
            p = self.solve(rule, c)
            if p is None:
                continue
            ok = p.bad_debt <= bad_debt_tolerance
            if best is None:
                best = p
                continue
            bok = best.bad_debt <= bad_debt_tolerance
            if ok and not bok:
                best = p
            elif ok and bok and (p.liquidations < best.liquidations or
                                 (p.liquidations == best.liquidations and p.bad_debt < best.bad_debt)):
                best = p
            elif not ok and not bok and (p.bad_debt < best.bad_debt or
                                         (p.bad_debt == best.bad_debt and p.liquidations < best.liquidations)):
                best = p
        return best


def scaled_path(path: MarginPath, scale: float, controls: Controls | None) -> MarginPath:
    """``path`` with its IM multiplied by ``scale`` (a policy brought to a capital budget).

    With ``controls`` the policy's own IM before the controls (``path.im_requested``; the controlled IM for a
    path without one) is scaled and then goes through the controls once: the floor and ceiling bind at their
    own levels whatever the scale (scaling the controlled IM instead would make the ceiling ``scale ×
    ceiling`` for a scale below 1, a rival unable to rise as far as the contender); the change cap is
    relative, so scaling keeps it; MM follows ``mm_fraction × IM`` with its notice. Without ``controls``, IM
    and MM are scaled and capped (a reference path, MM binding as before).
    """
    meta = {**path.meta, "budget_scale": float(scale)}
    if controls is not None:
        base = path.im_requested if path.im_requested is not None else path.im_rate
        requested = np.asarray(base, dtype=np.float64) * scale
        cp = apply_controls(np.minimum(requested, 1.0), controls)
        return MarginPath(times=path.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=path.policy, meta=meta,
                          mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar, im_requested=requested)
    im = np.minimum(np.asarray(path.im_rate, dtype=np.float64) * scale, 1.0)
    mm = np.minimum(np.asarray(path.mm_rate, dtype=np.float64) * scale, im)
    return MarginPath(times=path.times, im_rate=im, mm_rate=mm, policy=path.policy, meta=meta,
                      mm_binds=path.mm_binds)


def scale_to_budget(run_pre: Callable[[float], BacktestResult], target: float, *, lo: float = 0.05,
                    hi: float = 20.0, tol: float = 1e-3, iters: int = 20) -> tuple[float, BacktestResult]:
    """The scale whose pre-cut run locks ``target`` (bracketing secant steps in log scale).

    ``run_pre(scale)`` runs the scaled policy on the bars before the cut; collateral grows with the scale.
    Returns ``(scale, result)``; when ``target`` is out of reach, the nearest end of ``[lo, hi]`` (its
    collateral says by how much it misses).
    """
    s = 1.0
    r = run_pre(s)
    lo_p: tuple[float, BacktestResult] | None = None
    hi_p: tuple[float, BacktestResult] | None = None
    best = (s, r)
    for _ in range(iters):
        c = r.avg_collateral
        if abs(c - target) < abs(best[1].avg_collateral - target):
            best = (s, r)
        if abs(c - target) <= tol:
            return s, r
        if c < target:
            lo_p = (s, r)
        else:
            hi_p = (s, r)
        if lo_p is not None and hi_p is not None:
            a, b = math.log(lo_p[0]), math.log(hi_p[0])
            w = (target - lo_p[1].avg_collateral) / (hi_p[1].avg_collateral - lo_p[1].avg_collateral)
            nxt = math.exp(a + min(max(w, 0.1), 0.9) * (b - a))
            if hi_p[0] / lo_p[0] < 1.0 + 1e-6:
                break
        else:
            nxt = s * (target / max(c, 1e-9)) ** 1.2
        nxt = min(max(nxt, lo), hi)
        if nxt == s:
            break
        s, r = nxt, run_pre(nxt)
    return best


def share_of_bound(l_static: float | None, l_policy: float, l_bound: float | None, *, bad_debt_policy: float,
                   bad_debt_static: float | None, tolerance: float = 0.0) -> tuple[float | None, str | None]:
    """``(L_static - L_policy) / (L_static - L_bound)`` with the reason when it is undefined."""
    if l_static is None or l_bound is None or not math.isfinite(l_bound):
        return None, "no static pair or no bound at this collateral"
    allowance = max(tolerance, bad_debt_static if bad_debt_static is not None else 0.0)
    if bad_debt_policy > allowance + 1e-9:
        return None, (f"bad debt {bad_debt_policy:,.0f} USD above the best static's {allowance:,.0f} USD "
                      "(share undefined)")
    denom = l_static - l_bound
    if denom <= 0:
        return None, "the bound does not cut liquidations against the best static here"
    return (l_static - l_policy) / denom, None
