"""Market impact of liquidation flow, liquidity that withdraws in stress, and an oracle with delay.

Impact
------
A signed flow ``Q`` (USD, + = buy) moves the log price by ``I(Q) = sign(Q) min(g(|Q| / D_t), max_impact)``
with ``g(x) = coef x`` (``linear``) or ``coef sqrt(x)`` (``sqrt``, the square-root law), ``none`` = 0.
The depth ``D_t`` (USD) shrinks as volatility rises and as liquidity providers withdraw::

    D_t = depth_usd × min(1, sigma_ref / sigma_t)^vol_elasticity × (1 - lp_withdrawal × stress_t)

with ``sigma_t`` the causal EWMA volatility of the exogenous bars up to ``t - 1``, ``sigma_ref`` its median
before the window and ``stress_t = min(drawdown_t / lp_drawdown, 1)`` the market's drawdown from its running
peak in the window. A share ``resilience`` of the accumulated impact decays per bar (transient impact).

Oracle
------
The venue marks positions with an oracle. ``delay_bars = 0`` and ``deviation = 0`` is the ideal oracle: the
marks are the market's own bars (liquidation impact is seen inside the bar, so cascades run within it).
Otherwise the oracle publishes at each close the market close ``delay_bars`` bars earlier, and only when it
deviates from the last published price by at least ``deviation`` (a push oracle with a deviation
threshold); the mark bar is ``open = previous publish``, ``close = this publish``, high/low their extremes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

__all__ = ["ImpactModel", "Oracle", "depth_path"]


def _check(cls_name: str, name: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class ImpactModel:
    """Price impact of a signed USD flow (see the module docstring).

    Parameters
    ----------
    kind : {"none", "linear", "sqrt"}
        Impact law.
    coef : float
        Log move at a flow equal to the depth (``|Q| = D``).
    depth_usd : float
        Calm depth, USD.
    vol_elasticity : float
        Exponent of the depth's response to volatility (0 = depth ignores volatility).
    lp_withdrawal : float
        Share of depth liquidity providers withdraw at full stress, in [0, 1).
    lp_drawdown : float
        Drawdown (fraction) at which stress is full, > 0.
    resilience : float
        Share of the accumulated impact that decays per bar, in [0, 1].
    max_impact : float
        Cap on one bar's log impact per side, > 0.
    """

    kind: Literal["none", "linear", "sqrt"] = "sqrt"
    coef: float = 0.5
    depth_usd: float = 5.0e7
    vol_elasticity: float = 1.0
    lp_withdrawal: float = 0.5
    lp_drawdown: float = 0.2
    resilience: float = 0.1
    max_impact: float = 0.5

    def __post_init__(self) -> None:
        c = "impact"
        _check(c, "kind", self.kind in ("none", "linear", "sqrt"), self.kind, "'none', 'linear' or 'sqrt'")
        _check(c, "coef", math.isfinite(self.coef) and self.coef >= 0, self.coef, "finite and >= 0")
        _check(c, "depth_usd", math.isfinite(self.depth_usd) and self.depth_usd > 0, self.depth_usd, "finite and > 0")
        _check(c, "vol_elasticity", self.vol_elasticity >= 0, self.vol_elasticity, ">= 0")
        _check(c, "lp_withdrawal", 0.0 <= self.lp_withdrawal < 1.0, self.lp_withdrawal, "in [0, 1)")
        _check(c, "lp_drawdown", self.lp_drawdown > 0, self.lp_drawdown, "> 0")
        _check(c, "resilience", 0.0 <= self.resilience <= 1.0, self.resilience, "in [0, 1]")
        _check(c, "max_impact", self.max_impact > 0, self.max_impact, "> 0")

    @property
    def active(self) -> bool:
        """Whether any flow moves the price."""
        return self.kind != "none" and self.coef > 0

    def log_impact(self, flow_usd: float, depth: float) -> float:
        """Signed log price move of a flow ``flow_usd`` (USD, + = buy) at depth ``depth`` (USD)."""
        if not self.active or flow_usd == 0.0:
            return 0.0
        x = abs(flow_usd) / depth
        g = self.coef * x if self.kind == "linear" else self.coef * math.sqrt(x)
        return math.copysign(min(g, self.max_impact), flow_usd)

    def stress(self, drawdown: float) -> float:
        """Liquidity stress in [0, 1] at a drawdown (fraction)."""
        return min(max(drawdown / self.lp_drawdown, 0.0), 1.0)

    def depth_at(self, base_depth: float, drawdown: float) -> float:
        """Depth after liquidity providers withdraw (USD)."""
        return base_depth * (1.0 - self.lp_withdrawal * self.stress(drawdown))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def depth_path(close: np.ndarray, model: ImpactModel, ref_end: int, lam: float = 0.94) -> np.ndarray:
    """Depth per bar (USD) before liquidity providers withdraw: shrinks as the causal volatility rises.

    Parameters
    ----------
    close : np.ndarray
        Exogenous closes (USD).
    model : ImpactModel
    ref_end : int
        ``sigma_ref`` is the median volatility of the bars before ``ref_end`` (the window start).
    lam : float
        EWMA decay of the volatility.

    Returns
    -------
    np.ndarray
        ``depth_usd × min(1, sigma_ref / sigma_{t-1})^vol_elasticity`` per bar.
    """
    c = np.asarray(close, dtype=np.float64)
    r = np.zeros_like(c)
    r[1:] = np.diff(np.log(c))
    v = np.empty_like(c)
    prev = float(np.mean(r[1:31] ** 2)) if c.size > 1 else 0.0
    prev = prev if prev > 0 else 1e-8
    for t, x in enumerate((r * r).tolist()):  # causal: the volatility known at the open of bar t uses r_{t-1}
        v[t] = prev
        prev = lam * prev + (1.0 - lam) * x
    sig = np.sqrt(np.maximum(v, 1e-16))
    ref = float(np.median(sig[: max(int(ref_end), 1)]))
    ratio = np.minimum(1.0, ref / sig) ** model.vol_elasticity
    return model.depth_usd * ratio


@dataclass(frozen=True)
class Oracle:
    """Mark-price oracle: ``delay_bars`` of delay and a ``deviation`` threshold (fraction) for updates."""

    delay_bars: int = 0
    deviation: float = 0.0

    def __post_init__(self) -> None:
        _check("oracle", "delay_bars", int(self.delay_bars) == self.delay_bars and self.delay_bars >= 0,
               self.delay_bars, "an integer >= 0")
        _check("oracle", "deviation", 0.0 <= self.deviation < 1.0, self.deviation, "in [0, 1)")

    @property
    def ideal(self) -> bool:
        """The marks are the market's own bars."""
        return self.delay_bars == 0 and self.deviation == 0.0

    def publish(self, last: float, candidate: float) -> float:
        """Price published at a close: ``candidate`` when it deviates from ``last`` by ``deviation`` or more."""
        if not math.isfinite(last) or abs(candidate / last - 1.0) >= self.deviation:
            return candidate
        return last

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
