"""Controls on a margin path: floor, ceiling, cap on the change per update, notice before MM increases.

Every deployable policy passes its raw initial-margin series through :func:`apply_controls`. The
controls answer the worry that thresholds move faster than participants can react:

* ``floor`` / ``ceiling``: IM never leaves ``[floor, ceiling]``;
* ``max_change``: IM changes by at most this relative amount per update (bar), up or down:
  ``|IM_t / IM_{t-1} - 1| <= max_change``;
* ``notice_bars``: new positions get a higher IM at once, but a higher maintenance margin binds on OPEN
  positions only ``notice_bars`` bars after it was announced; decreases bind at once;
* ``mm_fraction``: the MM target is ``mm_fraction × IM`` (a policy with its own MM mapping passes ``raw_mm``;
  it gets the same change cap and notice, a floor of ``mm_fraction × floor`` and never exceeds IM).

Timing convention (shared with :mod:`backtest.simulation`): value ``t`` is published at the close of bar ``t``;
``im_new[t]`` applies to positions opened at that close, ``mm_open[t]`` binds during bar ``t + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = ["Controls", "ControlledPath", "apply_controls", "notice_min"]


@dataclass(frozen=True, slots=True)
class Controls:
    """Controls applied to every deployable policy.

    Parameters
    ----------
    floor : float
        Lowest IM rate (fraction of notional), in (0, 1].
    ceiling : float
        Highest IM rate, in [floor, 1].
    max_change : float
        Largest relative change of IM per update (per bar), > 0 (e.g. 0.25 = ±25 %).
    notice_bars : int
        Bars between the announcement of an MM increase and the bar from which it binds on open
        positions (>= 0; 0 = at once).
    mm_fraction : float
        MM target as a fraction of IM, in (0, 1].
    """

    floor: float = 0.01
    ceiling: float = 0.5
    max_change: float = 0.25
    notice_bars: int = 1
    mm_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"controls.floor must be in (0, 1], got {self.floor!r}")
        if not self.floor <= self.ceiling <= 1.0:
            raise ValueError(f"controls.ceiling must be in [floor={self.floor}, 1], got {self.ceiling!r}")
        if not self.max_change > 0.0:
            raise ValueError(f"controls.max_change must be > 0, got {self.max_change!r}")
        if int(self.notice_bars) != self.notice_bars or self.notice_bars < 0:
            raise ValueError(f"controls.notice_bars must be an integer >= 0, got {self.notice_bars!r}")
        if not 0.0 < self.mm_fraction <= 1.0:
            raise ValueError(f"controls.mm_fraction must be in (0, 1], got {self.mm_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Controls:
        return cls(**dict(d or {}))


@dataclass(frozen=True)
class ControlledPath:
    """Output of :func:`apply_controls` (all arrays of length ``n_bars``, rates as fractions).

    Attributes
    ----------
    im_new : np.ndarray
        IM rate for positions opened at the close of each bar.
    mm_target : np.ndarray
        The MM announced at each bar: ``mm_fraction × im_new``, or the policy's own MM target (capped).
    mm_open : np.ndarray
        MM rate binding on open positions during the next bar (increases lag by ``notice_bars``).
    mm_pending : np.ndarray
        Announced MM not yet binding (``NaN`` when nothing is pending).
    mm_effective_bar : np.ndarray
        Bar index from which ``mm_pending`` binds if the target stays put (-1 when nothing is pending).
    """

    im_new: np.ndarray
    mm_target: np.ndarray
    mm_open: np.ndarray
    mm_pending: np.ndarray
    mm_effective_bar: np.ndarray


def notice_min(target: np.ndarray, notice_bars: int) -> np.ndarray:
    """Running minimum of ``target`` over the window ``[t - notice_bars, t]`` (truncated at 0).

    A level binds only once it has been announced for ``notice_bars`` bars; a decrease binds at once.
    """
    x = np.asarray(target, dtype=np.float64)
    out = x.copy()
    for k in range(1, min(int(notice_bars), x.size - 1) + 1):
        np.minimum(out[k:], x[: x.size - k], out=out[k:])
    return out


def _change_capped(x: np.ndarray, max_change: float) -> np.ndarray:
    """``y_t`` = ``x_t`` clipped to ``[(1 - max_change) y_{t-1}, (1 + max_change) y_{t-1}]``; ``y_0 = x_0``."""
    out = np.empty_like(x)
    up, down = 1.0 + max_change, max(1.0 - max_change, 0.0)
    prev = x[0]
    out[0] = prev
    xs = x.tolist()
    # plain loop: the cap makes the path sequential (n_bars iterations of float math)
    for t in range(1, len(xs)):
        lo, hi = prev * down, prev * up
        v = xs[t]
        prev = lo if v < lo else (hi if v > hi else v)
        out[t] = prev
    return out


def apply_controls(raw_im: np.ndarray, controls: Controls, raw_mm: np.ndarray | None = None) -> ControlledPath:
    """Apply floor/ceiling, the change cap and the MM notice to a raw IM series.

    Parameters
    ----------
    raw_im : np.ndarray
        Raw IM rates per bar (fractions of notional), finite and > 0.
    controls : Controls
        The controls.
    raw_mm : np.ndarray, optional
        A policy's own MM target per bar (fractions, > 0). Default ``mm_fraction × IM``. When given it gets
        the same change cap as IM, is floored at ``mm_fraction × floor`` and never exceeds the controlled IM.

    Returns
    -------
    ControlledPath
    """
    raw = np.asarray(raw_im, dtype=np.float64).ravel()
    if raw.size == 0:
        raise ValueError("raw_im must have at least one bar, got an empty array")
    if not np.all(np.isfinite(raw)):
        i = int(np.flatnonzero(~np.isfinite(raw))[0])
        raise ValueError(f"raw_im must be finite, got {float(raw[i])!r} at bar {i}")
    c = controls
    im = _change_capped(np.clip(raw, c.floor, c.ceiling), c.max_change)
    if raw_mm is None:
        mm_target = c.mm_fraction * im
    else:
        mm = np.asarray(raw_mm, dtype=np.float64).ravel()
        if mm.shape != raw.shape:
            raise ValueError(f"raw_mm must have one value per bar ({raw.size}), got {mm.size}")
        if not np.all(np.isfinite(mm) & (mm > 0)):
            i = int(np.flatnonzero(~(np.isfinite(mm) & (mm > 0)))[0])
            raise ValueError(f"raw_mm must be finite and > 0, got {float(mm[i])!r} at bar {i}")
        mm_target = np.minimum(_change_capped(np.maximum(mm, c.mm_fraction * c.floor), c.max_change), im)
    mm_open = notice_min(mm_target, c.notice_bars)
    pending_mask = mm_target > mm_open
    mm_pending = np.where(pending_mask, mm_target, np.nan)
    eff = np.full(im.size, -1, dtype=np.int64)
    if c.notice_bars > 0 and pending_mask.any():
        # last bar j <= t with target[j] < target[t]: the pending level was (re)announced at j + 1
        tgt = mm_target
        for t in np.flatnonzero(pending_mask):
            j = t
            while j >= 0 and tgt[j] >= tgt[t]:
                j -= 1
            eff[t] = j + 1 + c.notice_bars
    return ControlledPath(im_new=im, mm_target=mm_target, mm_open=mm_open, mm_pending=mm_pending,
                          mm_effective_bar=eff)
