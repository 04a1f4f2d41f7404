"""Column extraction shared by the forecasters (private helper).

Every forecaster reads decimal log returns per bar from the ``ret`` column of the feature frame.
Rows with a NaN return (the first bar, gaps the pipeline could not bridge) are skipped. A return
that spans several bars across a gap (``ret_bars > 1``) is rescaled by ``1/sqrt(ret_bars)`` so that
every value fed to a per-bar variance model is a one-bar return.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

VARIANCE_FLOOR = 1e-12
"""Smallest per-bar variance any forecaster reports (decimal log-return units)."""


def per_bar_returns(frame: pd.DataFrame, column: str = "ret") -> pd.Series:
    """Decimal one-bar log returns, NaN rows dropped, multi-bar gap returns rescaled.

    Parameters
    ----------
    frame : pd.DataFrame
        Feature frame with at least ``column`` (decimal log returns); ``ret_bars`` is used when present.
    column : str
        Name of the return column.

    Returns
    -------
    pd.Series
        float64 returns indexed by the bar timestamps (UTC), without NaN.
    """
    if column not in frame.columns:
        raise ValueError(f"column {column!r} is not in the frame; columns are {list(frame.columns)}")
    r = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
    if "ret_bars" in frame.columns:
        nb = frame["ret_bars"].to_numpy(dtype=np.float64, na_value=np.nan)
        nb = np.where(np.isfinite(nb) & (nb > 1.0), nb, 1.0)
        r = r / np.sqrt(nb)
    keep = np.isfinite(r)
    return pd.Series(r[keep], index=frame.index[keep], name=column)


def aligned_returns(frame: pd.DataFrame, column: str = "ret") -> np.ndarray:
    """Like :func:`per_bar_returns` but as an array aligned to ``frame`` (NaN rows kept)."""
    if column not in frame.columns:
        raise ValueError(f"column {column!r} is not in the frame; columns are {list(frame.columns)}")
    r = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
    if "ret_bars" in frame.columns:
        nb = frame["ret_bars"].to_numpy(dtype=np.float64, na_value=np.nan)
        r = r / np.sqrt(np.where(np.isfinite(nb) & (nb > 1.0), nb, 1.0))
    return np.where(np.isfinite(r), r, np.nan)


def positive_values(frame: pd.DataFrame, column: str, floor: float = 1e-10) -> np.ndarray:
    """A variance column as a float64 array with values floored at ``floor`` (NaN kept)."""
    if column not in frame.columns:
        raise ValueError(f"column {column!r} is not in the frame; columns are {list(frame.columns)}")
    v = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(v), np.nan, np.maximum(v, floor))
