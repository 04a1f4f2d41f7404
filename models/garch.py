"""GARCH-family forecasters through ``arch``: one composed class, registered presets.

The model is composed like ``arch_model``: a mean (``"Zero"`` or ``"Constant"``), a volatility process
(``vol`` in GARCH / EGARCH / FIGARCH with orders ``p``, ``o``, ``q``; GJR is GARCH with ``o >= 1``) and a
distribution (``dist`` in normal / t / skewt). ``arch`` is fed returns ×100 (its preferred scale);
every variance this module reports is per bar in decimal log-return units (÷1e4).

Rolling use
-----------
* ``fit`` re-estimates. With ``warm_start=True`` (default) a refit of the same instance starts the
  optimiser from the last good parameters, which is what makes a refit every bar affordable.
* Every estimate is checked before it is used (:meth:`ArchForecaster._rejection`): it must converge
  (``convergence_flag == 0``) with finite parameters and log-likelihood; an EGARCH must be stationary in
  log-variance (``sum(beta) < 1``); its in-sample conditional variance must stay inside
  ``variance_bounds`` (widened by ``INSAMPLE_SLACK``) × the sample variance of the window; and, on a refit, its log-likelihood must not
  be below that of the last good parameters on the same returns (an optimiser that stops at a worse
  point than where it started has not found the maximum).
* A rejected warm-started estimate is retried from arch's own starting values (a fresh model); if that
  is rejected too, the last good parameters are used, ``n_fallbacks_`` is incremented and a warning
  naming the reason is logged. A first fit that is rejected for anything but non-convergence raises.
* Starting values: the last good parameters, moved inside arch's constraints and bounds; when they
  cannot be (checked with arch's own test), arch's defaults (``n_cold_starts_``). A
  ``StartingValueWarning`` that arch still raises is caught at the fit call and counted
  (``n_start_warnings_``), never passed on to the caller.
* Forecast variances are clipped to ``variance_bounds`` × the sample variance of the fit window; every
  clipped value is counted (``n_variance_clipped_``) and logged. :meth:`ArchForecaster.diagnostics`
  returns all counters (cumulative over refits of the instance).
* ``update(new_bars)`` appends returns and re-filters with the parameters fixed (``arch``'s ``fix``);
  nothing is re-estimated.

Why (LTC, 2017-09-12): after the +60% day in the window, an EGARCH(1,1,1)-t refit on 379 returns
"converged" to ``alpha = 133, gamma = -534`` (log-likelihood -5060 against -1066 for the previous
parameters); the in-sample variance swung over 14 orders of magnitude, forecasts underflowed to the
1e-12 floor or overflowed, every later refit warm-started from that point, and the held-out QLIKE was
3.4e9. The checks above reject that estimate and keep the previous parameters.

Presets: ``"garch"`` GARCH(1,1)-t, ``"gjr"`` GJR-GARCH(1,1,1)-t, ``"egarch"`` EGARCH(1,1,1)-t,
``"figarch"`` FIGARCH(1,d,1)-t; every parameter is overridable (``get_forecaster("garch", dist="skewt")``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
from arch import arch_model
from arch.utility.exceptions import StartingValueWarning

from models._inputs import VARIANCE_FLOOR, per_bar_returns
from models.base import Forecaster, VolatilityForecast, register

__all__ = ["ArchForecaster", "GJRForecaster", "EGARCHForecaster", "FIGARCHForecaster"]

logger = logging.getLogger(__name__)

VolName = Literal["GARCH", "EGARCH", "FIGARCH"]
DistName = Literal["normal", "t", "skewt"]
MeanName = Literal["Zero", "Constant"]

_VOLS = ("GARCH", "EGARCH", "FIGARCH")
_DISTS = ("normal", "t", "skewt")
_MEANS = ("Zero", "Constant")
SCALE = 100.0
"""Returns are multiplied by this before arch sees them; variances are divided by its square."""

DEFAULT_QUANTILE_LEVELS = (0.01, 0.025, 0.05, 0.95, 0.975, 0.99)
DEFAULT_VARIANCE_BOUNDS = (1e-3, 1e2)
"""Band for forecast (and accepted in-sample) variance, as multiples of the fit window's sample variance.

Measured on the bundled daily sets (walk-forward, min_train 300, refit every 20 bars; forecast over the
mean square of the returns up to the origin): GARCH, GJR and FIGARCH stay within 0.06–26 ×, EGARCH
within 0.06–38 × on BTC and LTC; on ETH before 2018 EGARCH goes past 100 × (113 clipped values, pre-cut
QLIKE 2.03 -> 1.97). On 15-minute BTC (rolling 2688 bars) the 2021-12-04 crash takes GARCH and GJR past
100 × for 3 and 4 values (held-out QLIKE 0.82507 -> 0.82504 and 0.79702 -> 0.79699). Otherwise the band
binds on broken estimates and numerical blow-ups only."""

INSAMPLE_SLACK = 100.0
"""An accepted estimate's in-sample conditional variance must stay within ``variance_bounds`` widened by
this factor on each side: in-sample variances react to the window's own shocks (113 × the sample variance
after the 2021-12-04 crash in 15-minute BTC), whereas the degenerate LTC EGARCH estimate spans 3e-8 .. 5e6 ×."""


def _constraints_and_bounds(am: Any, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """arch's linear constraints ``A·θ − b ≥ 0`` and box bounds ``lo ≤ θ ≤ hi`` for a model on ``y``."""
    parts = (am.constraints(), am.volatility.constraints(), am.distribution.constraints())
    sizes = (am.num_params, am.volatility.num_params, am.distribution.num_params)
    rows = sum(c[0].shape[0] for c in parts)
    n = int(sum(sizes))
    A, b = np.zeros((rows, n)), np.zeros(rows)
    r = c0 = 0
    for (ai, bi), k in zip(parts, sizes, strict=True):
        A[r : r + ai.shape[0], c0 : c0 + k] = ai
        b[r : r + ai.shape[0]] = bi
        r, c0 = r + ai.shape[0], c0 + k
    resid = y - (y.mean() if am.num_params else 0.0)
    bounds = list(am.bounds()) + list(am.volatility.bounds(resid)) + list(am.distribution.bounds(resid / resid.std()))
    lo = np.array([bd[0] for bd in bounds], dtype=np.float64)
    hi = np.array([bd[1] for bd in bounds], dtype=np.float64)
    return A, b, lo, hi


def _is_feasible(am: Any, y: np.ndarray, sv: np.ndarray) -> bool:
    """arch's own acceptance test of starting values (``ARCHModel.fit``): length, constraints, bounds."""
    A, b, lo, hi = _constraints_and_bounds(am, y)
    sv = np.asarray(sv, dtype=np.float64)
    if sv.shape != (A.shape[1],) or not np.all(np.isfinite(sv)):
        return False
    return bool(np.all(A @ sv - b >= 0) and np.all(lo <= sv) and np.all(sv <= hi))


def _feasible_start(am: Any, y: np.ndarray, sv: np.ndarray, margin: float = 1e-6) -> np.ndarray:
    """Move warm-start values strictly inside arch's linear constraints and bounds.

    The last optimum often sits on a boundary (e.g. ``alpha + beta`` at 1 up to solver tolerance);
    arch discards starting values that violate ``A·θ − b ≥ 0`` or the bounds (with a
    ``StartingValueWarning``) and runs its own starting-value search, which would make the warm start a
    cold one. The result may still be infeasible in degenerate cases; check it with :func:`_is_feasible`.
    """
    sv = np.asarray(sv, dtype=np.float64).copy()
    A, b, lo, hi = _constraints_and_bounds(am, y)
    for _ in range(20):
        span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
        sv = np.clip(sv, lo + margin * span, hi - margin * span)
        slack = A @ sv - b
        bad = slack < margin
        if not bad.any():
            break
        for i in np.flatnonzero(bad):
            sv += A[i] * (margin - slack[i]) * 10 / float(A[i] @ A[i])
    return sv


@register
class ArchForecaster(Forecaster):
    """GARCH-family volatility model estimated by maximum likelihood with ``arch``.

    Parameters
    ----------
    vol : {"GARCH", "EGARCH", "FIGARCH"}
        Volatility process. GJR-GARCH is ``vol="GARCH", o=1``.
    p, o, q : int
        ARCH, asymmetry and GARCH orders (FIGARCH uses ``p, q`` in {0, 1} and ignores ``o``).
    dist : {"normal", "t", "skewt"}
        Standardized innovation distribution.
    mean : {"Zero", "Constant"}
        Mean model of the returns.
    warm_start : bool
        Start each refit from the last good parameters of this instance.
    simulations : int
        Paths for simulation forecasts (EGARCH beyond one step).
    seed : int
        Seed of the simulation forecasts (forecasts are deterministic given the seed).
    quantile_levels : tuple of float or None
        Return quantile levels reported with each forecast (from the fitted distribution), or None.
    min_obs : int
        Fewest returns accepted by ``fit``.
    variance_bounds : tuple of float
        ``(low, high)`` multiples of the fit window's sample variance: forecasts are clipped to this band
        (counted in ``n_variance_clipped_``, logged) and an estimate whose in-sample conditional
        variance leaves it, widened ``INSAMPLE_SLACK`` times on each side, is rejected. ``0 < low < 1 < high``.
    """

    name = "garch"
    required_columns = ("ret",)
    _persistent = (
        "last_good_params_", "last_good_spec_", "n_fallbacks_", "n_fits_", "n_rejected_fits_",
        "n_cold_starts_", "n_start_warnings_", "n_variance_clipped_",
    )
    #: default for instances pickled before the parameter existed (``__init__`` always sets it)
    variance_bounds: tuple[float, float] = DEFAULT_VARIANCE_BOUNDS
    #: counters reported by :meth:`diagnostics` (cumulative over the refits of this instance)
    _counters = ("n_fallbacks_", "n_rejected_fits_", "n_cold_starts_", "n_start_warnings_", "n_variance_clipped_")

    def __init__(
        self,
        *,
        vol: VolName = "GARCH",
        p: int = 1,
        o: int = 0,
        q: int = 1,
        dist: DistName = "t",
        mean: MeanName = "Zero",
        warm_start: bool = True,
        simulations: int = 1000,
        seed: int = 0,
        quantile_levels: tuple[float, ...] | None = DEFAULT_QUANTILE_LEVELS,
        min_obs: int = 100,
        variance_bounds: tuple[float, float] = DEFAULT_VARIANCE_BOUNDS,
    ) -> None:
        self.vol = vol
        self.p = p
        self.o = o
        self.q = q
        self.dist = dist
        self.mean = mean
        self.warm_start = warm_start
        self.simulations = simulations
        self.seed = seed
        self.quantile_levels = quantile_levels
        self.min_obs = min_obs
        self.variance_bounds = variance_bounds

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> None:
        if self.vol not in _VOLS:
            raise ValueError(f"vol must be one of {_VOLS}, got {self.vol!r}")
        if self.dist not in _DISTS:
            raise ValueError(f"dist must be one of {_DISTS}, got {self.dist!r}")
        if self.mean not in _MEANS:
            raise ValueError(f"mean must be one of {_MEANS}, got {self.mean!r}")
        for k in ("p", "o", "q"):
            v = getattr(self, k)
            if not isinstance(v, int | np.integer) or v < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
        if self.p < 1 and self.o < 1:
            raise ValueError(f"p or o must be >= 1, got p={self.p}, o={self.o}")
        if self.vol == "FIGARCH" and (self.p > 1 or self.q > 1):
            raise ValueError(f"FIGARCH needs p, q in {{0, 1}}, got p={self.p}, q={self.q}")
        if int(self.simulations) < 1:
            raise ValueError(f"simulations must be >= 1, got {self.simulations!r}")
        if int(self.min_obs) < 10:
            raise ValueError(f"min_obs must be >= 10, got {self.min_obs!r}")
        vb = tuple(self.variance_bounds) if isinstance(self.variance_bounds, tuple | list) else ()
        if len(vb) != 2 or not all(np.isfinite(float(x)) for x in vb) or not 0 < float(vb[0]) < 1 < float(vb[1]):
            raise ValueError(
                f"variance_bounds must be (low, high) multiples of the sample variance with 0 < low < 1 < high, "
                f"got {self.variance_bounds!r}"
            )

    # ------------------------------------------------------------------ arch plumbing
    def _model(self, y: np.ndarray) -> Any:
        kw: dict[str, Any] = {"p": self.p, "q": self.q}
        if self.vol != "FIGARCH":
            kw["o"] = self.o
        return arch_model(y, mean=self.mean, vol=self.vol, dist=self.dist, rescale=False, **kw)

    @staticmethod
    def _nit(res: Any) -> int:
        opt = getattr(res, "optimization_result", None)
        return int(getattr(opt, "nit", 0) or 0)

    @staticmethod
    def _ok(res: Any) -> bool:
        return bool(
            res.convergence_flag == 0
            and np.all(np.isfinite(np.asarray(res.params)))
            and np.isfinite(res.loglikelihood)
        )

    def _sample_variance(self, y: np.ndarray) -> float:
        """Sample variance of ``y`` (arch units, %²) around the mean model's mean."""
        c = y - (y.mean() if self.mean == "Constant" else 0.0)
        return float(np.mean(c * c))

    def _arch_fit(self, am: Any, start: np.ndarray | None) -> Any:
        """``am.fit`` with arch's ``StartingValueWarning`` caught here and counted (other warnings pass on)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StartingValueWarning)
            res = am.fit(disp="off", show_warning=False, starting_values=start)
        for w in caught:
            if issubclass(w.category, StartingValueWarning):
                self.n_start_warnings_ += 1
                logger.info("%s: arch rejected the starting values (%s); it used its own", self.name, w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        self.n_iter_ += self._nit(res)
        return res

    def _rejection(self, res: Any, y: np.ndarray, ll_ref: float | None) -> tuple[str, bool] | None:
        """Why an estimate must not be used, or None when it passes.

        Returns ``(reason, invalid)``: ``invalid`` is False when the only fault is non-convergence of an
        otherwise usable estimate (a first fit may keep it), True for parameters that must never be used.
        """
        params = np.asarray(res.params, dtype=np.float64)
        if not (np.all(np.isfinite(params)) and np.isfinite(res.loglikelihood)):
            return "non-finite parameters or log-likelihood", True
        names = list(res.params.index)
        if self.vol == "EGARCH":
            persistence = float(sum(v for k, v in zip(names, params, strict=True) if k.startswith("beta")))
            if not abs(persistence) < 1.0:
                return f"EGARCH not stationary: sum(beta) = {persistence:.6g}, expected |sum(beta)| < 1", True
        if ll_ref is not None and res.loglikelihood < ll_ref - 1e-6 * (1.0 + abs(ll_ref)):
            return (
                f"log-likelihood {res.loglikelihood:.6g} below {ll_ref:.6g} of the last good parameters on the "
                f"same returns (not the maximum)", True
            )
        with np.errstate(over="ignore", invalid="ignore"):
            cv = np.asarray(res.conditional_volatility, dtype=np.float64) ** 2
        v = self._sample_variance(y)
        lo, hi = float(self.variance_bounds[0]) / INSAMPLE_SLACK, float(self.variance_bounds[1]) * INSAMPLE_SLACK
        if not (np.all(np.isfinite(cv)) and cv.min() >= lo * v and cv.max() <= hi * v):
            return (
                f"in-sample conditional variance spans {np.nanmin(cv) / v:.3g} .. {np.nanmax(cv) / v:.3g} x the "
                f"sample variance, outside [{lo:.3g}, {hi:.3g}] (variance_bounds widened {INSAMPLE_SLACK:g}x)", True
            )
        if not self._ok(res):
            return f"did not converge (flag {res.convergence_flag})", False
        return None

    def _fit(self, frame: pd.DataFrame) -> None:
        self._check_params()
        y = SCALE * per_bar_returns(frame).to_numpy()
        if len(y) < int(self.min_obs):
            raise ValueError(f"{type(self).__name__} needs at least min_obs={self.min_obs} returns, got {len(y)}")
        for k in ("n_fits_", *self._counters):
            setattr(self, k, getattr(self, k, 0))
        self.n_fits_ += 1
        self.n_iter_ = 0
        when = f"{self.name} fit on {len(y)} returns ending {frame.index[-1]}"
        last = getattr(self, "last_good_params_", None)
        warm = (
            bool(self.warm_start)
            and last is not None
            and getattr(self, "last_good_spec_", None) == self.spec_hash()
        )
        # the last good parameters on this window: the point a refit must not fall below
        ll_ref = float(self._model(y).fix(last).loglikelihood) if warm else None
        if ll_ref is not None and not np.isfinite(ll_ref):
            ll_ref = None
        res = rejected = None
        if warm:
            am = self._model(y)
            start = _feasible_start(am, y, last.to_numpy())
            if _is_feasible(am, y, start):
                # arch evaluates the volatility process's starting-value grid even when starting values
                # are supplied (it only uses it to standardize residuals); hand it the warm values instead
                k0, kv = am.num_params, am.volatility.num_params
                sv_vol = start[k0 : k0 + kv].copy()
                am.volatility.starting_values = lambda resids, _sv=sv_vol: _sv.copy()
                res = self._arch_fit(am, start)
                rejected = self._rejection(res, y, ll_ref)
                if rejected is not None:
                    logger.info("%s: warm-started estimate rejected (%s); retrying from arch's starts", when,
                                rejected[0])
            else:
                self.n_cold_starts_ += 1
                logger.info("%s: the last good parameters cannot be made feasible starts; using arch's", when)
        self.warm_started_ = res is not None
        if res is None or rejected is not None:
            res = self._arch_fit(self._model(y), None)  # a fresh model: arch's own starting values
            rejected = self._rejection(res, y, ll_ref)
        self.used_fallback_ = False
        self.converged_ = rejected is None
        self.rejection_ = None if rejected is None else rejected[0]
        if rejected is None:
            params = res.params.copy()
            self.last_good_params_ = params
            self.last_good_spec_ = self.spec_hash()
            self.loglikelihood_ = float(res.loglikelihood)
        elif warm:
            self.n_rejected_fits_ += 1
            self.n_fallbacks_ += 1
            logger.warning(
                "%s: estimate rejected (%s); using last good parameters (fallback #%d)",
                when, rejected[0], self.n_fallbacks_,
            )
            params = last.copy()
            self.used_fallback_ = True
            self.loglikelihood_ = float(ll_ref) if ll_ref is not None else float("nan")
        elif not rejected[1]:
            logger.warning(
                "%s %s and no earlier good parameters exist; keeping the unconverged estimate", when, rejected[0]
            )
            params = res.params.copy()
            self.loglikelihood_ = float(res.loglikelihood)
        else:
            self.n_rejected_fits_ += 1
            raise RuntimeError(f"{when} failed: {rejected[0]}, and no earlier good parameters to fall back on")
        self.params_ = params
        self.sample_variance_ = self._sample_variance(y) / SCALE**2
        self._filter(frame)

    def diagnostics(self) -> dict[str, int]:
        """Counters of this instance over all its fits (zero when all is well): fallbacks to the last good
        parameters, rejected estimates, cold starts, arch starting-value warnings caught, clipped forecast
        values."""
        return {k.removeprefix("n_").removesuffix("_"): int(getattr(self, k, 0) or 0) for k in self._counters}

    def _filter(self, frame: pd.DataFrame) -> None:
        self.y_ = SCALE * per_bar_returns(frame).to_numpy()
        self._fixed = None
        self._clipped_since_fit = 0

    def _update(self, new_bars: pd.DataFrame) -> None:
        y = SCALE * per_bar_returns(new_bars).to_numpy()
        if len(y):
            self.y_ = np.concatenate([self.y_, y])
            self._fixed = None

    def _fixed_result(self) -> Any:
        if getattr(self, "_fixed", None) is None:
            self._fixed = self._model(self.y_).fix(self.params_)
        return self._fixed

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fixed"] = None  # arch result objects are rebuilt on demand
        return state

    # ------------------------------------------------------------------ forecasting
    def _forecast_method(self, horizon: int) -> str:
        if horizon == 1:
            return "analytic"
        if self.vol == "EGARCH":
            return "simulation"
        return "analytic"

    def _predict(self, horizon: int) -> VolatilityForecast:
        res = self._fixed_result()
        method = self._forecast_method(horizon)
        kw: dict[str, Any] = {}
        dist = res.model.distribution
        dist_params = self.params_.to_numpy()[len(self.params_) - dist.num_params :]
        if method == "simulation":
            # deterministic given the seed: standardized shocks by inversion of the fitted distribution
            gen = np.random.default_rng(int(self.seed))

            def draws(size: int | tuple[int, ...]) -> np.ndarray:
                u = np.clip(gen.random(size), 1e-12, 1 - 1e-12)
                return np.asarray(dist.ppf(u.ravel(), dist_params), dtype=np.float64).reshape(u.shape)

            kw = {"simulations": int(self.simulations), "rng": draws}
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is clipped below, and counted
            fc = res.forecast(horizon=horizon, reindex=False, method=method, **kw)
        var = self._clip_variance(np.asarray(fc.variance, dtype=np.float64)[-1] / SCALE**2)
        std_resid = np.asarray(res.std_resid, dtype=np.float64)
        extra: dict[str, Any] = {"std_resid": std_resid[np.isfinite(std_resid)]}
        if self.quantile_levels:
            levels = np.asarray(self.quantile_levels, dtype=np.float64)
            z = np.asarray(dist.ppf(levels, dist_params), dtype=np.float64)
            mu = float(self.params_.get("mu", 0.0)) / SCALE
            extra["quantiles"] = (mu + np.sqrt(var)[:, None] * z[None, :])[None, :, :]
            extra["quantile_levels"] = tuple(levels)
        return self._forecast(var, **extra)

    def _clip_variance(self, var: np.ndarray) -> np.ndarray:
        """Clip forecast variances to ``variance_bounds`` × the fit window's sample variance (counted, logged).

        ``+inf`` (an overflow) is clipped to the upper bound; NaN is left for the caller to reject.
        """
        if getattr(self, "sample_variance_", None) is None:  # a model pickled before the bounds existed
            self.sample_variance_ = self._sample_variance(self.y_) / SCALE**2
        self.n_variance_clipped_ = getattr(self, "n_variance_clipped_", 0)
        v = float(self.sample_variance_)
        lo = max(float(self.variance_bounds[0]) * v, VARIANCE_FLOOR)
        hi = max(float(self.variance_bounds[1]) * v, lo)
        with np.errstate(invalid="ignore"):
            out = (var < lo) | (var > hi)
        n = int(out.sum())
        if n:
            first = getattr(self, "_clipped_since_fit", 0) == 0
            self._clipped_since_fit = getattr(self, "_clipped_since_fit", 0) + n
            self.n_variance_clipped_ += n
            (logger.warning if first else logger.debug)(
                "%s forecast at %s: %d of %d steps outside [%.3g, %.3g] x the sample variance %.3g, clipped "
                "(%d clipped values in total)", self.name, self.last_time_, n, len(var),
                *self.variance_bounds, v, self.n_variance_clipped_,
            )
        return np.where(np.isnan(var), var, np.clip(var, lo, hi))

    def conditional_variance(self) -> pd.Series:
        """In-sample per-bar conditional variance (decimal units) of every return seen, fixed params."""
        self._check_fitted()
        cv = np.asarray(self._fixed_result().conditional_volatility, dtype=np.float64) ** 2 / SCALE**2
        return pd.Series(cv, name="conditional_variance")


@register
class GJRForecaster(ArchForecaster):
    """GJR-GARCH(1,1,1) with Student-t errors (asymmetric news impact); all parameters overridable."""

    name = "gjr"

    def __init__(
        self,
        *,
        vol: VolName = "GARCH",
        p: int = 1,
        o: int = 1,
        q: int = 1,
        dist: DistName = "t",
        mean: MeanName = "Zero",
        warm_start: bool = True,
        simulations: int = 1000,
        seed: int = 0,
        quantile_levels: tuple[float, ...] | None = DEFAULT_QUANTILE_LEVELS,
        min_obs: int = 100,
        variance_bounds: tuple[float, float] = DEFAULT_VARIANCE_BOUNDS,
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs, variance_bounds=variance_bounds,
        )


@register
class EGARCHForecaster(ArchForecaster):
    """EGARCH(1,1,1) with Student-t errors; multi-step forecasts by seeded simulation."""

    name = "egarch"

    def __init__(
        self,
        *,
        vol: VolName = "EGARCH",
        p: int = 1,
        o: int = 1,
        q: int = 1,
        dist: DistName = "t",
        mean: MeanName = "Zero",
        warm_start: bool = True,
        simulations: int = 1000,
        seed: int = 0,
        quantile_levels: tuple[float, ...] | None = DEFAULT_QUANTILE_LEVELS,
        min_obs: int = 100,
        variance_bounds: tuple[float, float] = DEFAULT_VARIANCE_BOUNDS,
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs, variance_bounds=variance_bounds,
        )


@register
class FIGARCHForecaster(ArchForecaster):
    """FIGARCH(1,d,1) with Student-t errors (long memory in volatility)."""

    name = "figarch"

    def __init__(
        self,
        *,
        vol: VolName = "FIGARCH",
        p: int = 1,
        o: int = 0,
        q: int = 1,
        dist: DistName = "t",
        mean: MeanName = "Zero",
        warm_start: bool = True,
        simulations: int = 1000,
        seed: int = 0,
        quantile_levels: tuple[float, ...] | None = DEFAULT_QUANTILE_LEVELS,
        min_obs: int = 100,
        variance_bounds: tuple[float, float] = DEFAULT_VARIANCE_BOUNDS,
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs, variance_bounds=variance_bounds,
        )
