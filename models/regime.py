"""Volatility regimes (calm / normal / stressed) with filtered probabilities, and a regime forecaster.

Model
-----
Features at bar ``t`` are the log of the range variance ``v[t]`` (``var_gk`` by default) and the log
of its trailing mean over the last 7 days (only information up to ``t``). A scikit-learn
``GaussianMixture`` with ``n_regimes`` components gives the emission densities; components are
ordered by their mean smoothed log variance, so regime 0 is the calmest. The transition matrix is
estimated from the consecutive hard labels of the fitted mixture (with add-one smoothing). A
forward filter — ``alpha[t] ∝ (alpha[t-1] @ P) * f(x[t] | regime)`` — turns these into regime
probabilities that use data up to ``t`` only (no smoothing, no look-ahead).

Forecast: the regime variance ``sigma2[k]`` is the mean next-bar variance proxy weighted by the
one-step predicted probability of regime ``k``; the per-step variance at step ``h`` is
``(alpha[t] @ P^h) @ sigma2``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from models._inputs import VARIANCE_FLOOR, aligned_returns, positive_values
from models.base import Forecaster, VolatilityForecast, register

__all__ = ["RegimeForecaster", "REGIME_NAMES"]

REGIME_NAMES = {2: ("calm", "stressed"), 3: ("calm", "normal", "stressed"), 4: ("calm", "normal", "elevated", "stressed")}


def _trailing_mean(v: np.ndarray, window: int) -> np.ndarray:
    from models.har import har_design

    return har_design(v, (window,))[:, 0]


@register
class RegimeForecaster(Forecaster):
    """Gaussian-mixture regimes with a Markov forward filter; also a variance forecaster.

    Parameters
    ----------
    n_regimes : int
        Number of regimes (2 to 4); 3 gives calm / normal / stressed.
    column : str
        Per-bar variance column used for the features and as the variance target (``var_gk``).
    smooth_days : float
        Length of the trailing mean feature, in days (converted to bars from ``bars_per_year``).
    seed : int
        ``random_state`` of the mixture fit.
    em_iter : int
        Baum-Welch iterations refining the mixture into a Gaussian HMM (0: mixture + label transitions).
    min_obs : int
        Fewest bars accepted by ``fit``.
    """

    name = "regime"
    required_columns = ("ret",)

    def __init__(
        self,
        *,
        n_regimes: int = 3,
        column: str = "var_gk",
        smooth_days: float = 7.0,
        seed: int = 0,
        em_iter: int = 0,
        min_obs: int = 200,
    ) -> None:
        self.n_regimes = n_regimes
        self.em_iter = em_iter
        self.column = column
        self.smooth_days = smooth_days
        self.seed = seed
        self.min_obs = min_obs

    # ------------------------------------------------------------------ features / emissions
    def _features(self, v: np.ndarray) -> np.ndarray:
        sm = _trailing_mean(v, self.window_)
        return np.column_stack([np.log(v), np.log(sm)])

    def _log_emission(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), len(self.means_)))
        for k in range(len(self.means_)):
            out[:, k] = multivariate_normal.logpdf(X, mean=self.means_[k], cov=self.covariances_[k])
        return out.reshape(len(X), -1)

    def _forward(self, X: np.ndarray, log_alpha0: np.ndarray | None) -> np.ndarray:
        """Filtered log-probabilities ``(n, K)``; ``log_alpha0`` is the state before the first row."""
        le = self._log_emission(X)
        e = np.exp(le - le.max(axis=1, keepdims=True))  # scaled emissions; normalisation removes the scale
        P = self.transmat_
        out = np.empty_like(le)
        a = None if log_alpha0 is None else np.exp(log_alpha0)
        for t in range(len(X)):
            a = (self.weights_ if a is None else a @ P) * e[t]
            s = a.sum()
            a = a / s if s > 0 and np.isfinite(s) else np.full(len(a), 1.0 / len(a))
            out[t] = a
        return np.log(np.maximum(out, 1e-300))

    # ------------------------------------------------------------------ fit / filter
    def _fit(self, frame: pd.DataFrame) -> None:
        K = int(self.n_regimes)
        if K not in REGIME_NAMES:
            raise ValueError(f"n_regimes must be in {sorted(REGIME_NAMES)}, got {self.n_regimes!r}")
        if self.column not in frame.columns:
            raise ValueError(f"column {self.column!r} is not in the frame; columns are {list(frame.columns)}")
        if float(self.smooth_days) <= 0:
            raise ValueError(f"smooth_days must be > 0, got {self.smooth_days!r}")
        bpy = frame.attrs.get("bars_per_year") or 365.0
        self.window_ = max(2, round(float(self.smooth_days) * float(bpy) / 365.0))
        v = positive_values(frame, self.column)
        v = v[np.isfinite(v)]
        if len(v) < int(self.min_obs):
            raise ValueError(f"RegimeForecaster needs at least min_obs={self.min_obs} bars, got {len(v)}")
        X = self._features(v)
        gm = GaussianMixture(n_components=K, covariance_type="full", random_state=int(self.seed), n_init=2)
        labels = gm.fit_predict(X)
        order = np.argsort(gm.means_[:, 1])
        rank = np.empty(K, dtype=int)
        rank[order] = np.arange(K)
        labels = rank[labels]
        self.means_ = gm.means_[order]
        self.covariances_ = gm.covariances_[order]
        self.weights_ = gm.weights_[order]
        counts = np.ones((K, K))
        np.add.at(counts, (labels[:-1], labels[1:]), 1.0)
        self.transmat_ = counts / counts.sum(axis=1, keepdims=True)
        self.n_em_iter_ = 0
        if int(self.em_iter) > 0:
            self._baum_welch(X, int(self.em_iter))
        self.regime_names_ = REGIME_NAMES[K]
        # regime variances: next-bar proxy weighted by one-step predicted regime probabilities
        la = self._forward(X, None)
        pred = np.exp(la[:-1]) @ self.transmat_
        self.regime_variance_ = np.maximum((pred * v[1:, None]).sum(axis=0) / pred.sum(axis=0), VARIANCE_FLOOR)
        self._filter(frame)

    def _filter(self, frame: pd.DataFrame) -> None:
        v = positive_values(frame, self.column)
        keep = np.isfinite(v)
        X = self._features(v[keep])
        la = self._forward(X, None)
        self.log_alpha_ = la[-1]
        self.v_ = v[keep][-self.window_ :].copy()
        self.std_resid_ = self._std_resid(frame, keep, la)

    def _std_resid(self, frame: pd.DataFrame, keep: np.ndarray, la: np.ndarray) -> np.ndarray:
        r = aligned_returns(frame)[keep]
        one_step = (np.exp(la[:-1]) @ self.transmat_) @ self.regime_variance_
        z = r[1:] / np.sqrt(one_step)
        return z[np.isfinite(z)]

    def _update(self, new_bars: pd.DataFrame) -> None:
        if self.column not in new_bars.columns:
            raise ValueError(f"new_bars lacks the modelled column {self.column!r}")
        v = positive_values(new_bars, self.column)
        keep = np.isfinite(v)
        vn = v[keep]
        if len(vn) == 0:
            return
        hist = np.concatenate([self.v_, vn])
        X = self._features(hist)[len(self.v_) :]
        la = self._forward(X, self.log_alpha_)
        la_full = np.vstack([self.log_alpha_[None, :], la])
        r = aligned_returns(new_bars)[keep]
        one_step = (np.exp(la_full[:-1]) @ self.transmat_) @ self.regime_variance_
        z = r / np.sqrt(one_step)
        self.std_resid_ = np.concatenate([self.std_resid_, z[np.isfinite(z)]])
        probs = np.full((len(v), la.shape[1]), np.nan)
        probs[keep] = np.exp(la)
        self._last_probs = pd.DataFrame(probs, index=new_bars.index, columns=list(self.regime_names_))
        self.log_alpha_ = la[-1]
        self.v_ = hist[-self.window_ :]

    def _baum_welch(self, X: np.ndarray, n_iter: int, tol: float = 1e-4) -> None:
        """Refine the mixture into a Gaussian HMM by EM (forward-backward on the training bars only).

        Smoothed probabilities are used only to *estimate* the parameters on the fit window; every
        probability the model reports afterwards is filtered.
        """
        K, T = len(self.means_), len(X)
        prev_ll = -np.inf
        for it in range(1, n_iter + 1):
            le = self._log_emission(X)
            mx = le.max(axis=1, keepdims=True)
            b = np.exp(le - mx)
            P = self.transmat_
            alpha = np.empty((T, K))
            c = np.empty(T)
            a = self.weights_ * b[0]
            for t in range(T):
                if t:
                    a = (alpha[t - 1] @ P) * b[t]
                c[t] = a.sum()
                alpha[t] = a / c[t]
            beta = np.empty((T, K))
            beta[-1] = 1.0
            for t in range(T - 2, -1, -1):
                beta[t] = P @ (b[t + 1] * beta[t + 1]) / c[t + 1]
            gamma = alpha * beta
            gamma /= gamma.sum(axis=1, keepdims=True)
            xi = (alpha[:-1].T @ (b[1:] * beta[1:] / c[1:, None])) * P
            ll = float(np.log(c).sum() + mx.sum())
            self.transmat_ = (xi + 1e-6) / (xi + 1e-6).sum(axis=1, keepdims=True)
            w = gamma.sum(axis=0)
            self.means_ = (gamma.T @ X) / w[:, None]
            covs = []
            for k in range(K):
                d = X - self.means_[k]
                covs.append((gamma[:, k, None] * d).T @ d / w[k] + 1e-6 * np.eye(X.shape[1]))
            self.covariances_ = np.array(covs)
            self.weights_ = w / w.sum()
            self.n_em_iter_ = it
            if ll - prev_ll < tol * abs(ll):
                break
            prev_ll = ll
        order = np.argsort(self.means_[:, 1])
        self.means_, self.covariances_, self.weights_ = self.means_[order], self.covariances_[order], self.weights_[order]
        self.transmat_ = self.transmat_[np.ix_(order, order)]

    # ------------------------------------------------------------------ outputs
    def regime_probabilities(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Filtered regime probabilities for every bar of ``frame`` with the fitted parameters.

        Row ``t`` uses bars up to and including ``t`` only (forward filter started from the mixture
        weights at the first bar of ``frame``). Bars with a missing variance get NaN rows.

        Returns
        -------
        pd.DataFrame
            Index of ``frame``, one column per regime (``calm`` … ``stressed``), rows summing to 1.
        """
        self._check_fitted()
        frame = self._validate_frame(frame)
        if self.column not in frame.columns:
            raise ValueError(f"frame lacks the modelled column {self.column!r}")
        v = positive_values(frame, self.column)
        keep = np.isfinite(v)
        out = np.full((len(v), len(self.weights_)), np.nan)
        if keep.any():
            out[keep] = np.exp(self._forward(self._features(v[keep]), None))
        return pd.DataFrame(out, index=frame.index, columns=list(self.regime_names_))

    def update_probabilities(self, new_bars: pd.DataFrame) -> pd.DataFrame:
        """``update(new_bars)`` and return the filtered regime probabilities of the new bars.

        Equal to the rows of :meth:`regime_probabilities` over all bars seen (same forward filter).
        """
        self._check_fitted()
        new_bars = self._validate_frame(new_bars, what="new_bars")
        new_bars = new_bars[new_bars.index > self.last_time_]
        self._last_probs = pd.DataFrame(columns=list(self.regime_names_), dtype=float)
        self.update(new_bars)
        return self._last_probs.reindex(new_bars.index)

    def _predict(self, horizon: int) -> VolatilityForecast:
        alpha = np.exp(self.log_alpha_)
        var = np.empty(horizon)
        p = alpha
        for h in range(horizon):
            p = p @ self.transmat_
            var[h] = p @ self.regime_variance_
        return self._forecast(
            var,
            regime_probs=(alpha / alpha.sum())[None, :],
            regime_names=tuple(self.regime_names_),
            std_resid=self.std_resid_,
        )
