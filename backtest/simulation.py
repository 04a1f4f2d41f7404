"""Bar-by-bar liquidation backtest of a margin path on a population of leveraged isolated perp positions.

Timing (one bar ``t`` of the window, after the first)
-----------------------------------------------------
1. funding on open positions at the bar's open: the holder receives ``-side q open_t rate_t`` (USD);
2. collateral locked during the bar is recorded (sum of open isolated margins);
3. liquidation against the bar's high/low through :func:`margin.liquidation.liquidate_isolated` (partial
   or full, fill rule, slippage, penalty into the insurance fund, bad debt before the fund, fund draw),
   with the MM published at the close of bar ``t - 1`` (``path.mm_rate[t-1]``, or each position's MM fixed
   at entry when ``path.mm_binds == "entry"``); when a partially closed position's new liquidation price is
   still inside the bar's range the rule steps again at that price (up to ``max_steps_per_bar`` steps:
   the bar's extreme is assumed to come after the trigger, the adverse case; the continuation steps are
   geometric and computed in closed form);
4. positions whose holding period ends close at ``close_t`` (close fee; P&L realised; the rest withdrawn);
   positions still open at the end of the window close there too;
5. margin calls at the close: a position with equity ``< call_health × MM`` (MM including an announced,
   not yet binding increase: the notice) tops up to ``max(topup_level × entry margin, call_health × MM)``
   when ``topup_u < topup_prob`` and it has top-ups left;
6. new positions open at ``close_t``: leverage ``min(leverage_draw, 1 / im_rate[t])``, isolated margin
   ``notional / leverage``, opening fee deposited on top;
7. the engine's accounting identity (:class:`margin.liquidation.Ledger`) is checked.

Only bars are looped over; every step is vectorised over the OPEN positions (a compact book, appended
to from the sorted population and compacted when positions close), so a bar costs O(open positions).

Collateral
----------
``collateral_locked`` is the sum over bars of the open positions' isolated margins (USD·bars).
``avg_collateral = collateral_locked / exposure`` where ``exposure`` = Σ entry notional × planned bars
held within the window (USD·bars): a denominator that does not depend on the policy, so that for a
fixed population ``avg_collateral`` is proportional to the collateral locked and frontiers compare
policies at equal capital. ``avg_collateral_open`` divides by the notional actually open instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest.population import Population
from margin.liquidation import Ledger, liquidate_isolated
from margin.params import LiquidationSettings
from margin.path import MarginPath

log = logging.getLogger(__name__)

__all__ = ["BacktestConfig", "BacktestResult", "run_backtest", "reference_backtest", "ohlcv_arrays", "max_increase", "bars_per_day",
           "window_bounds"]


@dataclass(frozen=True)
class BacktestConfig:
    """Settings of :func:`run_backtest`.

    Parameters
    ----------
    liquidation : LiquidationSettings
        Penalty, slippage coefficients, max close fraction, target health (and the fund's default size).
    fund_initial : float, optional
        Opening insurance fund, USD (default: ``liquidation.insurance_fund_initial``).
    frozen : bool
        Frozen setting for comparisons with the ``bound``: volume-dependent slippage off, so that positions
        (and cohorts) are independent; ``bad_debt`` is always measured before the fund.
    topups : bool
        Traders top up on margin calls (per the population's ``topup_prob``).
    funding : bool
        Charge funding on open positions.
    fees : bool
        Charge the population's fee rate on opening and closing notional.
    funding_rate : float or tuple of float, optional
        Per-bar funding override (default: the population's).
    volume_scale : float
        Bar notional volume = ``volume × close × volume_scale`` (for the volume slippage term).
    max_steps_per_bar : int
        Most liquidation steps per position and bar: after a partial close the bar's range may cross the
        position's new liquidation price, and the rule steps again at that price (1 = one step per bar).
        The first step is the engine's (:func:`margin.liquidation.liquidate_isolated`); the following ones
        are computed in closed form (:func:`_continue_partial`) and checked against a step-by-step loop.
    """

    liquidation: LiquidationSettings = field(default_factory=LiquidationSettings)
    fund_initial: float | None = None
    frozen: bool = False
    topups: bool = True
    funding: bool = True
    fees: bool = True
    funding_rate: float | tuple[float, ...] | None = None
    volume_scale: float = 1.0
    max_steps_per_bar: int = 1000

    def __post_init__(self) -> None:
        if int(self.max_steps_per_bar) != self.max_steps_per_bar or self.max_steps_per_bar < 1:
            raise ValueError(f"backtest.max_steps_per_bar must be an integer >= 1, got {self.max_steps_per_bar!r}")
        if self.fund_initial is not None and not self.fund_initial >= 0:
            raise ValueError(f"backtest.fund_initial must be >= 0, got {self.fund_initial!r}")
        if not self.volume_scale > 0:
            raise ValueError(f"backtest.volume_scale must be > 0, got {self.volume_scale!r}")
        if isinstance(self.funding_rate, list):
            object.__setattr__(self, "funding_rate", tuple(self.funding_rate))

    @property
    def settings(self) -> LiquidationSettings:
        """Liquidation settings in force (volume slippage off when frozen)."""
        if self.frozen:
            return replace(self.liquidation, slippage_volume_coef=0.0)
        return self.liquidation

    @property
    def fund0(self) -> float:
        return float(self.liquidation.insurance_fund_initial if self.fund_initial is None else self.fund_initial)

    def frozen_copy(self) -> BacktestConfig:
        return replace(self, frozen=True)


@dataclass(frozen=True)
class BacktestResult:
    """Outcome of one policy's backtest (amounts USD, rates as fractions).

    Scalars: ``liquidations`` (positions liquidated at least once, partially or fully: traders hit),
    ``liquidation_events`` (every partial or full liquidation step), ``liquidated_notional``, ``bad_debt``
    (loss past bankruptcy before the fund, per the engine), ``fund_draw``, ``uncovered_bad_debt``,
    ``avg_im`` (time-average IM for new positions), ``avg_collateral`` (collateral locked / exposure, see the
    module docstring), ``avg_collateral_open``, ``collateral_locked`` (USD·bars), ``exposure`` (USD·bars),
    ``max_im_increase_1d/5d/10d`` (largest rise of IM over the period: ``IM_t / min(IM over the preceding
    period) - 1``), ``peak_to_trough`` (max IM / min IM), ``ledger_residual`` (largest relative residual of
    the accounting identity over the bars), ``n_positions``.
    ``series``: per-bar DataFrame (``im``, ``mm``, ``liquidations`` (positions first hit in the bar),
    ``liquidation_events``, ``liquidated_notional``, ``bad_debt``,
    ``fund_draw``, ``fund``, ``open_notional``, ``collateral``, ``n_open``, ``topups``).
    ``breaches``: per bar ``t``: close-to-close loss of a 1-unit long/short from ``t-1`` to ``t`` against the
    IM/MM published at ``t-1`` (``loss_long``, ``loss_short``, ``im``, ``mm``, ``breach_long``, ``breach_short``,
    ``breach_im`` = either side, ``breach_mm``).
    ``per_position``: optional per-position arrays (``liquidations`` (0/1: hit at least once),
    ``liquidation_events``, ``bad_debt``, ``collateral``,
    ``exposure``, ``topups``, ``open_bar``) in population order, for the bound and the reference tests.
    """

    policy: str
    liquidations: int
    liquidation_events: int
    liquidated_notional: float
    bad_debt: float
    fund_draw: float
    uncovered_bad_debt: float
    avg_im: float
    avg_collateral: float
    avg_collateral_open: float
    collateral_locked: float
    exposure: float
    max_im_increase_1d: float
    max_im_increase_5d: float
    max_im_increase_10d: float
    peak_to_trough: float
    ledger_residual: float
    n_positions: int
    topups: int
    topup_amount: float
    penalties: float
    fees: float
    funding: float
    fund_end: float
    series: pd.DataFrame
    breaches: pd.DataFrame
    per_position: dict[str, np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def breach(self) -> pd.Series:
        """Bool series: the bar's loss on a 1-unit position (either side) exceeded the IM set before it."""
        return self.breaches["breach_im"]

    def metrics(self) -> dict[str, float]:
        """Scalar metrics (JSON/MLflow friendly)."""
        keys = ("liquidations", "liquidation_events", "liquidated_notional", "bad_debt", "fund_draw", "uncovered_bad_debt", "avg_im",
                "avg_collateral", "avg_collateral_open", "collateral_locked", "exposure", "max_im_increase_1d",
                "max_im_increase_5d", "max_im_increase_10d", "peak_to_trough", "ledger_residual", "n_positions",
                "topups", "topup_amount", "penalties", "fees", "funding", "fund_end")
        return {k: float(getattr(self, k)) for k in keys}


def ohlcv_arrays(bars: pd.DataFrame) -> dict[str, np.ndarray]:
    """``open``/``high``/``low``/``close`` (and ``volume`` if present) as float64 arrays, case-insensitive."""
    if not isinstance(bars, pd.DataFrame):
        raise TypeError(f"bars must be a pandas DataFrame, got {type(bars).__name__}")
    cols = {str(c).lower(): c for c in bars.columns}
    out: dict[str, np.ndarray] = {}
    for name in ("open", "high", "low", "close"):
        if name not in cols:
            raise ValueError(f"bars must have an {name!r} column, got columns {list(bars.columns)}")
        out[name] = bars[cols[name]].to_numpy(dtype=np.float64)
    if "volume" in cols:
        out["volume"] = bars[cols["volume"]].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(out["close"]) & (out["close"] > 0) & np.isfinite(out["open"]) & (out["open"] > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"bars must have finite positive open/close prices, got {float(out['open'][i])!r}/"
                         f"{float(out['close'][i])!r} at {bars.index[i]}")
    return out


def window_bounds(times: pd.DatetimeIndex, start: Any, end: Any, what: str = "backtest") -> tuple[int, int]:
    """``(i0, i1)``: first and last bar of the window ``[start, end)``; ``what`` names the window in the error."""

    def ts(x: Any) -> pd.Timestamp:
        t = pd.Timestamp(x)
        return t.tz_localize("UTC") if t.tz is None and times.tz is not None else t

    i0 = 0 if start is None else int(times.searchsorted(ts(start), side="left"))
    i1 = len(times) - 1 if end is None else int(times.searchsorted(ts(end), side="left")) - 1
    if i1 - i0 < 1:
        raise ValueError(f"{what} window [{start}, {end}) holds {max(i1 - i0 + 1, 0)} bars, needs at least 2")
    return i0, i1


def bars_per_day(times: pd.DatetimeIndex) -> float:
    if len(times) < 2:
        return 1.0
    dt = float(pd.Series(times[1:] - times[:-1]).median().total_seconds())
    return max(86400.0 / dt, 1e-9) if dt > 0 else 1.0


def max_increase(im: np.ndarray, k: int) -> float:
    """Largest ``im[t] / min(im[t-k : t]) - 1`` (>= 0): the largest rise of IM within ``k`` bars."""
    x = np.asarray(im, dtype=np.float64)
    k = max(int(k), 1)
    if x.size < 2:
        return 0.0
    k = min(k, x.size - 1)
    from numpy.lib.stride_tricks import sliding_window_view

    mins = sliding_window_view(x[:-1], k).min(axis=1)  # min over x[t-k .. t-1] for t = k .. n-1
    best = float(np.max(x[k:] / mins - 1.0))
    # the first k bars: min over the available past
    head = x[1:k + 1] / np.minimum.accumulate(x[:k]) - 1.0 if k > 0 else np.zeros(0)
    return max(best, float(head.max(initial=0.0)), 0.0)


def _check_inputs(bars: pd.DataFrame, path: MarginPath, population: Population) -> dict[str, np.ndarray]:
    px = ohlcv_arrays(bars)
    n = len(bars)
    if len(path.im_rate) != n:
        raise ValueError(f"path has {len(path.im_rate)} bars but bars has {n}; build the path on the same bars")
    if not path.times.equals(pd.DatetimeIndex(bars.index)):
        raise ValueError("path.times must equal bars.index (the path is published at the close of each bar)")
    if population.n_bars != n:
        raise ValueError(f"population was drawn for {population.n_bars} bars but bars has {n}")
    return px


def _continue_partial(side, qty, entry, margin, mm_rate, fill, slip_rate, low, high, settings, max_more):
    """Further partial-liquidation steps in the same bar, in closed form (the engine's rule, step after step).

    After a partial close at ``F`` the position sits at health ``h`` there, so its next liquidation price is
    ``F (1 - side h m) / (1 - side m)``: a geometric sequence of triggers with ratio
    ``rho = (1 - side h m) / (1 - side m)``. At each trigger the rule closes the same fraction
    ``f = (h - 1) m / (h m - penalty - s)`` (equity = MM there), so the steps the bar's range reaches
    (``L_k >= low`` for longs, ``<= high`` for shorts) and their flows are geometric sums. Returns
    ``None`` when no position takes another step, else (steps, qty, margin, realised, slippage, penalty,
    notional) with per-position arrays for the first three and totals (USD) for the rest.
    """
    st = settings
    h, m, p = st.target_health, np.asarray(mm_rate, dtype=np.float64), st.penalty_rate
    s = slip_rate
    L1 = fill * (1.0 - side * h * m) / (1.0 - side * m)
    rho = (1.0 - side * h * m) / (1.0 - side * m)
    bound = np.where(side > 0, low, high)
    reach = np.where(side > 0, L1 >= bound, L1 <= bound)
    if not reach.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(reach, np.floor(np.log(bound / L1) / np.log(rho)) + 1.0, 0.0)
    k = np.minimum(np.nan_to_num(k, nan=0.0, posinf=float(max_more)), float(max_more))
    f = np.minimum(np.nextafter((h - 1.0) * m / (h * m - p - s), np.inf), 1.0)
    g = (1.0 - f) * rho
    keep = (1.0 - f) ** k
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(1.0 - g) > 1e-15, (1.0 - g**k) / (1.0 - g), k)
    cq_l = f * qty * L1 * geo  # sum over the steps of closed qty × fill price
    cq = qty * (1.0 - keep)  # sum of closed qty
    realised = side * (cq_l - entry * cq)
    slip = s * cq_l
    pen = p * cq_l
    return (k, qty * keep, margin + realised - slip - pen, float(realised.sum()), float(slip.sum()),
            float(pen.sum()), float(cq_l.sum()))


def run_backtest(
    bars: pd.DataFrame,
    path: MarginPath,
    population: Population,
    cfg: BacktestConfig | None = None,
    *,
    start: Any = None,
    end: Any = None,
    per_position: bool = False,
) -> BacktestResult:
    """Replay ``bars`` for ``population`` under the margin ``path`` (see the module docstring).

    Parameters
    ----------
    bars : pd.DataFrame
        OHLC(V) bars with a UTC DatetimeIndex; prices USD, volume in base units.
    path : MarginPath
        IM for new positions and MM for open positions per bar (published at each close).
    population : Population
        Positions drawn for ``len(bars)`` bars.
    cfg : BacktestConfig, optional
        Liquidation settings, fund, frozen setting, top-ups, funding, fees.
    start, end : timestamp, optional
        Window ``[start, end)``: only positions opening in it are replayed; those still open at its last
        bar close there.
    per_position : bool
        Also return per-position outcomes (``result.per_position``).

    Returns
    -------
    BacktestResult
    """
    cfg = cfg or BacktestConfig()
    px = _check_inputs(bars, path, population)
    times = pd.DatetimeIndex(bars.index)
    i0, i1 = window_bounds(times, start, end)
    settings = cfg.settings
    pc = population.cfg
    o_, h_, l_, c_ = px["open"], px["high"], px["low"], px["close"]
    if "volume" in px and not cfg.frozen:
        vol_usd = np.nan_to_num(px["volume"], nan=0.0) * c_ * cfg.volume_scale
        vol_usd = np.where(vol_usd > 0, vol_usd, np.inf)
    else:
        vol_usd = np.full(len(c_), np.inf)
    if cfg.funding:
        fr = (population.funding_series(len(c_)) if cfg.funding_rate is None
              else np.broadcast_to(np.asarray(cfg.funding_rate, dtype=np.float64), c_.shape).copy())
    else:
        fr = np.zeros(len(c_))
    fee_rate = pc.fee_rate if cfg.fees else 0.0
    im_rate = np.asarray(path.im_rate, dtype=np.float64)
    mm_rate = np.asarray(path.mm_rate, dtype=np.float64)
    mm_call_rate = mm_rate if path.mm_pending is None else np.fmax(mm_rate, np.asarray(path.mm_pending))
    entry_mode = path.mm_binds == "entry"
    topup_on = cfg.topups and pc.topup_max > 0 and pc.topup_prob > 0
    max_steps = int(cfg.max_steps_per_bar)

    ob = population.open_bar
    lo_ptr = int(ob.searchsorted(i0, side="left"))
    hi_ptr = int(ob.searchsorted(i1, side="left"))  # positions opening at i1 cannot be held
    n_pos = hi_ptr - lo_ptr
    starts = ob.searchsorted(np.arange(i0, i1 + 1), side="left")
    starts = np.minimum(starts, hi_ptr)

    # the book (open positions), compact arrays
    b_side = np.zeros(0)
    b_qty = np.zeros(0)
    b_entry = np.zeros(0)
    b_margin = np.zeros(0)
    b_w0 = np.zeros(0)
    b_mm = np.zeros(0)
    b_close = np.zeros(0, dtype=np.int64)
    b_left = np.zeros(0, dtype=np.int64)
    b_pid = np.zeros(0, dtype=np.int64)
    b_long = np.zeros(0, dtype=bool)
    closes_at = np.zeros(len(c_) + 1, dtype=np.int64)  # scheduled closes per bar

    ledger = Ledger(fund_initial=cfg.fund0)
    fund = cfg.fund0
    m = i1 - i0 + 1
    s_liq = np.zeros(m)
    s_ev = np.zeros(m)
    hit = np.zeros(len(population), dtype=bool)  # liquidated at least once
    s_liqn = np.zeros(m)
    s_bad = np.zeros(m)
    s_draw = np.zeros(m)
    s_fund = np.zeros(m)
    s_open = np.zeros(m)
    s_coll = np.zeros(m)
    s_nopen = np.zeros(m)
    s_top = np.zeros(m)
    n_topups = 0
    topup_amount = 0.0
    coll_total = 0.0
    open_notional_total = 0.0
    max_resid = 0.0
    if per_position:
        n_all = len(population)
        pp_liq = np.zeros(n_all)
        pp_bad = np.zeros(n_all)
        pp_coll = np.zeros(n_all)
        pp_top = np.zeros(n_all)
    hold_all = population.hold_bars
    exposure = 0.0

    n_starts = len(starts)
    for t in range(i0, i1 + 1):
        j = t - i0
        if not b_qty.size and (t == i1 or (starts[j + 1] if j + 1 < n_starts else hi_ptr) == starts[j]):
            s_fund[j] = fund  # nothing open, nothing opening: the ledger cannot move
            continue
        if b_qty.size:
            ot, ct = o_[t], c_[t]
            # 1. funding at the open
            if fr[t] != 0.0:
                pay = -b_side * b_qty * (ot * fr[t])
                b_margin += pay
                ledger.funding += float(pay.sum())
            # 2. collateral locked during the bar
            coll = float(b_margin.sum())
            on = float(b_qty.sum()) * ot
            s_coll[j] = coll
            s_open[j] = on
            s_nopen[j] = b_qty.size
            coll_total += coll
            open_notional_total += on
            if per_position:
                pp_coll[b_pid] += b_margin
            # 3. liquidation against the bar's high/low; a cheap pre-screen with the engine's own trigger
            # expression skips the engine call on bars where nothing triggers
            mm = b_mm if entry_mode else mm_rate[t - 1]
            lp = (b_entry - b_side * b_margin / b_qty) / (1.0 - b_side * mm)
            lo_t, hi_t = l_[t], h_[t]
            k = 0
            if np.any(np.where(b_long, lp - lo_t, hi_t - lp) >= 0.0):
                res = liquidate_isolated(b_side, b_qty, b_entry, b_margin, mm, ot, hi_t, lo_t, ct, settings, fund,
                                         bar_volume=vol_usd[t], inplace=True)
                idx_k = res.index
                k = idx_k.size
                ledger.record_liquidation(res)
                fund = res.fund_after
                pid_k = b_pid[idx_k]
                new = ~hit[pid_k]
                hit[pid_k] = True
                s_liq[j] = int(new.sum())
                s_ev[j] = k
                s_liqn[j] = res.totals["liquidated_notional"]
                s_bad[j] = res.totals["bad_debt"]
                s_draw[j] = res.totals["fund_draw"]
                if per_position:
                    pp_liq[pid_k] += 1.0
                    pp_bad[pid_k] += res.bad_debt
                if max_steps > 1 and not res.full.all():
                    part = ~res.full
                    sub = idx_k[part]
                    cont = _continue_partial(
                        b_side[sub], b_qty[sub], b_entry[sub], b_margin[sub], mm[sub] if entry_mode else mm,
                        res.fill_price[part], res.slippage_cost[part] / (res.closed_qty[part] * res.fill_price[part]),
                        lo_t, hi_t, settings, max_steps - 1)
                    if cont is not None:
                        n_steps, q_new, w_new, realised, slip, pen, notional = cont
                        b_qty[sub] = q_new
                        b_margin[sub] = w_new
                        ledger.realised_pnl += realised
                        ledger.slippage += slip
                        ledger.penalties += pen
                        fund += pen
                        ne = float(n_steps.sum())
                        k += int(ne)
                        s_ev[j] += ne
                        s_liqn[j] += notional
                        if per_position:
                            pp_liq[b_pid[sub]] += n_steps
            # 4. scheduled closes (and the end of the window)
            closing = b_close <= t if (closes_at[t] or t == i1) else None
            if closing is not None:
                q, sd, en, w = b_qty[closing], b_side[closing], b_entry[closing], b_margin[closing]
                realised = sd * q * (ct - en)
                eq = w + realised
                fee = np.minimum(fee_rate * q * ct, np.maximum(eq, 0.0))
                bad = np.maximum(-eq, 0.0)  # after a partial close the price may run past bankruptcy
                returned = np.maximum(eq - fee, 0.0)
                ledger.realised_pnl += float(realised.sum())
                ledger.fees += float(fee.sum())
                ledger.withdrawn += float(returned.sum())
                tb = float(bad.sum())
                if tb > 0:
                    draw = min(tb, fund)
                    fund -= draw
                    ledger.bad_debt += tb
                    ledger.fund_draw += draw
                    ledger.uncovered_bad_debt += tb - draw
                    s_bad[j] += tb
                    s_draw[j] += draw
                    if per_position:
                        pp_bad[b_pid[closing]] += bad
                keep = ~closing & (b_qty > 0) if k else ~closing
            elif k:
                keep = b_qty > 0
            else:
                keep = None
            if keep is not None and not keep.all():
                b_side, b_qty, b_entry, b_margin = b_side[keep], b_qty[keep], b_entry[keep], b_margin[keep]
                b_long = b_long[keep]
                b_w0, b_mm, b_close, b_left, b_pid = b_w0[keep], b_mm[keep], b_close[keep], b_left[keep], b_pid[keep]
        if t < i1:
            ct = c_[t]
            # 5. margin calls at the close (before new positions join)
            if topup_on and b_qty.size:
                callable_ = b_left > 0
                if callable_.any():
                    eq = b_margin + b_side * b_qty * (ct - b_entry)
                    mmv = (b_mm if entry_mode else mm_call_rate[t]) * b_qty * ct
                    need = pc.call_health * mmv
                    call = callable_ & (eq < need)
                    if call.any():
                        target = np.maximum(pc.topup_level * b_w0[call], need[call])
                        amt = target - eq[call]
                        b_margin[call] += amt
                        b_left[call] -= 1
                        a = float(amt.sum())
                        ledger.top_ups += a
                        topup_amount += a
                        nc = int(call.sum())
                        n_topups += nc
                        s_top[j] = nc
                        if per_position:
                            pp_top[b_pid[call]] += 1.0
            # 6. new positions at the close
            p0, p1 = int(starts[j]), int(starts[j + 1]) if j + 1 < len(starts) else hi_ptr
            if p1 > p0:
                sl = slice(p0, p1)
                im = im_rate[t]
                notional = population.notional[sl]
                w = notional * np.maximum(1.0 / population.leverage_draw[sl], im)
                fee = fee_rate * notional
                ledger.deposits += float(w.sum() + fee.sum())
                ledger.fees += float(fee.sum())
                close_bar = np.minimum(t + hold_all[sl], i1)
                exposure += float(np.dot(notional, (close_bar - t).astype(np.float64)))
                if topup_on:
                    left = np.where(population.topup_u[sl] < pc.topup_prob, pc.topup_max, 0).astype(np.int64)
                else:
                    left = np.zeros(p1 - p0, dtype=np.int64)
                b_side = np.concatenate((b_side, population.side[sl]))
                b_long = np.concatenate((b_long, population.side[sl] > 0))
                np.add.at(closes_at, close_bar, 1)
                b_qty = np.concatenate((b_qty, notional / ct))
                b_entry = np.concatenate((b_entry, np.full(p1 - p0, ct)))
                b_margin = np.concatenate((b_margin, w))
                b_w0 = np.concatenate((b_w0, w))
                b_mm = np.concatenate((b_mm, np.full(p1 - p0, mm_rate[t])))
                b_close = np.concatenate((b_close, close_bar))
                b_left = np.concatenate((b_left, left))
                b_pid = np.concatenate((b_pid, np.arange(p0, p1)))
        # 7. accounting identity (Ledger.residuals, inlined: this runs every bar)
        lg = ledger
        r1 = (float(b_margin.sum()) + lg.withdrawn) - (lg.deposits + lg.top_ups - lg.fees + lg.funding + lg.realised_pnl
                                                      - lg.penalties - lg.slippage + lg.bad_debt)
        r2 = fund - (lg.fund_initial + lg.penalties - lg.fund_draw)
        r3 = lg.bad_debt - (lg.fund_draw + lg.adl_covered + lg.uncovered_bad_debt)
        scale_ = max(1.0, lg.deposits, lg.withdrawn, lg.top_ups, lg.fees, abs(lg.funding), abs(lg.realised_pnl),
                     lg.penalties, lg.slippage, lg.bad_debt, lg.fund_initial)
        rel = max(abs(r1), abs(r2), abs(r3)) / scale_
        if rel > max_resid:
            max_resid = rel
        s_fund[j] = fund

    if not cfg.frozen and np.isfinite(vol_usd[i0:i1 + 1]).any():
        share = float(np.median(s_open[s_open > 0] / vol_usd[i0:i1 + 1][s_open > 0])) if (s_open > 0).any() else 0.0
        if share > 0.5:
            log.warning("the population's open notional is %.0f%% of the median bar volume: volume slippage is "
                        "extreme (raise backtest.volume_scale or lower the population's notional)", 100 * share)
    wtimes = times[i0:i1 + 1]
    im_w = im_rate[i0:i1 + 1]
    series = pd.DataFrame(
        {"im": im_w, "mm": mm_rate[i0:i1 + 1], "liquidations": s_liq, "liquidation_events": s_ev,
         "liquidated_notional": s_liqn,
         "bad_debt": s_bad, "fund_draw": s_draw, "fund": s_fund, "open_notional": s_open, "collateral": s_coll,
         "n_open": s_nopen, "topups": s_top},
        index=wtimes,
    )
    ret = c_[i0 + 1:i1 + 1] / c_[i0:i1]
    loss_long, loss_short = 1.0 - ret, ret - 1.0
    im_prev, mm_prev = im_rate[i0:i1], mm_rate[i0:i1]
    breaches = pd.DataFrame(
        {"loss_long": loss_long, "loss_short": loss_short, "im": im_prev, "mm": mm_prev,
         "breach_long": loss_long > im_prev, "breach_short": loss_short > im_prev,
         "breach_im": np.maximum(loss_long, loss_short) > im_prev,
         "breach_mm": np.maximum(loss_long, loss_short) > mm_prev},
        index=times[i0 + 1:i1 + 1],
    )
    bpd = bars_per_day(times)
    im_pub = im_rate[i0:i1]  # IM published for new positions over the window
    pp = None
    if per_position:
        idx = slice(lo_ptr, hi_ptr)
        close_bar = np.minimum(population.open_bar[idx] + hold_all[idx], i1)
        pp = {
            "open_bar": population.open_bar[idx].copy(),
            "liquidations": hit[idx].astype(np.float64), "liquidation_events": pp_liq[idx], "bad_debt": pp_bad[idx], "collateral": pp_coll[idx],
            "exposure": population.notional[idx] * (close_bar - population.open_bar[idx]),
            "topups": pp_top[idx],
        }
    return BacktestResult(
        policy=path.policy,
        liquidations=int(s_liq.sum()),
        liquidation_events=int(s_ev.sum()),
        liquidated_notional=float(s_liqn.sum()),
        bad_debt=float(ledger.bad_debt),
        fund_draw=float(ledger.fund_draw),
        uncovered_bad_debt=float(ledger.uncovered_bad_debt),
        avg_im=float(im_pub.mean()),
        avg_collateral=coll_total / exposure if exposure > 0 else math.nan,
        avg_collateral_open=coll_total / open_notional_total if open_notional_total > 0 else math.nan,
        collateral_locked=coll_total,
        exposure=exposure,
        max_im_increase_1d=max_increase(im_pub, round(bpd)),
        max_im_increase_5d=max_increase(im_pub, round(5 * bpd)),
        max_im_increase_10d=max_increase(im_pub, round(10 * bpd)),
        peak_to_trough=float(im_pub.max() / im_pub.min()),
        ledger_residual=max_resid,
        n_positions=n_pos,
        topups=n_topups,
        topup_amount=topup_amount,
        penalties=float(ledger.penalties),
        fees=float(ledger.fees),
        funding=float(ledger.funding),
        fund_end=float(fund),
        series=series,
        breaches=breaches,
        per_position=pp,
        meta={"window": [str(times[i0]), str(times[i1])], "frozen": cfg.frozen, "mm_binds": path.mm_binds},
    )


def reference_backtest(
    bars: pd.DataFrame,
    path: MarginPath,
    population: Population,
    cfg: BacktestConfig | None = None,
    *,
    start: Any = None,
    end: Any = None,
) -> dict[str, np.ndarray]:
    """Plain per-position loop (Python floats, no NumPy in the loop): the reference for the tests.

    Each position is replayed on its own over its bars with the formulas of docs/margin.md; the fund is
    left out (it does not change per-position outcomes), so it matches :func:`run_backtest` only when
    positions are independent: volume slippage off (``cfg.frozen`` or no volume column).

    Returns per-position arrays ``liquidations`` (0/1), ``liquidation_events``, ``bad_debt``, ``collateral``, ``topups`` and ``open_bar``
    for the positions opening in the window, in population order.
    """
    cfg = cfg or BacktestConfig()
    px = _check_inputs(bars, path, population)
    times = pd.DatetimeIndex(bars.index)
    i0, i1 = window_bounds(times, start, end)
    st = cfg.settings
    pc = population.cfg
    o_, h_, l_, c_ = (px[k].tolist() for k in ("open", "high", "low", "close"))
    fr = (population.funding_series(len(c_)) if cfg.funding_rate is None
          else np.broadcast_to(np.asarray(cfg.funding_rate, dtype=np.float64), (len(c_),)))
    fr = fr.tolist() if cfg.funding else [0.0] * len(c_)
    im_rate = np.asarray(path.im_rate, dtype=np.float64).tolist()
    mm_rate = np.asarray(path.mm_rate, dtype=np.float64).tolist()
    pend = None if path.mm_pending is None else np.asarray(path.mm_pending, dtype=np.float64).tolist()
    entry_mode = path.mm_binds == "entry"
    topup_on = cfg.topups and pc.topup_max > 0 and pc.topup_prob > 0
    max_steps = int(cfg.max_steps_per_bar)
    ob = population.open_bar
    lo_ptr = int(ob.searchsorted(i0, side="left"))
    hi_ptr = int(ob.searchsorted(i1, side="left"))
    out = {k: [] for k in ("liquidations", "liquidation_events", "bad_debt", "collateral", "topups", "open_bar")}
    for p in range(lo_ptr, hi_ptr):
        t0 = int(ob[p])
        sd = float(population.side[p])
        n = float(population.notional[p])
        im = im_rate[t0]
        w = n * max(1.0 / float(population.leverage_draw[p]), im)
        w0 = w
        en = c_[t0]
        q = n / en
        mmr_fixed = mm_rate[t0]
        close_bar = min(t0 + int(population.hold_bars[p]), i1)
        left = pc.topup_max if (topup_on and float(population.topup_u[p]) < pc.topup_prob) else 0
        liq = 0
        bad = 0.0
        coll = 0.0
        tops = 0
        for t in range(t0 + 1, close_bar + 1):
            ot, ht, lt, ct = o_[t], h_[t], l_[t], c_[t]
            w += -sd * q * (ot * fr[t])
            coll += w
            mr = mmr_fixed if entry_mode else mm_rate[t - 1]
            closed = False
            for _step in range(max_steps):
                lp = (en - sd * w / q) / (1.0 - sd * mr)
                if not ((sd > 0 and lp >= lt) or (sd < 0 and lp <= ht)):
                    break
                liq += 1
                fill = min(lp, ot) if sd > 0 else max(lp, ot)
                fill = max(fill, 0.0)
                nf = q * fill
                rng = (ht - lt) / ot if ot > 0 else 0.0
                s = st.slippage_base + st.slippage_range_coef * rng  # volume term off (independent positions)
                eq = w + sd * q * (fill - en)
                mm = mr * nf
                cost = nf * (st.penalty_rate + s)
                e = min(eq, mm)
                if mm <= 0 or e > mm:
                    f = 0.0
                else:
                    hm = st.target_health * mm
                    fr_ = (hm - e) / (hm - cost) if hm != cost else math.inf
                    ok = e > cost and hm > cost and fr_ <= st.max_close_fraction and fr_ > 0
                    f = min(math.nextafter(fr_, math.inf), 1.0) if ok else 1.0
                cq = f * q
                realised = sd * cq * (fill - en)
                slip = cq * fill * s
                e_s = eq - slip
                pen_due = cq * fill * st.penalty_rate
                if f >= 1.0:
                    bad += max(-e_s, 0.0)
                    q = 0.0
                    closed = True
                    break
                w = w + realised - slip - pen_due
                q = q - cq
            if closed:
                break
            if t == close_bar:
                bad += max(-(w + sd * q * (ct - en)), 0.0)  # below bankruptcy at the close (after a partial)
                break
            if left > 0:
                eqc = w + sd * q * (ct - en)
                mrc = mmr_fixed if entry_mode else (mm_rate[t] if pend is None or not pend[t] > mm_rate[t]
                                                   else pend[t])
                need = pc.call_health * mrc * q * ct
                if eqc < need:
                    w += max(pc.topup_level * w0, need) - eqc
                    left -= 1
                    tops += 1
        out["liquidations"].append(1 if liq else 0)
        out["liquidation_events"].append(liq)
        out["bad_debt"].append(bad)
        out["collateral"].append(coll)
        out["topups"].append(tops)
        out["open_bar"].append(t0)
    return {k: np.asarray(v, dtype=np.int64 if k == "open_bar" else np.float64) for k, v in out.items()}
