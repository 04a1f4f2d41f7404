"""Synthetic market: regime-switching GARCH-t with Poisson jumps, with a known true variance path.

Model (per bar t, all returns decimal log returns)::

    s_t ~ Markov(transition[s_{t-1}])                       regime of bar t, drawn at the close of t-1
    h_t = ω_{s_t}·Δ + α_{s_t}·ε_{t-1}² + β_{s_t}·h_{t-1}       diffusive GARCH(1,1) variance
    ε_t = sqrt(h_t)·z_t,   z_t ~ Student-t(ν_{s_t}) scaled to unit variance
    J_t = Σ_{i=1}^{N_t} Y_i,  N_t ~ Poisson(λ_{s_t}·Δ),  Y_i ~ N(0, σ_J,{s_t}²)
    r_t = ε_t + J_t
    true_variance_t = Var(r_t | F_{t-1}) = h_t + λ_{s_t}·Δ·σ_J,{s_t}²

Δ is the bar length in days (1 for daily bars, 1/1440 for 1-minute bars): ω and λ are per day, so the
unconditional variance scales with the bar length; α, β, ν, σ_J and the transition matrix are per
bar. Jumps do not feed the GARCH recursion (ε excludes J). With a single regime ("collapsed" GARCH, as
in Gray 1996 / Klaassen 2002) the path is one variance recursion whose parameters switch.

Defaults (daily, 24/7 crypto-like): regime 0 "calm": ω=2e-5, α=0.05, β=0.90, ν=6, λ=0.02/day,
σ_J=0.03 (unconditional daily vol ≈ 2.1 %); regime 1 "stressed": ω=2e-4, α=0.10, β=0.85, ν=4,
λ=0.10/day, σ_J=0.08 (≈ 6.9 %). Transition per bar: P(calm→calm)=0.99, P(stressed→stressed)=0.95
(mean durations 100 and 20 bars). Start in calm, price 100.

High and low come from an intrabar path of ``intraday_steps`` Brownian steps (a bridge pinned to the
bar's diffusive return, the jump inserted at a random step) whose per-step extremes are drawn EXACTLY
from the Brownian-bridge maximum/minimum law, so range estimators see a continuous-path range with no
discretisation bias (beyond the negligible max/min dependence inside one step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_pipelines.bars import CANONICAL_COLUMNS, bar_nanos, bars_per_year, content_hash, validate_bar

__all__ = ["RegimeParams", "DEFAULT_REGIMES", "DEFAULT_TRANSITION", "SyntheticPath", "simulate", "bridge_extremes"]

_CHUNK = 50_000


@dataclass(frozen=True)
class RegimeParams:
    """GARCH-t-with-jumps parameters of one regime (ω and λ per day; the rest per bar)."""

    omega: float
    alpha: float
    beta: float
    nu: float
    jump_intensity: float
    jump_scale: float

    def __post_init__(self) -> None:
        if not self.omega > 0:
            raise ValueError(f"omega must be > 0, got {self.omega}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta >= 1:
            raise ValueError(f"need alpha >= 0, beta >= 0, alpha + beta < 1, got alpha={self.alpha}, beta={self.beta}")
        if not self.nu > 2:
            raise ValueError(f"nu (Student-t degrees of freedom) must be > 2, got {self.nu}")
        if self.jump_intensity < 0 or self.jump_scale < 0:
            raise ValueError(f"jump_intensity and jump_scale must be >= 0, got {self.jump_intensity}, {self.jump_scale}")

    def unconditional_variance(self, dt: float = 1.0) -> float:
        """Long-run variance per bar of length ``dt`` days (diffusive plus jumps)."""
        return self.omega * dt / (1.0 - self.alpha - self.beta) + self.jump_intensity * dt * self.jump_scale**2


DEFAULT_REGIMES: tuple[RegimeParams, ...] = (
    RegimeParams(omega=2e-5, alpha=0.05, beta=0.90, nu=6.0, jump_intensity=0.02, jump_scale=0.03),
    RegimeParams(omega=2e-4, alpha=0.10, beta=0.85, nu=4.0, jump_intensity=0.10, jump_scale=0.08),
)
DEFAULT_TRANSITION: tuple[tuple[float, ...], ...] = ((0.99, 0.01), (0.05, 0.95))


@dataclass(frozen=True)
class SyntheticPath:
    """A simulated market with its truth.

    Attributes
    ----------
    bars : pd.DataFrame
        Canonical OHLCV frame (UTC index ``time``; attrs source, asset, bar, calendar, bars_per_year,
        content_hash).
    true_variance : pd.Series
        Conditional variance of each bar's log return given information up to t-1.
    regimes : pd.Series
        Regime label of each bar (0 = calm ... K-1 = stressed).
    returns : pd.Series
        Close-to-close log returns (the first relative to the start price).
    jumps : pd.Series
        Jump component of each return (0 where none).
    params : dict
        The parameters used (for logging / reproduction).
    """

    bars: pd.DataFrame
    true_variance: pd.Series
    regimes: pd.Series
    returns: pd.Series
    jumps: pd.Series
    params: dict = field(default_factory=dict)


def bridge_extremes(a: np.ndarray, b: np.ndarray, var: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws of the max and min of Brownian bridges from ``a`` to ``b`` with total variance ``var``.

    Uses ``max = (a + b + sqrt((b - a)^2 - 2 var ln U)) / 2`` (and the mirror for the min), U ~ U(0, 1).
    The max and min are drawn independently (their dependence inside one short step is negligible).
    """
    d2 = (b - a) ** 2
    u1 = 1.0 - rng.random(a.shape)  # in (0, 1]
    u2 = 1.0 - rng.random(a.shape)
    mx = 0.5 * (a + b + np.sqrt(d2 - 2.0 * var * np.log(u1)))
    mn = 0.5 * (a + b - np.sqrt(d2 - 2.0 * var * np.log(u2)))
    return mx, mn


def _intrabar_range(diff: np.ndarray, jump: np.ndarray, h: np.ndarray, steps: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Highest and lowest log move from the open within each bar (>= 0 and <= 0 respectively)."""
    n = diff.shape[0]
    hi = np.empty(n)
    lo = np.empty(n)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        m = e - s
        sv = h[s:e, None] / steps
        walk = np.cumsum(rng.standard_normal((m, steps)) * np.sqrt(sv), axis=1)
        frac = np.arange(1, steps + 1) / steps
        path = walk - frac[None, :] * (walk[:, -1:] - diff[s:e, None])  # bridge pinned to the diffusive return
        j = rng.integers(0, steps, size=m)
        path = path + np.where(np.arange(steps)[None, :] >= j[:, None], jump[s:e, None], 0.0)
        start = np.concatenate([np.zeros((m, 1)), path[:, :-1]], axis=1)
        mx, mn = bridge_extremes(start, path, np.broadcast_to(sv, path.shape), rng)
        hi[s:e] = np.maximum(mx.max(axis=1), 0.0)
        lo[s:e] = np.minimum(mn.min(axis=1), 0.0)
    return hi, lo


def simulate(n: int = 5000, *, seed: int = 0, bar: str = "1D", intraday_steps: int = 48,
             regimes: Sequence[RegimeParams] | None = None, transition: Sequence[Sequence[float]] | None = None,
             start: str = "2018-01-01", s0: float = 100.0, asset: str = "SYN", initial_regime: int = 0) -> SyntheticPath:
    """Simulate ``n`` bars of the regime-switching GARCH-t-with-jumps market (see module docstring).

    Parameters
    ----------
    n : int
        Number of bars (>= 2).
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same path bit for bit.
    bar : str
        Bar alias (fixed size, e.g. "1D", "15min", "1min"); 24/7 calendar.
    intraday_steps : int
        Brownian steps per bar used for high/low (>= 1; the extremes are exact per step).
    regimes, transition : optional
        Regime parameters (calm first) and the per-bar Markov transition matrix (rows sum to 1).
    start : str
        First bar's open time (UTC), on the bar grid.
    s0 : float
        Opening price in quote currency.

    Returns
    -------
    SyntheticPath
    """
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if int(intraday_steps) < 1:
        raise ValueError(f"intraday_steps must be >= 1, got {intraday_steps}")
    if not s0 > 0:
        raise ValueError(f"s0 must be > 0, got {s0}")
    n, steps = int(n), int(intraday_steps)
    bar = validate_bar(bar)
    if bar == "1B":
        raise ValueError("synthetic markets trade 24/7: bar must be a fixed size such as '1D' or '1min', got '1B'")
    regs = tuple(regimes) if regimes is not None else DEFAULT_REGIMES
    k = len(regs)
    P = np.asarray(transition if transition is not None else DEFAULT_TRANSITION, dtype=np.float64)
    if regimes is not None and transition is None and k != len(DEFAULT_TRANSITION):
        raise ValueError(f"transition must be given for {k} regimes")
    if P.shape != (k, k) or (P < 0).any() or not np.allclose(P.sum(axis=1), 1.0):
        raise ValueError(f"transition must be a {k}x{k} row-stochastic matrix, got {P.tolist()}")
    if not 0 <= initial_regime < k:
        raise ValueError(f"initial_regime must be in [0, {k}), got {initial_regime}")
    dt = bar_nanos(bar) / (86_400 * 10**9)
    rng = np.random.default_rng(seed)

    omega = np.array([r.omega * dt for r in regs])
    alpha = np.array([r.alpha for r in regs])
    beta = np.array([r.beta for r in regs])
    nu = np.array([r.nu for r in regs])
    lam = np.array([r.jump_intensity * dt for r in regs])
    jsd = np.array([r.jump_scale for r in regs])

    # regime chain (vectorised through uniform draws and cumulative rows)
    u = rng.random(n)
    cum = np.cumsum(P, axis=1)
    state = np.empty(n, dtype=np.int64)
    state[0] = initial_regime
    cum_list = cum.tolist()
    s = initial_regime
    for t in range(1, n):
        row = cum_list[s]
        s_new = 0
        while s_new < k - 1 and u[t] > row[s_new]:
            s_new += 1
        state[t] = s = s_new

    # innovations: Student-t scaled to unit variance, per regime's ν
    z = rng.standard_t(nu[state]) * np.sqrt((nu[state] - 2.0) / nu[state])
    counts = rng.poisson(lam[state])
    jumps = np.sqrt(counts) * jsd[state] * rng.standard_normal(n)

    # GARCH recursion (sequential by nature; plain floats are fastest in CPython)
    om, al, be = omega[state].tolist(), alpha[state].tolist(), beta[state].tolist()
    zl = z.tolist()
    h = np.empty(n)
    h_prev = regs[initial_regime].omega * dt / (1.0 - regs[initial_regime].alpha - regs[initial_regime].beta)
    eps_prev2 = h_prev
    hl = [0.0] * n
    for t in range(n):
        ht = om[t] + al[t] * eps_prev2 + be[t] * h_prev
        hl[t] = ht
        eps_prev2 = ht * zl[t] * zl[t]
        h_prev = ht
    h[:] = hl
    eps = np.sqrt(h) * z
    ret = eps + jumps
    true_var = h + lam[state] * jsd[state] ** 2

    hi, lo = _intrabar_range(eps, jumps, h, steps, rng)
    log_close = np.log(s0) + np.cumsum(ret)
    log_open = np.concatenate([[np.log(s0)], log_close[:-1]])
    vol = 1_000.0 * np.exp(0.5 * rng.standard_normal(n)) * (1.0 + np.abs(ret) / np.sqrt(true_var))

    t0 = pd.Timestamp(start)
    t0 = t0.tz_localize("UTC") if t0.tz is None else t0.tz_convert("UTC")
    index = pd.DatetimeIndex(t0 + pd.to_timedelta(np.arange(n, dtype=np.int64) * bar_nanos(bar), unit="ns")).as_unit("ns")
    index.name = "time"
    bars = pd.DataFrame(
        {
            "open": np.exp(log_open),
            "high": np.exp(log_open + hi),
            "low": np.exp(log_open + lo),
            "close": np.exp(log_close),
            "volume": vol,
        },
        index=index,
        columns=list(CANONICAL_COLUMNS),
    )
    # exp/log round-off can put close a hair outside [low, high]: widen by construction
    bars["high"] = bars[["open", "high", "close"]].max(axis=1)
    bars["low"] = bars[["open", "low", "close"]].min(axis=1)
    bars.attrs.update(source=f"synthetic:seed={seed}", asset=asset, bar=bar, calendar="24/7",
                      bars_per_year=bars_per_year(bar, "24/7"))
    bars.attrs["content_hash"] = content_hash(bars)
    params = {
        "n": n, "seed": seed, "bar": bar, "intraday_steps": steps, "dt_days": dt, "s0": s0,
        "regimes": [r.__dict__.copy() for r in regs], "transition": P.tolist(), "initial_regime": initial_regime,
    }
    return SyntheticPath(
        bars=bars,
        true_variance=pd.Series(true_var, index=index, name="true_variance"),
        regimes=pd.Series(state, index=index, name="regime"),
        returns=pd.Series(ret, index=index, name="ret"),
        jumps=pd.Series(jumps, index=index, name="jump"),
        params=params,
    )
