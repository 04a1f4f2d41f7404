"""The ``dynamic_grid`` policy: a portfolio-margin scenario grid that widens and narrows with forecast risk.

Per bar ``t`` (published at the close of ``t``, as every policy in :mod:`margin.controls`), per underlying ``u``:

* **spot range** ``r_u,t = k × σ_u,t(H)``: ``σ(H) = sqrt(sum of the forecast per-step variances over the
  liquidation horizon H)`` (steps beyond the forecast horizon repeat its last step), as a relative move; the grid
  is ``n_spot`` equally spaced moves over ``[-r, +r]``. The range goes through :func:`margin.controls.apply_controls`
  (floor, ceiling, cap per update, notice): ``range_new`` applies to accounts opening at that close, and the
  notice-lagged ``range_open`` binds on open accounts (a wider grid binds on them only after ``notice_bars``);
* **vol shocks** ``(-v, 0, +v)`` with ``v_u,t = clip(vol_k × vov_u,t × sqrt(H), vol_floor, vol_cap)``, where
  ``vov`` is an EWMA (``vov_lambda``) of the squared one-bar log change of the forecast volatility (a
  vol-of-vol estimate from the model's own forecasts);
* **correlation**: the EWMA (``corr_lambda``) correlation of the underlyings' returns up to the close of ``t``,
  used for offsets across underlyings (:func:`margin.portfolio.aggregate_grid_risk`), with the loss correlation
  blended toward 1 (no offsets) with weight ``w_t = clip(stress_base + stress_slope × p_t, 0, 1)``, ``p_t`` the
  largest stressed-regime probability across the underlyings;
* **concentration add-on** rate ``conc_k × r_u,t`` on the net delta notional above ``concentration_threshold``.

With ``vol_shock`` and ``correlation="none"`` frozen and a constant ``k × σ(H)`` the grid of every bar is the
static grid of that range (tested: the parameters, the engine's margins and the portfolio backtest coincide).

Static references (the settings are stated here, they are this module's reading of the venues' published
styles, not a copy of their current parameters): :func:`deribit_style_grid` (spot ±16 % in 2 % steps, 17 points,
× vol shocks -30 %/0/+45 %) and :func:`derive_style_grid` (spot ±18 % in 11 points × vol -25 %/0/+25 %,
33 scenarios). :func:`static_grid` gives a grid of any range (the static family scaled to a budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from margin.controls import Controls, apply_controls
from margin.params import LiquidationSettings, MarginParams, ParamsFile, RiskModel, ScenarioGrid
from margin.policies import PolicyContext, aligned_stress, aligned_variance

__all__ = [
    "DynamicGridPolicy",
    "GridPath",
    "static_grid",
    "static_grid_path",
    "deribit_style_grid",
    "derive_style_grid",
    "ewma_correlation_path",
]


def static_grid(spot_range: float, *, n_spot: int = 11, vol_shocks: Sequence[float] = (-0.25, 0.0, 0.25),
                mm_fraction: float = 0.8, concentration_threshold: float = math.inf,
                concentration_addon: float = 0.0) -> ScenarioGrid:
    """A symmetric grid: ``n_spot`` moves over ``[-spot_range, +spot_range]`` × ``vol_shocks`` (worst loss)."""
    if not 0.0 < spot_range < 1.0:
        raise ValueError(f"spot_range must be in (0, 1), got {spot_range!r}")
    if n_spot < 2:
        raise ValueError(f"n_spot must be >= 2, got {n_spot!r}")
    ss = tuple(float(x) for x in np.round(np.linspace(-spot_range, spot_range, n_spot), 12))
    return ScenarioGrid(spot_shocks=ss, vol_shocks=tuple(vol_shocks), measure="max", mm_fraction=mm_fraction,
                        concentration_threshold=concentration_threshold, concentration_addon=concentration_addon)


def deribit_style_grid(mm_fraction: float = 0.8) -> ScenarioGrid:
    """Deribit-style static reference: spot ±16 % in 2 % steps (17 points) × vol shocks -30 %, 0, +45 %."""
    return static_grid(0.16, n_spot=17, vol_shocks=(-0.30, 0.0, 0.45), mm_fraction=mm_fraction)


def derive_style_grid(mm_fraction: float = 0.8) -> ScenarioGrid:
    """Derive-style static reference: spot ±18 % in 11 points × vol -25 %, 0, +25 % (33 scenarios)."""
    return static_grid(0.18, n_spot=11, vol_shocks=(-0.25, 0.0, 0.25), mm_fraction=mm_fraction)


def ewma_correlation_path(returns: np.ndarray, lam: float = 0.94, warmup: int = 20) -> np.ndarray:
    """``(T, U, U)`` EWMA correlation after folding in the returns up to and including bar ``t``.

    Starts from the sample second moment of the first ``warmup`` rows (about zero mean); row ``t`` uses
    ``returns[:t + 1]`` only (causal at the close of ``t``).
    """
    r = np.asarray(returns, dtype=np.float64)
    t_n, u = r.shape
    w = max(1, min(warmup, t_n))
    c = r[:w].T @ r[:w] / w + 1e-12 * np.eye(u)
    out = np.empty((t_n, u, u))
    for t in range(t_n):
        c = lam * c + (1.0 - lam) * np.outer(r[t], r[t])
        sd = np.sqrt(np.diag(c))
        out[t] = np.clip(c / np.outer(sd, sd), -1.0, 1.0)
        np.fill_diagonal(out[t], 1.0)
    return out


@dataclass(frozen=True)
class GridPath:
    """A path of portfolio-margin grids over bars (one value per bar and underlying).

    Attributes
    ----------
    times : pd.DatetimeIndex
        ``T`` bar times (UTC); value ``t`` is published at the close of bar ``t``.
    underlyings : tuple of str
        ``U`` markets.
    range_new : np.ndarray
        ``(T, U)`` spot range (fraction) for accounts opening at the close of ``t``.
    range_open : np.ndarray
        ``(T, U)`` spot range binding on open accounts during bar ``t + 1`` (after the notice).
    vol_shock : np.ndarray
        ``(T, U)`` relative vol shock ``v`` (the grid's vol shocks are ``-v, 0, +v``).
    correlation : np.ndarray or None
        ``(T, U, U)`` return correlation for offsets; ``None``: no offsets (each underlying's worst loss summed).
    stress_weight : np.ndarray
        ``(T,)`` blend of the loss correlation toward 1.
    concentration_addon : np.ndarray
        ``(T, U)`` add-on rate on delta notional above ``concentration_threshold``.
    """

    times: pd.DatetimeIndex
    underlyings: tuple[str, ...]
    range_new: np.ndarray
    range_open: np.ndarray
    vol_shock: np.ndarray
    correlation: np.ndarray | None
    stress_weight: np.ndarray
    concentration_addon: np.ndarray
    n_spot: int = 11
    mm_fraction: float = 0.8
    concentration_threshold: float = math.inf
    policy: str = "dynamic_grid"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        t, u = len(self.times), len(self.underlyings)
        for name in ("range_new", "range_open", "vol_shock", "concentration_addon"):
            a = np.asarray(getattr(self, name), dtype=np.float64)
            if a.shape != (t, u):
                raise ValueError(f"GridPath.{name} must have shape {(t, u)}, got {a.shape}")
            object.__setattr__(self, name, a)
        if np.any(~(self.range_new > 0) | (self.range_new >= 1)) or np.any(~(self.range_open > 0) |
                                                                             (self.range_open >= 1)):
            raise ValueError("GridPath ranges must be in (0, 1)")
        if self.correlation is not None and np.asarray(self.correlation).shape != (t, u, u):
            raise ValueError(f"GridPath.correlation must have shape {(t, u, u)}, got {np.shape(self.correlation)}")
        sw = np.asarray(self.stress_weight, dtype=np.float64)
        if sw.shape != (t,) or np.any((sw < 0) | (sw > 1)):
            raise ValueError(f"GridPath.stress_weight must be (T,) in [0, 1], got shape {sw.shape}")
        object.__setattr__(self, "stress_weight", sw)

    def __len__(self) -> int:
        return len(self.times)

    def grid(self, t: int, u: int, *, opening: bool = False, scale: float = 1.0) -> ScenarioGrid:
        """The ScenarioGrid of underlying ``u`` at bar ``t`` (``opening``: the grid for new accounts)."""
        r = (self.range_new if opening else self.range_open)[t, u] * scale
        v = float(self.vol_shock[t, u])
        vols = (-min(v, 0.95), 0.0, v) if v > 0 else (0.0,)
        return static_grid(min(r, 0.95), n_spot=self.n_spot, vol_shocks=vols, mm_fraction=self.mm_fraction,
                           concentration_threshold=self.concentration_threshold,
                           concentration_addon=float(min(self.concentration_addon[t, u], 1.0)))

    def params_at(self, t: int, *, opening: bool = False, scale: float = 1.0,
                  template: MarginParams | None = None,
                  liquidation: LiquidationSettings | None = None) -> ParamsFile:
        """The :class:`ParamsFile` in force at bar ``t`` (what ``compute_margin`` consumes).

        ``template`` supplies the non-grid fields (haircuts, option rule, fees); IM/MM rates of the cross mode are
        the spot range and ``mm_fraction ×`` it (a linear position's grid margin), so the cross and portfolio
        modes of the engine price a lone perp alike.
        """
        tm = template or MarginParams(market_id="_", im_rate=0.1, mm_rate=0.05)
        markets = []
        ts = self.times[t].to_pydatetime()
        for u, name in enumerate(self.underlyings):
            g = self.grid(t, u, opening=opening, scale=scale)
            r = max(abs(g.spot_shocks[0]), abs(g.spot_shocks[-1]))
            kw: dict[str, Any] = {"scenario_grid": g, "valid_from": ts}
            if liquidation is not None:
                kw["liquidation"] = liquidation
            markets.append(tm.with_rates(r, self.mm_fraction * r, market_id=name, **kw))
        rm = RiskModel(underlyings=self.underlyings)
        if self.correlation is not None:
            c = np.asarray(self.correlation[t])
            rm = RiskModel(underlyings=self.underlyings, grid_correlation=tuple(map(tuple, c.tolist())),
                           grid_stress_weight=float(self.stress_weight[t]))
        return ParamsFile(markets=tuple(markets), risk_model=rm)

    def index_at(self, as_of: Any) -> int:
        """Row of the grid in force at UTC time ``as_of``: the last bar whose close is at or before it."""
        ts = pd.Timestamp(as_of)
        ts = ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
        i = int(self.times.searchsorted(ts, side="right")) - 1
        if i < 0:
            raise ValueError(f"as_of {ts.isoformat()} is before the first grid ({self.times[0].isoformat()})")
        return i

    def params_at_time(self, as_of: Any, *, opening: bool = False,
                       template: MarginParams | None = None) -> ParamsFile:
        """:meth:`params_at` of the grid published at the last close at or before ``as_of``."""
        return self.params_at(self.index_at(as_of), opening=opening, template=template)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times ISO-8601 UTC; arrays as nested lists); inverse :meth:`from_dict`."""
        return {
            "policy": self.policy,
            "times": [t.isoformat().replace("+00:00", "Z") for t in self.times],
            "underlyings": list(self.underlyings),
            "range_new": self.range_new.tolist(),
            "range_open": self.range_open.tolist(),
            "vol_shock": self.vol_shock.tolist(),
            "correlation": None if self.correlation is None else np.asarray(self.correlation).tolist(),
            "stress_weight": self.stress_weight.tolist(),
            "concentration_addon": self.concentration_addon.tolist(),
            "n_spot": self.n_spot,
            "mm_fraction": self.mm_fraction,
            "concentration_threshold": None if math.isinf(self.concentration_threshold)
            else self.concentration_threshold,
            "meta": {k: v for k, v in self.meta.items() if k in ("params", "controls", "scale")},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridPath:
        ct = d.get("concentration_threshold")
        return cls(times=pd.DatetimeIndex(pd.to_datetime(d["times"], utc=True)), underlyings=tuple(d["underlyings"]),
                   range_new=np.asarray(d["range_new"], dtype=np.float64),
                   range_open=np.asarray(d["range_open"], dtype=np.float64),
                   vol_shock=np.asarray(d["vol_shock"], dtype=np.float64),
                   correlation=None if d.get("correlation") is None else np.asarray(d["correlation"], dtype=np.float64),
                   stress_weight=np.asarray(d["stress_weight"], dtype=np.float64),
                   concentration_addon=np.asarray(d["concentration_addon"], dtype=np.float64),
                   n_spot=int(d.get("n_spot", 11)), mm_fraction=float(d.get("mm_fraction", 0.8)),
                   concentration_threshold=math.inf if ct is None else float(ct),
                   policy=str(d.get("policy", "dynamic_grid")), meta=dict(d.get("meta", {})))

    def write(self, path: Any) -> Any:
        """Write :meth:`to_dict` as JSON atomically (temporary name, then rename); returns the path."""
        import json

        from data_pipelines.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def read(cls, path: Any) -> GridPath:
        """Read a file written by :meth:`write`."""
        import json
        from pathlib import Path

        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read a grid path from {p}: {exc}") from None
        return cls.from_dict(d)

    def scaled(self, scale: float, controls: Controls | None = None) -> GridPath:
        """The path with every spot range multiplied by ``scale`` (a policy brought to a budget); with
        ``controls`` the scaled range goes through them again."""
        rn = np.minimum(self.range_new * scale, 0.95)
        ro = np.minimum(self.range_open * scale, 0.95)
        if controls is not None:
            rn = np.empty_like(self.range_new)
            ro = np.empty_like(self.range_open)
            for u in range(len(self.underlyings)):
                cp = apply_controls(np.minimum(self.meta.get("raw_range", self.range_new)[:, u] * scale, 0.95),
                                    replace(controls, mm_fraction=1.0))
                rn[:, u], ro[:, u] = cp.im_new, cp.mm_open
        return replace(self, range_new=rn, range_open=ro, meta={**self.meta, "scale": float(scale)})


def static_grid_path(times: pd.DatetimeIndex, underlyings: Sequence[str], spot_range: float, *,
                     vol_shock: float = 0.25, n_spot: int = 11, mm_fraction: float = 0.8) -> GridPath:
    """A constant grid over ``times`` (the static family: one range for every bar and underlying)."""
    t, u = len(times), len(underlyings)
    full = np.full((t, u), float(spot_range))
    return GridPath(times=pd.DatetimeIndex(times), underlyings=tuple(underlyings), range_new=full,
                    range_open=full.copy(), vol_shock=np.full((t, u), float(vol_shock)), correlation=None,
                    stress_weight=np.ones(t), concentration_addon=np.zeros((t, u)), n_spot=n_spot,
                    mm_fraction=mm_fraction, policy=f"static_grid[{spot_range:g}]",
                    meta={"raw_range": full.copy()})


@dataclass(frozen=True)
class DynamicGridPolicy:
    """Forecast → portfolio-margin grid (see the module docstring).

    Parameters
    ----------
    k : float
        Spot range in forecast standard deviations over the liquidation horizon (> 0).
    horizon_bars : int
        Liquidation horizon in bars (>= 1).
    n_spot : int
        Spot points of the grid (>= 2).
    vol_k : float
        Vol shock in vol-of-vol standard deviations over the horizon (>= 0).
    vol_floor, vol_cap : float
        Bounds of the vol shock (fractions, ``0 <= vol_floor <= vol_cap < 1``).
    vol_shock : float, optional
        Frozen vol shock (ignores ``vol_k``): the ablation and the static-equivalence test.
    vov_lambda, corr_lambda : float
        EWMA decays of the vol-of-vol and of the correlation, in (0, 1).
    correlation : {"ewma", "none"}
        ``none``: no offsets across underlyings (the static grid's rule).
    stress_base, stress_slope : float
        ``w_t = clip(stress_base + stress_slope × p_stressed, 0, 1)``.
    conc_k : float
        Concentration add-on rate as a multiple of the spot range (0 = off).
    concentration_threshold : float
        Delta notional per underlying (USD) above which the add-on applies.
    mm_fraction : float
        MM as a fraction of the grid IM, in (0, 1].
    controls : Controls
        Applied to the spot range of each underlying (``mm_fraction`` of the controls is not used).
    """

    name: str = "dynamic_grid"
    k: float = 3.0
    horizon_bars: int = 1
    n_spot: int = 11
    vol_k: float = 2.0
    vol_floor: float = 0.05
    vol_cap: float = 0.6
    vol_shock: float | None = None
    vov_lambda: float = 0.94
    corr_lambda: float = 0.94
    correlation: str = "ewma"
    stress_base: float = 0.25
    stress_slope: float = 1.0
    conc_k: float = 0.0
    concentration_threshold: float = math.inf
    mm_fraction: float = 0.8
    controls: Controls = field(default_factory=lambda: Controls(floor=0.02, ceiling=0.9, max_change=0.5,
                                                                 notice_bars=1))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.k) and self.k > 0):
            raise ValueError(f"k must be > 0, got {self.k!r}")
        if int(self.horizon_bars) != self.horizon_bars or self.horizon_bars < 1:
            raise ValueError(f"horizon_bars must be an integer >= 1, got {self.horizon_bars!r}")
        if self.n_spot < 2:
            raise ValueError(f"n_spot must be >= 2, got {self.n_spot!r}")
        if not self.vol_k >= 0:
            raise ValueError(f"vol_k must be >= 0, got {self.vol_k!r}")
        if not 0.0 <= self.vol_floor <= self.vol_cap < 1.0:
            raise ValueError(f"vol_floor and vol_cap must satisfy 0 <= vol_floor <= vol_cap < 1, got "
                             f"{self.vol_floor!r}, {self.vol_cap!r}")
        if self.vol_shock is not None and not 0.0 <= self.vol_shock < 1.0:
            raise ValueError(f"vol_shock must be in [0, 1), got {self.vol_shock!r}")
        for nm in ("vov_lambda", "corr_lambda"):
            if not 0.0 < getattr(self, nm) < 1.0:
                raise ValueError(f"{nm} must be in (0, 1), got {getattr(self, nm)!r}")
        if self.correlation not in ("ewma", "none"):
            raise ValueError(f"correlation must be 'ewma' or 'none', got {self.correlation!r}")
        if not 0.0 < self.mm_fraction <= 1.0:
            raise ValueError(f"mm_fraction must be in (0, 1], got {self.mm_fraction!r}")

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "vol_k": self.vol_k, "stress_base": self.stress_base, "stress_slope": self.stress_slope,
                "conc_k": self.conc_k, "mm_fraction": self.mm_fraction, "horizon_bars": self.horizon_bars}

    def sigma_h(self, ctx: PolicyContext) -> np.ndarray:
        """``(T,)`` forecast volatility over the liquidation horizon (decimal log-return units)."""
        var, _ = aligned_variance(ctx)
        h = self.horizon_bars
        if var.shape[1] < h:
            var = np.concatenate([var, np.repeat(var[:, -1:], h - var.shape[1], axis=1)], axis=1)
        return np.sqrt(var[:, :h].sum(axis=1))

    def path(self, contexts: Mapping[str, PolicyContext]) -> GridPath:
        """The grid path over the common bars of ``contexts`` (one :class:`PolicyContext` per underlying).

        Every context must have the same bar times; each carries its own forecast and regime probabilities.
        """
        names = tuple(contexts)
        if not names:
            raise ValueError("contexts must name at least one underlying")
        times = contexts[names[0]].times
        for nm in names[1:]:
            if not contexts[nm].times.equals(times):
                raise ValueError(f"contexts[{nm!r}] bars are not on the bar times of {names[0]!r}")
        t_n, u_n = len(times), len(names)
        raw = np.empty((t_n, u_n))
        vov = np.empty((t_n, u_n))
        rets = np.empty((t_n, u_n))
        stress = np.zeros(t_n)
        sq_h = math.sqrt(self.horizon_bars)
        for j, nm in enumerate(names):
            ctx = contexts[nm]
            sh = self.sigma_h(ctx)
            raw[:, j] = np.clip(np.expm1(self.k * sh), 1e-4, 0.95)
            ls = np.log(sh)
            d2 = np.r_[0.0, np.diff(ls)] ** 2
            v = np.empty(t_n)
            acc = float(np.mean(d2[1:21])) if t_n > 1 else 0.0
            for t in range(t_n):  # causal EWMA of the squared change of log forecast vol
                acc = self.vov_lambda * acc + (1.0 - self.vov_lambda) * d2[t]
                v[t] = acc
            vov[:, j] = np.sqrt(v)
            rets[:, j] = ctx.returns()
            stress = np.maximum(stress, aligned_stress(ctx))
        c = replace(self.controls, mm_fraction=1.0)
        rn = np.empty_like(raw)
        ro = np.empty_like(raw)
        for j in range(u_n):
            cp = apply_controls(raw[:, j], c)
            rn[:, j], ro[:, j] = cp.im_new, cp.mm_open
        if self.vol_shock is not None:
            vs = np.full((t_n, u_n), float(self.vol_shock))
        else:
            vs = np.clip(self.vol_k * vov * sq_h, self.vol_floor, self.vol_cap)
        corr = ewma_correlation_path(rets, self.corr_lambda) if (self.correlation == "ewma" and u_n > 1) else None
        w = np.clip(self.stress_base + self.stress_slope * stress, 0.0, 1.0)
        return GridPath(times=times, underlyings=names, range_new=rn, range_open=ro, vol_shock=vs, correlation=corr,
                        stress_weight=w if corr is not None else np.ones(t_n),
                        concentration_addon=np.clip(self.conc_k * rn, 0.0, 1.0), n_spot=self.n_spot,
                        mm_fraction=self.mm_fraction, concentration_threshold=self.concentration_threshold,
                        policy=self.name, meta={"params": self.params(), "raw_range": raw,
                                                "controls": self.controls.to_dict()})
