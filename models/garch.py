"""GARCH-family forecasters through ``arch``: one composed class, registered presets.

The model is composed like ``arch_model``: a mean (``"Zero"`` or ``"Constant"``), a volatility process
(``vol`` in GARCH / EGARCH / FIGARCH with orders ``p``, ``o``, ``q``; GJR is GARCH with ``o >= 1``) and a
distribution (``dist`` in normal / t / skewt). ``arch`` is fed returns ×100 (its preferred scale);
every variance this module reports is per bar in decimal log-return units (÷1e4).

Rolling use
-----------
* ``fit`` re-estimates. With ``warm_start=True`` (default) a refit of the same instance starts the
  optimiser from the last good parameters, which is what makes a refit every bar affordable.
* A fit that does not converge (``convergence_flag != 0``) or returns non-finite parameters or
  log-likelihood is retried from arch's own starting values; if that fails too, the last good
  parameters are used, ``n_fallbacks_`` is incremented and a warning is logged.
* ``update(new_bars)`` appends returns and re-filters with the parameters fixed (``arch``'s ``fix``);
  nothing is re-estimated.

Presets: ``"garch"`` GARCH(1,1)-t, ``"gjr"`` GJR-GARCH(1,1,1)-t, ``"egarch"`` EGARCH(1,1,1)-t,
``"figarch"`` FIGARCH(1,d,1)-t; every parameter is overridable (``get_forecaster("garch", dist="skewt")``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
from arch import arch_model

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


def _feasible_start(am: Any, y: np.ndarray, sv: np.ndarray, margin: float = 1e-6) -> np.ndarray:
    """Move warm-start values strictly inside arch's linear constraints and bounds.

    The last optimum often sits on a boundary (e.g. ``alpha + beta`` at 1 up to solver tolerance);
    arch silently discards starting values that violate ``A·θ − b ≥ 0`` or the bounds and runs its
    own starting-value search, which would make the warm start a cold one.
    """
    sv = np.asarray(sv, dtype=np.float64).copy()
    parts = (am.constraints(), am.volatility.constraints(), am.distribution.constraints())
    sizes = (am.num_params, am.volatility.num_params, am.distribution.num_params)
    rows = sum(c[0].shape[0] for c in parts)
    A, b = np.zeros((rows, len(sv))), np.zeros(rows)
    r = c0 = 0
    for (ai, bi), k in zip(parts, sizes, strict=True):
        A[r : r + ai.shape[0], c0 : c0 + k] = ai
        b[r : r + ai.shape[0]] = bi
        r, c0 = r + ai.shape[0], c0 + k
    resid = y - (y.mean() if am.num_params else 0.0)
    bounds = list(am.bounds()) + list(am.volatility.bounds(resid)) + list(am.distribution.bounds(resid / resid.std()))
    lo = np.array([bd[0] for bd in bounds], dtype=np.float64)
    hi = np.array([bd[1] for bd in bounds], dtype=np.float64)
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
    """

    name = "garch"
    required_columns = ("ret",)
    _persistent = ("last_good_params_", "last_good_spec_", "n_fallbacks_", "n_fits_")

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

    def _fit(self, frame: pd.DataFrame) -> None:
        self._check_params()
        y = SCALE * per_bar_returns(frame).to_numpy()
        if len(y) < int(self.min_obs):
            raise ValueError(f"{type(self).__name__} needs at least min_obs={self.min_obs} returns, got {len(y)}")
        self.n_fits_ = getattr(self, "n_fits_", 0) + 1
        self.n_fallbacks_ = getattr(self, "n_fallbacks_", 0)
        am = self._model(y)
        last = getattr(self, "last_good_params_", None)
        warm = (
            bool(self.warm_start)
            and last is not None
            and getattr(self, "last_good_spec_", None) == self.spec_hash()
        )
        start = None
        if warm:
            start = _feasible_start(am, y, last.to_numpy())
            # arch evaluates the volatility process's starting-value grid even when starting values
            # are supplied (it only uses it to standardize residuals); with a warm start, hand it the
            # warm volatility parameters instead of searching the grid
            k0, kv = am.num_params, am.volatility.num_params
            sv_vol = start[k0 : k0 + kv].copy()
            am.volatility.starting_values = lambda resids, _sv=sv_vol: _sv.copy()
        res = am.fit(disp="off", show_warning=False, starting_values=start)
        self.warm_started_ = warm
        self.n_iter_ = self._nit(res)
        if not self._ok(res) and warm:
            logger.info("%s: warm-started fit did not converge; retrying from default starts", self.name)
            res = am.fit(disp="off", show_warning=False)
            self.n_iter_ += self._nit(res)
        if self._ok(res):
            params = res.params.copy()
            self.converged_ = True
            self.used_fallback_ = False
            self.last_good_params_ = params
            self.last_good_spec_ = self.spec_hash()
        elif warm and last is not None:
            self.n_fallbacks_ += 1
            logger.warning(
                "%s fit on %d returns ending %s did not converge (flag %s); using last good parameters "
                "(fallback #%d)",
                self.name, len(y), frame.index[-1], res.convergence_flag, self.n_fallbacks_,
            )
            params = last.copy()
            self.converged_ = False
            self.used_fallback_ = True
        elif np.all(np.isfinite(np.asarray(res.params))) and np.isfinite(res.loglikelihood):
            logger.warning(
                "%s fit on %d returns ending %s did not converge (flag %s) and no earlier good "
                "parameters exist; keeping the unconverged estimate",
                self.name, len(y), frame.index[-1], res.convergence_flag,
            )
            params = res.params.copy()
            self.converged_ = False
            self.used_fallback_ = False
        else:
            raise RuntimeError(
                f"{self.name} fit on {len(y)} returns ending {frame.index[-1]} failed: non-finite parameters "
                f"or log-likelihood and no earlier good parameters to fall back on"
            )
        self.params_ = params
        self.loglikelihood_ = float(
            res.loglikelihood if not self.used_fallback_ else self._model(y).fix(params).loglikelihood
        )
        self._filter(frame)

    def _filter(self, frame: pd.DataFrame) -> None:
        self.y_ = SCALE * per_bar_returns(frame).to_numpy()
        self._fixed = None

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
        fc = res.forecast(horizon=horizon, reindex=False, method=method, **kw)
        var = np.maximum(np.asarray(fc.variance)[-1] / SCALE**2, VARIANCE_FLOOR)
        std_resid = np.asarray(res.std_resid, dtype=np.float64)
        extra: dict[str, Any] = {"std_resid": std_resid[np.isfinite(std_resid)]}
        if self.quantile_levels:
            levels = np.asarray(self.quantile_levels, dtype=np.float64)
            z = np.asarray(dist.ppf(levels, dist_params), dtype=np.float64)
            mu = float(self.params_.get("mu", 0.0)) / SCALE
            extra["quantiles"] = (mu + np.sqrt(var)[:, None] * z[None, :])[None, :, :]
            extra["quantile_levels"] = tuple(levels)
        return self._forecast(var, **extra)

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
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs,
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
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs,
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
    ) -> None:
        super().__init__(
            vol=vol, p=p, o=o, q=q, dist=dist, mean=mean, warm_start=warm_start, simulations=simulations,
            seed=seed, quantile_levels=quantile_levels, min_obs=min_obs,
        )
