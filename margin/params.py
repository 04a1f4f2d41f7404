"""`MarginParams`: the single contract for margin settings of one market at one time.

A market is identified by ``market_id`` and matches :attr:`margin.instruments.Instrument.underlying`
(e.g. ``"BTC"``): every perpetual, dated future and option on that underlying is margined with the same
parameters. All rates are fractions (0.05 = 5 %), notionals and amounts are in the quote currency (USD),
times are timezone-aware UTC datetimes.

Construction is cheap (a few scalar checks) because a margin policy produces a path of parameters over
time. Lineage, update ids and signatures are not part of this object; the serving layer wraps it in a
signed feed record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

__all__ = [
    "RiskTier",
    "CollateralHaircuts",
    "ScenarioGrid",
    "LiquidationSettings",
    "OptionMarginRule",
    "MarginParams",
    "ParamsFile",
    "RiskModel",
    "MmBasis",
    "RiskMeasureName",
]

MmBasis = Literal["mark", "entry"]
RiskMeasureName = Literal["max", "es", "var"]

_TIERS = ("stablecoin", "major", "long_tail")


def _num(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def _rate(name: str, value: Any, *, allow_zero: bool = False) -> float:
    v = _num(name, value)
    lo_ok = v >= 0.0 if allow_zero else v > 0.0
    if not (lo_ok and v <= 1.0):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def _nonneg(name: str, value: Any) -> float:
    v = _num(name, value)
    if v < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def _utc(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{name} must be an ISO-8601 UTC time, got {value!r}") from None
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {value!r}")
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RiskTier:
    """One risk-limit tier: rates that apply while position notional is at most ``max_notional``.

    Parameters
    ----------
    max_notional : float
        Upper bound of the tier in quote currency (``math.inf`` for the last tier).
    im_rate, mm_rate : float
        Initial and maintenance margin rates in (0, 1], ``mm_rate <= im_rate``.
    """

    max_notional: float
    im_rate: float
    mm_rate: float

    def __post_init__(self) -> None:
        mx = float(self.max_notional) if self.max_notional is not None else math.inf
        if math.isnan(mx) or mx <= 0:
            raise ValueError(f"tier max_notional must be > 0, got {self.max_notional!r}")
        object.__setattr__(self, "max_notional", mx)
        object.__setattr__(self, "im_rate", _rate("tier im_rate", self.im_rate))
        object.__setattr__(self, "mm_rate", _rate("tier mm_rate", self.mm_rate))
        if self.mm_rate > self.im_rate:
            raise ValueError(
                f"tier mm_rate must not exceed im_rate, got mm_rate={self.mm_rate} > im_rate={self.im_rate}"
            )


@dataclass(frozen=True, slots=True)
class CollateralHaircuts:
    """Collateral valuation settings (see :mod:`margin.collateral`).

    Parameters
    ----------
    tier_haircuts : tuple of (tier, haircut)
        Base haircut per liquidity tier, fractions in [0, 1]: ``stablecoin``, ``major``, ``long_tail``.
    asset_tiers : tuple of (asset, tier)
        Tier of each collateral asset; assets not listed fall in ``default_tier``.
    size_brackets : tuple of (threshold, extra_haircut)
        Size-dependent haircut: the part of a balance's value (quote currency) above ``threshold`` gets
        ``extra_haircut`` more (cumulative over brackets, like tax brackets), so value never falls as the
        balance grows.
    home_chain : str
        Chain where the venue settles; collateral on any other chain also gets ``bridge_haircut``.
    bridge_haircut : float
        Extra haircut in [0, 1] for collateral held on another chain (bridge risk), applied multiplicatively.
    """

    tier_haircuts: tuple[tuple[str, float], ...] = (("stablecoin", 0.02), ("major", 0.10), ("long_tail", 0.35))
    asset_tiers: tuple[tuple[str, str], ...] = (
        ("USDC", "stablecoin"),
        ("USDT", "stablecoin"),
        ("DAI", "stablecoin"),
        ("BTC", "major"),
        ("ETH", "major"),
    )
    default_tier: str = "long_tail"
    size_brackets: tuple[tuple[float, float], ...] = ()
    home_chain: str = "ethereum"
    bridge_haircut: float = 0.05

    def __post_init__(self) -> None:
        th = tuple(sorted(dict(self.tier_haircuts).items()))
        for tier, h in th:
            _rate(f"haircuts.tier_haircuts[{tier}]", h, allow_zero=True)
        object.__setattr__(self, "tier_haircuts", tuple((t, float(h)) for t, h in th))
        known = {t for t, _ in th}
        at = tuple(sorted(dict(self.asset_tiers).items()))
        for asset, tier in at:
            if tier not in known:
                raise ValueError(f"haircuts.asset_tiers[{asset}] names unknown tier {tier!r}; known: {sorted(known)}")
        object.__setattr__(self, "asset_tiers", at)
        if self.default_tier not in known:
            raise ValueError(f"haircuts.default_tier must be one of {sorted(known)}, got {self.default_tier!r}")
        br = tuple((float(t), float(e)) for t, e in self.size_brackets)
        prev = -math.inf
        for i, (t, e) in enumerate(br):
            _nonneg(f"haircuts.size_brackets[{i}].threshold", t)
            _rate(f"haircuts.size_brackets[{i}].extra_haircut", e, allow_zero=True)
            if t <= prev:
                raise ValueError(f"haircuts.size_brackets thresholds must increase, got {t} after {prev}")
            prev = t
        object.__setattr__(self, "size_brackets", br)
        object.__setattr__(self, "bridge_haircut", _rate("haircuts.bridge_haircut", self.bridge_haircut, allow_zero=True))

    def tier_of(self, asset: str) -> str:
        """Liquidity tier of ``asset``."""
        return dict(self.asset_tiers).get(asset, self.default_tier)

    def base_haircut(self, asset: str) -> float:
        """Tier haircut of ``asset`` (fraction)."""
        return dict(self.tier_haircuts)[self.tier_of(asset)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier_haircuts": dict(self.tier_haircuts),
            "asset_tiers": dict(self.asset_tiers),
            "default_tier": self.default_tier,
            "size_brackets": [{"threshold": t, "extra_haircut": e} for t, e in self.size_brackets],
            "home_chain": self.home_chain,
            "bridge_haircut": self.bridge_haircut,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollateralHaircuts:
        kw = dict(d)
        if "tier_haircuts" in kw:
            kw["tier_haircuts"] = tuple(dict(kw["tier_haircuts"]).items())
        if "asset_tiers" in kw:
            kw["asset_tiers"] = tuple(dict(kw["asset_tiers"]).items())
        if "size_brackets" in kw:
            kw["size_brackets"] = tuple((b["threshold"], b["extra_haircut"]) for b in kw["size_brackets"])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class ScenarioGrid:
    """Portfolio-margin settings: the spot × volatility grid, the risk measure and the add-ons.

    Defaults follow exchange portfolio-margin grids (Deribit/Derive style): spot moves of -15 % … +15 % in
    3 % steps (11 points) crossed with relative implied-volatility shocks of -25 %, 0, +25 % — 33 scenarios.

    Parameters
    ----------
    spot_shocks : tuple of float
        Relative spot moves (0.15 = +15 %); each > -1.
    vol_shocks : tuple of float
        Relative implied-vol moves (0.25 = vol × 1.25); each > -1.
    measure : {"max", "es", "var"}
        ``max`` = worst scenario loss (grid); ``es``/``var`` = expected shortfall / value at risk at
        ``confidence`` (used with filtered historical scenarios).
    confidence : float
        Tail confidence for ``es``/``var`` in (0, 1), e.g. 0.99.
    mm_fraction : float
        Maintenance margin as a fraction of initial margin, in (0, 1].
    short_option_addon : float
        Contingency add-on per net short option contract, as a fraction of the underlying price.
    concentration_threshold : float
        Net delta notional per underlying (quote currency) above which the concentration add-on applies.
    concentration_addon : float
        Add-on rate on the net delta notional above the threshold (fraction).
    """

    spot_shocks: tuple[float, ...] = tuple(round(-0.15 + 0.03 * i, 10) for i in range(11))
    vol_shocks: tuple[float, ...] = (-0.25, 0.0, 0.25)
    measure: RiskMeasureName = "max"
    confidence: float = 0.99
    mm_fraction: float = 0.8
    short_option_addon: float = 0.0
    concentration_threshold: float = math.inf
    concentration_addon: float = 0.0

    def __post_init__(self) -> None:
        ss = tuple(_num("scenario_grid.spot_shocks", s) for s in self.spot_shocks)
        vs = tuple(_num("scenario_grid.vol_shocks", s) for s in self.vol_shocks)
        if not ss or not vs:
            raise ValueError("scenario_grid.spot_shocks and vol_shocks must be non-empty")
        for name, arr in (("spot_shocks", ss), ("vol_shocks", vs)):
            bad = [s for s in arr if s <= -1.0]
            if bad:
                raise ValueError(f"scenario_grid.{name} must be > -1, got {bad[0]}")
        object.__setattr__(self, "spot_shocks", ss)
        object.__setattr__(self, "vol_shocks", vs)
        if self.measure not in ("max", "es", "var"):
            raise ValueError(f"scenario_grid.measure must be 'max', 'es' or 'var', got {self.measure!r}")
        c = _num("scenario_grid.confidence", self.confidence)
        if not 0.0 < c < 1.0:
            raise ValueError(f"scenario_grid.confidence must be in (0, 1), got {self.confidence!r}")
        object.__setattr__(self, "mm_fraction", _rate("scenario_grid.mm_fraction", self.mm_fraction))
        _nonneg("scenario_grid.short_option_addon", self.short_option_addon)
        ct = float(self.concentration_threshold) if self.concentration_threshold is not None else math.inf
        if math.isnan(ct) or ct < 0:
            raise ValueError(f"scenario_grid.concentration_threshold must be >= 0, got {self.concentration_threshold!r}")
        object.__setattr__(self, "concentration_threshold", ct)
        _rate("scenario_grid.concentration_addon", self.concentration_addon, allow_zero=True)

    @property
    def n_scenarios(self) -> int:
        return len(self.spot_shocks) * len(self.vol_shocks)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spot_shocks"] = list(self.spot_shocks)
        d["vol_shocks"] = list(self.vol_shocks)
        d["concentration_threshold"] = None if math.isinf(self.concentration_threshold) else self.concentration_threshold
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScenarioGrid:
        kw = dict(d)
        for k in ("spot_shocks", "vol_shocks"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if kw.get("concentration_threshold", 0.0) is None:
            kw["concentration_threshold"] = math.inf
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class LiquidationSettings:
    """Liquidation engine settings (see :mod:`margin.liquidation` and docs/margin.md).

    Parameters
    ----------
    penalty_rate : float
        Liquidation penalty as a fraction of the closed notional, paid to the insurance fund, in [0, 1).
    max_close_fraction : float
        Largest fraction of a position (or account) one partial-liquidation step may close, in (0, 1].
    target_health : float
        Health factor a partial liquidation restores (> 1; the rule closes the least that reaches it).
    slippage_base : float
        Slippage of a liquidation fill as a fraction of the price, before range/volume terms.
    slippage_range_coef : float
        Extra slippage per unit of the bar's relative range ``(high - low) / open``.
    slippage_volume_coef : float
        Extra slippage per unit of liquidated notional / bar notional volume.
    insurance_fund_initial : float
        Opening size of the insurance fund in quote currency.
    """

    penalty_rate: float = 0.005
    max_close_fraction: float = 0.5
    target_health: float = 1.05
    slippage_base: float = 0.0005
    slippage_range_coef: float = 0.1
    slippage_volume_coef: float = 0.5
    insurance_fund_initial: float = 1_000_000.0

    def __post_init__(self) -> None:
        p = _num("liquidation.penalty_rate", self.penalty_rate)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"liquidation.penalty_rate must be in [0, 1), got {self.penalty_rate!r}")
        _rate("liquidation.max_close_fraction", self.max_close_fraction)
        th = _num("liquidation.target_health", self.target_health)
        if th <= 1.0:
            raise ValueError(f"liquidation.target_health must be > 1, got {self.target_health!r}")
        _nonneg("liquidation.slippage_base", self.slippage_base)
        _nonneg("liquidation.slippage_range_coef", self.slippage_range_coef)
        _nonneg("liquidation.slippage_volume_coef", self.slippage_volume_coef)
        _nonneg("liquidation.insurance_fund_initial", self.insurance_fund_initial)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LiquidationSettings:
        return cls(**dict(d))


@dataclass(frozen=True, slots=True)
class OptionMarginRule:
    """Per-option margin for isolated and cross modes (Deribit standard-margin style).

    Short option IM = ``max(im_rate - OTM / F, im_floor) * F * size + mark``; MM = ``mm_rate * F * size
    + mark``; long options need no margin beyond the premium paid.
    """

    im_rate: float = 0.15
    im_floor: float = 0.10
    mm_rate: float = 0.075

    def __post_init__(self) -> None:
        _rate("option_rule.im_rate", self.im_rate)
        _rate("option_rule.im_floor", self.im_floor)
        _rate("option_rule.mm_rate", self.mm_rate)
        if self.mm_rate > self.im_floor:
            raise ValueError(
                f"option_rule.mm_rate must not exceed im_floor, got mm_rate={self.mm_rate} > im_floor={self.im_floor}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class MarginParams:
    """Margin settings for one market (underlying) over ``[valid_from, valid_until)``.

    Give either flat ``im_rate``/``mm_rate`` or notional ``tiers`` (risk-limit tiers, increasing
    ``max_notional``, last one unbounded). All keyword arguments; validated on construction.

    Parameters
    ----------
    market_id : str
        Underlying the parameters apply to (matches ``Instrument.underlying``).
    im_rate, mm_rate : float, optional
        Flat initial / maintenance margin rates in (0, 1], ``mm_rate <= im_rate``.
    tiers : tuple of RiskTier
        Notional risk-limit tiers; rates must not fall as notional grows.
    mm_basis : {"mark", "entry"}
        Notional on which maintenance margin is charged: mark notional (default, Binance style) or
        entry notional (Bybit USDT style).
    mm_rate_pending : float, optional
        Announced maintenance rate that binds from ``mm_effective_from`` (notice period).
    mm_effective_from : datetime, optional
        UTC time at which ``mm_rate_pending`` binds on existing positions.
    taker_fee_rate, maker_fee_rate : float
        Trade fee rates (fractions of traded notional), in [0, 1).
    close_fee_in_mm : bool
        If true, maintenance margin includes the taker fee to close at the liquidation price.
    haircuts : CollateralHaircuts
    scenario_grid : ScenarioGrid
    liquidation : LiquidationSettings
    option_rule : OptionMarginRule
    valid_from, valid_until : datetime, optional
        UTC validity window, ``valid_from < valid_until``.
    """

    market_id: str
    im_rate: float | None = None
    mm_rate: float | None = None
    tiers: tuple[RiskTier, ...] = ()
    mm_basis: MmBasis = "mark"
    mm_rate_pending: float | None = None
    mm_effective_from: datetime | None = None
    taker_fee_rate: float = 0.0005
    maker_fee_rate: float = 0.0002
    close_fee_in_mm: bool = False
    haircuts: CollateralHaircuts = field(default_factory=CollateralHaircuts)
    scenario_grid: ScenarioGrid = field(default_factory=ScenarioGrid)
    liquidation: LiquidationSettings = field(default_factory=LiquidationSettings)
    option_rule: OptionMarginRule = field(default_factory=OptionMarginRule)
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.market_id, str) or not self.market_id:
            raise ValueError(f"market_id must be a non-empty string, got {self.market_id!r}")
        flat = self.im_rate is not None or self.mm_rate is not None
        if flat and self.tiers:
            raise ValueError(f"market {self.market_id}: give either im_rate/mm_rate or tiers, not both")
        if not flat and not self.tiers:
            raise ValueError(f"market {self.market_id}: im_rate and mm_rate (or tiers) are required")
        if flat:
            if self.im_rate is None or self.mm_rate is None:
                raise ValueError(f"market {self.market_id}: im_rate and mm_rate must both be given")
            im = _rate("im_rate", self.im_rate)
            mm = _rate("mm_rate", self.mm_rate)
            if mm > im:
                raise ValueError(f"mm_rate must not exceed im_rate, got mm_rate={mm} > im_rate={im}")
            object.__setattr__(self, "tiers", (RiskTier(max_notional=math.inf, im_rate=im, mm_rate=mm),))
        else:
            tiers = tuple(t if isinstance(t, RiskTier) else RiskTier(**t) for t in self.tiers)
            for a, b in zip(tiers, tiers[1:], strict=False):
                if b.max_notional <= a.max_notional:
                    raise ValueError(f"tiers max_notional must increase, got {b.max_notional} after {a.max_notional}")
                if b.im_rate < a.im_rate or b.mm_rate < a.mm_rate:
                    raise ValueError(f"tier rates must not fall as notional grows (tier cap {b.max_notional})")
            if not math.isinf(tiers[-1].max_notional):
                raise ValueError(f"the last tier must be unbounded (max_notional null), got {tiers[-1].max_notional}")
            object.__setattr__(self, "tiers", tiers)
            object.__setattr__(self, "im_rate", None)
            object.__setattr__(self, "mm_rate", None)
        if self.mm_basis not in ("mark", "entry"):
            raise ValueError(f"mm_basis must be 'mark' or 'entry', got {self.mm_basis!r}")
        if (self.mm_rate_pending is None) != (self.mm_effective_from is None):
            raise ValueError("mm_rate_pending and mm_effective_from must be given together")
        if self.mm_rate_pending is not None:
            _rate("mm_rate_pending", self.mm_rate_pending)
            if self.mm_rate_pending > self.tiers[0].im_rate:
                raise ValueError(
                    f"mm_rate_pending must not exceed im_rate, got {self.mm_rate_pending} > {self.tiers[0].im_rate}"
                )
        object.__setattr__(self, "mm_effective_from", _utc("mm_effective_from", self.mm_effective_from))
        for name in ("taker_fee_rate", "maker_fee_rate"):
            v = _num(name, getattr(self, name))
            if not -1.0 < v < 1.0:
                raise ValueError(f"{name} must be in (-1, 1), got {v}")
        object.__setattr__(self, "valid_from", _utc("valid_from", self.valid_from))
        object.__setattr__(self, "valid_until", _utc("valid_until", self.valid_until))
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise ValueError(
                f"valid_until must be after valid_from, got {_iso(self.valid_until)} <= {_iso(self.valid_from)}"
            )
        for name, cls in (
            ("haircuts", CollateralHaircuts),
            ("scenario_grid", ScenarioGrid),
            ("liquidation", LiquidationSettings),
            ("option_rule", OptionMarginRule),
        ):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                object.__setattr__(self, name, cls.from_dict(v) if hasattr(cls, "from_dict") else cls(**v))
            elif not isinstance(v, cls):
                raise ValueError(f"{name} must be a {cls.__name__} or a mapping, got {type(v).__name__}")

    # ------------------------------------------------------------------ rates
    def tiers_at(self, t: datetime | None = None) -> tuple[RiskTier, ...]:
        """Risk tiers in force at UTC time ``t`` (the pending MM rate binds from ``mm_effective_from``).

        When the pending rate binds, every tier's MM rate becomes ``max(tier.mm_rate, mm_rate_pending)``
        capped at the tier's IM rate.
        """
        if self.mm_rate_pending is None or t is None or _utc("t", t) < self.mm_effective_from:
            return self.tiers
        p = self.mm_rate_pending
        return tuple(
            RiskTier(max_notional=x.max_notional, im_rate=x.im_rate, mm_rate=min(max(x.mm_rate, p), x.im_rate))
            for x in self.tiers
        )

    def is_valid_at(self, t: datetime) -> bool:
        """Whether UTC time ``t`` is inside ``[valid_from, valid_until)``."""
        t = _utc("t", t)
        return (self.valid_from is None or t >= self.valid_from) and (self.valid_until is None or t < self.valid_until)

    def with_rates(self, im_rate: float, mm_rate: float, **changes: Any) -> MarginParams:
        """Copy with flat rates (cheap; used by policies that produce a path of parameters)."""
        return replace(self, im_rate=im_rate, mm_rate=mm_rate, tiers=(), **changes)

    # -------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (unbounded tier cap as ``null``, times as ISO-8601 ``Z``)."""
        d: dict[str, Any] = {"market_id": self.market_id}
        if len(self.tiers) == 1 and math.isinf(self.tiers[0].max_notional):
            d["im_rate"] = self.tiers[0].im_rate
            d["mm_rate"] = self.tiers[0].mm_rate
        else:
            d["tiers"] = [
                {
                    "max_notional": None if math.isinf(t.max_notional) else t.max_notional,
                    "im_rate": t.im_rate,
                    "mm_rate": t.mm_rate,
                }
                for t in self.tiers
            ]
        d.update(
            mm_basis=self.mm_basis,
            mm_rate_pending=self.mm_rate_pending,
            mm_effective_from=_iso(self.mm_effective_from),
            taker_fee_rate=self.taker_fee_rate,
            maker_fee_rate=self.maker_fee_rate,
            close_fee_in_mm=self.close_fee_in_mm,
            haircuts=self.haircuts.to_dict(),
            scenario_grid=self.scenario_grid.to_dict(),
            liquidation=self.liquidation.to_dict(),
            option_rule=self.option_rule.to_dict(),
            valid_from=_iso(self.valid_from),
            valid_until=_iso(self.valid_until),
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MarginParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown MarginParams field(s) {sorted(extra)}")
        kw = dict(d)
        if "tiers" in kw:
            kw["tiers"] = tuple(
                RiskTier(
                    max_notional=math.inf if t.get("max_notional") is None else t["max_notional"],
                    im_rate=t["im_rate"],
                    mm_rate=t["mm_rate"],
                )
                for t in kw["tiers"]
            )
        if "haircuts" in kw:
            kw["haircuts"] = CollateralHaircuts.from_dict(kw["haircuts"])
        if "scenario_grid" in kw:
            kw["scenario_grid"] = ScenarioGrid.from_dict(kw["scenario_grid"])
        if "liquidation" in kw:
            kw["liquidation"] = LiquidationSettings.from_dict(kw["liquidation"])
        if "option_rule" in kw:
            kw["option_rule"] = OptionMarginRule(**kw["option_rule"])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class RiskModel:
    """Settings shared across markets: joint historical scenarios and EWMA correlation.

    Parameters
    ----------
    underlyings : tuple of str
        Column order of ``historical_returns``.
    historical_returns : tuple of tuple of float
        Joint historical log returns (rows = dates, columns = underlyings), decimal units per horizon.
        May be empty when scenarios come from ``scenario_source``.
    scenario_source : str, optional
        Where the joint scenarios come from (e.g. a dataset name), recorded for lineage.
    ewma_lambda : float
        RiskMetrics decay for the EWMA covariance/correlation, in (0, 1).
    horizon_bars : int
        Liquidation horizon in bars; FHS shocks are scaled by ``sqrt(horizon_bars)``.
    grid_correlation : tuple of tuple of float
        Optional ``(U, U)`` return correlation across ``underlyings`` for offsets in GRID mode (empty: no
        offsets, each underlying's worst loss summed, as on Deribit). Symmetric, unit diagonal, entries in
        [-1, 1], positive semi-definite. See :func:`margin.portfolio.aggregate_grid_risk`.
    grid_stress_weight : float
        Weight in [0, 1] of the stressed blend of the loss correlation toward 1 (1 = no offsets at all, the
        static sum); only used with ``grid_correlation``.
    """

    underlyings: tuple[str, ...] = ()
    historical_returns: tuple[tuple[float, ...], ...] = ()
    scenario_source: str | None = None
    ewma_lambda: float = 0.94
    horizon_bars: int = 1
    grid_correlation: tuple[tuple[float, ...], ...] = ()
    grid_stress_weight: float = 0.0

    def __post_init__(self) -> None:
        lam = _num("risk_model.ewma_lambda", self.ewma_lambda)
        if not 0.0 < lam < 1.0:
            raise ValueError(f"risk_model.ewma_lambda must be in (0, 1), got {self.ewma_lambda!r}")
        if isinstance(self.horizon_bars, bool) or not isinstance(self.horizon_bars, int) or self.horizon_bars < 1:
            raise ValueError(f"risk_model.horizon_bars must be a positive integer, got {self.horizon_bars!r}")
        object.__setattr__(self, "underlyings", tuple(self.underlyings))
        rows = tuple(tuple(float(x) for x in r) for r in self.historical_returns)
        for i, r in enumerate(rows):
            if len(r) != len(self.underlyings):
                raise ValueError(
                    f"risk_model.historical_returns[{i}] has {len(r)} values, expected {len(self.underlyings)}"
                )
            for j, x in enumerate(r):
                if not math.isfinite(x):
                    raise ValueError(f"risk_model.historical_returns[{i}][{j}] must be finite, got {x}")
        object.__setattr__(self, "historical_returns", rows)
        corr = tuple(tuple(float(x) for x in r) for r in self.grid_correlation)
        if corr:
            u = len(self.underlyings)
            c = [list(r) for r in corr]
            if len(c) != u or any(len(r) != u for r in c):
                raise ValueError(f"risk_model.grid_correlation must be {u}x{u} (one row per underlying), "
                                 f"got {len(c)} rows")
            for i in range(u):
                if abs(c[i][i] - 1.0) > 1e-9:
                    raise ValueError(f"risk_model.grid_correlation[{i}][{i}] must be 1, got {c[i][i]}")
                for j in range(u):
                    x = c[i][j]
                    if not (math.isfinite(x) and -1.0 - 1e-12 <= x <= 1.0 + 1e-12) or abs(x - c[j][i]) > 1e-9:
                        raise ValueError(f"risk_model.grid_correlation[{i}][{j}] must be in [-1, 1] and symmetric, "
                                         f"got {x}")
            if np.linalg.eigvalsh(np.asarray(c)).min() < -1e-8:
                raise ValueError("risk_model.grid_correlation must be positive semi-definite, got an eigenvalue "
                                 f"{np.linalg.eigvalsh(np.asarray(c)).min():.3g}")
        object.__setattr__(self, "grid_correlation", corr)
        object.__setattr__(self, "grid_stress_weight",
                           _rate("risk_model.grid_stress_weight", self.grid_stress_weight, allow_zero=True))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "underlyings": list(self.underlyings),
            "historical_returns": [list(r) for r in self.historical_returns],
            "scenario_source": self.scenario_source,
            "ewma_lambda": self.ewma_lambda,
            "horizon_bars": self.horizon_bars,
        }
        if self.grid_correlation:  # only when set, so files without offsets keep their old form
            d["grid_correlation"] = [list(r) for r in self.grid_correlation]
            d["grid_stress_weight"] = self.grid_stress_weight
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RiskModel:
        kw = dict(d)
        kw["underlyings"] = tuple(kw.get("underlyings", ()))
        kw["historical_returns"] = tuple(tuple(r) for r in kw.get("historical_returns", ()))
        if "grid_correlation" in kw:
            kw["grid_correlation"] = tuple(tuple(r) for r in kw["grid_correlation"])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class ParamsFile:
    """A params file: ``{"markets": [MarginParams, ...], "risk_model": {...}}``."""

    markets: tuple[MarginParams, ...]
    risk_model: RiskModel = field(default_factory=RiskModel)

    def __post_init__(self) -> None:
        ids = [m.market_id for m in self.markets]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"markets: duplicate market_id {dup}")

    def by_market(self) -> dict[str, MarginParams]:
        return {m.market_id: m for m in self.markets}

    def to_dict(self) -> dict[str, Any]:
        return {"markets": [m.to_dict() for m in self.markets], "risk_model": self.risk_model.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamsFile:
        markets: Iterable[Mapping[str, Any]] = d.get("markets", [])
        out = []
        for i, m in enumerate(markets):
            try:
                out.append(MarginParams.from_dict(m))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"$.markets[{i}]: {exc}") from None
        try:
            rm = RiskModel.from_dict(d.get("risk_model", {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"$.risk_model: {exc}") from None
        return cls(markets=tuple(out), risk_model=rm)
