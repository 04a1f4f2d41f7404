"""Intercept refit and held-out calibration of the neural return-quantile heads.

:func:`intercept_offsets` (on the training windows) sets each step's and level's intercept of the
head to the exact minimiser of the pinball loss, given the rest of the network.
:func:`fit_quantile_calibration` (on a held-out block) measures the breach rates and optionally
corrects the quantiles to match the levels (coverage matching).

The quantile head predicts standardized return quantiles ``zq`` ``(n, H, Q)``: the return quantile at
step ``k`` is ``sigma_k * zq[..., k, j]`` with ``sigma_k`` the network's per-step volatility. On a
calibration block that the network was not fitted on (the validation block at the end of the fit
window, so no look-ahead), the standardized outcomes are ``z = r_{t+k} / sigma_k``, pooled over the
horizon steps. Two corrections are offered:

``"scale"``
    one dispersion factor ``s`` for all levels, ``zq -> s * zq``, minimising the mean pinball loss
    over the levels on the block (convex in ``s``). One parameter, so less noisy than per-level
    shifts; it corrects the usual failure (in-sample residuals narrower than out-of-sample ones).
``"shift"``
    one-sided split-conformal shifts per level (conformalized quantile regression, Romano,
    Patterson & Candès 2019, scores in volatility units): ``c_j`` is the empirical ``tau_j``-quantile
    of ``z - zq[..., j]``, so a fraction ``tau_j`` of the block falls below ``zq + c_j``. Exact on
    the block but noisy in the tails; a level is shifted only when the block holds at least
    ``min_tail`` expected breaches (distinct origins × ``min(tau, 1 - tau)``).
``"none"``
    no correction; the block's breach rates are still recorded as a diagnostic.

Blocks with fewer than ``min_origins`` origins are not used for a correction (``"none"``).

Quantiles stay non-decreasing across levels (a running maximum over the levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats
from scipy.optimize import minimize_scalar

__all__ = [
    "CalibrationMethod",
    "QuantileCalibration",
    "exceedance_rates",
    "fit_quantile_calibration",
    "intercept_offsets",
    "monotone_levels",
    "pinball",
]

CalibrationMethod = Literal["none", "scale", "shift"]
METHODS: tuple[str, ...] = ("none", "scale", "shift")


def monotone_levels(q: np.ndarray) -> np.ndarray:
    """Running maximum along the last axis (quantiles non-decreasing in the level)."""
    return np.maximum.accumulate(np.asarray(q, dtype=np.float64), axis=-1)


def pinball(y: np.ndarray, q: np.ndarray, levels: np.ndarray) -> float:
    """Mean pinball loss of quantiles ``q`` ``(m, Q)`` at ``levels`` ``(Q,)`` for outcomes ``y`` ``(m,)``."""
    d = np.asarray(y, dtype=np.float64)[:, None] - np.asarray(q, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    return float(np.mean(np.maximum(lv * d, (lv - 1.0) * d)))


def exceedance_rates(z: np.ndarray, zq: np.ndarray) -> np.ndarray:
    """Fraction of finite outcomes below each quantile, pooled over origins and steps.

    Parameters
    ----------
    z : np.ndarray
        ``(n, H)`` standardized outcomes (NaN where unknown).
    zq : np.ndarray
        ``(n, H, Q)`` standardized quantile forecasts.

    Returns
    -------
    np.ndarray
        ``(Q,)`` rates in [0, 1]; NaN when no outcome is finite.
    """
    z = np.asarray(z, dtype=np.float64)
    zq = np.asarray(zq, dtype=np.float64)
    ok = np.isfinite(z)
    if not ok.any():
        return np.full(zq.shape[-1], np.nan)
    return np.mean(z[ok][:, None] < zq[ok], axis=0)


def intercept_offsets(z: np.ndarray, zq: np.ndarray, levels: tuple[float, ...]) -> np.ndarray:
    """Offsets ``(H, Q)`` that minimise the pinball loss of ``zq + offset`` per step and level.

    For one intercept the pinball loss ``mean(rho_tau(z - zq - c))`` is minimised by the empirical
    ``tau``-quantile of ``z - zq`` (the inverse of the empirical distribution function); on the training windows this finishes the part of the quantile
    regression that few epochs of gradient steps leave unfinished. Steps without a finite outcome
    get zero offsets.
    """
    z = np.asarray(z, dtype=np.float64)
    zq = np.asarray(zq, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    if z.ndim != 2 or zq.shape != (*z.shape, len(lv)):
        raise ValueError(f"zq must have shape {(*z.shape, len(lv))} for z of shape {z.shape}, got {zq.shape}")
    out = np.zeros((z.shape[1], len(lv)))
    for k in range(z.shape[1]):
        ok = np.isfinite(z[:, k]) & np.all(np.isfinite(zq[:, k]), axis=-1)
        if ok.any():
            d = z[ok, k][:, None] - zq[ok, k]
            out[k] = [np.quantile(d[:, j], lv[j], method="inverted_cdf") for j in range(len(lv))]
    return out


@dataclass(frozen=True)
class QuantileCalibration:
    """Correction of the standardized quantile head and its diagnostics on the calibration block.

    Attributes
    ----------
    method : str
        ``"none"``, ``"scale"`` or ``"shift"`` (what was applied; ``"none"`` when the block was too short).
    levels : tuple of float
        Quantile levels in (0, 1), increasing.
    scale : float
        Dispersion factor (``"scale"``; 1 otherwise).
    shift : np.ndarray
        ``(Q,)`` additive shifts in volatility units (``"shift"``; zeros otherwise).
    n_points : int
        Finite (origin, step) outcomes in the calibration block.
    n_origins : int
        Origins of the block with a finite one-step outcome.
    rate_before, rate_after : np.ndarray
        ``(Q,)`` fraction of calibration outcomes below the quantile before and after the correction.
    block : tuple of str
        First and last origin (UTC ISO time) of the calibration block.
    """

    method: str
    levels: tuple[float, ...]
    scale: float
    shift: np.ndarray
    n_points: int
    n_origins: int
    rate_before: np.ndarray
    rate_after: np.ndarray
    block: tuple[str, str] = ("", "")

    def apply(self, zq: np.ndarray) -> np.ndarray:
        """Corrected, level-monotone standardized quantiles (levels on the last axis of ``zq``)."""
        return monotone_levels(self.scale * np.asarray(zq, dtype=np.float64) + self.shift)

    def head_outside_band(self, confidence: float = 0.999) -> bool:
        """Whether the uncorrected head's breach rate at some level lies outside the two-sided
        ``confidence`` binomial interval of ``n_origins`` draws at that level (a broken head, such as
        one stuck near its initial values; pooling over steps only narrows the true spread, so the
        interval on ``n_origins`` is the conservative one)."""
        if self.n_origins < 1:
            return False
        for lv, rate in zip(self.levels, self.rate_before, strict=True):
            lo, hi = stats.binom.interval(confidence, self.n_origins, lv)
            if np.isfinite(rate) and not lo / self.n_origins <= rate <= hi / self.n_origins:
                return True
        return False

    def as_dict(self) -> dict:
        """Plain-type summary (for logging)."""
        return {
            "method": self.method,
            "n_points": int(self.n_points),
            "n_origins": int(self.n_origins),
            "block": list(self.block),
            "levels": [float(x) for x in self.levels],
            "scale": float(self.scale),
            "shift": [float(x) for x in self.shift],
            "rate_before": [float(x) for x in self.rate_before],
            "rate_after": [float(x) for x in self.rate_after],
        }


def fit_quantile_calibration(
    z: np.ndarray,
    zq: np.ndarray,
    levels: tuple[float, ...],
    *,
    method: CalibrationMethod = "scale",
    min_origins: int = 250,
    min_tail: float = 10.0,
    scale_bounds: tuple[float, float] = (0.25, 4.0),
    block: tuple[str, str] = ("", ""),
) -> QuantileCalibration:
    """Fit the correction of the standardized quantiles on a calibration block.

    Parameters
    ----------
    z : np.ndarray
        ``(n, H)`` standardized outcomes ``r_{t+k} / sigma_k`` (NaN where unknown).
    zq : np.ndarray
        ``(n, H, Q)`` standardized quantile forecasts of the head, for the same origins.
    levels : tuple of float
        The ``Q`` levels, increasing in (0, 1).
    method : {"none", "scale", "shift"}
        Correction (see the module docstring).
    min_origins : int
        Fewest origins with a finite one-step outcome for any correction (the default, about a year
        of daily bars, puts about 12 expected breaches behind the 5 % level); with fewer,
        ``method`` becomes ``"none"``.
    min_tail : float
        ``"shift"`` only: fewest expected breaches (origins × min(tau, 1 - tau)) for a level to be shifted.
    scale_bounds : tuple of float
        Search interval of the ``"scale"`` factor.
    block : tuple of str
        First and last origin of the block, for the record.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    z = np.asarray(z, dtype=np.float64)
    zq = np.asarray(zq, dtype=np.float64)
    lv = np.asarray(levels, dtype=np.float64)
    if z.ndim != 2 or zq.shape != (*z.shape, len(lv)):
        raise ValueError(f"zq must have shape {(*z.shape, len(lv))} for z of shape {z.shape}, got {zq.shape}")
    if len(lv) == 0 or np.any((lv <= 0) | (lv >= 1)) or np.any(np.diff(lv) <= 0):
        raise ValueError(f"levels must be increasing in (0, 1), got {tuple(levels)}")
    ok = np.isfinite(z) & np.all(np.isfinite(zq), axis=-1)
    z = np.where(ok, z, np.nan)
    n_points, n_origins = int(ok.sum()), int(ok[:, 0].sum())
    before = exceedance_rates(z, zq)
    if n_origins < int(min_origins):
        method = "none"
    scale, shift = 1.0, np.zeros(len(lv))
    if method == "scale":
        y, a = z[ok], zq[ok]
        res = minimize_scalar(
            lambda s: pinball(y, s * a, lv), bounds=scale_bounds, method="bounded", options={"xatol": 1e-5}
        )
        scale = float(res.x)
    elif method == "shift":
        scores = z[ok][:, None] - zq[ok]  # (m, Q)
        tail_ok = n_origins * np.minimum(lv, 1.0 - lv) >= float(min_tail)
        shift = np.array([np.quantile(scores[:, j], lv[j]) if tail_ok[j] else 0.0 for j in range(len(lv))])
    cal = QuantileCalibration(
        method=method,
        levels=tuple(float(x) for x in lv),
        scale=scale,
        shift=shift,
        n_points=n_points,
        n_origins=n_origins,
        rate_before=before,
        rate_after=before,
        block=block,
    )
    after = exceedance_rates(z, cal.apply(zq))
    return QuantileCalibration(**{**cal.__dict__, "rate_after": after})
