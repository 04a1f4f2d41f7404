"""Equal capital under stress: every policy brought to one average collateral on the bars before each window.

The budget is an average collateral (:attr:`backtest.simulation.BacktestResult.avg_collateral`: collateral
locked / exposure, a denominator that does not depend on the policy) of the *pre-window run*: a plain
backtest (no impact, no agents) of a population drawn over the ``calibration_bars`` bars before the
scenario's window, ending at the window's first bar. Each policy reaches it with the backtest stage's budget
tools (:mod:`backtest.budgets`, :mod:`backtest.fit`), as the held-out headline does
(:mod:`backtest.headline`), and nothing is chosen on the window's bars:

* ``static`` (no ``params.im``): the best static (IM, MM) pair locking the budget
  (:class:`backtest.budgets.StaticEnvelope`: among the MM rules, the fewest liquidations with bad debt at
  most ``bad_debt_tolerance``);
* ``predictive`` with ``fit``: :func:`backtest.fit.fit_predictive` in budget mode
  (``target_avg_collateral``): the best shape with its level solved for the budget;
* every other policy (``ewma_ccp``, ``garch_fhs``, a registered kind, a fitted policy that still misses by
  more than ``tol``): one scale on its IM before its controls (``MarginPath.im_requested``;
  :func:`backtest.budgets.scale_to_budget`), the controls applied once at every later use (:class:`ScaledPolicy`),
  so the floor and ceiling stay the controls'; a policy with its own ``with_scale(factor)`` (the
  dynamic grid, :class:`stress.grid.GridPerpPolicy`: its raw spot range, its MM fraction kept) is scaled
  through it.

:func:`bring_to_budget` then measures what the policy locks on the pre-window run
(``pre_window_avg_collateral``, recorded in ``stress.json`` per scenario and policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from backtest.budgets import MmRule, StaticEnvelope, scale_to_budget, scaled_path
from backtest.population import Population, PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, BacktestResult, run_backtest
from margin.path import MarginPath
from margin.policies import PolicyContext

__all__ = ["BudgetSettings", "Calibration", "ScaledPolicy", "calibration", "bring_to_budget", "place_population",
           "collateral_spread"]


def config_section(cls: type, d: Mapping[str, Any], where: str) -> Any:
    """The dataclass ``cls`` from the mapping of a ``stress.yaml`` section; unknown keys and bad values are
    errors naming the section (``stress config: budget has unknown keys [...]``)."""
    valid = {f.name for f in fields(cls)}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"stress config: {where} has unknown keys {sorted(unknown)}; valid: {sorted(valid)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise ValueError(f"stress config: {where}: {exc}") from None


@dataclass(frozen=True)
class BudgetSettings:
    """``budget:`` in configs/stress.yaml.

    Parameters
    ----------
    collateral : float or None
        The budget: average collateral / exposure in (0, 1]; ``None`` runs every policy as configured (no
        equal-capital comparison).
    calibration_bars : int
        Bars before the window that the pre-window run covers (a scenario group may override it).
    tol : float
        A policy is at the budget when its pre-window collateral is within ``tol`` of it (0.002 = 0.2 points);
        also the static envelope's tolerance.
    bad_debt_tolerance : float
        USD of pre-window bad debt a static pair may have and still win on liquidations (and the predictive
        fit's ``bad_debt_allowance``).
    im_grid, mm_fractions, mm_fixed
        The static envelope's IM grid and MM rules (MM = fraction × IM, or a fixed MM rate <= IM).
    scale_bounds : (float, float)
        Range of the scale for scaled policies.
    """

    collateral: float | None = None
    calibration_bars: int = 365
    tol: float = 0.002
    bad_debt_tolerance: float = 0.0
    im_grid: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.7)
    mm_fractions: tuple[float, ...] = (0.25, 0.5)
    mm_fixed: tuple[float, ...] = (0.02, 0.035, 0.05, 0.08)
    scale_bounds: tuple[float, float] = (0.05, 20.0)

    def __post_init__(self) -> None:
        for f in ("im_grid", "mm_fractions", "mm_fixed", "scale_bounds"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        if self.collateral is not None and not 0.0 < self.collateral <= 1.0:
            raise ValueError(f"budget.collateral must be in (0, 1] (average collateral / exposure), "
                             f"got {self.collateral!r}")
        if int(self.calibration_bars) != self.calibration_bars or self.calibration_bars < 10:
            raise ValueError(f"budget.calibration_bars must be an integer >= 10, got {self.calibration_bars!r}")
        if not 0.0 < self.tol <= 0.005:
            raise ValueError(f"budget.tol must be in (0, 0.005] (0.5 points), got {self.tol!r}")
        if not self.bad_debt_tolerance >= 0:
            raise ValueError(f"budget.bad_debt_tolerance must be >= 0 USD, got {self.bad_debt_tolerance!r}")
        if not self.im_grid or not all(0.0 < x <= 1.0 for x in self.im_grid):
            raise ValueError(f"budget.im_grid must be IM rates in (0, 1], got {self.im_grid!r}")
        lo, hi = self.scale_bounds
        if not 0.0 < lo < 1.0 < hi:
            raise ValueError(f"budget.scale_bounds must be (lo, hi) with 0 < lo < 1 < hi, got {self.scale_bounds!r}")
        self.rules  # noqa: B018  (validates the MM rules)

    @property
    def rules(self) -> tuple[MmRule, ...]:
        """The static envelope's MM rules."""
        return tuple([MmRule("fraction", float(f)) for f in self.mm_fractions]
                     + [MmRule("fixed", float(m)) for m in self.mm_fixed])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | float | None) -> BudgetSettings:
        """From the YAML value: a mapping of the fields, a bare number (the collateral) or nothing."""
        if d is None:
            return cls()
        if isinstance(d, int | float) and not isinstance(d, bool):
            return cls(collateral=float(d))
        if not isinstance(d, Mapping):
            raise ValueError(f"stress config: budget must be a number or a mapping, got {d!r}")
        return config_section(cls, d, "budget")


def place_population(n_bars: int, start: int, end: int, cfg: PopulationConfig) -> Population:
    """A population drawn over the ``end - start + 1`` bars from ``start``, placed at bar ``start`` of ``n_bars``
    (positions open in ``[start, end - 1]``)."""
    p = generate_population(end - start + 1, cfg)
    return Population(open_bar=p.open_bar + start, hold_bars=p.hold_bars, side=p.side, leverage_draw=p.leverage_draw,
                      notional=p.notional, topup_u=p.topup_u, n_bars=n_bars, cfg=cfg)


@dataclass(frozen=True)
class ScaledPolicy:
    """``policy`` with its IM before the controls multiplied by ``scale``, then the context's controls."""

    policy: Any
    scale: float

    @property
    def name(self) -> str:
        return f"{getattr(self.policy, 'name', type(self.policy).__name__)}×{self.scale:.4g}"

    def path(self, ctx: PolicyContext) -> MarginPath:
        return scaled_path(self.policy.path(ctx), self.scale, ctx.controls)


@dataclass(frozen=True)
class Calibration:
    """What a policy builder may see: the bars before the window only.

    ``ctx`` has ``cut`` at the window's first bar; ``population`` is drawn over bars ``[start, cut)``;
    :meth:`run` is the pre-window run (``run_backtest`` on ``[start, cut)``, positions open at the cut close
    there).
    """

    ctx: PolicyContext
    population: Population
    cfg: BacktestConfig
    start: int
    settings: BudgetSettings

    @property
    def budget(self) -> float | None:
        return self.settings.collateral

    @property
    def cut(self) -> int:
        return self.ctx.cut_index()

    def window(self) -> dict[str, Any]:
        idx = self.ctx.bars.index
        return {"start": str(idx[self.start]), "end": str(idx[self.cut - 1]), "bars": self.cut - self.start}

    def run(self, path: MarginPath) -> BacktestResult:
        idx = self.ctx.bars.index
        return run_backtest(self.ctx.bars, path, self.population, self.cfg, start=idx[self.start], end=idx[self.cut])

    def envelope(self) -> StaticEnvelope:
        idx = self.ctx.bars.index
        return StaticEnvelope(self.ctx.bars, self.population, self.cfg, self.settings.rules, self.settings.im_grid,
                              start=idx[self.start], end=idx[self.cut], tol=self.settings.tol / 2)


def calibration(ctx: PolicyContext, pop_cfg: PopulationConfig, cfg: BacktestConfig, settings: BudgetSettings,
                calibration_bars: int | None = None) -> Calibration:
    """The pre-window calibration for a context whose ``cut`` is the window's first bar."""
    if ctx.cut is None:
        raise ValueError("calibration needs ctx.cut (the window's first bar)")
    k = ctx.cut_index()
    n = int(settings.calibration_bars if calibration_bars is None else calibration_bars)
    c0 = max(0, k - n)
    if k - c0 < 10:
        raise ValueError(f"only {k - c0} bars before the window starting {ctx.cut}; the budget's calibration needs "
                         f">= 10 (calibration_bars={n})")
    pop = place_population(len(ctx.bars), c0, k, pop_cfg)
    return Calibration(ctx=ctx, population=pop, cfg=cfg, start=c0, settings=settings)


def bring_to_budget(policy: Any, cal: Calibration, method: str = "as_built") -> tuple[Any, dict[str, Any]]:
    """``policy`` at the budget and the record of it (see the module docstring).

    ``method`` names how the builder already aimed at the budget (``static_envelope``, ``fit``); a policy
    whose pre-window run misses the budget by more than ``tol`` is scaled (``method`` becomes ``scale``, or
    ``<method>+scale``). Without a budget the policy is returned as built and only measured.
    """
    b, tol = cal.budget, cal.settings.tol
    base_path = policy.path(cal.ctx)
    r = cal.run(base_path)
    rec: dict[str, Any] = {"target": b}
    if b is not None and abs(r.avg_collateral - b) > tol:
        lo, hi = cal.settings.scale_bounds
        if hasattr(policy, "with_scale"):  # scales itself (the dynamic grid: its raw spot range)
            scale, r = scale_to_budget(lambda s: cal.run(policy.with_scale(s).path(cal.ctx)), b, lo=lo, hi=hi,
                                       tol=tol / 2)
            policy = policy.with_scale(float(scale))
        else:
            scale, r = scale_to_budget(lambda s: cal.run(scaled_path(base_path, s, cal.ctx.controls)), b, lo=lo,
                                       hi=hi, tol=tol / 2)
            policy = ScaledPolicy(policy, float(scale))
        method = "scale" if method == "as_built" else f"{method}+scale"
        rec["scale"] = float(scale)
    rec["method"] = method if b is not None else "unbudgeted"
    rec["pre_window_avg_collateral"] = float(r.avg_collateral)
    rec["pre_window_avg_im"] = float(r.avg_im)
    rec["pre_window_liquidations"] = int(r.liquidations)
    rec["pre_window_bad_debt"] = float(r.bad_debt)
    rec["at_budget"] = None if b is None else bool(abs(r.avg_collateral - b) <= tol)
    rec["calibration"] = cal.window()
    return policy, rec


def collateral_spread(records: Sequence[Mapping[str, Any]]) -> float:
    """Largest minus smallest ``pre_window_avg_collateral`` of a comparison (0 for fewer than two)."""
    x = [float(r["pre_window_avg_collateral"]) for r in records]
    return float(np.ptp(x)) if len(x) > 1 else 0.0
