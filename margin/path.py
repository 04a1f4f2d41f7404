"""``MarginPath``: margin rates per bar as a policy publishes them (IM for new positions, MM for open ones).

Timing convention (shared by :mod:`margin.controls` and the backtest): value ``t`` is published at the close
of bar ``t``; ``im_rate[t]`` applies to positions opened at that close, ``mm_rate[t]`` binds during bar
``t + 1`` (or, with ``mm_binds="entry"``, is the MM of positions opened at that close for their life).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from margin.params import MarginParams

__all__ = ["MarginPath"]


@dataclass(frozen=True)
class MarginPath:
    """Margin rates per bar, published at each bar's close.

    Parameters
    ----------
    times : pd.DatetimeIndex
        UTC bar times (``n_bars``), equal to the bars' index.
    im_rate : np.ndarray
        IM rate for positions opened at each close (fraction of notional).
    mm_rate : np.ndarray
        MM rate binding on open positions during the next bar (``mm_binds="path"``), or the MM of
        positions opened at that close for life (``mm_binds="entry"``).
    policy : str
        Policy name.
    meta : dict
        Parameters and diagnostics.
    mm_pending : np.ndarray, optional
        Announced, not yet binding MM (NaN when none); margin calls use ``max(mm_rate, mm_pending)``.
    mm_effective_bar : np.ndarray, optional
        Bar from which ``mm_pending`` binds (-1 when none).
    mm_binds : {"path", "entry"}
        Whether open positions follow the path's MM or keep the MM of their entry bar.
    im_requested : np.ndarray, optional
        The policy's own IM per bar before the controls (finite, >= 0; may exceed the ceiling): what
        :func:`backtest.budgets.scaled_path` scales to bring the policy to a capital budget before the controls
        apply once, so a scaled policy keeps the controls' floor and ceiling. None when the policy has none.
    """

    times: pd.DatetimeIndex
    im_rate: np.ndarray
    mm_rate: np.ndarray
    policy: str
    meta: dict[str, Any] = field(default_factory=dict)
    mm_pending: np.ndarray | None = None
    mm_effective_bar: np.ndarray | None = None
    mm_binds: Literal["path", "entry"] = "path"
    im_requested: np.ndarray | None = None

    def __post_init__(self) -> None:
        times = pd.DatetimeIndex(self.times)
        object.__setattr__(self, "times", times)
        n = len(times)
        for name in ("im_rate", "mm_rate"):
            a = np.asarray(getattr(self, name), dtype=np.float64).ravel()
            if a.size != n:
                raise ValueError(f"MarginPath.{name} has {a.size} values for {n} times")
            bad = ~np.isfinite(a) | (a <= 0) | (a > 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"MarginPath.{name} must be in (0, 1], got {float(a[i])!r} at {times[i]}")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        if np.any(self.mm_rate > self.im_rate * (1 + 1e-12)) and self.mm_binds == "entry":
            raise ValueError("MarginPath.mm_rate must not exceed im_rate")
        if self.mm_binds not in ("path", "entry"):
            raise ValueError(f"MarginPath.mm_binds must be 'path' or 'entry', got {self.mm_binds!r}")
        if self.im_requested is not None:
            q = np.asarray(self.im_requested, dtype=np.float64).ravel()
            if q.size != n:
                raise ValueError(f"MarginPath.im_requested has {q.size} values for {n} times")
            if not np.all(np.isfinite(q) & (q >= 0)):
                i = int(np.flatnonzero(~(np.isfinite(q) & (q >= 0)))[0])
                raise ValueError(f"MarginPath.im_requested must be finite and >= 0, got {float(q[i])!r} at {times[i]}")
            q.setflags(write=False)
            object.__setattr__(self, "im_requested", q)
        if self.mm_pending is not None:
            p = np.asarray(self.mm_pending, dtype=np.float64).ravel()
            if p.size != n:
                raise ValueError(f"MarginPath.mm_pending has {p.size} values for {n} times")
            object.__setattr__(self, "mm_pending", p)

    def to_frame(self) -> pd.DataFrame:
        d = {"im_rate": self.im_rate, "mm_rate": self.mm_rate}
        if self.mm_pending is not None:
            d["mm_pending"] = self.mm_pending
        return pd.DataFrame(d, index=self.times)

    def params_at(self, i: int, market_id: str, **changes: Any) -> Any:
        """The :class:`margin.params.MarginParams` published at bar ``i`` (pending MM and its start included)."""
        kw: dict[str, Any] = {"market_id": market_id, "im_rate": float(self.im_rate[i]),
                              "mm_rate": float(min(self.mm_rate[i], self.im_rate[i])),
                              "valid_from": self.times[i].to_pydatetime()}
        if self.mm_pending is not None and np.isfinite(self.mm_pending[i]) and self.mm_effective_bar is not None:
            eff = int(self.mm_effective_bar[i])
            step = self.times[1] - self.times[0] if len(self.times) > 1 else pd.Timedelta(0)
            kw["mm_rate_pending"] = float(min(self.mm_pending[i], self.im_rate[i]))
            kw["mm_effective_from"] = (self.times[i] + (eff - i) * step).to_pydatetime()
        kw.update(changes)
        return MarginParams(**kw)
