"""Plain per-position loop of the cascade engine (Python floats): the reference for tests and the benchmark.

Each bar: funding at the open, then waves: every open position is checked one by one against the bar's
current range and liquidated step by step with the formulas of docs/margin.md (partial close to
``target_health``, full close with penalty and bad debt), the wave's flow moves the range through the impact
model, until a wave liquidates nothing new; then scheduled closes and new positions. It supports what the
benchmark and the tests switch on (impact, funding, fees, steps per bar) and requires top-ups, agents,
volume slippage and the oracle's delay off (:func:`reference_cascade` raises otherwise). The fund is applied
per wave (penalties in, then the wave's bad debt drawn), which equals the engine's per call as long as the
fund does not run dry inside a wave.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from backtest.population import Population
from backtest.simulation import ohlcv_arrays, window_bounds
from margin.path import MarginPath
from stress.cascade import CascadeConfig
from stress.impact import depth_path

__all__ = ["reference_cascade"]


def reference_cascade(bars: pd.DataFrame, path: MarginPath, population: Population, cfg: CascadeConfig,
                      *, start: Any = None, end: Any = None) -> dict[str, Any]:
    """Per-position loop; returns ``liquidated_notional``, ``bad_debt``, ``fund`` (per bar), ``waves`` (per bar),
    ``events`` and per-position ``bad_debt`` / ``liquidation_events`` in population order (window only)."""
    bt = cfg.backtest
    pc = population.cfg
    if (bt.topups and pc.topup_max > 0 and pc.topup_prob > 0) or cfg.agents.active or not cfg.oracle.ideal:
        raise ValueError("reference_cascade needs backtest.topups off (or no top-ups), no agents and the ideal oracle")
    if "volume" in bars.columns and not bt.frozen and bt.liquidation.slippage_volume_coef > 0:
        raise ValueError("reference_cascade needs volume slippage off (backtest.frozen)")
    if path.mm_binds != "path":
        raise ValueError("reference_cascade supports mm_binds='path' only")
    st = bt.settings
    imp = cfg.impact
    px = ohlcv_arrays(bars)
    o_, h_, l_, c_ = (px[k].tolist() for k in ("open", "high", "low", "close"))
    n = len(c_)
    times = pd.DatetimeIndex(bars.index)
    i0, i1 = window_bounds(times, start, end, what="stress")
    fr = population.funding_series(n).tolist() if bt.funding else [0.0] * n
    if bt.funding and bt.funding_rate is not None:
        fr = np.broadcast_to(np.asarray(bt.funding_rate, dtype=np.float64), (n,)).tolist()
    fee_rate = pc.fee_rate if bt.fees else 0.0
    im_rate, mm_rate = path.im_rate.tolist(), path.mm_rate.tolist()
    depth = depth_path(np.asarray(c_), imp, i0).tolist() if imp.active else [imp.depth_usd] * n
    ob = population.open_bar
    lo_ptr, hi_ptr = int(ob.searchsorted(i0, side="left")), int(ob.searchsorted(i1, side="left"))
    book: list[list[float]] = []  # [pid, side, qty, entry, margin, close_bar]
    fund = bt.fund0
    u = 0.0
    peak = -math.inf
    logc = [math.log(x) for x in c_]
    out_fund, out_waves = [], []
    liqn = bad_total = 0.0
    events = 0
    pp_bad = [0.0] * len(population)
    pp_ev = [0.0] * len(population)
    nxt = lo_ptr
    for t in range(i0, i1 + 1):
        u *= 1.0 - imp.resilience
        dd = 1.0 - math.exp(logc[t - 1]) / peak if (t > i0 and peak > 0) else 0.0
        d_t = imp.depth_at(depth[t], dd) if imp.active else math.inf
        e_u = math.exp(u)
        ot, ht, lt, ct0 = o_[t] * e_u, h_[t] * e_u, l_[t] * e_u, c_[t] * e_u
        for p in book:
            p[4] += -p[1] * p[2] * (ot * fr[t])
        mr = mm_rate[t - 1]
        sells = buys = 0.0
        lo, hi = lt, ht
        waves = 0
        steps = {}
        while waves < cfg.max_waves:
            w_sell = w_buy = 0.0
            pens = bads = 0.0
            any_liq = False
            # the engine's slippage uses the range in force (it widens with the impact of earlier waves)
            s = st.slippage_base + st.slippage_range_coef * ((hi - lo) / ot if ot > 0 else 0.0)
            for p in book:
                pid, sd, q, en, w = int(p[0]), p[1], p[2], p[3], p[4]
                while q > 0 and steps.get(pid, 0) < bt.max_steps_per_bar:
                    lp = (en - sd * w / q) / (1.0 - sd * mr)
                    if not ((sd > 0 and lp >= lo) or (sd < 0 and lp <= hi)):
                        break
                    any_liq = True
                    steps[pid] = steps.get(pid, 0) + 1
                    events += 1
                    pp_ev[pid] += 1
                    fill = max(min(lp, ot) if sd > 0 else max(lp, ot), 0.0)
                    nf = q * fill
                    eq = w + sd * q * (fill - en)
                    mm = mr * nf
                    cost = nf * (st.penalty_rate + s)
                    e = min(eq, mm)
                    hm = st.target_health * mm
                    f_ = (hm - e) / (hm - cost) if hm != cost else math.inf
                    ok = e > cost and hm > cost and 0 < f_ <= st.max_close_fraction
                    f = min(math.nextafter(f_, math.inf), 1.0) if (ok and mm > 0) else 1.0
                    cq = f * q
                    slip = cq * fill * s
                    e_s = eq - slip
                    liqn += cq * fill
                    if sd > 0:
                        w_sell += cq * fill
                    else:
                        w_buy += cq * fill
                    if f >= 1.0:
                        pens += min(max(e_s, 0.0), cq * fill * st.penalty_rate)
                        b = max(-e_s, 0.0)
                        bads += b
                        pp_bad[pid] += b
                        q = 0.0
                        w = 0.0
                    else:
                        pen = cq * fill * st.penalty_rate
                        pens += pen
                        w = w + sd * cq * (fill - en) - slip - pen
                        q = q - cq
                p[2], p[4] = q, w
            if not any_liq:
                break
            waves += 1
            fund += pens
            fund -= min(bads, fund)
            bad_total += bads
            if not imp.active:
                break
            flow = w_buy - w_sell
            if flow > 0:
                buys += flow
            else:
                sells -= flow
            nlo = lt * math.exp(imp.log_impact(-sells, d_t))
            nhi = ht * math.exp(imp.log_impact(buys, d_t))
            if not (nlo < lo or nhi > hi):
                break
            lo, hi = min(lo, nlo), max(hi, nhi)
        net = imp.log_impact(buys - sells, d_t) if imp.active else 0.0
        u += net
        ct = ct0 * math.exp(net)
        logc[t] = math.log(c_[t]) + u
        peak = max(peak, math.exp(logc[t]))
        keep = []
        for p in book:
            if p[2] <= 0:
                continue
            if p[5] <= t:
                eq = p[4] + p[1] * p[2] * (ct - p[3])
                b = max(-eq, 0.0)
                if b > 0:
                    fund -= min(b, fund)
                    bad_total += b
                    pp_bad[int(p[0])] += b
                continue
            keep.append(p)
        book = keep
        if t < i1:
            while nxt < hi_ptr and int(ob[nxt]) == t:
                nt = float(population.notional[nxt])
                w = nt * max(1.0 / float(population.leverage_draw[nxt]), im_rate[t])
                book.append([float(nxt), float(population.side[nxt]), nt / ct, ct, w,
                             float(min(t + int(population.hold_bars[nxt]), i1))])
                nxt += 1
        out_fund.append(fund)
        out_waves.append(waves)
    sl = slice(lo_ptr, hi_ptr)
    return {"liquidated_notional": liqn, "bad_debt": bad_total, "fund": np.asarray(out_fund),
            "waves": np.asarray(out_waves), "events": events, "bad_debt_pp": np.asarray(pp_bad)[sl],
            "liquidation_events_pp": np.asarray(pp_ev)[sl], "fee_rate": fee_rate}
