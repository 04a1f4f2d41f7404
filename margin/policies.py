"""Margin policies: map forecasts and market state to a margin path (IM for new positions, MM for open ones).

Every policy is a small frozen object with ``name`` and ``path(ctx: PolicyContext) -> MarginPath``;
:func:`make_policy` builds one from its name and config.

=================  ==========================================================================================
name               rule
=================  ==========================================================================================
``static_<im>``    fixed IM (e.g. ``static_0.10``), MM = ``mm_fraction × IM``; no floor/ceiling (the static
                   levels trace the frontier on the bound's grid)
``ewma_ccp``       EWMA (RiskMetrics) variance of the bars' returns → normal VaR at ``confidence`` over
                   ``horizon`` bars, with ONE anti-procyclicality tool (EMIR art. 28): ``floor`` (VaR of the
                   ``lookback``-bar (10y) or full-history volatility), ``buffer`` (25 % buffer, released when
                   the EWMA volatility is above its past ``stress_quantile``), ``stressed_weight`` (25 % weight
                   on the margin of the most stressed EWMA volatility seen so far)
``garch_fhs``      filtered historical simulation: the forecast's ``horizon``-step volatility × the VaR or ES
                   of bootstrapped sums of the forecast's standardized residuals, worst of long and short
``predictive``     the optimizer (:class:`PredictivePolicy`): ``IM = max(floor, level (σ/σ_ref)^power
                   (1 + stress p_stressed))``, σ a blend of the forecast's 1-step and H-step volatility (and of
                   the quantile-implied volatility when present); parameters fitted before the cut only
                   (:func:`fit_predictive`)
``oracle_vol``     IM from the REALISED future volatility (benchmark, not deployable; can lose to static)
``bound``          perfect-foresight cohort optimizer (:class:`BoundPolicy`): per bar's cohort of new
                   positions the entry IM on a grid that minimises ``metric + λ collateral`` knowing the
                   future; MM fixed at entry; scored in the frozen setting
=================  ==========================================================================================

Controls (floor, ceiling, change cap, MM notice; :mod:`margin.controls`) apply to every deployable policy.
Conventions: IM/MM are fractions of notional; value ``t`` is published at the close of bar ``t`` (see
:mod:`margin.backtest`); a variance is per bar, in decimal log-return units.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from scipy.signal import lfilter
from scipy.stats import norm

from margin.controls import Controls, apply_controls

__all__ = [
    "MarginPath",
    "PolicyContext",
    "Policy",
    "StaticPolicy",
    "EwmaCcpPolicy",
    "GarchFhsPolicy",
    "PredictivePolicy",
    "OracleVolPolicy",
    "BoundPolicy",
    "make_policy",
    "fit_predictive",
    "slow_release",
    "POLICY_NAMES",
    "DEFAULT_IM_GRID",
]

log = logging.getLogger(__name__)

#: IM grid of the bound and of the static levels (fractions of notional).
DEFAULT_IM_GRID: tuple[float, ...] = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.5)
POLICY_NAMES: tuple[str, ...] = ("static_<im>", "ewma_ccp", "garch_fhs", "predictive", "oracle_vol", "bound")


# ---------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class MarginPath:
    """Margin rates per bar, published at each bar's close.

    Parameters
    ----------
    times : pd.DatetimeIndex
        UTC bar times (``n_bars``), equal to the bars' index.
    im_rate : np.ndarray
        IM rate for positions opened at each close (fraction of notional).
    mm_rate : np.ndarray
        MM rate binding on open positions during the next bar (``mm_binds="path"``), or the MM of
        positions opened at that close for life (``mm_binds="entry"``).
    policy : str
        Policy name.
    meta : dict
        Parameters and diagnostics.
    mm_pending : np.ndarray, optional
        Announced, not yet binding MM (NaN when none); margin calls use ``max(mm_rate, mm_pending)``.
    mm_effective_bar : np.ndarray, optional
        Bar from which ``mm_pending`` binds (-1 when none).
    mm_binds : {"path", "entry"}
        Whether open positions follow the path's MM or keep the MM of their entry bar.
    """

    times: pd.DatetimeIndex
    im_rate: np.ndarray
    mm_rate: np.ndarray
    policy: str
    meta: dict[str, Any] = field(default_factory=dict)
    mm_pending: np.ndarray | None = None
    mm_effective_bar: np.ndarray | None = None
    mm_binds: Literal["path", "entry"] = "path"

    def __post_init__(self) -> None:
        times = pd.DatetimeIndex(self.times)
        object.__setattr__(self, "times", times)
        n = len(times)
        for name in ("im_rate", "mm_rate"):
            a = np.asarray(getattr(self, name), dtype=np.float64).ravel()
            if a.size != n:
                raise ValueError(f"MarginPath.{name} has {a.size} values for {n} times")
            bad = ~np.isfinite(a) | (a <= 0) | (a > 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"MarginPath.{name} must be in (0, 1], got {float(a[i])!r} at {times[i]}")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        if np.any(self.mm_rate > self.im_rate * (1 + 1e-12)) and self.mm_binds == "entry":
            raise ValueError("MarginPath.mm_rate must not exceed im_rate")
        if self.mm_binds not in ("path", "entry"):
            raise ValueError(f"MarginPath.mm_binds must be 'path' or 'entry', got {self.mm_binds!r}")
        if self.mm_pending is not None:
            p = np.asarray(self.mm_pending, dtype=np.float64).ravel()
            if p.size != n:
                raise ValueError(f"MarginPath.mm_pending has {p.size} values for {n} times")
            object.__setattr__(self, "mm_pending", p)

    def to_frame(self) -> pd.DataFrame:
        d = {"im_rate": self.im_rate, "mm_rate": self.mm_rate}
        if self.mm_pending is not None:
            d["mm_pending"] = self.mm_pending
        return pd.DataFrame(d, index=self.times)

    def params_at(self, i: int, market_id: str, **changes: Any) -> Any:
        """The :class:`margin.params.MarginParams` published at bar ``i`` (pending MM and its start included)."""
        from margin.params import MarginParams

        kw: dict[str, Any] = {"market_id": market_id, "im_rate": float(self.im_rate[i]),
                              "mm_rate": float(min(self.mm_rate[i], self.im_rate[i])),
                              "valid_from": self.times[i].to_pydatetime()}
        if self.mm_pending is not None and np.isfinite(self.mm_pending[i]) and self.mm_effective_bar is not None:
            eff = int(self.mm_effective_bar[i])
            step = self.times[1] - self.times[0] if len(self.times) > 1 else pd.Timedelta(0)
            kw["mm_rate_pending"] = float(min(self.mm_pending[i], self.im_rate[i]))
            kw["mm_effective_from"] = (self.times[i] + (eff - i) * step).to_pydatetime()
        kw.update(changes)
        return MarginParams(**kw)


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


def _mm_controlled(name: str, ctx: PolicyContext, raw: np.ndarray, meta: dict[str, Any],
                   raw_mm: np.ndarray | None = None) -> MarginPath:
    cp = apply_controls(raw, ctx.controls, raw_mm)
    meta = {**meta, "controls": ctx.controls.to_dict()}
    return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_open, policy=name, meta=meta,
                      mm_pending=cp.mm_pending, mm_effective_bar=cp.mm_effective_bar)


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
    """Fixed IM; MM = ``mm_fraction × IM`` (``mm_fraction`` from the context's controls unless given)."""

    im: float
    mm_fraction: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.im <= 1.0:
            raise ValueError(f"static im must be in (0, 1], got {self.im!r}")

    @property
    def name(self) -> str:
        return f"static_{self.im:.2f}" if round(self.im, 2) == self.im else f"static_{self.im:g}"

    def path(self, ctx: PolicyContext) -> MarginPath:
        n = len(ctx.bars)
        frac = ctx.controls.mm_fraction if self.mm_fraction is None else self.mm_fraction
        return MarginPath(times=ctx.times, im_rate=np.full(n, self.im), mm_rate=np.full(n, frac * self.im),
                          policy=self.name, meta={"im": self.im, "mm_fraction": frac})


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
        return _mm_controlled(self.name, ctx, self.raw(ctx), meta)


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
        return _mm_controlled(self.name, ctx, im, meta)


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


@dataclass(frozen=True)
class PredictivePolicy:
    """The optimizer's mapping from forecasts to IM (then the controls; MM = ``mm_fraction × IM``).

    ``IM_raw = max(floor, level × (σ_t / sigma_ref)^power × (1 + stress × p_stressed_t))`` with
    ``σ_t = exp(ω ln σ1 + (1-ω) ln σH)`` (σ1: the 1-step forecast volatility, σH: the root mean per-step
    variance over the forecast's horizon), blended geometrically with the quantile-implied volatility
    (``quantile_weight``) when the forecast has quantiles; ``sigma_ref`` is the median σ before the cut.
    ``power < 1`` is a sub-proportional response, ``> 1`` super-proportional, 0 static.
    ``release`` (in (0, 1]): the largest relative fall of the raw IM per bar, so that margin raised in a
    volatile spell is released slowly (crashes cluster); 1 = no hold (the controls' cap still applies).
    ``mm_binds``: ``"path"`` (the MM binds on open positions, increases after the notice)
    or ``"entry"`` (each position keeps the MM of its entry bar: only new positions see changes, an
    entry-IM policy like the bound). Both are in the fit's grid.
    ``mm_k``: the MM mapping. 0 (default): ``MM = mm_fraction × IM`` as for every other policy. ``> 0``: MM
    covers a ``mm_k``-sigma one-bar move, ``MM_t = exp(mm_k σ1_t) - 1`` (σ1: the 1-step forecast volatility),
    the close-out (gap) risk a maintenance margin exists for, while IM keeps pricing the holding-horizon risk;
    it then gets the controls (change cap, notice, floor ``mm_fraction × floor``) and never exceeds IM.
    """

    level: float = 0.10
    power: float = 0.5
    stress: float = 0.0
    omega: float = 0.5
    floor: float = 0.01
    quantile_weight: float = 0.5
    release: float = 1.0
    mm_binds: Literal["path", "entry"] = "path"
    mm_k: float = 0.0
    sigma_ref: float | None = None
    name: str = "predictive"
    fitted: dict[str, Any] = field(default_factory=dict, compare=False)

    def params(self) -> dict[str, float]:
        """Numeric parameters (``mm_at_entry``: 1.0 when MM is fixed at entry, 0.0 when it follows the path)."""
        return {"level": self.level, "power": self.power, "stress": self.stress, "omega": self.omega,
                "floor": self.floor, "quantile_weight": self.quantile_weight, "release": self.release,
                "mm_at_entry": 1.0 if self.mm_binds == "entry" else 0.0, "mm_k": self.mm_k,
                "sigma_ref": float("nan") if self.sigma_ref is None else self.sigma_ref}

    @staticmethod
    def features(ctx: PolicyContext) -> dict[str, np.ndarray]:
        var, has = aligned_variance(ctx)
        s1 = np.sqrt(var[:, 0])
        sh = np.sqrt(var.mean(axis=1))
        out = {"s1": s1, "sh": sh, "stress": aligned_stress(ctx), "has": has}
        fc = ctx.forecast
        if fc is not None and fc.quantiles is not None and fc.quantile_levels:
            lv = fc.quantile_levels
            pos = fc.origins.searchsorted(ctx.times, side="right") - 1
            q = fc.quantiles[np.maximum(pos, 0), 0, :]
            zl, zh = norm.ppf(lv[0]), norm.ppf(lv[-1])
            sq = np.full(len(ctx.bars), np.nan)
            if zl < 0 < zh:
                sq = np.maximum(q[:, 0] / zl, q[:, -1] / zh)
            sq = np.where((pos >= 0) & (sq > 0), sq, s1)
            out["sq"] = sq
        return out

    def sigma(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        ls = self.omega * np.log(feats["s1"]) + (1.0 - self.omega) * np.log(feats["sh"])
        if "sq" in feats:
            ls = (1.0 - self.quantile_weight) * ls + self.quantile_weight * np.log(feats["sq"])
        return np.exp(ls)

    def raw_from(self, feats: Mapping[str, np.ndarray], sigma_ref: float) -> np.ndarray:
        x = self.sigma(feats) / sigma_ref
        raw = np.maximum(self.floor, self.level * x**self.power * (1.0 + self.stress * feats["stress"]))
        if self.release < 1.0:
            raw = slow_release(raw, self.release)
        return raw

    def path(self, ctx: PolicyContext) -> MarginPath:
        feats = self.features(ctx)
        ref = self.sigma_ref
        if ref is None:
            k = ctx.cut_index()
            s = self.sigma(feats)[: max(k, 1)]
            ref = float(np.median(s))
        raw = np.minimum(self.raw_from(feats, ref), 1.0)
        raw_mm = np.minimum(var_to_im(feats["s1"], self.mm_k), 1.0) if self.mm_k > 0 else None
        meta = {**self.params(), "mm_binds": self.mm_binds, "sigma_ref": ref,
                **({"fit": self.fitted} if self.fitted else {})}
        if self.mm_binds == "entry":
            # MM fixed at entry (the MM target of the entry bar): open positions never see an MM change
            cp = apply_controls(raw, ctx.controls, raw_mm)
            return MarginPath(times=ctx.times, im_rate=cp.im_new, mm_rate=cp.mm_target,
                              policy=self.name, meta={**meta, "controls": ctx.controls.to_dict()}, mm_binds="entry")
        return _mm_controlled(self.name, ctx, raw, meta, raw_mm)


def fit_predictive(
    ctx: PolicyContext,
    population: Any,
    backtest_cfg: Any = None,
    objective_weights: Mapping[str, float] | None = None,
    *,
    grid: Mapping[str, Sequence[float]] | None = None,
    max_positions: int | None = 20_000,
    rounds: int = 2,
    refine: bool = True,
    target_avg_im: float | None = None,
    start: Any = None,
) -> PredictivePolicy:
    """Fit :class:`PredictivePolicy` on origins BEFORE ``ctx.cut`` by coordinate search over a grid.

    Objective (USD): ``bad_debt + alpha × liquidations + beta × collateral_locked`` from
    :func:`margin.backtest.run_backtest` on the window ``[start, cut)`` under the context's controls
    (positions still open at the cut close there: nothing after the cut is seen). ``objective_weights``:
    ``alpha`` (USD per liquidation, default 1 % of the median notional) and ``beta`` (USD per USD·bar of
    collateral; default ``capital_cost_annual`` (0.10) per year converted with the bar length).

    The search: coordinate descent over ``grid`` (``rounds`` passes over level, power, stress, omega, floor
    mm_binds and mm_k, keeping every improvement), then (``refine``) a finer look at level and power between
    their grid neighbours. With ``target_avg_im`` the level is not searched: for every candidate shape it is
    solved so that the controlled IM averages ``target_avg_im`` over the bars before the cut, so the fit
    picks the best SHAPE at the capital of ``static_<target_avg_im>`` (the claim compares policies at equal
    collateral). Returns the fitted policy; ``policy.fitted`` records the weights, the best objective and its parts,
    the number of evaluations and the search path.
    """
    from margin.backtest import BacktestConfig, _bars_per_day, run_backtest

    if ctx.cut is None:
        raise ValueError("fit_predictive needs ctx.cut (parameters are fitted on origins before it)")
    cfg = backtest_cfg or BacktestConfig()
    k = ctx.cut_index()
    if k < 3:
        raise ValueError(f"fit_predictive needs at least 3 bars before the cut {ctx.cut}, got {k}")
    w = dict(objective_weights or {})
    unknown = set(w) - {"alpha", "beta", "capital_cost_annual"}
    if unknown:
        raise ValueError(f"objective_weights has unknown keys {sorted(unknown)}; valid: alpha, beta, capital_cost_annual")
    alpha = float(w.get("alpha", 0.01 * population.cfg.notional_median))
    bpy = 365.0 * _bars_per_day(ctx.times)
    beta = float(w.get("beta", float(w.get("capital_cost_annual", 0.10)) / bpy))
    pop = population
    if max_positions is not None and len(pop) > max_positions:
        rng = np.random.default_rng(pop.cfg.seed + 7919)
        pop = pop.subset(rng.choice(len(pop), size=max_positions, replace=False))
    scale = len(population) / len(pop)
    feats = PredictivePolicy.features(ctx)
    base = PredictivePolicy(floor=ctx.controls.floor)
    ref = float(np.median(base.sigma(feats)[:k]))
    g = {
        "level": (0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.4, 0.5),
        "power": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
        "stress": (0.0, 0.25, 0.5, 1.0, 2.0),
        "omega": (0.0, 0.5, 1.0),
        "floor": tuple(sorted({ctx.controls.floor, 0.02, 0.03, 0.05, 0.08})),
        "release": (1.0, 0.2, 0.05, 0.02),
        "mm_binds": ("path", "entry"),
        "mm_k": (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    }
    if grid:
        g.update({k_: tuple(v) for k_, v in grid.items()})
    if not np.any(feats["stress"] > 0):
        g["stress"] = (0.0,)
    end = ctx.bars.index[k] if k < len(ctx.bars) else None
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    names: tuple[str, ...] = ("level", "power", "stress", "omega", "floor", "release", "mm_binds", "mm_k")
    if target_avg_im is not None:
        if not 0.0 < target_avg_im <= 1.0:
            raise ValueError(f"target_avg_im must be in (0, 1], got {target_avg_im!r}")
        names = names[1:]
        g["level"] = (float(target_avg_im),)
        # a floor above the target would set the IM by itself (the level solve could not reach the target)
        g["floor"] = tuple(f for f in g["floor"] if f <= target_avg_im) or (min(ctx.controls.floor, target_avg_im),)

    def solve_level(p: dict[str, Any]) -> tuple[float, MarginPath]:
        lv = float(p["level"])
        path = PredictivePolicy(**{**p, "level": lv}, sigma_ref=ref).path(ctx)
        for _ in range(8):
            m = float(np.mean(path.im_rate[:k]))
            if abs(m / target_avg_im - 1.0) < 1e-3:
                break
            lv = min(max(lv * target_avg_im / m, 1e-4), 10.0)
            path = PredictivePolicy(**{**p, "level": lv}, sigma_ref=ref).path(ctx)
        return lv, path

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        key = tuple(p[n] for n in names)
        if key not in cache:
            if target_avg_im is None:
                lv, path = p["level"], PredictivePolicy(**p, sigma_ref=ref).path(ctx)
            else:
                lv, path = solve_level(p)
            res = run_backtest(ctx.bars, path, pop, cfg, start=start, end=end)
            obj = scale * (res.bad_debt + alpha * res.liquidations + beta * res.collateral_locked)
            cache[key] = {"objective": obj, "level": lv, "bad_debt": scale * res.bad_debt,
                          "liquidations": scale * res.liquidations,
                          "collateral_locked": scale * res.collateral_locked, "avg_collateral": res.avg_collateral}
        return cache[key]

    cur = {"level": 0.10, "power": 0.5, "stress": 0.0, "omega": 0.5, "floor": ctx.controls.floor, "release": 1.0,
           "mm_binds": "path", "mm_k": 0.0}
    for n in names:
        if cur[n] not in g[n]:
            cur[n] = g[n][len(g[n]) // 2]
    best = evaluate(cur)
    trace = [{**cur, **best}]
    for _ in range(max(int(rounds), 1)):
        improved = False
        for n in names:
            for v in g[n]:
                cand = {**cur, n: v}
                r = evaluate(cand)
                if r["objective"] < best["objective"] - 1e-9 * max(1.0, abs(best["objective"])):
                    cur, best, improved = cand, r, True
                    trace.append({**cur, **best})
        if not improved:
            break
    # refine the continuous parameters between their grid neighbours (three points on each side)
    for n in ("level", "power"):
        if refine and len(g[n]) > 1 and n in names:
            vals = sorted(g[n])
            i = vals.index(cur[n]) if cur[n] in vals else int(np.argmin(np.abs(np.asarray(vals) - cur[n])))
            lo_v, hi_v = vals[max(i - 1, 0)], vals[min(i + 1, len(vals) - 1)]
            for v in np.unique(np.r_[np.linspace(lo_v, cur[n], 4)[1:-1], np.linspace(cur[n], hi_v, 4)[1:-1]]):
                cand = {**cur, n: float(v)}
                r = evaluate(cand)
                if r["objective"] < best["objective"] - 1e-9 * max(1.0, abs(best["objective"])):
                    cur, best = cand, r
                    trace.append({**cur, **best})
    cur = {**cur, "level": float(best["level"])}
    fitted = {"alpha": alpha, "beta": beta, "target_avg_im": target_avg_im, "objective": best, "evaluations": len(cache), "trace": trace,
              "n_positions_fit": len(pop), "fit_end": str(end), "sigma_ref": ref}
    log.info("predictive fitted: %s objective %.4g (%d evaluations)", cur, best["objective"], len(cache))
    return PredictivePolicy(**cur, sigma_ref=ref, fitted=fitted)


# ---------------------------------------------------------------------------------------------- bound
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
    from margin.backtest import BacktestConfig, run_backtest

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


# ---------------------------------------------------------------------------------------------- factory
def make_policy(name: str, **cfg: Any) -> Any:
    """Build a policy by name: ``static_<im>``, ``ewma_ccp``, ``garch_fhs``, ``predictive``, ``oracle_vol``,
    ``bound`` (needs ``population``; ``bound_liquidations`` / ``bound_bad_debt`` set the objective)."""
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {type(name).__name__}")
    try:
        if name.startswith("static_"):
            try:
                im = float(name[len("static_"):])
            except ValueError:
                raise ValueError(f"static policy name must be static_<im> with im a number, got {name!r}") from None
            return StaticPolicy(im=im, **cfg)
        if name == "static":
            return StaticPolicy(**cfg)
        if name == "ewma_ccp":
            return EwmaCcpPolicy(**cfg)
        if name == "garch_fhs":
            return GarchFhsPolicy(**cfg)
        if name == "predictive":
            return PredictivePolicy(**cfg)
        if name == "oracle_vol":
            return OracleVolPolicy(**cfg)
        if name in ("bound", "bound_liquidations", "bound_bad_debt"):
            if name != "bound":
                cfg = {**cfg, "objective": name[len("bound_"):]}
            if "population" not in cfg:
                raise ValueError("policy 'bound' needs population= (it optimizes per cohort of positions)")
            if "grid" in cfg:
                cfg["grid"] = tuple(cfg["grid"])
            return BoundPolicy(**cfg)
    except TypeError as exc:
        raise ValueError(f"bad config for policy {name!r}: {exc}") from None
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
