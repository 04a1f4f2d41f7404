"""Walk-forward splits with purge, embargo, refit frequency and a pre-cut / held-out tag.

Rows are bars 0..n-1. The target of row t is the window of future bars ``[t+1, t+horizon]`` (what
:func:`data_pipelines.features.forward_targets` builds). Test blocks are consecutive, ``test_size``
rows each, and walk forward until the data end. For a test block ``[a, b]``:

* **purge** — drop every training row whose target window overlaps ``[a, b]``: rows
  ``t >= a - horizon`` (training is always before the test block here, so that is all of them);
* **embargo** — additionally drop the ``embargo`` rows just before the purged zone
  (``t >= a - horizon - embargo``), a buffer against serial dependence that the target window
  alone does not cover (features built from trailing windows, autocorrelated volatility). The
  López de Prado embargo *after* a test block only matters when training rows follow a test block,
  which never happens in walk-forward;
* **window** — ``"expanding"`` trains on every earlier row; ``"rolling"`` on the last
  ``train_size`` rows before the purge/embargo zone;
* **refit_every** — a model is refit on the first block of every ``refit_every`` blocks and reused
  for the following ones: those folds carry ``refit=False`` and the training rows of the last refit
  (which still end before their own test blocks);
* **cut** — folds whose test block starts before the cut time are tagged ``"pre_cut"`` (use them
  for model selection and tuning); the rest ``"held_out"`` (report only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = ["Fold", "walk_forward_splits", "purge_mask"]

Window = Literal["expanding", "rolling"]


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold (positions are integer row positions, not labels).

    Attributes
    ----------
    fold : int
        0-based fold number.
    train_idx, test_idx : np.ndarray
        int64 row positions, sorted; training rows all lie before the test block.
    refit : bool
        Whether the model is (re)fit for this fold; False means reuse the last refit's model.
    tag : str
        ``"pre_cut"`` or ``"held_out"`` (``"pre_cut"`` everywhere when no cut is given).
    test_start, test_end : pd.Timestamp or None
        Times of the first and last test rows (when an index was given).
    """

    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    refit: bool
    tag: str
    test_start: pd.Timestamp | None = None
    test_end: pd.Timestamp | None = None

    def __post_init__(self) -> None:
        if self.train_idx.size and self.test_idx.size and self.train_idx.max() >= self.test_idx.min():
            raise ValueError(f"fold {self.fold}: training rows must precede the test block")

    def to_dict(self) -> dict[str, Any]:
        """Summary for logging (sizes and bounds, not the index arrays)."""
        return {
            "fold": self.fold, "refit": self.refit, "tag": self.tag,
            "train_start": int(self.train_idx[0]) if self.train_idx.size else None,
            "train_end": int(self.train_idx[-1]) if self.train_idx.size else None, "n_train": int(self.train_idx.size),
            "test_start": int(self.test_idx[0]), "test_end": int(self.test_idx[-1]), "n_test": int(self.test_idx.size),
            "test_start_time": None if self.test_start is None else self.test_start.isoformat(),
        }


def purge_mask(train_idx: np.ndarray, test_start: int, test_end: int, horizon: int, embargo: int = 0) -> np.ndarray:
    """True for training rows to KEEP: target window [t+1, t+horizon] misses [test_start - embargo, test_end].

    Works for training rows on either side of the block (rows after the block never overlap its
    targets, but an ``embargo`` after the block is not applied here; see module docstring).
    """
    t = np.asarray(train_idx, dtype=np.int64)
    lo = test_start - embargo
    overlaps = (t + horizon >= lo) & (t + 1 <= test_end)
    return ~overlaps & ((t < test_start) | (t > test_end))


def walk_forward_splits(index: pd.DatetimeIndex | int, *, test_size: int, min_train: int, horizon: int = 1,
                        window: Window = "expanding", train_size: int | None = None, embargo: int = 0,
                        refit_every: int = 1, cut: str | pd.Timestamp | None = None,
                        max_folds: int | None = None) -> list[Fold]:
    """Walk-forward folds over ``index`` (a ``DatetimeIndex`` or a row count).

    Parameters
    ----------
    index : pd.DatetimeIndex or int
        The rows (bars) to split; times are needed for ``cut``.
    test_size : int
        Rows per test block (>= 1).
    min_train : int
        Training rows the first fold must have after purge and embargo (>= 1); the first test block
        starts at ``min_train + horizon + embargo``.
    horizon : int
        Target length H in bars: row t's target covers bars t+1..t+H.
    window : {"expanding", "rolling"}
        Training window type; ``rolling`` keeps the last ``train_size`` rows (default ``min_train``).
    embargo : int
        Extra rows dropped between the training set and the purged zone (>= 0).
    refit_every : int
        Refit on every ``refit_every``-th fold (1 = every fold).
    cut : str or Timestamp, optional
        UTC time separating pre-cut folds from held-out folds (by test-block start).
    max_folds : int, optional
        Keep only the first ``max_folds`` folds.

    Returns
    -------
    list of Fold
    """
    times: pd.DatetimeIndex | None
    if isinstance(index, int | np.integer) and not isinstance(index, bool):
        n, times = int(index), None
    elif isinstance(index, pd.DatetimeIndex):
        n, times = len(index), index
    else:
        raise TypeError(f"index must be a DatetimeIndex or an int row count, got {type(index).__name__}")
    for name, val, lo in (("test_size", test_size, 1), ("min_train", min_train, 1), ("horizon", horizon, 1),
                          ("refit_every", refit_every, 1), ("embargo", embargo, 0)):
        if not isinstance(val, int | np.integer) or isinstance(val, bool) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if window not in ("expanding", "rolling"):
        raise ValueError(f"window must be 'expanding' or 'rolling', got {window!r}")
    if train_size is not None and (not isinstance(train_size, int | np.integer) or train_size < 1):
        raise ValueError(f"train_size must be a positive integer, got {train_size!r}")
    roll = train_size or min_train
    cut_ts: pd.Timestamp | None = None
    if cut is not None:
        if times is None:
            raise ValueError("cut needs a DatetimeIndex, got a row count")
        cut_ts = pd.Timestamp(cut)
        if cut_ts.tz is None and times.tz is not None:
            cut_ts = cut_ts.tz_localize("UTC")
    first = min_train + horizon + embargo
    if first >= n:
        raise ValueError(
            f"not enough rows for one fold: need min_train + horizon + embargo + 1 = {first + 1}, got {n} rows"
        )
    folds: list[Fold] = []
    train: np.ndarray = np.empty(0, dtype=np.int64)
    for j, a in enumerate(range(first, n, test_size)):
        if max_folds is not None and j >= max_folds:
            break
        b = min(a + test_size, n) - 1
        refit = j % refit_every == 0
        if refit:
            stop = a - horizon - embargo  # first excluded row
            start = 0 if window == "expanding" else max(0, stop - roll)
            train = np.arange(start, stop, dtype=np.int64)
        tag = "pre_cut"
        t_start = t_end = None
        if times is not None:
            t_start, t_end = times[a], times[b]
            if cut_ts is not None and t_start >= cut_ts:
                tag = "held_out"
        folds.append(Fold(fold=j, train_idx=train, test_idx=np.arange(a, b + 1, dtype=np.int64), refit=refit,
                          tag=tag, test_start=t_start, test_end=t_end))
    return folds
