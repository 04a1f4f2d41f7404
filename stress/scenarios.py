"""Stress scenarios: historical replays and hypothetical shocks on bundled bars, and joint price paths.

A :class:`Scenario` is a full bar history (so that policies see the past) with a window ``[start, end]``
(bar indices) to replay and the bar ``shock`` where the stress begins (the pre-shock margin of the
counterfactual and the Cover-2 snapshot are taken there).

* :func:`largest_daily_crashes`: the ``k`` most negative close-to-close daily returns (at least ``gap`` bars
  apart), each replayed from ``lead`` bars before to ``tail`` bars after;
* :func:`worst_intraday_drop`: the largest fall over ``span`` bars inside a month of intraday bars (the
  December 2021 crash in the bundled 15-minute BTC data);
* :func:`shock_drop`: a fall of ``size`` spread evenly over ``bars`` bars (−30 % in an hour = 4 bars of 15
  minutes), the later bars moving as before from the lower level;
* :func:`vol_multiply`: log returns and intrabar ranges scaled by ``factor`` from the shock on;
* :func:`joint_prices`: BTC, ETH and USDC closes for the venues, with ``correlation_one`` (ETH moves as BTC
  scaled by their volatility ratio from the shock on) and a stablecoin ``depeg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Scenario", "largest_daily_crashes", "worst_intraday_drop", "shock_drop", "vol_multiply",
           "joint_prices", "calm_start"]


@dataclass(frozen=True)
class Scenario:
    """One stress scenario on a bar history (see the module docstring)."""

    name: str
    kind: str
    bars: pd.DataFrame
    start: int
    shock: int
    end: int
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        n = len(self.bars)
        if not 0 <= self.start < self.shock <= self.end < n:
            raise ValueError(f"scenario {self.name!r}: need 0 <= start < shock <= end < {n}, got start={self.start}, "
                             f"shock={self.shock}, end={self.end}")

    @property
    def window(self) -> tuple[pd.Timestamp, pd.Timestamp | None]:
        """``(start, end)`` timestamps for :func:`stress.cascade.run_cascade` (end exclusive)."""
        idx = self.bars.index
        return idx[self.start], (idx[self.end + 1] if self.end + 1 < len(idx) else None)

    def with_bars(self, bars: pd.DataFrame, name: str | None = None, kind: str | None = None, **meta: Any) -> Scenario:
        return Scenario(name=name or self.name, kind=kind or self.kind, bars=bars, start=self.start, shock=self.shock,
                        end=self.end, meta={**self.meta, **meta})


def _ohlc(bars: pd.DataFrame) -> pd.DataFrame:
    cols = {str(c).lower(): c for c in bars.columns}
    out = pd.DataFrame({k: bars[cols[k]].to_numpy(dtype=np.float64) for k in ("open", "high", "low", "close")},
                       index=bars.index)
    if "volume" in cols:
        out["volume"] = bars[cols["volume"]].to_numpy(dtype=np.float64)
    return out


def largest_daily_crashes(bars: pd.DataFrame, k: int = 3, lead: int = 30, tail: int = 10, gap: int = 30,
                          min_history: int = 120) -> list[Scenario]:
    """The ``k`` largest daily crashes (most negative close-to-close returns), each as a replay window."""
    b = _ohlc(bars)
    c = b["close"].to_numpy()
    r = np.full(len(c), np.inf)
    r[1:] = c[1:] / c[:-1] - 1.0
    r[: max(min_history, lead + 1)] = np.inf
    r[len(c) - tail:] = np.inf
    out: list[Scenario] = []
    taken: list[int] = []
    for i in np.argsort(r, kind="stable"):
        if len(out) >= k or not np.isfinite(r[i]):
            break
        if any(abs(int(i) - j) < gap for j in taken):
            continue
        taken.append(int(i))
        day = b.index[i].strftime("%Y-%m-%d")
        out.append(Scenario(name=f"crash_{day}", kind="historical", bars=b.iloc[: i + tail + 1], start=int(i) - lead,
                            shock=int(i), end=int(i) + tail, meta={"return": float(r[i]), "date": day}))
    if not out:
        raise ValueError(f"no daily crash found: bars has {len(c)} bars, needs more than min_history={min_history} + tail={tail}")
    return out


def worst_intraday_drop(bars: pd.DataFrame, month: str, span: int = 96, lead: int = 192, tail: int = 96) -> Scenario:
    """The largest fall over ``span`` bars whose start lies in ``month`` (``"YYYY-MM"``)."""
    b = _ohlc(bars)
    c = b["close"].to_numpy()
    idx = b.index
    sel = np.flatnonzero(idx.strftime("%Y-%m") == month)
    if sel.size == 0:
        raise ValueError(f"month {month!r} is not in the bars ({idx[0]} .. {idx[-1]})")
    best, best_i = np.inf, -1
    for i in sel:
        if i < lead or i + span >= len(c):
            continue
        low = c[i:i + span + 1].min()
        d = low / c[i] - 1.0
        if d < best:
            best, best_i = d, int(i)
    if best_i < 0:
        raise ValueError(f"month {month!r} has no window of {span} bars with {lead} bars of lead")
    # the shock: the bar of the steepest one-bar fall inside the worst span
    seg = c[best_i:best_i + span + 1]
    shock = best_i + 1 + int(np.argmin(seg[1:] / seg[:-1]))
    end = min(shock + tail, len(c) - 1)
    return Scenario(name=f"intraday_{month}", kind="historical", bars=b.iloc[: end + 1], start=shock - lead,
                    shock=shock, end=end, meta={"drop": float(best), "time": str(idx[shock]), "span_bars": span})


def calm_start(bars: pd.DataFrame, window: int = 96, lead: int = 192, tail: int = 96) -> int:
    """A bar after the calmest ``window`` bars (lowest realised volatility) with room for lead and tail."""
    c = _ohlc(bars)["close"].to_numpy()
    r = np.diff(np.log(c))
    v = pd.Series(r**2).rolling(window).mean().to_numpy()
    ok = np.arange(len(v)) + 1
    mask = (ok >= lead) & (ok < len(c) - tail)
    v = np.where(mask & np.isfinite(v), v, np.inf)
    return int(np.argmin(v)) + 1


def shock_drop(base: Scenario, size: float, bars: int, name: str | None = None) -> Scenario:
    """Base scenario with a fall of ``size`` (fraction) spread over ``bars`` bars from ``base.shock``."""
    if not 0.0 < size < 1.0:
        raise ValueError(f"shock size must be in (0, 1), got {size!r}")
    if int(bars) != bars or bars < 1:
        raise ValueError(f"shock bars must be an integer >= 1, got {bars!r}")
    b = base.bars.copy()
    n = len(b)
    step = (1.0 - size) ** (1.0 / bars)
    k = np.arange(n) - base.shock
    f = step ** np.clip(k + 1, 0, bars)
    f_open = step ** np.clip(k, 0, bars)
    o, c = b["open"].to_numpy() * f_open, b["close"].to_numpy() * f
    h = np.maximum(b["high"].to_numpy() * f_open, np.maximum(o, c))
    low = np.minimum(b["low"].to_numpy() * f, np.minimum(o, c))
    b["open"], b["high"], b["low"], b["close"] = o, h, low, c
    return base.with_bars(b, name=name or f"drop_{size:g}_{bars}bars", kind="hypothetical", size=float(size),
                          shock_bars=int(bars))


def vol_multiply(base: Scenario, factor: float, name: str | None = None) -> Scenario:
    """Base scenario with log returns and intrabar ranges multiplied by ``factor`` from the shock on."""
    if not factor > 0:
        raise ValueError(f"vol factor must be > 0, got {factor!r}")
    b = base.bars.copy()
    lc = np.log(b["close"].to_numpy())
    r = np.diff(lc, prepend=lc[0])
    s = base.shock
    r[s:] *= factor
    new_c = np.exp(lc[0] + np.cumsum(r))
    prev = np.concatenate(([new_c[0]], new_c[:-1]))
    ratio = np.ones(len(b))
    ratio[s:] = factor
    o = np.where(np.arange(len(b)) >= s, prev, b["open"].to_numpy())
    hi = np.exp(np.log(np.maximum(b["high"].to_numpy() / b["close"].to_numpy(), 1.0)) * ratio) * np.maximum(o, new_c)
    lo = np.exp(np.log(np.minimum(b["low"].to_numpy() / b["close"].to_numpy(), 1.0)) * ratio) * np.minimum(o, new_c)
    b["open"], b["high"], b["low"], b["close"] = o, hi, lo, new_c
    return base.with_bars(b, name=name or f"vol_x{factor:g}", kind="hypothetical", vol_factor=float(factor))


def joint_prices(btc: pd.Series, eth: pd.Series, shock: int, *, correlation_one: bool = False,
                 depeg: float = 0.0, depeg_bars: int = 1, drop: float = 0.0, drop_bars: int = 1) -> pd.DataFrame:
    """Closes of BTC, ETH and USDC for :func:`stress.venues.run_contagion` from bar ``shock`` on.

    ``drop``: BTC falls by this fraction over ``drop_bars`` (ETH keeps its own moves unless
    ``correlation_one``); ``correlation_one``: from the shock, ETH's log returns are BTC's times the ratio of
    their volatilities before the shock; ``depeg``: USDC falls to ``1 - depeg`` over ``depeg_bars`` bars.
    """
    df = pd.concat({"BTC": btc, "ETH": eth}, axis=1, join="inner").astype(np.float64)
    n = len(df)
    if not 0 < shock < n:
        raise ValueError(f"shock must be in (0, {n}), got {shock!r}")
    lb, le = np.log(df["BTC"].to_numpy()), np.log(df["ETH"].to_numpy())
    rb, re_ = np.diff(lb, prepend=lb[0]), np.diff(le, prepend=le[0])
    if drop > 0:
        rb[shock:shock + drop_bars] += np.log(1.0 - drop) / drop_bars
    if correlation_one:
        ratio = float(np.std(re_[1:shock]) / max(np.std(rb[1:shock]), 1e-12)) if shock > 2 else 1.0
        re_[shock:] = rb[shock:] * ratio
    usdc = np.ones(n)
    if depeg > 0:
        k = np.arange(n) - shock
        usdc = np.where(k >= 0, 1.0 - depeg * np.minimum((k + 1) / depeg_bars, 1.0), 1.0)
    return pd.DataFrame({"BTC": np.exp(lb[0] + np.cumsum(rb)), "ETH": np.exp(le[0] + np.cumsum(re_)), "USDC": usdc},
                        index=df.index)
