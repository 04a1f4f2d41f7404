"""Cascade engine: the backtest's bar-by-bar replay, with liquidations that move the price within the bar.

The bar loop follows :mod:`backtest.simulation` step for step (funding at the open, collateral locked,
liquidation against the bar's range with the MM published at the previous close, scheduled closes, margin
calls, new positions at the close, the :class:`margin.liquidation.Ledger` identity), and every liquidation is
the engine's :func:`margin.liquidation.liquidate_isolated`. What it adds is the feedback inside step 3:

1. **wave 1**: every open position whose liquidation price the bar's range reaches is liquidated; partially
   closed positions whose new liquidation price is still inside the range step again (the engine's rule,
   called once per step, at most ``max_steps_per_bar`` steps per position and bar, as in the backtest);
2. the wave's liquidation flow (longs sell, shorts buy; USD at the fill, less what market makers absorb)
   moves the price through the :class:`stress.impact.ImpactModel`: the bar's low falls by the impact of the
   bar's cumulative sells, its high rises by that of its buys, its close moves by the net;
3. positions the extended range now reaches form **wave 2**, and so on until no position is reached (or
   ``max_waves``). ``cascade_depth`` of a bar is the number of waves that liquidated something.

The market price is the exogenous bars times ``exp(u)``, ``u`` the accumulated log impact (liquidations and
the agents of :mod:`stress.agents`), of which the share ``resilience`` decays per bar. The venue marks with
the :class:`stress.impact.Oracle` (the ideal oracle marks with the market bars). With the impact, volume
slippage (``backtest.frozen`` or no volume), the agents and the oracle's delay all off, the result equals
:func:`backtest.simulation.run_backtest` on the same bars (tests/test_stress/test_cascade.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from backtest.population import Population
from backtest.simulation import BacktestConfig, ohlcv_arrays, window_bounds
from margin.liquidation import Ledger, liquidate_isolated
from margin.path import MarginPath
from stress.agents import AgentConfig, Agents
from stress.impact import ImpactModel, Oracle, depth_path

log = logging.getLogger(__name__)

__all__ = ["CascadeConfig", "CascadeResult", "run_cascade"]


@dataclass(frozen=True)
class CascadeConfig:
    """Settings of :func:`run_cascade`.

    Parameters
    ----------
    backtest : BacktestConfig
        The backtest's settings (liquidation rule, fund, frozen, top-ups, funding, fees, steps per bar).
    impact : ImpactModel
        Price impact of liquidation and agent flow (``kind="none"``: none).
    oracle : Oracle
        Mark-price oracle (default: ideal, the market's own bars).
    agents : AgentConfig
        Momentum, mean-reversion, noise traders and market makers (default: none).
    max_waves : int
        Most liquidation waves per bar (>= 1).
    snapshot_bar : int, optional
        Bar index at whose open the open book and the fund are copied (``result.snapshot``), for Cover-2.
    """

    backtest: BacktestConfig = field(default_factory=BacktestConfig)
    impact: ImpactModel = field(default_factory=lambda: ImpactModel(kind="none"))
    oracle: Oracle = field(default_factory=Oracle)
    agents: AgentConfig = field(default_factory=AgentConfig)
    max_waves: int = 100
    snapshot_bar: int | None = None

    def __post_init__(self) -> None:
        if int(self.max_waves) != self.max_waves or self.max_waves < 1:
            raise ValueError(f"cascade.max_waves must be an integer >= 1, got {self.max_waves!r}")


@dataclass(frozen=True)
class CascadeResult:
    """Outcome of one cascade run (amounts USD, prices USD, impacts as fractions of the price).

    Scalars: ``liquidations`` (positions hit at least once), ``liquidation_events`` (engine steps),
    ``liquidated_notional``, ``bad_debt`` (before the fund), ``fund_draw``, ``uncovered_bad_debt``,
    ``fund_end``, ``fund_min`` (lowest fund at a bar's end), ``cascade_depth`` (most waves in one bar),
    ``impact_from_liquidations`` (largest price move the liquidations' own flow caused, inside a bar's
    range or at a close, ``|exp(u_liq) - 1|``), ``ledger_residual``, ``n_positions``, ``penalties``.
    ``series``: per bar ``liquidations``, ``liquidation_events``, ``liquidated_notional``, ``bad_debt``,
    ``fund``, ``waves``, ``mark_low``, ``mark_close``, ``market_close``, ``exog_close``, ``liq_impact``
    (``exp(u_liq) - 1`` at the close), ``agent_flow``, ``open_notional``.
    ``per_position``: optional ``liquidations`` (0/1), ``liquidation_events``, ``bad_debt`` and
    ``liquidated_notional`` (USD at the fill, summed over its steps) per position of the window, in population
    order. ``snapshot``: the open book at ``snapshot_bar`` (``side``, ``qty``,
    ``entry``, ``margin``, ``pid``, ``fund``) or ``None``. ``market_bars``: the market's OHLC after impact.
    """

    liquidations: int
    liquidation_events: int
    liquidated_notional: float
    bad_debt: float
    fund_draw: float
    uncovered_bad_debt: float
    fund_end: float
    fund_min: float
    cascade_depth: int
    impact_from_liquidations: float
    ledger_residual: float
    n_positions: int
    penalties: float
    series: pd.DataFrame
    market_bars: pd.DataFrame
    per_position: dict[str, np.ndarray] | None = None
    snapshot: dict[str, Any] | None = None

    def metrics(self) -> dict[str, float]:
        keys = ("liquidations", "liquidation_events", "liquidated_notional", "bad_debt", "fund_draw",
                "uncovered_bad_debt", "fund_end", "fund_min", "cascade_depth", "impact_from_liquidations",
                "ledger_residual", "n_positions", "penalties")
        return {k: float(getattr(self, k)) for k in keys}


def run_cascade(
    bars: pd.DataFrame,
    path: MarginPath,
    population: Population,
    cfg: CascadeConfig | None = None,
    *,
    start: Any = None,
    end: Any = None,
    per_position: bool = False,
) -> CascadeResult:
    """Replay ``bars`` (the exogenous market) for ``population`` under ``path``, with cascades.

    Parameters
    ----------
    bars : pd.DataFrame
        Exogenous OHLC(V) bars, UTC index, prices USD, volume in base units.
    path : MarginPath
        IM for new positions and MM for open ones, published at each close (same bars).
    population : Population
        Positions drawn for ``len(bars)`` bars (see :mod:`backtest.population`).
    cfg : CascadeConfig, optional
    start, end : timestamp, optional
        Window ``[start, end)`` as in :func:`backtest.simulation.run_backtest`.
    per_position : bool
        Also return per-position outcomes.

    Returns
    -------
    CascadeResult
    """
    cfg = cfg or CascadeConfig()
    bt = cfg.backtest
    px = ohlcv_arrays(bars)
    n = len(bars)
    if len(path.im_rate) != n or not path.times.equals(pd.DatetimeIndex(bars.index)):
        raise ValueError(f"path must be built on the same bars (path has {len(path.im_rate)} bars, bars {n})")
    if population.n_bars != n:
        raise ValueError(f"population was drawn for {population.n_bars} bars but bars has {n}")
    times = pd.DatetimeIndex(bars.index)
    i0, i1 = window_bounds(times, start, end, what="stress")
    settings = bt.settings
    pc = population.cfg
    xo, xh, xl, xc = px["open"], px["high"], px["low"], px["close"]
    if "volume" in px and not bt.frozen:
        vol_usd = np.nan_to_num(px["volume"], nan=0.0) * xc * bt.volume_scale
        vol_usd = np.where(vol_usd > 0, vol_usd, np.inf)
    else:
        vol_usd = np.full(n, np.inf)
    if bt.funding:
        fr = (population.funding_series(n) if bt.funding_rate is None
              else np.broadcast_to(np.asarray(bt.funding_rate, dtype=np.float64), (n,)).copy())
    else:
        fr = np.zeros(n)
    fee_rate = pc.fee_rate if bt.fees else 0.0
    im_rate = np.asarray(path.im_rate, dtype=np.float64)
    mm_rate = np.asarray(path.mm_rate, dtype=np.float64)
    mm_call_rate = mm_rate if path.mm_pending is None else np.fmax(mm_rate, np.asarray(path.mm_pending))
    entry_mode = path.mm_binds == "entry"
    topup_on = bt.topups and pc.topup_max > 0 and pc.topup_prob > 0
    max_steps = int(bt.max_steps_per_bar)
    imp, orc = cfg.impact, cfg.oracle
    agents = Agents(cfg.agents, n)
    agents_on = cfg.agents.active
    depth = depth_path(xc, imp, i0) if imp.active else np.full(n, imp.depth_usd)

    ob = population.open_bar
    lo_ptr = int(ob.searchsorted(i0, side="left"))
    hi_ptr = int(ob.searchsorted(i1, side="left"))
    n_pos = hi_ptr - lo_ptr
    starts = np.minimum(ob.searchsorted(np.arange(i0, i1 + 1), side="left"), hi_ptr)

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
    b_steps = np.zeros(0, dtype=np.int64)
    closes_at = np.zeros(n + 1, dtype=np.int64)

    ledger = Ledger(fund_initial=bt.fund0)
    fund = bt.fund0
    m = i1 - i0 + 1
    s = {k: np.zeros(m) for k in ("liquidations", "liquidation_events", "liquidated_notional", "bad_debt", "fund",
                                  "waves", "mark_low", "mark_close", "market_close", "liq_impact", "agent_flow",
                                  "open_notional")}
    hit = np.zeros(len(population), dtype=bool)
    if per_position:
        pp_ev = np.zeros(len(population))
        pp_bad = np.zeros(len(population))
        pp_liqn = np.zeros(len(population))
    max_resid = 0.0
    snapshot = None
    # market state: log offset of the market over the exogenous bars (total and liquidations' part)
    log_mkt = np.log(xc)  # market log closes (before the window: exogenous)
    # what the agents watch: the market's log closes, or their deviation from the exogenous ones (u at each close)
    watched = log_mkt if cfg.agents.signal == "price" else np.zeros(n)
    u = u_liq = 0.0
    peak = -math.inf
    pub = math.nan  # last oracle publish
    max_liq_move = 0.0
    mm_used = 0.0

    def mark_bar(t: int, lo_m: float, hi_m: float, o_m: float, c_m: float) -> tuple[float, float, float, float]:
        """The venue's mark bar (open, high, low, close) from the market bar, through the oracle."""
        if orc.ideal:
            return o_m, hi_m, lo_m, c_m
        src = t - orc.delay_bars
        cand = c_m if src == t else float(math.exp(log_mkt[src])) if src >= 0 else float(xc[0])
        first = pub if math.isfinite(pub) else float(math.exp(log_mkt[t - 1])) if t > 0 else cand
        close = orc.publish(first, cand)
        return first, max(first, close), min(first, close), close

    for t in range(i0, i1 + 1):
        j = t - i0
        # market bar before liquidations: decayed impact plus the agents' flow at the open
        u *= 1.0 - imp.resilience
        u_liq *= 1.0 - imp.resilience
        dd = 1.0 - math.exp(log_mkt[t - 1]) / peak if (t > i0 and peak > 0) else 0.0
        d_t = imp.depth_at(float(depth[t]), dd) if imp.active else math.inf
        stress_t = imp.stress(dd)
        a_flow = agents.flow(t, watched) if agents_on else 0.0
        if a_flow and imp.active:
            u += imp.log_impact(a_flow, d_t)
        e_u = math.exp(u)
        mo, mh, ml, mc = xo[t] * e_u, xh[t] * e_u, xl[t] * e_u, xc[t] * e_u
        ot, hi_t, lo_t, ct = mark_bar(t, ml, mh, mo, mc)
        sells = buys = 0.0
        waves = 0
        mm_used = 0.0
        if t == cfg.snapshot_bar:
            snapshot = {"side": b_side.copy(), "qty": b_qty.copy(), "entry": b_entry.copy(),
                        "margin": b_margin.copy(), "pid": b_pid.copy(), "fund": fund}
        if b_qty.size:
            # 1. funding at the (mark) open
            if fr[t] != 0.0:
                pay = -b_side * b_qty * (ot * fr[t])
                b_margin += pay
                ledger.funding += float(pay.sum())
            s["open_notional"][j] = float(b_qty.sum()) * ot
            # 3. liquidation waves
            mm = b_mm if entry_mode else mm_rate[t - 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                lp = (b_entry - b_side * b_margin / b_qty) / (1.0 - b_side * mm)
            touched: list[np.ndarray] = []
            cur_lo, cur_hi = lo_t, hi_t
            cand = np.flatnonzero(np.where(b_long, lp >= cur_lo, lp <= cur_hi))
            while cand.size and waves < cfg.max_waves:
                waves += 1
                sub = cand
                wave_sell = wave_buy = 0.0
                while sub.size:
                    sub = sub[b_steps[sub] < max_steps]
                    if not sub.size:
                        break
                    mm_sub = mm[sub] if entry_mode else mm
                    res = liquidate_isolated(b_side[sub], b_qty[sub], b_entry[sub], b_margin[sub], mm_sub, ot,
                                             cur_hi, cur_lo, ct, settings, fund, bar_volume=vol_usd[t])
                    k_idx = sub[res.index]
                    if not k_idx.size:
                        break
                    b_qty[sub] = res.qty_after
                    b_margin[sub] = res.margin_after
                    b_steps[k_idx] += 1
                    touched.append(k_idx)
                    ledger.record_liquidation(res)
                    fund = res.fund_after
                    pid_k = b_pid[k_idx]
                    s["liquidations"][j] += int((~hit[pid_k]).sum())
                    hit[pid_k] = True
                    s["liquidation_events"][j] += k_idx.size
                    s["liquidated_notional"][j] += res.totals["liquidated_notional"]
                    s["bad_debt"][j] += res.totals["bad_debt"]
                    notional = res.closed_qty * res.fill_price
                    if per_position:
                        pp_ev[pid_k] += 1.0
                        pp_bad[pid_k] += res.bad_debt
                        pp_liqn[pid_k] += notional
                    longs = b_long[k_idx]
                    wave_sell += float(notional[longs].sum())
                    wave_buy += float(notional[~longs].sum())
                    with np.errstate(divide="ignore", invalid="ignore"):
                        q_k = b_qty[k_idx]
                        mk = mm[k_idx] if entry_mode else mm
                        lp[k_idx] = (b_entry[k_idx] - b_side[k_idx] * b_margin[k_idx] / q_k) / (1.0 - b_side[k_idx] * mk)
                    sub = k_idx[~res.full]
                if not imp.active:
                    break
                flow = wave_buy - wave_sell
                if agents_on:
                    flow, mm_used = agents.absorb(flow, mm_used, stress_t, imp.lp_withdrawal)
                if flow > 0:
                    buys += flow
                else:
                    sells -= flow
                ml2 = ml * math.exp(imp.log_impact(-sells, d_t))
                mh2 = mh * math.exp(imp.log_impact(buys, d_t))
                mc2 = mc * math.exp(imp.log_impact(buys - sells, d_t))
                _, nhi, nlo, nct = mark_bar(t, ml2, mh2, mo, mc2)
                ct = nct
                if not (nlo < cur_lo or nhi > cur_hi):
                    break
                cur_lo, cur_hi = min(cur_lo, nlo), max(cur_hi, nhi)
                live = b_qty > 0
                cand = np.flatnonzero(live & np.where(b_long, lp >= cur_lo, lp <= cur_hi))
            for k_idx in touched:
                b_steps[k_idx] = 0
            lo_t, hi_t = cur_lo, cur_hi
        net = imp.log_impact(buys - sells, d_t) if imp.active else 0.0
        low_move = imp.log_impact(-sells, d_t) if imp.active else 0.0
        high_move = imp.log_impact(buys, d_t) if imp.active else 0.0
        max_liq_move = max(max_liq_move, abs(math.expm1(u_liq + low_move)), abs(math.expm1(u_liq + high_move)))
        u += net
        u_liq += net
        log_mkt[t] = math.log(xc[t]) + u
        if agents_on and watched is not log_mkt:
            watched[t] = u
        peak = max(peak, math.exp(log_mkt[t]))
        if not orc.ideal:
            pub = ct
        ct = mc * math.exp(net) if orc.ideal else ct
        s["waves"][j] = waves
        s["mark_low"][j] = lo_t
        s["mark_close"][j] = ct
        s["market_close"][j] = math.exp(log_mkt[t])
        s["liq_impact"][j] = math.expm1(u_liq)
        s["agent_flow"][j] = a_flow
        if b_qty.size:
            # 4. scheduled closes (and the end of the window)
            closing = b_close <= t if (closes_at[t] or t == i1) else None
            if closing is not None:
                q, sd, en, w = b_qty[closing], b_side[closing], b_entry[closing], b_margin[closing]
                realised = sd * q * (ct - en)
                eq = w + realised
                fee = np.minimum(fee_rate * q * ct, np.maximum(eq, 0.0))
                bad = np.maximum(-eq, 0.0)
                ledger.realised_pnl += float(realised.sum())
                ledger.fees += float(fee.sum())
                ledger.withdrawn += float(np.maximum(eq - fee, 0.0).sum())
                tb = float(bad.sum())
                if tb > 0:
                    draw = min(tb, fund)
                    fund -= draw
                    ledger.bad_debt += tb
                    ledger.fund_draw += draw
                    ledger.uncovered_bad_debt += tb - draw
                    s["bad_debt"][j] += tb
                    if per_position:
                        pp_bad[b_pid[closing]] += bad
                b_qty[closing] = 0.0
                b_margin[closing] = 0.0
            # closed positions stay in the book with qty 0 (inert: no trigger, no funding) until they are a
            # quarter of it, then the book is compacted (a copy of every array costs more than the zeros)
            dead = int(np.count_nonzero(b_qty <= 0.0))
            if dead and (dead * 4 >= b_qty.size or t == i1):
                keep = b_qty > 0.0
                b_side, b_qty, b_entry, b_margin = b_side[keep], b_qty[keep], b_entry[keep], b_margin[keep]
                b_long, b_w0, b_mm, b_close = b_long[keep], b_w0[keep], b_mm[keep], b_close[keep]
                b_left, b_pid, b_steps = b_left[keep], b_pid[keep], b_steps[keep]
        if t < i1:
            # 5. margin calls at the close
            if topup_on and b_qty.size:
                callable_ = (b_left > 0) & (b_qty > 0.0)
                if callable_.any():
                    eq = b_margin + b_side * b_qty * (ct - b_entry)
                    need = pc.call_health * (b_mm if entry_mode else mm_call_rate[t]) * b_qty * ct
                    call = callable_ & (eq < need)
                    if call.any():
                        amt = np.maximum(pc.topup_level * b_w0[call], need[call]) - eq[call]
                        b_margin[call] += amt
                        b_left[call] -= 1
                        ledger.top_ups += float(amt.sum())
            # 6. new positions at the close
            p0, p1 = int(starts[j]), int(starts[j + 1]) if j + 1 < len(starts) else hi_ptr
            if p1 > p0:
                sl = slice(p0, p1)
                notional = population.notional[sl]
                w = notional * np.maximum(1.0 / population.leverage_draw[sl], im_rate[t])
                fee = fee_rate * notional
                ledger.deposits += float(w.sum() + fee.sum())
                ledger.fees += float(fee.sum())
                close_bar = np.minimum(t + population.hold_bars[sl], i1)
                if topup_on:
                    left = np.where(population.topup_u[sl] < pc.topup_prob, pc.topup_max, 0).astype(np.int64)
                else:
                    left = np.zeros(p1 - p0, dtype=np.int64)
                np.add.at(closes_at, close_bar, 1)
                b_side = np.concatenate((b_side, population.side[sl]))
                b_long = np.concatenate((b_long, population.side[sl] > 0))
                b_qty = np.concatenate((b_qty, notional / ct))
                b_entry = np.concatenate((b_entry, np.full(p1 - p0, ct)))
                b_margin = np.concatenate((b_margin, w))
                b_w0 = np.concatenate((b_w0, w))
                b_mm = np.concatenate((b_mm, np.full(p1 - p0, mm_rate[t])))
                b_close = np.concatenate((b_close, close_bar))
                b_left = np.concatenate((b_left, left))
                b_pid = np.concatenate((b_pid, np.arange(p0, p1)))
                b_steps = np.concatenate((b_steps, np.zeros(p1 - p0, dtype=np.int64)))
        # 7. accounting identity
        res_ = ledger.residuals(float(b_margin.sum()), fund)
        rel = max(abs(v) for v in res_.values()) / ledger.scale()
        max_resid = max(max_resid, rel)
        s["fund"][j] = fund

    wtimes = times[i0:i1 + 1]
    series = pd.DataFrame(s, index=wtimes)
    series["exog_close"] = xc[i0:i1 + 1]
    mk = np.exp(log_mkt[i0:i1 + 1] - np.log(xc[i0:i1 + 1]))
    prev = np.concatenate(([1.0], mk[:-1]))
    market_bars = pd.DataFrame({"open": xo[i0:i1 + 1] * prev, "high": np.maximum(xh[i0:i1 + 1] * prev, series["market_close"]),
                                "low": np.minimum(xl[i0:i1 + 1] * prev, series["market_close"]),
                                "close": series["market_close"].to_numpy()}, index=wtimes)
    pp = None
    if per_position:
        idx = slice(lo_ptr, hi_ptr)
        pp = {"liquidations": hit[idx].astype(np.float64), "liquidation_events": pp_ev[idx], "bad_debt": pp_bad[idx],
              "liquidated_notional": pp_liqn[idx]}
    return CascadeResult(
        liquidations=int(series["liquidations"].sum()),
        liquidation_events=int(series["liquidation_events"].sum()),
        liquidated_notional=float(series["liquidated_notional"].sum()),
        bad_debt=float(ledger.bad_debt),
        fund_draw=float(ledger.fund_draw),
        uncovered_bad_debt=float(ledger.uncovered_bad_debt),
        fund_end=float(fund),
        fund_min=float(min(series["fund"].min(), bt.fund0)),
        cascade_depth=int(series["waves"].max()),
        impact_from_liquidations=float(max_liq_move),
        ledger_residual=max_resid,
        n_positions=n_pos,
        penalties=float(ledger.penalties),
        series=series,
        market_bars=market_bars,
        per_position=pp,
        snapshot=snapshot,
    )
