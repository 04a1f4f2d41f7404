"""A seeded synthetic population of leveraged perp traders for the margin backtest.

Positions open over time (long and short), each with a desired leverage (capped by the policy's IM at
entry by the backtester: ``leverage = min(leverage_draw, 1 / IM)``), a holding period in bars, a notional
in USD and a uniform draw that decides, per position, whether the trader tops up on a margin call.

Defaults (the README quotes this table)
---------------------------------------

=====================  ==============================  =====================================================
parameter              default                         meaning
=====================  ==============================  =====================================================
``n_positions``        10,000                          positions over the whole history
``seed``               0                               ``numpy.random.default_rng(seed)``
``long_share``         0.55                            share of longs
``arrival``            ``"uniform"``                   open bar uniform over the bars (``"volume"``: weighted
                                                       by the bar's volume)
``leverage_median``    10                              lognormal desired leverage, median
``leverage_sigma``     0.7                             log-sd of the leverage draw
``leverage_min/max``   1 / 100                         clip of the draw (then capped by ``1/IM`` at entry)
``hold``               ``"geometric"``                 holding period distribution in bars (or ``lognormal``)
``hold_mean_bars``     10                              mean holding period (geometric: ``p = 1/mean``)
``hold_max_bars``      250                             cap on the holding period
``notional_median``    10,000 USD                      lognormal notional, median
``notional_sigma``     1.0                             log-sd of the notional
``topup_prob``         0.3                             probability a trader tops up on a margin call
``topup_level``        1.0                             a top-up restores equity to ``topup_level ×`` the entry
                                                       margin (at least ``call_health × MM``)
``topup_max``          2                               most top-ups per position
``call_health``        1.25                            margin call when equity < ``call_health × MM``
                                                       (MM incl. an announced increase)
``fee_rate``           0.0005                          taker fee on open and close notional
``funding_rate``       0.0001                          funding per bar (longs pay shorts when > 0); a
                                                       constant or a per-bar array
=====================  ==============================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np

__all__ = ["PopulationConfig", "Population", "generate_population", "POPULATION_DEFAULTS"]


@dataclass(frozen=True)
class PopulationConfig:
    """Parameters of the synthetic trader population (see the module table for the defaults)."""

    n_positions: int = 10_000
    seed: int = 0
    long_share: float = 0.55
    arrival: Literal["uniform", "volume"] = "uniform"
    leverage_median: float = 10.0
    leverage_sigma: float = 0.7
    leverage_min: float = 1.0
    leverage_max: float = 100.0
    hold: Literal["geometric", "lognormal"] = "geometric"
    hold_mean_bars: float = 10.0
    hold_sigma: float = 1.0
    hold_max_bars: int = 250
    notional_median: float = 10_000.0
    notional_sigma: float = 1.0
    topup_prob: float = 0.3
    topup_level: float = 1.0
    topup_max: int = 2
    call_health: float = 1.25
    fee_rate: float = 0.0005
    funding_rate: float | tuple[float, ...] = 0.0001

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"population.{name} must be {expected}, got {getattr(self, name)!r}")

        if int(self.n_positions) != self.n_positions or self.n_positions < 1:
            raise bad("n_positions", "an integer >= 1")
        if not 0.0 <= self.long_share <= 1.0:
            raise bad("long_share", "in [0, 1]")
        if self.arrival not in ("uniform", "volume"):
            raise bad("arrival", "'uniform' or 'volume'")
        if not self.leverage_median >= 1.0:
            raise bad("leverage_median", ">= 1")
        if not self.leverage_sigma >= 0.0:
            raise bad("leverage_sigma", ">= 0")
        if not 1.0 <= self.leverage_min <= self.leverage_max:
            raise bad("leverage_max", f">= leverage_min={self.leverage_min} >= 1")
        if self.hold not in ("geometric", "lognormal"):
            raise bad("hold", "'geometric' or 'lognormal'")
        if not self.hold_mean_bars >= 1.0:
            raise bad("hold_mean_bars", ">= 1")
        if int(self.hold_max_bars) != self.hold_max_bars or self.hold_max_bars < 1:
            raise bad("hold_max_bars", "an integer >= 1")
        if not self.notional_median > 0.0:
            raise bad("notional_median", "> 0")
        if not (self.notional_sigma >= 0.0 and self.hold_sigma >= 0.0):
            raise bad("notional_sigma", ">= 0 (and hold_sigma >= 0)")
        if not 0.0 <= self.topup_prob <= 1.0:
            raise bad("topup_prob", "in [0, 1]")
        if not self.topup_level > 0.0:
            raise bad("topup_level", "> 0")
        if int(self.topup_max) != self.topup_max or self.topup_max < 0:
            raise bad("topup_max", "an integer >= 0")
        if not self.call_health >= 1.0:
            raise bad("call_health", ">= 1")
        if not 0.0 <= self.fee_rate < 0.1:
            raise bad("fee_rate", "in [0, 0.1)")
        fr = np.asarray(self.funding_rate, dtype=np.float64)
        if not np.all(np.isfinite(fr)) or np.any(np.abs(fr) >= 0.1):
            raise bad("funding_rate", "finite with |rate| < 0.1 per bar")
        if fr.ndim == 1:
            object.__setattr__(self, "funding_rate", tuple(float(x) for x in fr))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(d["funding_rate"], tuple):
            d["funding_rate"] = list(d["funding_rate"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PopulationConfig:
        d = dict(d or {})
        if isinstance(d.get("funding_rate"), list):
            d["funding_rate"] = tuple(d["funding_rate"])
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"population has unknown keys {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def with_(self, **changes: Any) -> PopulationConfig:
        return replace(self, **changes)


POPULATION_DEFAULTS: dict[str, Any] = PopulationConfig().to_dict()


@dataclass(frozen=True)
class Population:
    """Positions of the synthetic population, sorted by ``open_bar`` (arrays of length ``n``).

    Attributes
    ----------
    open_bar : np.ndarray
        int64 bar index at whose close the position opens (entry at that close).
    hold_bars : np.ndarray
        int64 planned holding period in bars (>= 1): closes at the close of ``open_bar + hold_bars``.
    side : np.ndarray
        +1.0 long / -1.0 short.
    leverage_draw : np.ndarray
        Desired leverage before the cap ``1 / IM`` at entry.
    notional : np.ndarray
        Entry notional, USD.
    topup_u : np.ndarray
        Uniform draws in [0, 1): the trader tops up on margin calls when ``topup_u < topup_prob``.
    n_bars : int
        Number of bars the population was drawn for.
    cfg : PopulationConfig
        The configuration (fees, funding, top-up behaviour).
    """

    open_bar: np.ndarray
    hold_bars: np.ndarray
    side: np.ndarray
    leverage_draw: np.ndarray
    notional: np.ndarray
    topup_u: np.ndarray
    n_bars: int
    cfg: PopulationConfig = field(default_factory=PopulationConfig)

    def __post_init__(self) -> None:
        for name, dt in (("open_bar", np.int64), ("hold_bars", np.int64), ("side", np.float64),
                         ("leverage_draw", np.float64), ("notional", np.float64), ("topup_u", np.float64)):
            object.__setattr__(self, name, np.array(getattr(self, name), dtype=dt))  # own, read-only copies
        n = len(self.open_bar)
        for name in ("hold_bars", "side", "leverage_draw", "notional", "topup_u"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"population.{name} has length {len(getattr(self, name))}, expected {n}")
        if n and np.any(np.diff(self.open_bar) < 0):
            raise ValueError("population.open_bar must be sorted ascending")
        checks = (
            ("open_bar", (self.open_bar < 0) | (self.open_bar >= self.n_bars), f"in [0, n_bars={self.n_bars})"),
            ("hold_bars", self.hold_bars < 1, ">= 1"),
            ("side", (self.side != 1.0) & (self.side != -1.0), "+1 or -1"),
            ("leverage_draw", ~(self.leverage_draw >= 1.0), ">= 1"),
            ("notional", ~(self.notional > 0.0) | ~np.isfinite(self.notional), "finite and > 0"),
            ("topup_u", ~((self.topup_u >= 0.0) & (self.topup_u < 1.0)), "in [0, 1)"),
        )
        for name, bad, expected in checks:
            if n and bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"population.{name} must be {expected}, got {getattr(self, name)[i].item()!r} at position {i}")
        for name in ("open_bar", "hold_bars", "side", "leverage_draw", "notional", "topup_u"):
            getattr(self, name).setflags(write=False)

    def __len__(self) -> int:
        return int(len(self.open_bar))

    def subset(self, idx: np.ndarray) -> Population:
        """The positions at ``idx`` (sorted order kept)."""
        idx = np.sort(np.asarray(idx))
        return replace(
            self,
            open_bar=self.open_bar[idx].copy(), hold_bars=self.hold_bars[idx].copy(), side=self.side[idx].copy(),
            leverage_draw=self.leverage_draw[idx].copy(), notional=self.notional[idx].copy(),
            topup_u=self.topup_u[idx].copy(),
        )

    def funding_series(self, n_bars: int) -> np.ndarray:
        """Funding rate per bar (length ``n_bars``)."""
        fr = np.asarray(self.cfg.funding_rate, dtype=np.float64)
        if fr.ndim == 0:
            return np.full(n_bars, float(fr))
        if fr.size != n_bars:
            raise ValueError(f"population.funding_rate has {fr.size} values, expected one per bar ({n_bars})")
        return fr.copy()


def generate_population(n_bars: int, cfg: PopulationConfig | None = None,
                        volume: np.ndarray | None = None) -> Population:
    """Draw a population of positions over ``n_bars`` bars.

    Parameters
    ----------
    n_bars : int
        Number of bars of the history (open bars are drawn in ``[0, n_bars - 2]`` so every position
        is held for at least one bar).
    cfg : PopulationConfig, optional
        Parameters; defaults in the module table.
    volume : np.ndarray, optional
        Bar volumes (length ``n_bars``), used when ``cfg.arrival == "volume"``.

    Returns
    -------
    Population
        Sorted by ``open_bar``; the same ``(n_bars, cfg)`` always gives the same population.
    """
    cfg = cfg or PopulationConfig()
    if int(n_bars) != n_bars or n_bars < 2:
        raise ValueError(f"n_bars must be an integer >= 2, got {n_bars!r}")
    rng = np.random.default_rng(cfg.seed)
    n = int(cfg.n_positions)
    if cfg.arrival == "volume":
        if volume is None:
            raise ValueError("population.arrival='volume' needs the bar volumes")
        w = np.nan_to_num(np.asarray(volume, dtype=np.float64)[: n_bars - 1], nan=0.0).clip(min=0.0)
        if w.sum() <= 0:
            raise ValueError("population.arrival='volume' needs a positive total volume")
        open_bar = rng.choice(n_bars - 1, size=n, p=w / w.sum())
    else:
        open_bar = rng.integers(0, n_bars - 1, size=n)
    side = np.where(rng.random(n) < cfg.long_share, 1.0, -1.0)
    lev = np.exp(np.log(cfg.leverage_median) + cfg.leverage_sigma * rng.standard_normal(n))
    lev = np.clip(lev, cfg.leverage_min, cfg.leverage_max)
    if cfg.hold == "geometric":
        hold = rng.geometric(1.0 / cfg.hold_mean_bars, size=n)
    else:
        mu = np.log(cfg.hold_mean_bars) - 0.5 * cfg.hold_sigma**2
        hold = np.ceil(np.exp(mu + cfg.hold_sigma * rng.standard_normal(n)))
    hold = np.clip(hold, 1, cfg.hold_max_bars).astype(np.int64)
    notional = np.exp(np.log(cfg.notional_median) + cfg.notional_sigma * rng.standard_normal(n))
    topup_u = rng.random(n)
    order = np.argsort(open_bar, kind="stable")
    return Population(
        open_bar=open_bar[order].astype(np.int64), hold_bars=hold[order], side=side[order],
        leverage_draw=lev[order], notional=notional[order], topup_u=topup_u[order], n_bars=int(n_bars), cfg=cfg,
    )
