"""Margin policies: map forecasts and market state to a margin path (IM for new positions, MM for open ones).

Every policy is a small frozen object with ``name`` and ``path(ctx: PolicyContext) -> MarginPath``;
:func:`make_policy` builds one from its name and config. The optimizer lives in :mod:`margin.predictive`
and the bound in :mod:`margin.bound` (their names stay importable from here).

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
                   the quantile-implied volatility when present); MM ``mm_fraction × IM`` or its own
                   mapping (``mm_k``-sigma one-bar move); parameters fitted before the cut only
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
    "OracleVolPolicy",
    "make_policy",
    "mm_controlled",
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


def mm_controlled(name: str, ctx: PolicyContext, raw: np.ndarray, meta: dict[str, Any],
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
            from margin.predictive import PredictivePolicy

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
            from margin.bound import BoundPolicy

            return BoundPolicy(**cfg)
    except TypeError as exc:
        raise ValueError(f"bad config for policy {name!r}: {exc}") from None
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")


# the optimizer and the bound live in their own modules; these names stay importable from here
_MOVED = {"PredictivePolicy": "margin.predictive", "fit_predictive": "margin.predictive",
          "CohortTable": "margin.bound", "cohort_table": "margin.bound", "BoundPolicy": "margin.bound",
          "solve_lambda": "margin.bound", "bound_path": "margin.bound"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
