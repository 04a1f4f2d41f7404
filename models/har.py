"""HAR (Corsi 2009) and log-HAR forecasters on a range-based or realized variance column.

Regressors at bar ``t`` are trailing means of the variance proxy ``v`` over the last bar and over
1, 7 and 30 days (expressed in bars from ``frame.attrs["bars_per_year"]``; duplicated windows are
dropped, so daily bars use 1, 7 and 30 bars). Each horizon step ``k = 1..max_horizon`` has its own OLS
regression of ``v[t+k]`` on the regressors at ``t`` (direct per-step forecasts, never cumulative).
Steps beyond ``max_horizon`` repeat the last fitted step.

log-HAR regresses ``ln v`` on the logs of the regressors and returns
``exp(fitted + s_k^2 / 2)`` where ``s_k^2`` is the residual variance of step ``k`` (log-normal bias
correction).

Floor
-----
A linear HAR is an unconstrained OLS: right after a spike, negative coefficients on the longer windows can
make the prediction negative. Every variance the model returns (forecasts and the in-sample one-step
values behind the standardized residuals) is floored at ``min_variance_ratio`` × the mean of the
modelled variance over the fit window (``variance_floor_``), never at an absolute 1e-12 (which gave a
QLIKE in the 1e9s on the next bar). Each binding is counted (``n_floor_binds_`` for forecast values,
``n_floor_binds_in_sample_`` for in-sample values; cumulative over refits, see :meth:`HAR.diagnostics`)
and logged. The defaults sit well below the lowest walk-forward forecasts on the bundled sets
(expanding windows, min_train 300, refit every 20 bars; 15-minute BTC: rolling 2688 bars), each over the
mean of its fit window: linear HAR 0.12 (BTC), 0.36 (ETH), 0.41 (LTC), 0.36 (BTC 15-minute) against a
default ratio of 0.05; log-HAR, whose forecasts are geometric and lower in calm periods, 0.022, 0.034,
0.037, 0.016 against a default of 0.005. So the floor binds only on broken predictions.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from models._inputs import VARIANCE_FLOOR, aligned_returns, positive_values
from models.base import Forecaster, VolatilityForecast, register

__all__ = ["HAR", "LogHAR", "har_windows", "har_design"]

logger = logging.getLogger(__name__)

HAR_DAYS = (1, 7, 30)


def har_windows(bars_per_year: float | None) -> tuple[int, ...]:
    """Trailing windows in bars: the last bar plus 1, 7 and 30 days (365-day years)."""
    bpd = 1.0 if not bars_per_year else float(bars_per_year) / 365.0
    wins = {1} | {max(1, round(d * bpd)) for d in HAR_DAYS}
    return tuple(sorted(wins))


def har_design(v: np.ndarray, windows: tuple[int, ...]) -> np.ndarray:
    """Trailing means of ``v`` (NaN skipped) over each window; row ``t`` uses ``v[:t+1]`` only.

    Returns an ``(n, len(windows))`` array; entries with no finite value in their window are NaN.
    """
    v = np.asarray(v, dtype=np.float64)
    finite = np.isfinite(v)
    cs = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    cn = np.concatenate([[0], np.cumsum(finite)])
    n = len(v)
    out = np.empty((n, len(windows)))
    t = np.arange(n)
    for j, w in enumerate(windows):
        lo = np.maximum(t + 1 - w, 0)
        s = cs[t + 1] - cs[lo]
        c = cn[t + 1] - cn[lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    return out


@register
class HAR(Forecaster):
    """Heterogeneous autoregressive model of a per-bar variance proxy, fitted by OLS.

    Parameters
    ----------
    column : str
        Variance column to model: ``"auto"`` (default: realized variance ``rv`` when at least 90% of
        it is present, else Garman-Klass ``var_gk``), or a named column (``var_gk``, ``var_pk``,
        ``rv`` ...).
    max_horizon : int
        Number of horizon steps with their own direct regression.
    log : bool
        Fit in logs (log-HAR) with the ``exp(s^2/2)`` bias correction.
    windows : tuple of int or None
        Trailing windows in bars; None derives them from ``frame.attrs["bars_per_year"]``.
    min_obs : int
        Fewest usable regression rows.
    min_variance_ratio : float
        Floor of every returned variance as a fraction of the mean of the modelled variance over the fit
        window, in (0, 1) (default 0.05; 0.005 for log-HAR).
    """

    name = "har"
    required_columns = ("ret",)
    _persistent = ("n_floor_binds_", "n_floor_binds_in_sample_")
    #: default for instances pickled before the parameter existed (``__init__`` always sets it)
    min_variance_ratio: float = 0.05
    #: counters reported by :meth:`diagnostics` (cumulative over the refits of this instance)
    _counters = ("n_floor_binds_", "n_floor_binds_in_sample_")

    def __init__(
        self,
        *,
        column: str = "auto",
        max_horizon: int = 10,
        log: bool = False,
        windows: tuple[int, ...] | None = None,
        min_obs: int = 60,
        min_variance_ratio: float = 0.05,
    ) -> None:
        self.column = column
        self.max_horizon = max_horizon
        self.log = log
        self.windows = windows
        self.min_obs = min_obs
        self.min_variance_ratio = min_variance_ratio

    def _resolve_column(self, frame: pd.DataFrame) -> str:
        if self.column != "auto":
            if self.column not in frame.columns:
                raise ValueError(f"column {self.column!r} is not in the frame; columns are {list(frame.columns)}")
            return self.column
        if "rv" in frame.columns and frame["rv"].notna().mean() >= 0.9:
            return "rv"
        if "var_gk" not in frame.columns:
            raise ValueError("column='auto' needs 'rv' (>= 90% present) or 'var_gk' in the frame")
        return "var_gk"

    def _fit(self, frame: pd.DataFrame) -> None:
        if int(self.max_horizon) < 1:
            raise ValueError(f"max_horizon must be >= 1, got {self.max_horizon!r}")
        if not 0.0 < float(self.min_variance_ratio) < 1.0:
            raise ValueError(f"min_variance_ratio must be in (0, 1), got {self.min_variance_ratio!r}")
        for k in self._counters:
            setattr(self, k, getattr(self, k, 0))
        col = self._resolve_column(frame)
        wins = tuple(int(w) for w in (self.windows or har_windows(frame.attrs.get("bars_per_year"))))
        if any(w < 1 for w in wins):
            raise ValueError(f"windows must be positive bar counts, got {wins}")
        v = positive_values(frame, col)
        X = har_design(v, wins)
        H = int(self.max_horizon)
        start = max(wins) - 1  # first row with full windows
        n = len(v)
        coefs = np.empty((H, len(wins) + 1))
        s2 = np.zeros(H)
        for k in range(1, H + 1):
            rows = np.arange(start, n - k)
            y = v[rows + k]
            Xk = X[rows]
            ok = np.isfinite(y) & np.all(np.isfinite(Xk), axis=1)
            if ok.sum() < int(self.min_obs):
                raise ValueError(
                    f"{type(self).__name__} needs at least min_obs={self.min_obs} complete rows for step {k}, "
                    f"got {int(ok.sum())} (frame has {n} bars, longest window {max(wins)})"
                )
            y, Xk = y[ok], Xk[ok]
            if self.log:
                y, Xk = np.log(y), np.log(Xk)
            A = np.column_stack([np.ones(len(y)), Xk])
            beta, *_ = np.linalg.lstsq(A, y, rcond=None)
            coefs[k - 1] = beta
            resid = y - A @ beta
            s2[k - 1] = float(resid @ resid) / max(len(y) - A.shape[1], 1)
        self.column_ = col
        self.windows_ = wins
        self.coef_ = coefs
        self.resid_var_ = s2
        self.variance_floor_ = max(float(self.min_variance_ratio) * float(np.nanmean(v)), VARIANCE_FLOOR)
        self._filter(frame)

    def _filter(self, frame: pd.DataFrame) -> None:
        if self.column_ not in frame.columns:
            raise ValueError(f"frame lacks the modelled column {self.column_!r}")
        v = positive_values(frame, self.column_)
        X = har_design(v, self.windows_)
        # one-step in-sample forecasts -> standardized returns (for filtered historical simulation)
        fitted = self._apply(X[:-1], 0, counter="n_floor_binds_in_sample_")
        r = aligned_returns(frame)[1:]
        z = r / np.sqrt(fitted)
        self.std_resid_ = z[np.isfinite(z)]
        self.v_ = v[-max(self.windows_) :].copy()

    def _apply(self, X: np.ndarray, step: int, counter: str | None = None) -> np.ndarray:
        """Fitted variance of step ``step`` at design rows ``X``, floored at ``variance_floor_``.

        Bindings of the floor on finite values are added to the attribute named by ``counter``.
        """
        beta = self.coef_[step]
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                out = np.exp(beta[0] + np.log(X) @ beta[1:] + 0.5 * self.resid_var_[step])
        else:
            out = beta[0] + X @ beta[1:]
        floor = getattr(self, "variance_floor_", VARIANCE_FLOOR)  # models pickled before the relative floor
        with np.errstate(invalid="ignore"):
            binds = int(np.sum(out < floor))
        if binds and counter is not None:
            setattr(self, counter, getattr(self, counter, 0) + binds)
            logger.warning(
                "%s: %d of %d %s below the floor %.3g (%g x the in-sample mean variance), floored "
                "(%d in total)", self.name, binds, out.size,
                "forecast values" if counter == "n_floor_binds_" else "in-sample one-step values",
                floor, self.min_variance_ratio, getattr(self, counter),
            )
        return np.maximum(out, floor)

    def diagnostics(self) -> dict[str, int]:
        """Counters of this instance over all its fits: forecast values and in-sample one-step values
        that fell below the floor (``variance_floor_``)."""
        return {k.removeprefix("n_").removesuffix("_"): int(getattr(self, k, 0) or 0) for k in self._counters}

    def _update(self, new_bars: pd.DataFrame) -> None:
        if self.column_ not in new_bars.columns:
            raise ValueError(f"new_bars lacks the modelled column {self.column_!r}")
        v = positive_values(new_bars, self.column_)
        r = aligned_returns(new_bars)
        # standardized residuals of the new bars against the one-step forecasts made before each
        zs = []
        for t in range(len(v)):
            f1 = self._apply(har_design(self.v_, self.windows_)[-1:], 0, counter="n_floor_binds_in_sample_")[0]
            zs.append(r[t] / np.sqrt(f1))
            self.v_ = np.concatenate([self.v_, v[t : t + 1]])[-max(self.windows_) :]
        z = np.asarray(zs)
        self.std_resid_ = np.concatenate([self.std_resid_, z[np.isfinite(z)]])

    def _predict(self, horizon: int) -> VolatilityForecast:
        x = har_design(self.v_, self.windows_)[-1:]
        if not np.all(np.isfinite(x)):
            x = np.where(np.isfinite(x), x, np.nanmean(self.v_))
        steps = [min(k, int(self.max_horizon)) - 1 for k in range(1, horizon + 1)]
        var = np.array([self._apply(x, s, counter="n_floor_binds_")[0] for s in steps])
        return self._forecast(var, std_resid=self.std_resid_)


@register
class LogHAR(HAR):
    """log-HAR: HAR in logs with the ``exp(s^2/2)`` bias correction."""

    name = "loghar"

    def __init__(
        self,
        *,
        column: str = "auto",
        max_horizon: int = 10,
        log: bool = True,
        windows: tuple[int, ...] | None = None,
        min_obs: int = 60,
        min_variance_ratio: float = 0.005,
    ) -> None:
        super().__init__(
            column=column, max_horizon=max_horizon, log=log, windows=windows, min_obs=min_obs,
            min_variance_ratio=min_variance_ratio,
        )
