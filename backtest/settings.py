"""Pydantic models of the backtest stage's config sections: ``population``, ``backtest``, ``policies``, ``portfolio``.

Each model forbids unknown keys, so a typo is reported with the key's name; ``volmargin.config.RunConfig``
composes them. The population and backtest sections mirror the dataclasses they build
(:class:`backtest.population.PopulationConfig`, :class:`backtest.simulation.BacktestConfig`): a key left out
keeps the dataclass default, and the dataclass's own checks run when the section is built, so an error
names the field and the value (``population.topup_prob must be in [0, 1], got 1.5``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backtest.population import PopulationConfig
from backtest.portfolio_backtest import PortfolioBacktestConfig
from backtest.portfolio_headline import PortfolioHeadlineSettings
from backtest.portfolio_population import AccountPopulationConfig
from backtest.simulation import BacktestConfig
from margin.dynamic_grid import DynamicGridPolicy
from margin.params import LiquidationSettings

__all__ = [
    "PopulationSettings",
    "LiquidationSection",
    "BacktestSettings",
    "StaticPairsConfig",
    "PoliciesConfig",
    "PortfolioSection",
    "replace_path",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def given(self) -> dict[str, Any]:
        """The keys set in the config (``None`` = the dataclass default)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def check_budgets(v: Sequence[float]) -> list[float]:
    """Capital budgets (average collateral / exposure), each in (0, 1] and unique; returned sorted."""
    for b in v:
        if not 0 < b <= 1:
            raise ValueError(f"a budget (average collateral / exposure) must be in (0, 1], got {b}")
    if len(set(v)) != len(v):
        raise ValueError(f"budgets must be unique, got {list(v)}")
    return sorted(v)


def replace_path(obj: Any, dotted: str, value: Any) -> Any:
    """``dataclasses.replace`` along a dotted field path of nested frozen dataclasses (``liquidation.penalty_rate``).

    An integer field given a whole float (``topup_max: 1.0``) keeps its integer type; a bool field gets a bool.
    """
    head, _, rest = dotted.partition(".")
    if not rest:
        cur = getattr(obj, head)
        if isinstance(cur, bool):
            value = bool(value)
        elif isinstance(cur, int) and float(value).is_integer():
            value = int(value)
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: replace_path(getattr(obj, head), rest, value)})


class PopulationSettings(_Strict):
    """The ``population`` section: fields of :class:`backtest.population.PopulationConfig` (its module table
    gives the defaults; ``seed`` comes from the run's ``seed``)."""

    n_positions: int | None = None
    long_share: float | None = None
    arrival: Literal["uniform", "volume"] | None = None
    leverage_median: float | None = None
    leverage_sigma: float | None = None
    leverage_min: float | None = None
    leverage_max: float | None = None
    hold: Literal["geometric", "lognormal"] | None = None
    hold_mean_bars: float | None = None
    hold_sigma: float | None = None
    hold_max_bars: int | None = None
    notional_median: float | None = None
    notional_sigma: float | None = None
    topup_prob: float | None = None
    topup_level: float | None = None
    topup_max: int | None = None
    call_health: float | None = None
    fee_rate: float | None = None
    funding_rate: float | list[float] | None = None

    def build(self, seed: int, overrides: Mapping[str, Any] | None = None) -> PopulationConfig:
        """The :class:`PopulationConfig` with ``seed`` and dotted ``overrides`` (sensitivity runs) applied."""
        d = self.given()
        if isinstance(d.get("funding_rate"), list):
            d["funding_rate"] = tuple(d["funding_rate"])
        pc = PopulationConfig(**d, seed=seed)
        for k, v in (overrides or {}).items():
            pc = replace_path(pc, k, v)
        return pc


class LiquidationSection(_Strict):
    """``backtest.liquidation``: fields of :class:`margin.params.LiquidationSettings`."""

    penalty_rate: float | None = None
    max_close_fraction: float | None = None
    target_health: float | None = None
    slippage_base: float | None = None
    slippage_range_coef: float | None = None
    slippage_volume_coef: float | None = None
    insurance_fund_initial: float | None = None


class BacktestSettings(_Strict):
    """The ``backtest`` section: fields of :class:`backtest.simulation.BacktestConfig`."""

    liquidation: LiquidationSection | None = None
    fund_initial: float | None = None
    frozen: bool | None = None
    topups: bool | None = None
    funding: bool | None = None
    fees: bool | None = None
    funding_rate: float | list[float] | None = None
    volume_scale: float | None = None
    max_steps_per_bar: int | None = None

    def build(self, overrides: Mapping[str, Any] | None = None) -> BacktestConfig:
        """The :class:`BacktestConfig` with dotted ``overrides`` (``liquidation.slippage_range_coef``) applied."""
        d = self.given()
        if self.liquidation is not None:
            d["liquidation"] = LiquidationSettings(**self.liquidation.given())
        if isinstance(d.get("funding_rate"), list):
            d["funding_rate"] = tuple(d["funding_rate"])
        bc = BacktestConfig(**d)
        for k, v in (overrides or {}).items():
            bc = replace_path(bc, k, v)
        return bc


class StaticPairsConfig(_Strict):
    """The static (IM, MM) family (:class:`backtest.budgets.StaticEnvelope`).

    Parameters
    ----------
    im : list of float
        IM levels run for every MM rule first; they bracket each collateral level before the bisection.
    mm_fractions : list of float
        MM rules ``MM = f × IM``.
    mm_fixed : list of float
        MM rules ``MM = m`` (a pair exists only where ``m <= IM``).
    """

    im: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.7], min_length=2)
    mm_fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5])
    mm_fixed: list[float] = Field(default_factory=lambda: [0.02, 0.035, 0.05, 0.08])

    @field_validator("im", "mm_fractions", "mm_fixed")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        for x in v:
            if not 0 < x <= 1:
                raise ValueError(f"a rate must be in (0, 1], got {x}")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be unique, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _some_rule(self) -> StaticPairsConfig:
        if not self.mm_fractions and not self.mm_fixed:
            raise ValueError("static_pairs needs at least one MM rule (mm_fractions or mm_fixed)")
        return self


class PoliciesConfig(_Strict):
    """Policies run by the job and their settings (passed to :func:`backtest.factory.make_policy`).

    Parameters
    ----------
    static_pairs : StaticPairsConfig
        The static (IM, MM) family whose best pair at each collateral level is the baseline.
    ewma_ccp, garch_fhs, oracle_vol : dict
        Keyword settings of each policy (e.g. ``ewma_ccp: {apc: buffer}``; ``garch_fhs:
        {confidence: 0.99, horizon: 2}``); checked against ``make_policy`` when the job starts. ``ewma_ccp``
        and ``garch_fhs`` are scaled to each budget before the cut.
    predictive : dict
        Keyword settings of :func:`backtest.fit.fit_predictive` in budget mode (``rounds``, ``max_positions``,
        ``grid``, ``bad_debt_weight``, ``max_im_increase_5d`` (a fraction or ``ewma_ccp``: that policy's
        largest 5-day IM increase before the cut at the same budget)) and ``fit_bars`` (the bars before the cut
        that the fit and the rivals' scales see; default all).
    """

    static_pairs: StaticPairsConfig = Field(default_factory=StaticPairsConfig)
    ewma_ccp: dict[str, Any] = Field(default_factory=dict)
    garch_fhs: dict[str, Any] = Field(default_factory=dict)
    predictive: dict[str, Any] = Field(default_factory=dict)
    oracle_vol: dict[str, Any] = Field(default_factory=dict)


#: Fields of :class:`margin.dynamic_grid.DynamicGridPolicy` a ``portfolio.fit_grid`` shape may set (``k`` is
#: solved per budget, the controls come from the run's ``controls`` section).
GRID_SHAPE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DynamicGridPolicy)
                                         if f.name not in ("name", "k", "controls"))


class PortfolioSection(_Strict):
    """The ``portfolio`` section: the portfolio-margin comparison of the job on multi-instrument accounts
    (:func:`backtest.portfolio_headline.portfolio_headline`; ``docs/portfolio.md``).

    Parameters
    ----------
    enabled : bool
        Run the comparison (default true); false: nothing is computed and ``summary.portfolio`` says so.
    assets : list of str, optional
        Asset labels of the run (``BTC``, ``ETH``, ...), at least two sharing one cut; default every daily asset
        of the run that shares the most common cut.
    budgets : list of float, optional
        Average collateral levels in (0, 1]; default the run's ``budgets``.
    n_accounts : int
        Accounts of the population (each holds a fresh multi-instrument book every cycle).
    cycle_bars : int
        Bars of one cycle (a book is held from the cycle's first close to its last).
    mode : {"portfolio", "cross"}
        Engine mode of every bar.
    static_mm_fractions : list of float, optional
        MM fractions of the static grid family (default those of ``PortfolioHeadlineSettings``).
    fit_grid : list of dict, optional
        Shapes of the dynamic grid tried before the cut (fields of ``DynamicGridPolicy`` except ``k``, which is
        solved at each budget, and ``controls``); default those of ``PortfolioHeadlineSettings``.
    bad_debt_weight : float, optional
        Weight of bad debt above the tolerance in the pre-cut objective (default 10 per USD).
    """

    enabled: bool = True
    assets: list[str] | None = None
    budgets: list[float] | None = None
    n_accounts: int = Field(default=100, ge=1)
    cycle_bars: int = Field(default=30, ge=2)
    mode: Literal["portfolio", "cross"] = "portfolio"
    static_mm_fractions: list[float] | None = None
    fit_grid: list[dict[str, Any]] | None = None
    bad_debt_weight: float | None = Field(default=None, ge=0)

    @field_validator("assets")
    @classmethod
    def _assets(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(f"a portfolio needs at least 2 assets, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"assets must be unique, got {v}")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one budget (or leave the key out for the run's budgets)")
        return check_budgets(v)

    @field_validator("static_mm_fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one MM fraction")
        for x in v:
            if not 0 < x <= 1:
                raise ValueError(f"an MM fraction must be in (0, 1], got {x}")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be unique, got {v}")
        return v

    @field_validator("fit_grid")
    @classmethod
    def _shapes(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one shape")
        for i, shape in enumerate(v):
            unknown = sorted(set(shape) - set(GRID_SHAPE_KEYS))
            if unknown:
                raise ValueError(f"shape {i}: unknown key(s) {unknown}; known: {list(GRID_SHAPE_KEYS)}")
            try:
                dataclasses.replace(DynamicGridPolicy(), **shape)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"shape {i}: {exc}") from None
        return v

    def headline_settings(self, budgets: Sequence[float], bad_debt_tolerance: float) -> PortfolioHeadlineSettings:
        """:class:`PortfolioHeadlineSettings` at ``budgets`` (the section's own when given) and the run's tolerance."""
        d = PortfolioHeadlineSettings()
        return PortfolioHeadlineSettings(
            budgets=tuple(self.budgets if self.budgets is not None else sorted(budgets)),
            bad_debt_tolerance=float(bad_debt_tolerance),
            bad_debt_weight=d.bad_debt_weight if self.bad_debt_weight is None else float(self.bad_debt_weight),
            static_mm_fractions=(d.static_mm_fractions if self.static_mm_fractions is None
                                 else tuple(self.static_mm_fractions)),
            fit_grid=d.fit_grid if self.fit_grid is None else tuple(dict(x) for x in self.fit_grid),
        )

    def population(self, seed: int) -> AccountPopulationConfig:
        """:class:`AccountPopulationConfig` of ``n_accounts`` and ``cycle_bars`` (seed from the run)."""
        return AccountPopulationConfig(n_accounts=self.n_accounts, cycle_bars=self.cycle_bars, seed=seed)

    def backtest(self) -> PortfolioBacktestConfig:
        """:class:`PortfolioBacktestConfig` in the section's ``mode``."""
        return PortfolioBacktestConfig(mode=self.mode)
