"""The ``bound``: a perfect-foresight relaxation that no deployable margin policy can beat.

What it contains
----------------
Every control a deployable policy has: an IM per cohort (the positions opening at one close share it, as
they share a published IM) chosen on a continuum in (0, 1] knowing the future, and a maintenance margin
chosen per POSITION and per bar knowing the future (so every MM path, with or without notice or change
caps, and every MM fixed at entry, is one of its choices). A position is then liquidated only when no MM
could have saved it: when its equity would otherwise reach zero (the price crosses its bankruptcy price)
and, for a trader who tops up on margin calls, top-ups could not have kept it above zero either.

Scored in the frozen setting (volume slippage off, so positions are independent; top-ups as drawn), per
position and IM level ``g`` (entry margin ``w0 = notional × max(1/leverage, g)``) it offers:

* *survive*: no liquidation, no bad debt, collateral ``Σ_t w_t`` over the bars held — for a position that
  does not top up ``w_t = w0 - P_t`` (``P_t`` the funding paid by bar ``t``), feasible only when
  ``w0 > max_t M_t`` with ``M_t = need_t + P_t`` and ``need_t`` the loss at the bar's adverse extreme; for a
  position that tops up, the least margin path that never reaches zero (top-ups only add margin, from the
  close of its first bar on): ``w_t + P_t = max(w0, max_{s<=t} M_s)``, feasible when ``w0 > M_{first bar}``;
* *liquidate*: one liquidation, no bad debt, collateral of its first bar only ``w0 - P_{t0+1}`` (every
  liquidated position locks at least that much).

Every deployable policy's outcome for a position is no better on all three counts than one of these
(it liquidates a position whose price crosses bankruptcy, its top-ups are at least the least path's, bad
debt is >= 0), so for any collateral budget ``c`` the bound's liquidations ``L*(c)`` are at most any
deployable policy's at collateral <= ``c`` with any bad debt. ``L*(c)`` is computed by Lagrangian
duality: for a multiplier ``λ`` each cohort picks the IM minimising ``Σ_p min(options: L + λ C)`` (the
cohort's cost is non-decreasing in IM between the positions' survival thresholds, so only those thresholds
are candidates: the minimum is exact, no grid), and ``L*(c)`` is read off the lower convex hull of the
``(C(λ), L(λ))`` points, itself a lower bound of the integer programme. A "share of the bound" above 1
therefore means a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from backtest.population import Population
from backtest.simulation import BacktestConfig, ohlcv_arrays, window_bounds

__all__ = ["ClairvoyantBound", "BoundPoint", "clairvoyant_bound"]


@dataclass(frozen=True)
class BoundPoint:
    """The bound at one average collateral (``avg_collateral`` = collateral locked / exposure)."""

    avg_collateral: float
    liquidations: float
    bad_debt: float
    lam: float | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"avg_collateral": self.avg_collateral, "liquidations": self.liquidations, "bad_debt": self.bad_debt,
                "lam": self.lam, "reason": self.reason}


@dataclass(frozen=True)
class ClairvoyantBound:
    """Per (cohort candidate IM, position) options of the relaxation (see the module docstring).

    Arrays over pairs: ``pair_cand`` (candidate index), ``surv_ok`` (survival feasible), ``surv_coll``,
    ``liq_coll`` (USD·bars); over candidates: ``cand_cohort``, ``cand_im``; ``exposure`` (USD·bars, the
    simulation's denominator for ``avg_collateral``).
    """

    pair_cand: np.ndarray
    surv_ok: np.ndarray
    surv_coll: np.ndarray
    liq_coll: np.ndarray
    cand_cohort: np.ndarray
    cand_im: np.ndarray
    exposure: float
    n_positions: int

    def solve(self, lam: float) -> tuple[float, float, np.ndarray]:
        """``(liquidations, collateral, chosen candidate per cohort)`` minimising ``L + lam × C``."""
        surv_cost = np.where(self.surv_ok, lam * self.surv_coll, np.inf)
        liq_cost = 1.0 + lam * self.liq_coll
        take_surv = surv_cost <= liq_cost
        cost = np.where(take_surv, surv_cost, liq_cost)
        n_c = self.cand_im.size
        cand_cost = np.bincount(self.pair_cand, weights=cost, minlength=n_c)
        cand_liq = np.bincount(self.pair_cand, weights=(~take_surv).astype(np.float64), minlength=n_c)
        cand_coll = np.bincount(self.pair_cand, weights=np.where(take_surv, self.surv_coll, self.liq_coll),
                                minlength=n_c)
        # per cohort: the candidate with the least cost (ties: the lower IM, listed first)
        order = np.lexsort((np.arange(n_c), cand_cost, self.cand_cohort))
        first = np.r_[True, self.cand_cohort[order][1:] != self.cand_cohort[order][:-1]]
        chosen = order[first]
        return float(cand_liq[chosen].sum()), float(cand_coll[chosen].sum()), chosen

    def at(self, avg_collateral: float, iters: int = 60) -> BoundPoint:
        """The bound's liquidations at ``avg_collateral`` (lower convex hull; bisection on ``lam``)."""
        c = float(avg_collateral)
        if not math.isfinite(c) or self.exposure <= 0:
            return BoundPoint(c, math.nan, 0.0, None, "no exposure in the window or collateral not finite")
        target = c * self.exposure
        l0, c0, _ = self.solve(0.0)
        if c0 <= target:
            return BoundPoint(c, l0, 0.0, 0.0)
        scale = self.exposure / max(self.n_positions, 1)
        hi = 1.0 / scale
        while self.solve(hi)[1] > target and hi < 1e12 / scale:
            hi *= 10.0
        lh, ch, _ = self.solve(hi)
        if ch > target:
            return BoundPoint(c, math.nan, 0.0, None,
                              f"avg_collateral {c:.4g} is below the least the bound can lock ({ch / self.exposure:.4g})")
        lo = 0.0
        ll, cl = l0, c0
        for _ in range(iters):
            mid = 0.5 * (lo + hi) if lo == 0.0 else math.sqrt(lo * hi)
            lm, cm, _ = self.solve(mid)
            if cm > target:
                lo, ll, cl = mid, lm, cm
            else:
                hi, lh, ch = mid, lm, cm
        # on the hull between the two solutions around the target (exact at a vertex)
        w = 0.0 if cl == ch else (cl - target) / (cl - ch)
        return BoundPoint(c, (1.0 - w) * ll + w * lh, 0.0, hi)


def clairvoyant_bound(bars: pd.DataFrame, population: Population, cfg: BacktestConfig | None = None, *,
                      start: Any = None, end: Any = None) -> ClairvoyantBound:
    """Build the relaxation's options for the positions opening in ``[start, end)`` (see the module docstring).

    Uses the simulation's conventions: funding at each bar's open, collateral recorded before liquidation,
    positions held from the bar after their entry close to ``min(entry + hold, last bar)``.
    """
    cfg = (cfg or BacktestConfig()).frozen_copy()
    px = ohlcv_arrays(bars)
    n = len(bars)
    if population.n_bars != n:
        raise ValueError(f"population was drawn for {population.n_bars} bars but bars has {n}")
    times = pd.DatetimeIndex(bars.index)
    i0, i1 = window_bounds(times, start, end)
    o_, h_, l_, c_ = px["open"], px["high"], px["low"], px["close"]
    if cfg.funding:
        fr = (population.funding_series(n) if cfg.funding_rate is None
              else np.broadcast_to(np.asarray(cfg.funding_rate, dtype=np.float64), (n,)).copy())
    else:
        fr = np.zeros(n)
    F = np.cumsum(o_ * fr)  # funding per unit long, cumulative to each bar's open
    pc = population.cfg
    ob = population.open_bar
    lo_ptr = int(ob.searchsorted(i0, side="left"))
    hi_ptr = int(ob.searchsorted(i1, side="left"))
    idx = np.arange(lo_ptr, hi_ptr)
    t0 = ob[idx].astype(np.int64)
    cb = np.minimum(t0 + population.hold_bars[idx].astype(np.int64), i1)
    H = cb - t0
    side = population.side[idx].astype(np.float64)
    notional = population.notional[idx].astype(np.float64)
    en = c_[t0]
    q = notional / en
    a = 1.0 / population.leverage_draw[idx].astype(np.float64)
    topping = (cfg.topups and pc.topup_max > 0 and pc.topup_prob > 0) & (population.topup_u[idx] < pc.topup_prob)
    exposure = float(np.dot(notional, H.astype(np.float64)))
    # flattened bars held: position k, bars t0+1 .. cb
    seg = np.repeat(np.arange(idx.size), H)
    starts = np.r_[0, np.cumsum(H)[:-1]]
    tt = t0[seg] + 1 + (np.arange(seg.size) - starts[seg])
    sd = side[seg]
    P = sd * q[seg] * (F[tt] - F[t0[seg]])  # funding paid by bar t
    need = np.where(sd > 0, q[seg] * (en[seg] - l_[tt]), q[seg] * (h_[tt] - en[seg]))
    M = need + P
    P_sum = np.bincount(seg, weights=P, minlength=idx.size)
    P_first = P[starts] if seg.size else np.zeros(0)
    M_first = M[starts] if seg.size else np.zeros(0)
    r = np.maximum.reduceat(M, starts) if seg.size else np.zeros(0)
    RM = pd.Series(M).groupby(seg).cummax().to_numpy() if seg.size else np.zeros(0)
    # candidates per cohort: IM just above each position's survival threshold (rate of notional), and 0+
    thr = np.where(topping, M_first, r) / notional
    cohort = t0
    uniq, cohort_id = np.unique(cohort, return_inverse=True)
    eps = 1e-12
    c_cohort = [np.arange(uniq.size)]
    c_im = [np.full(uniq.size, eps)]
    ok = (thr > a) & (thr * (1 + 1e-12) < 1.0)
    c_cohort.append(cohort_id[ok])
    c_im.append(np.minimum(thr[ok] * (1 + 1e-12) + 1e-15, 1.0))
    cand_cohort = np.concatenate(c_cohort)
    cand_im = np.concatenate(c_im)
    o = np.lexsort((cand_im, cand_cohort))
    cand_cohort, cand_im = cand_cohort[o], cand_im[o]
    # pairs: every candidate of a cohort with every position of that cohort
    pos_by_cohort = np.argsort(cohort_id, kind="stable")
    cnt = np.bincount(cohort_id, minlength=uniq.size)
    first_pos = np.r_[0, np.cumsum(cnt)[:-1]]
    n_per_cand = cnt[cand_cohort]
    pair_cand = np.repeat(np.arange(cand_im.size), n_per_cand)
    pstart = np.r_[0, np.cumsum(n_per_cand)[:-1]]
    within = np.arange(pair_cand.size) - pstart[pair_cand]
    pair_pos = pos_by_cohort[first_pos[cand_cohort[pair_cand]] + within]
    w0 = notional[pair_pos] * np.maximum(a[pair_pos], cand_im[pair_cand])
    surv_ok = np.where(topping[pair_pos], w0 > M_first[pair_pos], w0 > r[pair_pos])
    surv_coll = H[pair_pos] * w0 - P_sum[pair_pos]
    # a trader who tops up: the least margin path Σ_t max(w0, running max of M) - Σ P
    tp = np.flatnonzero(topping[pair_pos])
    if tp.size:
        for k in np.unique(pair_pos[tp]):
            sel = tp[pair_pos[tp] == k]
            rm = RM[starts[k]:starts[k] + H[k]]
            csum = np.r_[0.0, np.cumsum(rm)]
            j = np.searchsorted(rm, w0[sel], side="left")  # bars whose running max is below w0
            surv_coll[sel] = w0[sel] * j + (csum[-1] - csum[j]) - P_sum[k]
    liq_coll = w0 - P_first[pair_pos]
    return ClairvoyantBound(pair_cand=pair_cand, surv_ok=surv_ok, surv_coll=surv_coll, liq_coll=liq_coll,
                            cand_cohort=cand_cohort, cand_im=cand_im, exposure=exposure, n_positions=int(idx.size))
