"""Margin policies: map forecasts and market state to a margin path (IM for new positions, MM for open ones).

Every policy is a small frozen object with ``name`` and ``path(ctx: PolicyContext) -> MarginPath``
(:mod:`margin.path`). This module holds the context, the shared helpers and the policies that need no
search; the predictive mapping is in :mod:`margin.predictive`. Fitting it, the perfect-foresight bound and
the factory that builds any policy by name (``backtest.factory.make_policy``) need the simulation, so they
live in the ``backtest`` stage.

=================  ==========================================================================================
name               rule
=================  ==========================================================================================
``static_<im>``    an (IM, MM) pair: fixed IM (e.g. ``static_0.10``), MM a fixed rate or ``mm_fraction × IM``;
                   no floor/ceiling (the pairs trace the static frontier at each capital budget)
``ewma_ccp``       EWMA (RiskMetrics) variance of the bars' returns → normal VaR at ``confidence`` over
                   ``horizon`` bars, with ONE anti-procyclicality tool (EMIR art. 28): ``floor`` (VaR of the
                   ``lookback``-bar (10y) or full-history volatility), ``buffer`` (25 % buffer, released when
                   the EWMA volatility is above its past ``stress_quantile``), ``stressed_weight`` (25 % weight
                   on the margin of the most stressed EWMA volatility seen so far)
``garch_fhs``      filtered historical simulation: the forecast's ``horizon``-step volatility × the VaR or ES
                   of bootstrapped sums of the forecast's standardized residuals, worst of long and short
``oracle_vol``     IM from the REALISED future volatility (benchmark, not deployable; can lose to static)
=================  ==========================================================================================

Controls (floor, ceiling, change cap, MM notice; :mod:`margin.controls`) apply to every deployable policy.
Conventions: IM/MM are fractions of notional; value ``t`` is published at the close of bar ``t`` (see
:mod:`margin.path`); a variance is per bar, in decimal log-return units.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.stats import norm

from margin.controls import Controls, apply_controls
from margin.path import MarginPath

__all__ = [
    "PolicyContext",
    "Policy",
    "StaticPolicy",
    "EwmaCcpPolicy",
    "GarchFhsPolicy",
    "OracleVolPolicy",
    "mm_controlled",
    "slow_release",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class PolicyContext:
    """What a policy may look at.

    Parameters
    ----------
    bars : pd.DataFrame
        OHLCV bars, UTC index (the path has one value per bar).
    forecast : VolatilityForecast, optional
        Out-of-sample forecasts whose origins are bar times (per-step variance; may carry ``std_resid``,
        ``quantiles``, ``regime_probs``). Bars before the first origin use a causal EWMA variance.
    regime_probs : pd.DataFrame, optional
        Filtered regime probabilities (index: bar times, columns calm … stressed; the last column, or one
        named ``stressed``, is the stressed regime).
    cut : pd.Timestamp, optional
        Out-of-sample cut: parameters are fitted on origins before it, scored after it.
    controls : Controls
        Controls for deployable policies.
    """

    bars: pd.DataFrame
    forecast: Any = None
    regime_probs: pd.DataFrame | None = None
    cut: pd.Timestamp | None = None
    controls: Controls = field(default_factory=Controls)

    def __post_init__(self) -> None:
        if not isinstance(self.bars, pd.DataFrame) or not isinstance(self.bars.index, pd.DatetimeIndex):
            raise TypeError("PolicyContext.bars must be a DataFrame with a DatetimeIndex")
        if self.cut is not None:
            c = pd.Timestamp(self.cut)
            object.__setattr__(self, "cut", c.tz_localize("UTC") if c.tz is None else c.tz_convert("UTC"))

    @property
    def times(self) -> pd.DatetimeIndex:
        return pd.DatetimeIndex(self.bars.index)

    def close(self) -> np.ndarray:
        cols = {str(c).lower(): c for c in self.bars.columns}
        if "close" not in cols:
            raise ValueError(f"bars must have a 'close' column, got {list(self.bars.columns)}")
        return self.bars[cols["close"]].to_numpy(dtype=np.float64)

    def returns(self) -> np.ndarray:
        """Decimal log returns per bar (``r[0] = 0``)."""
        c = self.close()
        r = np.zeros_like(c)
        r[1:] = np.log(c[1:] / c[:-1])
        return r

    def cut_index(self) -> int:
        """Index of the first bar at or after the cut (``n_bars`` when there is no cut)."""
        if self.cut is None:
            return len(self.bars)
        return int(self.times.searchsorted(self.cut, side="left"))


class Policy(Protocol):
    name: str

    def path(self, ctx: PolicyContext) -> MarginPath: ...


# ---------------------------------------------------------------------------------------------- helpers
def ewma_variance(r: np.ndarray, lam: float = 0.94, seed_bars: int = 30) -> np.ndarray:
    """Causal RiskMetrics variance ``v_t = lam v_{t-1} + (1 - lam) r_t^2`` (includes bar ``t``).

    Seeded with the mean squared return of the first ``seed_bars`` returns.
    """
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam!r}")
    r2 = np.asarray(r, dtype=np.float64) ** 2
    v0 = float(np.mean(r2[1:seed_bars + 1])) if r2.size > 1 else 1e-4
    v0 = v0 if v0 > 0 else 1e-8
    v, _ = lfilter([1.0 - lam], [1.0, -lam], r2, zi=[lam * v0])
    return np.maximum(v, 1e-12)


def var_to_im(sigma_h: np.ndarray, z: float) -> np.ndarray:
    """IM rate covering a ``z``-sigma log move either way: ``exp(z σ_h) - 1`` (the short's loss, the larger)."""
    return np.expm1(z * np.asarray(sigma_h, dtype=np.float64))


def mm_controlled(name: str, ctx: PolicyContext, raw: np.ndarray, meta: dict[str, Any],
                   raw_mm: np.ndarray | None = None) -> MarginPath:
    cp = apply_controls(raw, ctx.controls, raw_mm)
    meta = {**meta, "controls": ctx.controls.to_dict()}
    return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=name, meta=meta,
                      mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar, im_requested=raw)


def aligned_variance(ctx: PolicyContext, lam: float = 0.94) -> tuple[np.ndarray, np.ndarray]:
    """Forecast per-step variance on the bars' grid: ``(n_bars, H)`` and a mask of bars with a forecast.

    Forecast rows are matched to bars by origin (the last row at or before each bar: forward-filled);
    bars before the first origin get a causal EWMA variance for every step.
    """
    n = len(ctx.bars)
    fc = ctx.forecast
    ew = ewma_variance(ctx.returns(), lam)
    if fc is None:
        return ew[:, None], np.zeros(n, dtype=bool)
    pos = fc.origins.searchsorted(ctx.times, side="right") - 1  # last origin <= bar time
    has = pos >= 0
    var = np.empty((n, fc.horizon))
    var[has] = fc.variance[pos[has]]
    var[~has] = ew[~has, None]
    return var, has


def aligned_stress(ctx: PolicyContext) -> np.ndarray:
    """Probability of the stressed regime per bar (0 where unknown)."""
    n = len(ctx.bars)
    if ctx.regime_probs is not None:
        df = ctx.regime_probs
        col = next((c for c in df.columns if "stress" in str(c).lower()), df.columns[-1])
        idx = pd.DatetimeIndex(df.index)
        pos = idx.searchsorted(ctx.times, side="right") - 1
        vals = df[col].to_numpy(dtype=np.float64)
        return np.where(pos >= 0, np.nan_to_num(vals[np.maximum(pos, 0)], nan=0.0), 0.0)
    fc = ctx.forecast
    if fc is not None and fc.regime_probs is not None:
        names = fc.regime_names or ()
        j = next((i for i, nm in enumerate(names) if "stress" in nm.lower()), fc.regime_probs.shape[1] - 1)
        pos = fc.origins.searchsorted(ctx.times, side="right") - 1
        return np.where(pos >= 0, fc.regime_probs[np.maximum(pos, 0), j], 0.0)
    return np.zeros(n)


def slow_release(raw: np.ndarray, release: float) -> np.ndarray:
    """``y_t = max(raw_t, (1 - release) y_{t-1})``: rises at once, falls by at most ``release`` per bar."""
    if not 0.0 < release <= 1.0:
        raise ValueError(f"release must be in (0, 1], got {release!r}")
    x = np.asarray(raw, dtype=np.float64)
    out = np.empty_like(x)
    keep = 1.0 - release
    prev = 0.0  # IM rates are positive
    for t, v in enumerate(x.tolist()):
        prev = v if v > prev * keep else prev * keep
        out[t] = prev
    return out


# ---------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class StaticPolicy:
    """Fixed IM and MM: an (IM, MM) pair.

    MM is ``mm`` (a fixed rate, at most ``im``) when given, else ``mm_fraction × IM`` (``mm_fraction`` from the
    context's controls unless given). Constant rates: the MM binding on open positions is the one they opened
    with, so the path's ``mm_binds`` does not matter.
    """

    im: float
    mm_fraction: float | None = None
    mm: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.im <= 1.0:
            raise ValueError(f"static im must be in (0, 1], got {self.im!r}")
        if self.mm is not None:
            if self.mm_fraction is not None:
                raise ValueError("static policy: give mm (a rate) or mm_fraction (of IM), not both")
            if not 0.0 < self.mm <= self.im:
                raise ValueError(f"static mm must be in (0, im={self.im!r}], got {self.mm!r}")
        if self.mm_fraction is not None and not 0.0 < self.mm_fraction <= 1.0:
            raise ValueError(f"static mm_fraction must be in (0, 1], got {self.mm_fraction!r}")

    @property
    def name(self) -> str:
        base = f"static_{self.im:.2f}" if round(self.im, 2) == self.im else f"static_{self.im:g}"
        if self.mm is not None:
            return f"{base}_mm{self.mm:g}"
        return base if self.mm_fraction is None else f"{base}_mmx{self.mm_fraction:g}"

    def path(self, ctx: PolicyContext) -> MarginPath:
        n = len(ctx.bars)
        if self.mm is not None:
            mm, meta = self.mm, {"im": self.im, "mm": self.mm}
        else:
            frac = ctx.controls.mm_fraction if self.mm_fraction is None else self.mm_fraction
            mm, meta = frac * self.im, {"im": self.im, "mm_fraction": frac}
        return MarginPath(times=ctx.times, im_rate=np.full(n, self.im), mm_rate=np.full(n, mm),
                          policy=self.name, meta=meta)


@dataclass(frozen=True)
class EwmaCcpPolicy:
    """EWMA VaR margin with one CCP anti-procyclicality tool (``apc``: floor, buffer or stressed_weight)."""

    lam: float = 0.94
    confidence: float = 0.99
    horizon: int = 2
    apc: Literal["floor", "buffer", "stressed_weight"] = "floor"
    lookback: int | None = 3650
    buffer: float = 0.25
    stress_quantile: float = 0.9
    stressed_weight: float = 0.25
    name: str = "ewma_ccp"

    def __post_init__(self) -> None:
        if self.apc not in ("floor", "buffer", "stressed_weight"):
            raise ValueError(f"ewma_ccp.apc must be 'floor', 'buffer' or 'stressed_weight', got {self.apc!r}")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"ewma_ccp.confidence must be in (0.5, 1), got {self.confidence!r}")
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError(f"ewma_ccp.horizon must be an integer >= 1, got {self.horizon!r}")
        if self.lookback is not None and self.lookback < 2:
            raise ValueError(f"ewma_ccp.lookback must be >= 2 bars or null (full history), got {self.lookback!r}")

    def raw(self, ctx: PolicyContext) -> np.ndarray:
        r = ctx.returns()
        v = ewma_variance(r, self.lam)
        z = float(norm.ppf(self.confidence))
        sig = np.sqrt(v)
        im = var_to_im(sig * math.sqrt(self.horizon), z)
        s = pd.Series(sig)
        win = self.lookback or len(r)
        if self.apc == "floor":
            rs = pd.Series(r)
            lt = rs.rolling(win, min_periods=2).std().bfill().to_numpy()
            return np.maximum(im, var_to_im(lt * math.sqrt(self.horizon), z))
        if self.apc == "buffer":
            thr = s.rolling(win, min_periods=1).quantile(self.stress_quantile).shift(1).bfill().to_numpy()
            stressed = sig > thr
            return np.where(stressed, im, (1.0 + self.buffer) * im)
        peak = s.rolling(win, min_periods=1).max().to_numpy()
        im_stress = var_to_im(peak * math.sqrt(self.horizon), z)
        return (1.0 - self.stressed_weight) * im + self.stressed_weight * im_stress

    def path(self, ctx: PolicyContext) -> MarginPath:
        meta = {"lam": self.lam, "confidence": self.confidence, "horizon": self.horizon, "apc": self.apc,
                "lookback": self.lookback}
        return mm_controlled(self.name, ctx, self.raw(ctx), meta)


@dataclass(frozen=True)
class GarchFhsPolicy:
    """Filtered historical simulation on the forecast: VaR/ES of ``horizon``-bar returns, worst side."""

    confidence: float = 0.99
    horizon: int = 2
    measure: Literal["var", "es"] = "es"
    n_sims: int = 20_000
    seed: int = 0
    name: str = "garch_fhs"

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"garch_fhs.confidence must be in (0.5, 1), got {self.confidence!r}")
        if self.measure not in ("var", "es"):
            raise ValueError(f"garch_fhs.measure must be 'var' or 'es', got {self.measure!r}")
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError(f"garch_fhs.horizon must be an integer >= 1, got {self.horizon!r}")

    def tail_factors(self, resid: np.ndarray) -> tuple[float, float]:
        """(left, right) tail of the bootstrapped standardized ``horizon``-sum of residuals / sqrt(horizon)."""
        z = np.asarray(resid, dtype=np.float64)
        z = z[np.isfinite(z)]
        if z.size < 20:
            raise ValueError(f"garch_fhs needs at least 20 standardized residuals, got {z.size}")
        z = (z - z.mean()) / z.std()
        rng = np.random.default_rng(self.seed)
        sims = z[rng.integers(0, z.size, size=(self.n_sims, self.horizon))].sum(axis=1) / math.sqrt(self.horizon)
        a = 1.0 - self.confidence
        lo, hi = np.quantile(sims, a), np.quantile(sims, 1.0 - a)
        if self.measure == "es":
            lo = float(sims[sims <= lo].mean())
            hi = float(sims[sims >= hi].mean())
        return float(lo), float(hi)

    def path(self, ctx: PolicyContext) -> MarginPath:
        var, has = aligned_variance(ctx)
        h = min(self.horizon, var.shape[1])
        cum = var[:, :h].sum(axis=1) if h == self.horizon else var[:, :1].sum(axis=1) * self.horizon
        sig = np.sqrt(cum)
        resid = getattr(ctx.forecast, "std_resid", None) if ctx.forecast is not None else None
        source = "forecast"
        if resid is None or len(resid) < 20:
            # residuals of the one-step forecasts before the cut (out-of-sample, no look-ahead past the cut)
            r = ctx.returns()
            k = ctx.cut_index()
            z = r[1:k] / np.sqrt(var[:k - 1, 0]) if k > 1 else np.zeros(0)
            resid, source = z[has[:k - 1]] if k > 1 else z, "pre_cut_one_step"
        lo, hi = self.tail_factors(resid)
        im = np.maximum(-np.expm1(lo * sig), np.expm1(hi * sig))
        meta = {"confidence": self.confidence, "horizon": self.horizon, "measure": self.measure,
                "tail_left": lo, "tail_right": hi, "resid_source": source, "forecast_bars": int(has.sum())}
        return mm_controlled(self.name, ctx, im, meta)


@dataclass(frozen=True)
class OracleVolPolicy:
    """IM ∝ realised FUTURE volatility over ``horizon`` bars (benchmark; not deployable, not a bound)."""

    scale: float = float(norm.ppf(0.99))
    horizon: int = 2
    floor: float = 0.005
    name: str = "oracle_vol"

    def path(self, ctx: PolicyContext) -> MarginPath:
        r = ctx.returns()
        n = r.size
        from numpy.lib.stride_tricks import sliding_window_view

        fut = np.concatenate((r[1:] ** 2, np.full(self.horizon, np.nan)))  # fut[t] = r_{t+1}^2
        win = sliding_window_view(fut, self.horizon)[:n]
        cnt = np.isfinite(win).sum(axis=1)
        rv = np.sqrt(np.where(cnt > 0, np.nansum(win, axis=1) / np.maximum(cnt, 1), np.nan))
        rv = pd.Series(rv).ffill().bfill().fillna(0.0).to_numpy()
        im = np.clip(np.expm1(self.scale * rv * math.sqrt(self.horizon)), self.floor, 1.0)
        frac = ctx.controls.mm_fraction
        return MarginPath(times=ctx.times, im_rate=im, mm_rate=frac * im, policy=self.name,
                          meta={"scale": self.scale, "horizon": self.horizon, "deployable": False})
