"""Forecaster interface and the `VolatilityForecast` contract between forecasting and margin.

Units
-----
* Returns are decimal log returns per bar (``ln(C_t / C_{t-1})``), never ×100.
* Variance is **per step**: column ``k`` (``h.k``) is the forecast variance of the return of bar
  ``t + k`` made at origin ``t``. It is never cumulative; sum the columns for a multi-bar horizon.
* Annualisation happens only in reports.

The estimator contract follows scikit-learn / sktime: ``__init__`` stores keyword arguments only;
public ``fit``/``update``/``predict_variance`` validate and delegate to private ``_fit``/``_update``/
``_predict``; fitted attributes end in an underscore; use before ``fit`` raises ``NotFittedError``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd

__all__ = [
    "Forecaster",
    "NotFittedError",
    "VolatilityForecast",
    "FORECASTERS",
    "register",
    "get_forecaster",
]


def _utc(ts: Any) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


#: the frame.attrs keys forecasters may read (the rest is dropped on entry: pandas deep-copies
#: attrs on every column access, which is measurable in rolling refits)
MODEL_ATTRS = ("bar", "bars_per_year", "asset")


def _light_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    if not frame.attrs or set(frame.attrs) <= set(MODEL_ATTRS):
        return frame
    out = pd.DataFrame(frame, copy=False)
    out.attrs = {k: frame.attrs[k] for k in MODEL_ATTRS if k in frame.attrs}
    return out


class NotFittedError(RuntimeError):
    """Raised when a forecaster is used before ``fit``."""


@dataclass(frozen=True)
class VolatilityForecast:
    """Per-step variance forecasts: origins × horizon steps.

    Parameters
    ----------
    origins : pd.DatetimeIndex
        UTC timestamps of the last bar seen when each forecast row was made, shape ``(n,)``.
    variance : np.ndarray
        ``(n, H)`` float64, per-step variance of decimal log returns; ``variance[i, k-1]`` is the
        variance of the return of bar ``origins[i] + k bars``. Strictly positive and finite.
    model : str
        Name of the model that produced it (e.g. ``"garch"``).
    version : str
        Model version / specification hash (registry version once registered).
    quantiles : np.ndarray, optional
        ``(n, H, Q)`` return quantiles (decimal log returns) at ``quantile_levels``.
    quantile_levels : tuple of float, optional
        Levels in (0, 1), increasing, one per last axis of ``quantiles``.
    regime_probs : np.ndarray, optional
        ``(n, K)`` regime probabilities at each origin (rows sum to 1).
    regime_names : tuple of str, optional
        Names of the ``K`` regimes, calm to stressed.
    std_resid : np.ndarray, optional
        Standardized residuals of the fit (1-D), for filtered historical simulation.
    """

    origins: pd.DatetimeIndex
    variance: np.ndarray
    model: str
    version: str = ""
    quantiles: np.ndarray | None = None
    quantile_levels: tuple[float, ...] | None = None
    regime_probs: np.ndarray | None = None
    regime_names: tuple[str, ...] | None = None
    std_resid: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        origins = pd.DatetimeIndex(self.origins)
        if origins.tz is None:
            origins = origins.tz_localize("UTC")
        object.__setattr__(self, "origins", origins)
        var = np.asarray(self.variance, dtype=np.float64)
        if var.ndim == 1:
            var = var[None, :]
        if var.ndim != 2:
            raise ValueError(f"variance must be 2-D (origins × horizon), got shape {var.shape}")
        if var.shape[0] != len(origins):
            raise ValueError(
                f"variance has {var.shape[0]} rows but there are {len(origins)} origins"
            )
        if var.shape[1] < 1:
            raise ValueError("variance must have at least one horizon step")
        if not np.all(np.isfinite(var)) or np.any(var <= 0):
            bad = np.argwhere(~np.isfinite(var) | (var <= 0))[0]
            raise ValueError(
                f"variance must be finite and > 0, got {var[tuple(bad)]!r} at row {bad[0]}, step {bad[1] + 1}"
            )
        var.setflags(write=False)
        object.__setattr__(self, "variance", var)
        if self.quantiles is not None:
            q = np.asarray(self.quantiles, dtype=np.float64)
            if self.quantile_levels is None:
                raise ValueError("quantiles given without quantile_levels")
            levels = tuple(float(x) for x in self.quantile_levels)
            if q.shape != (var.shape[0], var.shape[1], len(levels)):
                raise ValueError(
                    f"quantiles must have shape {(var.shape[0], var.shape[1], len(levels))}, got {q.shape}"
                )
            if any(not 0 < lv < 1 for lv in levels) or list(levels) != sorted(levels):
                raise ValueError(f"quantile_levels must be increasing in (0, 1), got {levels}")
            q.setflags(write=False)
            object.__setattr__(self, "quantiles", q)
            object.__setattr__(self, "quantile_levels", levels)
        if self.regime_probs is not None:
            p = np.asarray(self.regime_probs, dtype=np.float64)
            if p.ndim != 2 or p.shape[0] != var.shape[0]:
                raise ValueError(f"regime_probs must be (n_origins, K), got {p.shape}")
            if not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
                raise ValueError("regime_probs rows must sum to 1")
            p.setflags(write=False)
            object.__setattr__(self, "regime_probs", p)
            if self.regime_names is not None and len(self.regime_names) != p.shape[1]:
                raise ValueError(
                    f"regime_names has {len(self.regime_names)} names for {p.shape[1]} regimes"
                )
        if self.std_resid is not None:
            r = np.asarray(self.std_resid, dtype=np.float64).ravel()
            r = r[np.isfinite(r)]
            r.setflags(write=False)
            object.__setattr__(self, "std_resid", r)

    # ------------------------------------------------------------------ views
    @property
    def horizon(self) -> int:
        """Number of forecast steps ``H``."""
        return int(self.variance.shape[1])

    def __len__(self) -> int:
        return int(self.variance.shape[0])

    def volatility(self) -> np.ndarray:
        """Per-step standard deviation, ``sqrt(variance)``."""
        return np.sqrt(self.variance)

    def cumulative_variance(self, steps: int | None = None) -> np.ndarray:
        """Variance of the sum of the next ``steps`` returns (sum of per-step variances)."""
        steps = self.horizon if steps is None else int(steps)
        if not 1 <= steps <= self.horizon:
            raise ValueError(f"steps must be in [1, {self.horizon}], got {steps}")
        return self.variance[:, :steps].sum(axis=1)

    def to_frame(self) -> pd.DataFrame:
        """Forecast table: rows are origins, columns ``h.1 … h.H`` (arch's layout)."""
        cols = [f"h.{k}" for k in range(1, self.horizon + 1)]
        return pd.DataFrame(np.array(self.variance), index=self.origins, columns=cols)

    def to_long_frame(self) -> pd.DataFrame:
        """Wide table plus optional regime probability and quantile columns, for parquet."""
        df = self.to_frame()
        if self.regime_probs is not None:
            names = self.regime_names or tuple(f"regime_{i}" for i in range(self.regime_probs.shape[1]))
            for i, nm in enumerate(names):
                df[f"p.{nm}"] = self.regime_probs[:, i]
        if self.quantiles is not None and self.quantile_levels is not None:
            for k in range(self.horizon):
                for j, lv in enumerate(self.quantile_levels):
                    df[f"q{lv:g}.h.{k + 1}"] = self.quantiles[:, k, j]
        return df

    @classmethod
    def from_long_frame(
        cls, df: pd.DataFrame, *, model: str, version: str = "", std_resid: np.ndarray | None = None
    ) -> VolatilityForecast:
        """Inverse of :meth:`to_long_frame`."""
        hcols = sorted((c for c in df.columns if c.startswith("h.")), key=lambda c: int(c[2:]))
        pcols = [c for c in df.columns if c.startswith("p.")]
        qcols = [c for c in df.columns if c.startswith("q") and ".h." in c]
        regime_probs = df[pcols].to_numpy() if pcols else None
        regime_names = tuple(c[2:] for c in pcols) if pcols else None
        quantiles = levels = None
        if qcols:
            levels = tuple(sorted({float(c[1:].split(".h.")[0]) for c in qcols}))
            H = len(hcols)
            quantiles = np.empty((len(df), H, len(levels)))
            for k in range(H):
                for j, lv in enumerate(levels):
                    quantiles[:, k, j] = df[f"q{lv:g}.h.{k + 1}"].to_numpy()
        return cls(
            origins=pd.DatetimeIndex(df.index),
            variance=df[hcols].to_numpy(),
            model=model,
            version=version,
            quantiles=quantiles,
            quantile_levels=levels,
            regime_probs=regime_probs,
            regime_names=regime_names,
            std_resid=std_resid,
        )

    def slice(self, start: Any = None, end: Any = None) -> VolatilityForecast:
        """Rows with ``start <= origin < end`` (timestamps, naive taken as UTC, or None)."""
        mask = np.ones(len(self), dtype=bool)
        if start is not None:
            mask &= self.origins >= _utc(start)
        if end is not None:
            mask &= self.origins < _utc(end)
        return self._take(mask)

    def _take(self, idx: np.ndarray) -> VolatilityForecast:
        return replace(
            self,
            origins=self.origins[idx],
            variance=self.variance[idx],
            quantiles=None if self.quantiles is None else self.quantiles[idx],
            regime_probs=None if self.regime_probs is None else self.regime_probs[idx],
        )

    @classmethod
    def stack(cls, parts: list[VolatilityForecast]) -> VolatilityForecast:
        """Concatenate forecasts row-wise (walk-forward: one row per origin).

        The standardized residuals of the last part are kept (the most recent fit).
        """
        if not parts:
            raise ValueError("stack needs at least one forecast")
        first = parts[0]
        H = first.horizon
        for p in parts:
            if p.horizon != H:
                raise ValueError(f"cannot stack horizons {H} and {p.horizon}")
        has_q = all(p.quantiles is not None for p in parts)
        has_p = all(p.regime_probs is not None for p in parts)
        return cls(
            origins=first.origins.append([p.origins for p in parts[1:]]),
            variance=np.concatenate([p.variance for p in parts]),
            model=first.model,
            version=first.version,
            quantiles=np.concatenate([p.quantiles for p in parts]) if has_q else None,
            quantile_levels=first.quantile_levels if has_q else None,
            regime_probs=np.concatenate([p.regime_probs for p in parts]) if has_p else None,
            regime_names=first.regime_names if has_p else None,
            std_resid=parts[-1].std_resid,
        )


# ---------------------------------------------------------------------- forecaster base
class Forecaster:
    """Base class of every volatility forecaster.

    Subclasses implement ``_fit(frame)`` (estimate, then build the state), ``_filter(frame)`` (rebuild
    the state over ``frame`` with fixed parameters), ``_update(new_bars)`` (advance the state
    incrementally, equal to ``_filter`` on the concatenated bars) and
    ``_predict(horizon) -> VolatilityForecast``.

    ``frame`` is the prepared bar frame from ``data_pipelines.features.build_features``: a UTC
    ``DatetimeIndex`` and at least the column ``ret`` (decimal log return per bar). Models take the
    columns they need (``var_gk``, ``rv``, ``har_*`` ...) and list them in ``required_columns``.
    """

    name: ClassVar[str] = "base"
    required_columns: ClassVar[tuple[str, ...]] = ("ret",)

    # -- sklearn-style parameter handling
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind == p.KEYWORD_ONLY
        ]

    @classmethod
    def test_params(cls) -> dict[str, Any]:
        """Small, fast parameters for the shared interface test suite (sktime's ``get_test_params``)."""
        return {}

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> Forecaster:
        valid = set(self._param_names())
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {k!r}; valid: {sorted(valid)}")
            setattr(self, k, v)
        return self

    def clone(self) -> Forecaster:
        """Unfitted copy with the same parameters."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- state
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "last_time_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet; call fit(frame) before using it."
            )

    def _validate_frame(self, frame: pd.DataFrame, *, what: str = "frame") -> pd.DataFrame:
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
        if not isinstance(frame.index, pd.DatetimeIndex):
            raise TypeError(f"{what} must have a DatetimeIndex")
        missing = [c for c in self.required_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs columns {list(self.required_columns)}; {what} lacks {missing}"
            )
        if len(frame) == 0:
            raise ValueError(f"{what} is empty")
        if not frame.index.is_monotonic_increasing:
            raise ValueError(f"{what} index must be increasing")
        return frame

    # -- public API
    def fit(self, frame: pd.DataFrame) -> Forecaster:
        """Fit on all bars of ``frame`` (rows with NaN ``ret`` at the start are skipped)."""
        frame = _light_attrs(self._validate_frame(frame))
        self._reset()
        self._fit(frame)
        self.n_obs_ = int(len(frame))
        self.last_time_ = frame.index[-1]
        return self

    def update(self, new_bars: pd.DataFrame) -> Forecaster:
        """Append bars after the last one seen and refilter, without re-estimating parameters."""
        self._check_fitted()
        new_bars = self._validate_frame(new_bars, what="new_bars")
        new_bars = new_bars[new_bars.index > self.last_time_]
        if len(new_bars) == 0:
            return self
        # models read frame.attrs only when fitting; pandas deep-copies attrs on every operation,
        # which dominates the cost of one-bar updates when attrs are large
        new_bars = pd.DataFrame(new_bars, copy=False)
        new_bars.attrs = {}
        self._update(new_bars)
        self.n_obs_ += int(len(new_bars))
        self.last_time_ = new_bars.index[-1]
        return self

    def filter(self, frame: pd.DataFrame) -> Forecaster:
        """Re-run the fitted model over all bars of ``frame`` with its parameters fixed (no estimation).

        The state (last bar, filtered variances, residuals) is rebuilt from ``frame`` alone, so
        ``fit(A).update(B)`` and ``fit(A).filter(A + B)`` give the same forecasts.
        """
        self._check_fitted()
        frame = _light_attrs(self._validate_frame(frame))
        self._filter(frame)
        self.n_obs_ = int(len(frame))
        self.last_time_ = frame.index[-1]
        return self

    def predict_variance(self, horizon: int = 1) -> VolatilityForecast:
        """Per-step variance for the next ``horizon`` bars from the last bar seen (one origin)."""
        self._check_fitted()
        if not isinstance(horizon, int | np.integer) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        fc = self._predict(int(horizon))
        if len(fc) != 1 or fc.horizon != horizon:
            raise AssertionError(f"{type(self).__name__}._predict returned shape {fc.variance.shape}")
        return fc

    # -- to implement
    #: fitted attributes that survive a refit (e.g. last good parameters used as warm starts)
    _persistent: ClassVar[tuple[str, ...]] = ()

    def _reset(self) -> None:
        for k in list(vars(self)):
            if k.endswith("_") and not k.startswith("__") and k not in self._persistent:
                delattr(self, k)

    def _fit(self, frame: pd.DataFrame) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, new_bars: pd.DataFrame) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _filter(self, frame: pd.DataFrame) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, horizon: int) -> VolatilityForecast:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- helpers for subclasses
    def _forecast(self, variance: np.ndarray, **extra: Any) -> VolatilityForecast:
        return VolatilityForecast(
            origins=pd.DatetimeIndex([self.last_time_]),
            variance=np.asarray(variance, dtype=np.float64).reshape(1, -1),
            model=self.name,
            version=self.spec_hash(),
            **extra,
        )

    def spec_hash(self) -> str:
        """Short stable hash of the class name and parameters (the model's specification)."""
        import hashlib
        import json

        payload = json.dumps({"cls": type(self).__name__, **self.get_params()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------- registry
FORECASTERS: dict[str, type[Forecaster]] = {}


def register(cls: type[Forecaster]) -> type[Forecaster]:
    """Class decorator: add a forecaster to the registry under ``cls.name``."""
    if cls.name in FORECASTERS and FORECASTERS[cls.name] is not cls:
        raise ValueError(f"forecaster name {cls.name!r} registered twice")
    FORECASTERS[cls.name] = cls
    return cls


def get_forecaster(name: str, **params: Any) -> Forecaster:
    """Build a registered forecaster by name (imports ``models`` to fill the registry)."""
    import models  # noqa: F401  (registers all built-in forecasters)

    if name not in FORECASTERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(FORECASTERS)}")
    return FORECASTERS[name](**params)
