"""Inputs and targets of the neural forecasters: per-bar features, sliding windows, scaling.

Per-bar features at bar ``t`` use only information up to and including ``t``:

* ``ret`` — decimal log return (scaled like the rest by the StandardScaler);
* ``log_var_sq, log_var_pk, log_var_gk, log_var_rs, log_var_yz`` — logs of the per-bar variance
  estimates (floored at 1e-10; columns absent from the frame are skipped);
* ``log_rv`` when realized variance is present for at least 90% of the bars;
* ``log_har_<w>`` — logs of trailing means of ``var_gk`` over the HAR windows (last bar, 1/7/30 days);
* ``p_<regime>`` — filtered regime probabilities (from a fitted :class:`models.regime.RegimeForecaster`).

Targets at origin ``t`` are the variance proxy at ``t+1 … t+H`` (``ret2`` = squared return, or a
variance column such as ``var_gk``), the returns at ``t+1 … t+H`` (for the quantile head) and the
regime label at ``t+1`` (argmax of the filtered probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from models._inputs import aligned_returns, positive_values
from models.har import har_design, har_windows

__all__ = ["RANGE_COLUMNS", "feature_columns", "bar_features", "target_proxy", "WindowSet", "make_windows"]

RANGE_COLUMNS = ("var_sq", "var_pk", "var_gk", "var_rs", "var_yz")


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """Variance columns of ``frame`` used as inputs (``rv`` only when >= 90% present)."""
    cols = [c for c in RANGE_COLUMNS if c in frame.columns]
    if "rv" in frame.columns and frame["rv"].notna().mean() >= 0.9:
        cols.append("rv")
    if "var_gk" not in cols:
        raise ValueError(f"the neural forecasters need a 'var_gk' column; frame has {list(frame.columns)}")
    return cols


def bar_features(
    frame: pd.DataFrame,
    columns: list[str],
    windows: tuple[int, ...],
    regime_probs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per-bar input features (unscaled), index of ``frame``; NaN where an input is missing.

    Parameters
    ----------
    frame : pd.DataFrame
        Feature frame (``ret`` and the variance ``columns``).
    columns : list of str
        Variance columns to log-transform.
    windows : tuple of int
        HAR windows in bars for the trailing means of ``var_gk``.
    regime_probs : pd.DataFrame, optional
        Filtered regime probabilities aligned to ``frame``.
    """
    out = {"ret": aligned_returns(frame)}
    for c in columns:
        out[f"log_{c}"] = np.log(positive_values(frame, c))
    gk = positive_values(frame, "var_gk")
    har = har_design(gk, windows)
    for j, w in enumerate(windows):
        out[f"log_har_{w}"] = np.log(har[:, j])
    df = pd.DataFrame(out, index=frame.index)
    if regime_probs is not None:
        for c in regime_probs.columns:
            df[f"p_{c}"] = regime_probs[c].reindex(frame.index).to_numpy()
    return df


def target_proxy(frame: pd.DataFrame, target: str) -> np.ndarray:
    """Per-bar variance proxy: ``"ret2"`` (squared one-bar return) or a variance column."""
    if target == "ret2":
        r = aligned_returns(frame)
        return r**2
    return positive_values(frame, target)


@dataclass(frozen=True)
class WindowSet:
    """Sliding windows: ``X`` (n, L, F) float32 inputs; targets aligned to the window's last bar."""

    X: np.ndarray
    y_var: np.ndarray  # (n, H) proxy at t+1..t+H (NaN where missing)
    y_ret: np.ndarray  # (n, H) returns at t+1..t+H
    y_regime: np.ndarray  # (n,) int regime label at t+1 (-1 where unknown)
    end: np.ndarray  # (n,) integer position of each window's last bar in the source arrays


def make_windows(
    feats: np.ndarray,
    proxy: np.ndarray,
    rets: np.ndarray,
    regime_labels: np.ndarray | None,
    *,
    lookback: int,
    horizon: int,
    ends: np.ndarray,
) -> WindowSet:
    """Windows ending at the positions ``ends`` (each needs ``lookback`` finite rows before it).

    Targets beyond the end of the arrays are NaN (used for the last origins at prediction time).
    """
    n, F = feats.shape
    ends = np.asarray(ends, dtype=int)
    idx = ends[:, None] + np.arange(-lookback + 1, 1)[None, :]
    X = feats[idx].astype(np.float32)
    tgt = ends[:, None] + np.arange(1, horizon + 1)[None, :]
    valid = tgt < n
    tgt_c = np.minimum(tgt, n - 1)
    y_var = np.where(valid, proxy[tgt_c], np.nan)
    y_ret = np.where(valid, rets[tgt_c], np.nan)
    if regime_labels is None:
        y_reg = np.full(len(ends), -1, dtype=int)
    else:
        nxt = np.minimum(ends + 1, n - 1)
        y_reg = np.where(ends + 1 < n, regime_labels[nxt], -1).astype(int)
    return WindowSet(X=X, y_var=y_var, y_ret=y_ret, y_regime=y_reg, end=ends)


def fit_scaler(feats: np.ndarray) -> StandardScaler:
    """StandardScaler on the finite rows of ``feats`` (call on the training part only)."""
    ok = np.all(np.isfinite(feats), axis=1)
    if ok.sum() < 10:
        raise ValueError(f"need at least 10 complete feature rows to fit the scaler, got {int(ok.sum())}")
    return StandardScaler().fit(feats[ok])


def default_windows(bars_per_year: float | None) -> tuple[int, ...]:
    """HAR windows in bars (last bar, 1, 7, 30 days)."""
    return har_windows(bars_per_year)
