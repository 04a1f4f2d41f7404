"""Other traders around the leveraged population: momentum, mean reversion, market makers, noise.

Each acts at a bar's open on what it saw up to the previous close and sends a signed USD flow (+ = buy) that
moves the price through the impact model. What it watches (``signal``):

* ``"deviation"`` (default): ``x_t = ln(market close) - ln(exogenous close)``, the part of the price the
  simulation itself made (liquidation flow, the agents' own flow). The exogenous bars already are the market with
  its usual traders in it, so the agents react only to what the leveraged population and the cascade add: with no
  liquidations they never trade and the market is the exogenous bars;
* ``"price"``: ``x_t = ln(market close)``, the whole price. The agents then also trade the exogenous moves (a
  second copy of the traders already in the bars); with square-root impact, whose slope is unbounded at small
  flows, momentum on the price can drive the market far from the bars with no liquidation at all (on the calm
  15-minute base of configs/stress.yaml, -5.7 % before the shock; liquidations under "volatility x3" from
  0 to 19 M USD). Kept for comparison.

Flows, with ``x`` the watched series:

* momentum: ``momentum_usd × 100 × (x_{t-1} - x_{t-1-momentum_lookback})`` (USD per 1 % move);
* mean reversion: ``-mean_reversion_usd × 100 × (x_{t-1} - mean x over mr_window bars)``;
* noise: ``noise_usd × N(0, 1)`` from ``numpy.random.default_rng(seed)``;
* market makers absorb the share ``mm_absorb`` of each bar's liquidation flow up to ``mm_capacity_usd``
  per bar, a capacity that shrinks with the liquidity providers' withdrawal in stress.

All zero by default (the leveraged population alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

__all__ = ["AgentConfig", "Agents"]


@dataclass(frozen=True)
class AgentConfig:
    """Sizes and rules of the agents (USD; 0 switches an agent off)."""

    momentum_usd: float = 0.0
    momentum_lookback: int = 4
    mean_reversion_usd: float = 0.0
    mr_window: int = 20
    noise_usd: float = 0.0
    mm_absorb: float = 0.0
    mm_capacity_usd: float = 0.0
    seed: int = 0
    signal: Literal["deviation", "price"] = "deviation"

    def __post_init__(self) -> None:
        if self.signal not in ("deviation", "price"):
            raise ValueError(f"agents.signal must be 'deviation' or 'price', got {self.signal!r}")
        for name in ("momentum_usd", "mean_reversion_usd", "noise_usd", "mm_capacity_usd"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"agents.{name} must be finite and >= 0, got {v!r}")
        for name in ("momentum_lookback", "mr_window"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"agents.{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.mm_absorb <= 1.0:
            raise ValueError(f"agents.mm_absorb must be in [0, 1], got {self.mm_absorb!r}")

    @property
    def active(self) -> bool:
        return (self.momentum_usd > 0 or self.mean_reversion_usd > 0 or self.noise_usd > 0
                or (self.mm_absorb > 0 and self.mm_capacity_usd > 0))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Agents:
    """Stateful agents over one simulation (a new instance per run keeps runs deterministic)."""

    def __init__(self, cfg: AgentConfig, n_bars: int) -> None:
        self.cfg = cfg
        self._noise = (np.random.default_rng(cfg.seed).standard_normal(n_bars) if cfg.noise_usd > 0
                       else np.zeros(n_bars))

    def flow(self, t: int, log_price: np.ndarray) -> float:
        """Signed USD flow of the directional agents at the open of bar ``t``.

        ``log_price[:t]`` is the watched series up to the close of ``t - 1`` (``signal``: the market's log
        closes, or their deviation from the exogenous log closes).
        """
        c = self.cfg
        out = c.noise_usd * float(self._noise[t])
        if t >= 1:
            last = float(log_price[t - 1])
            if c.momentum_usd > 0 and t - 1 - c.momentum_lookback >= 0:
                out += c.momentum_usd * 100.0 * (last - float(log_price[t - 1 - c.momentum_lookback]))
            if c.mean_reversion_usd > 0 and t >= 2:
                lo = max(0, t - c.mr_window)
                out -= c.mean_reversion_usd * 100.0 * (last - float(np.mean(log_price[lo:t])))
        return out

    def absorb(self, liq_flow: float, used: float, stress: float, lp_withdrawal: float) -> tuple[float, float]:
        """Market makers take part of the liquidation flow: returns (flow left, capacity used so far)."""
        c = self.cfg
        if c.mm_absorb <= 0 or c.mm_capacity_usd <= 0 or liq_flow == 0.0:
            return liq_flow, used
        cap = c.mm_capacity_usd * (1.0 - lp_withdrawal * stress)
        take = min(abs(liq_flow) * c.mm_absorb, max(cap - used, 0.0))
        return liq_flow - math.copysign(take, liq_flow), used + take
