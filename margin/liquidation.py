"""Health factor, partial/full liquidation, insurance fund, bad debt and auto-deleveraging.

Rules (stated in docs/margin.md, tested in tests/test_margin/test_margin_liquidation.py)
-------------------------------------------------------------------------------------
* Health factor ``HF = (haircut collateral + unrealised P&L) / MM``; an account/position is liquidatable
  when ``HF <= 1`` (for isolated positions: when the bar reaches the liquidation price).
* Fill rule: a long is sold at ``min(L, open)`` (a short bought at ``max(L, open)``): at the trigger price
  ``L``, or at the bar's open when the bar gaps past it; the fill is then worsened by the slippage rate
  ``s = slippage_base + slippage_range_coef * (high - low) / open + slippage_volume_coef * V_liq / V_bar``
  with ``V_liq`` the notional of all positions triggered in the bar (at the fill) and ``V_bar`` the bar's
  notional volume: executed price ``fill * (1 - side * s)``.
* Partial liquidation: with equity ``E`` and maintenance margin ``MM`` at the fill price and close cost
  ``C = N (penalty_rate + s)`` for closing everything (``N`` the notional at the fill), closing a fraction
  ``f`` leaves ``HF(f) = (E - f C) / ((1 - f) MM)``. The rule closes the least ``f`` reaching
  ``target_health`` (> 1): ``f = (h MM - E) / (h MM - C)``, if ``E > C``, ``h MM > C`` and ``f <=
  max_close_fraction``; otherwise it closes everything (so a close never lowers the health factor and a
  healthy account is never touched; ADL excepted).
* Full close: equity after slippage ``E_s = E - N s``; the penalty paid is ``min(penalty_rate N,
  max(E_s, 0))``; ``bad_debt = max(-E_s, 0)`` (loss past bankruptcy, per position, before the fund);
  what is left is returned to the trader.
* Penalties go to the insurance fund; the fund then pays bad debt (``fund_draw``, allocated to positions
  pro rata); what it cannot pay is ``uncovered_bad_debt``, which auto-deleveraging (ADL) assigns to the most
  profitable opposite positions (rank = PnL% × leverage): a deleveraged position closes the fraction of
  itself whose unrealised profit equals its share of the shortfall, at its entry price.

Accounting identity per position and step::

    margin_after = margin_before + realised_pnl - slippage_cost - penalty + bad_debt - returned

and for the system, over any number of steps (``Ledger``)::

    sum(margin) + withdrawn = deposits + top_ups - fees + funding + realised_pnl - penalties - slippage + bad_debt
    fund = fund_initial + penalties - fund_draw
    bad_debt = fund_draw + adl_covered + uncovered_bad_debt
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from margin.isolated import liquidation_price_linear
from margin.params import LiquidationSettings

__all__ = [
    "health_factor",
    "partial_close_fraction",
    "liquidate_accounts",
    "IsolatedLiquidation",
    "liquidate_isolated",
    "auto_deleverage",
    "Ledger",
]


def health_factor(collateral: np.ndarray, unrealised: np.ndarray, mm: np.ndarray) -> np.ndarray:
    """``(collateral + unrealised) / mm``; ``inf`` where ``mm == 0`` (nothing to maintain)."""
    c, u, m = (np.asarray(x, dtype=np.float64) for x in (collateral, unrealised, mm))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m > 0, (c + u) / np.where(m > 0, m, 1.0), np.inf)


def partial_close_fraction(
    equity: np.ndarray,
    mm: np.ndarray,
    close_cost: np.ndarray,
    target_health: float,
    max_close_fraction: float,
) -> np.ndarray:
    """Fraction to close by the partial-liquidation rule (0 when healthy, 1 = full close).

    Parameters
    ----------
    equity : np.ndarray
        Collateral + unrealised P&L at the fill price, USD.
    mm : np.ndarray
        Maintenance margin at the fill price, USD (scales with the open size).
    close_cost : np.ndarray
        Penalty + slippage of closing everything, USD (scales with the closed size).
    target_health : float
        HF the partial close restores (> 1).
    max_close_fraction : float
        Largest fraction one step may close partially.
    """
    e, m, c = (np.asarray(x, dtype=np.float64) for x in (equity, mm, close_cost))
    healthy = (m <= 0) | (e > m)
    hm = target_health * m
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (hm - e) / (hm - c)
    ok = (e > c) & (hm > c) & (f <= max_close_fraction) & (f > 0)
    # guard the rounding of f so that HF(f) >= target_health holds in floating point
    f = np.minimum(np.nextafter(f, np.inf), 1.0)
    return np.where(healthy, 0.0, np.where(ok, f, 1.0))


def liquidate_accounts(
    equity: np.ndarray,
    mm: np.ndarray,
    notional: np.ndarray,
    settings: LiquidationSettings,
    slippage_rate: np.ndarray | float | None = None,
) -> dict[str, np.ndarray]:
    """One liquidation step for cross/portfolio accounts closing every position pro rata.

    Returns ``fraction``, ``penalty``, ``slippage_cost``, ``bad_debt``, ``equity_after``, ``mm_after``
    arrays (USD). Maintenance margin scales with the open size (exact for flat rates and for scenario
    margin with add-ons off; conservative with tiers).
    """
    e, m, n = (np.asarray(x, dtype=np.float64) for x in (equity, mm, notional))
    s = settings.slippage_base if slippage_rate is None else np.asarray(slippage_rate, dtype=np.float64)
    cost = n * (settings.penalty_rate + s)
    f = partial_close_fraction(e, m, cost, settings.target_health, settings.max_close_fraction)
    slip = f * n * s
    e_s = e - slip
    pen = np.clip(e_s, 0.0, f * n * settings.penalty_rate)
    bad = np.where(f >= 1.0, np.maximum(-e_s, 0.0), 0.0)
    e_after = np.where(f >= 1.0, 0.0, e_s - pen)
    return {
        "fraction": f,
        "penalty": pen,
        "slippage_cost": slip,
        "bad_debt": bad,
        "equity_after": e_after,
        "mm_after": (1.0 - f) * m,
    }


@dataclass
class IsolatedLiquidation:
    """Per-position result of one bar of :func:`liquidate_isolated` (arrays of the input length, USD)."""

    triggered: np.ndarray
    full: np.ndarray
    fraction: np.ndarray
    fill_price: np.ndarray
    exec_price: np.ndarray
    closed_qty: np.ndarray
    qty_after: np.ndarray
    margin_after: np.ndarray
    realised_pnl: np.ndarray
    slippage_cost: np.ndarray
    penalty: np.ndarray
    bad_debt: np.ndarray
    fund_draw: np.ndarray
    uncovered_bad_debt: np.ndarray
    returned: np.ndarray
    fund_after: float
    totals: dict[str, float] = field(default_factory=dict)


def liquidate_isolated(
    side: np.ndarray,
    qty: np.ndarray,
    entry: np.ndarray,
    margin: np.ndarray,
    mm_rate: np.ndarray | float,
    bar_open: float,
    bar_high: float,
    bar_low: float,
    bar_close: float,
    settings: LiquidationSettings,
    fund: float,
    bar_volume: float = np.inf,
    contract_size: np.ndarray | float = 1.0,
) -> IsolatedLiquidation:
    """Liquidate isolated linear positions of one market over one OHLC bar, vectorised.

    Parameters
    ----------
    side : np.ndarray
        +1 long / -1 short per position.
    qty : np.ndarray
        Open contracts (>= 0; 0 = closed, ignored).
    entry : np.ndarray
        Entry prices, USD.
    margin : np.ndarray
        Isolated margin balances, USD.
    mm_rate : array_like
        Maintenance rate per position (flat; MM on mark notional).
    bar_open, bar_high, bar_low, bar_close : float
        The bar's mark prices, USD.
    settings : LiquidationSettings
        Penalty, partial-close cap, target health and slippage coefficients.
    fund : float
        Insurance fund before the bar, USD.
    bar_volume : float
        Bar notional volume, USD (``inf``: no volume impact).
    contract_size : array_like
        Underlying units per contract.

    Returns
    -------
    IsolatedLiquidation
        New sizes and margins, flows per position, the fund after the bar and bar totals.
    """
    side = np.asarray(side, dtype=np.float64)
    qty = np.asarray(qty, dtype=np.float64)
    entry = np.asarray(entry, dtype=np.float64)
    margin = np.asarray(margin, dtype=np.float64)
    n_pos = side.shape[0]
    m = np.broadcast_to(np.asarray(mm_rate, dtype=np.float64), (n_pos,))
    cs = np.broadcast_to(np.asarray(contract_size, dtype=np.float64), (n_pos,))
    zeros = np.zeros(n_pos)
    out = IsolatedLiquidation(
        triggered=np.zeros(n_pos, dtype=bool), full=np.zeros(n_pos, dtype=bool), fraction=zeros.copy(),
        fill_price=np.full(n_pos, np.nan), exec_price=np.full(n_pos, np.nan), closed_qty=zeros.copy(),
        qty_after=qty.copy(), margin_after=margin.copy(), realised_pnl=zeros.copy(), slippage_cost=zeros.copy(),
        penalty=zeros.copy(), bad_debt=zeros.copy(), fund_draw=zeros.copy(), uncovered_bad_debt=zeros.copy(),
        returned=zeros.copy(), fund_after=float(fund),
    )
    live = qty > 0
    # cheap trigger test on all positions: long hits when low <= L, short when high >= L
    lp = liquidation_price_linear(side, np.where(live, qty, 1.0), entry, margin, m, 0.0, 0.0, cs)
    trig = live & np.where(side > 0, bar_low <= lp, bar_high >= lp)
    idx = np.flatnonzero(trig)
    if idx.size:
        sd, q, ep, w, mr, c, lpi = side[idx], qty[idx], entry[idx], margin[idx], m[idx], cs[idx], lp[idx]
        fill = np.where(sd > 0, np.minimum(lpi, bar_open), np.maximum(lpi, bar_open))
        fill = np.maximum(fill, 0.0)
        n_full = q * c * fill
        rng = (bar_high - bar_low) / bar_open if bar_open > 0 else 0.0
        vol_term = n_full.sum() / bar_volume if np.isfinite(bar_volume) and bar_volume > 0 else 0.0
        s = settings.slippage_base + settings.slippage_range_coef * rng + settings.slippage_volume_coef * vol_term
        eq = w + sd * q * c * (fill - ep)
        mm = mr * n_full
        cost = n_full * (settings.penalty_rate + s)
        # at the trigger the position is at HF <= 1 (equality at L up to rounding): apply the rule there
        f = partial_close_fraction(np.minimum(eq, mm), mm, cost, settings.target_health, settings.max_close_fraction)
        full = f >= 1.0
        cq = f * q
        realised = sd * cq * c * (fill - ep)
        slip = cq * c * fill * s
        e_s = eq - f * n_full * s  # equity after slippage (partial: whole position's equity minus slip)
        pen_due = cq * c * fill * settings.penalty_rate
        pen = np.where(full, np.clip(e_s, 0.0, pen_due), pen_due)
        bad = np.where(full, np.maximum(-e_s, 0.0), 0.0)
        returned = np.where(full, np.maximum(e_s - pen, 0.0), 0.0)
        m_after = np.where(full, 0.0, w + realised - slip - pen)
        out.triggered[idx] = True
        out.full[idx] = full
        out.fraction[idx] = f
        out.fill_price[idx] = fill
        out.exec_price[idx] = fill * (1.0 - sd * s)
        out.closed_qty[idx] = cq
        out.qty_after[idx] = np.where(full, 0.0, q - cq)
        out.margin_after[idx] = m_after
        out.realised_pnl[idx] = realised
        out.slippage_cost[idx] = slip
        out.penalty[idx] = pen
        out.bad_debt[idx] = bad
        out.returned[idx] = returned
        fund_now = float(fund) + float(pen.sum())
        total_bad = float(bad.sum())
        draw = min(total_bad, fund_now)
        if total_bad > 0:
            share = bad / total_bad
            out.fund_draw[idx] = draw * share
            out.uncovered_bad_debt[idx] = (total_bad - draw) * share
        out.fund_after = fund_now - draw
    out.totals = {
        k: float(getattr(out, k).sum())
        for k in ("realised_pnl", "slippage_cost", "penalty", "bad_debt", "fund_draw", "uncovered_bad_debt", "returned")
    }
    out.totals["liquidations"] = float(out.triggered.sum())
    out.totals["liquidated_notional"] = float((out.closed_qty * cs * np.nan_to_num(out.fill_price)).sum())
    return out


def auto_deleverage(
    shortfall: float,
    bankrupt_side: float,
    side: np.ndarray,
    qty: np.ndarray,
    entry: np.ndarray,
    margin: np.ndarray,
    mark: float,
    contract_size: np.ndarray | float = 1.0,
) -> dict[str, np.ndarray | float]:
    """Assign an uncovered shortfall to the most profitable opposite positions (last resort).

    Positions on the side opposite to ``bankrupt_side`` with positive unrealised P&L are ranked by
    ``PnL% × leverage`` (``upnl / margin × notional / (margin + upnl)``, Binance-style); from the top,
    each gives up ``min(its upnl, remaining shortfall)`` by closing the fraction of itself whose profit
    equals that amount at its entry price (margin of the closed part is returned).

    Returns
    -------
    dict
        ``adl_qty`` (contracts closed), ``adl_loss`` (profit forgone, USD), ``returned`` (margin released),
        ``qty_after``, ``margin_after`` per position and ``covered`` / ``remaining`` totals.
    """
    side = np.asarray(side, dtype=np.float64)
    qty = np.asarray(qty, dtype=np.float64)
    entry = np.asarray(entry, dtype=np.float64)
    margin = np.asarray(margin, dtype=np.float64)
    cs = np.broadcast_to(np.asarray(contract_size, dtype=np.float64), side.shape)
    upnl = side * qty * cs * (mark - entry)
    elig = (side == -np.sign(bankrupt_side)) & (qty > 0) & (upnl > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(elig, upnl / np.maximum(margin, 1e-12) * qty * cs * mark / np.maximum(margin + upnl, 1e-12), -np.inf)
    order = np.argsort(-score, kind="stable")
    order = order[elig[order]]
    cap = upnl[order]
    before = np.concatenate(([0.0], np.cumsum(cap)[:-1]))
    take = np.clip(shortfall - before, 0.0, cap)
    loss = np.zeros_like(qty)
    loss[order] = take
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(elig, loss / np.where(upnl > 0, upnl, 1.0), 0.0)
    adl_qty = frac * qty
    returned = frac * margin
    covered = float(loss.sum())
    return {
        "adl_qty": adl_qty,
        "adl_loss": loss,
        "returned": returned,
        "qty_after": qty - adl_qty,
        "margin_after": margin - returned,
        "covered": covered,
        "remaining": float(shortfall) - covered,
    }


@dataclass
class Ledger:
    """Running totals of every money flow, to check the accounting identity at each step (USD)."""

    deposits: float = 0.0
    top_ups: float = 0.0
    fees: float = 0.0
    funding: float = 0.0
    realised_pnl: float = 0.0
    penalties: float = 0.0
    slippage: float = 0.0
    bad_debt: float = 0.0
    fund_draw: float = 0.0
    adl_covered: float = 0.0
    uncovered_bad_debt: float = 0.0
    withdrawn: float = 0.0
    fund_initial: float = 0.0

    def record_liquidation(self, res: IsolatedLiquidation) -> None:
        t = res.totals
        self.realised_pnl += t["realised_pnl"]
        self.slippage += t["slippage_cost"]
        self.penalties += t["penalty"]
        self.bad_debt += t["bad_debt"]
        self.fund_draw += t["fund_draw"]
        self.uncovered_bad_debt += t["uncovered_bad_debt"]
        self.withdrawn += t["returned"]

    def record_adl(self, adl: dict) -> None:
        self.adl_covered += float(adl["covered"])
        self.uncovered_bad_debt -= float(adl["covered"])
        self.withdrawn += float(np.sum(adl["returned"]))

    def residuals(self, margin_total: float, fund: float) -> dict[str, float]:
        """Residuals of the three identities (all zero up to rounding)."""
        lhs = margin_total + self.withdrawn
        rhs = (
            self.deposits + self.top_ups - self.fees + self.funding + self.realised_pnl
            - self.penalties - self.slippage + self.bad_debt
        )
        return {
            "margin": lhs - rhs,
            "fund": fund - (self.fund_initial + self.penalties - self.fund_draw),
            "bad_debt": self.bad_debt - (self.fund_draw + self.adl_covered + self.uncovered_bad_debt),
        }

    def scale(self) -> float:
        """Magnitude for relative tolerances."""
        return max(1.0, *(abs(getattr(self, f.name)) for f in fields(self)))

