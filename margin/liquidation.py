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

    Returns ``fraction``, ``penalty``, ``slippage_cost``, ``bad_debt``, ``returned`` (equity handed back
    after a full close), ``equity_after``, ``mm_after`` arrays (USD); per account
    ``equity_after = equity - slippage_cost - penalty + bad_debt - returned``. Maintenance margin scales with the open size (exact for flat rates and for scenario
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
    returned = np.where(f >= 1.0, np.maximum(e_s - pen, 0.0), 0.0)
    return {
        "returned": returned,
        "fraction": f,
        "penalty": pen,
        "slippage_cost": slip,
        "bad_debt": bad,
        "equity_after": e_after,
        "mm_after": (1.0 - f) * m,
    }


@dataclass
class IsolatedLiquidation:
    """Result of one bar of :func:`liquidate_isolated`.

    ``triggered`` (bool), ``qty_after`` and ``margin_after`` have the input length; every other array is
    compact: one entry per triggered position, in the order of ``index`` (their positions in the input).
    Amounts in USD.
    """

    index: np.ndarray
    triggered: np.ndarray
    qty_after: np.ndarray
    margin_after: np.ndarray
    full: np.ndarray
    fraction: np.ndarray
    fill_price: np.ndarray
    exec_price: np.ndarray
    closed_qty: np.ndarray
    realised_pnl: np.ndarray
    slippage_cost: np.ndarray
    penalty: np.ndarray
    bad_debt: np.ndarray
    fund_draw: np.ndarray
    uncovered_bad_debt: np.ndarray
    returned: np.ndarray
    fund_after: float
    totals: dict[str, float] = field(default_factory=dict)


_FLOWS = ("realised_pnl", "slippage_cost", "penalty", "bad_debt", "fund_draw", "uncovered_bad_debt", "returned")


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
    inplace: bool = False,
) -> IsolatedLiquidation:
    """Liquidate isolated linear positions of one market over one OHLC bar, vectorised.

    The trigger test runs on every position (a handful of array operations); the liquidation arithmetic
    runs only on the triggered ones, so a bar costs little when few positions are hit.

    Parameters
    ----------
    side : np.ndarray
        +1 long / -1 short per position (float).
    qty : np.ndarray
        Open contracts (>= 0; 0 = closed, ignored).
    entry : np.ndarray
        Entry prices, USD.
    margin : np.ndarray
        Isolated margin balances, USD (after fees, including funding).
    mm_rate : array_like
        Maintenance rate per position (flat, in [0, 1); MM on mark notional, no maintenance amount).
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
    inplace : bool
        Update ``qty`` and ``margin`` in place (they are then also ``qty_after``/``margin_after``).

    Returns
    -------
    IsolatedLiquidation
    """
    side = np.asarray(side, dtype=np.float64)
    qty = np.asarray(qty, dtype=np.float64)
    margin = np.asarray(margin, dtype=np.float64)
    m_all = np.asarray(mm_rate, dtype=np.float64)
    cs_all = np.asarray(contract_size, dtype=np.float64)
    # liquidation price (linear, MM on mark, cum = 0): L = (E - side W / N) / (1 - side m); qty = 0 gives
    # +-inf/NaN, which never triggers
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = (entry - side * margin / (qty * cs_all)) / (1.0 - side * m_all)
    trig = np.where(side > 0, lp >= bar_low, lp <= bar_high)
    trig &= qty > 0
    idx = np.flatnonzero(trig)
    qty_after = qty if inplace else qty.copy()
    margin_after = margin if inplace else margin.copy()
    k = idx.size
    fund_after = float(fund)
    if k == 0:
        e = np.zeros(0)
        out = IsolatedLiquidation(
            index=idx, triggered=trig, qty_after=qty_after, margin_after=margin_after, full=np.zeros(0, bool),
            fraction=e, fill_price=e, exec_price=e, closed_qty=e, realised_pnl=e, slippage_cost=e, penalty=e,
            bad_debt=e, fund_draw=e, uncovered_bad_debt=e, returned=e, fund_after=fund_after,
        )
        out.totals = dict.fromkeys(_FLOWS, 0.0) | {"liquidations": 0.0, "liquidated_notional": 0.0}
        return out
    sd, q, ep, w, lpi = side[idx], qty[idx], np.asarray(entry, dtype=np.float64)[idx], margin[idx], lp[idx]
    mr = m_all[idx] if m_all.ndim else m_all
    c = cs_all[idx] if cs_all.ndim else cs_all
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
    f = np.where(mm > 0, f, 1.0)  # zero maintenance rate: triggered at bankruptcy, close in full
    full = f >= 1.0
    cq = f * q
    realised = sd * cq * c * (fill - ep)
    slip = cq * c * fill * s
    e_s = eq - slip  # equity after slippage (whole position)
    pen_due = cq * c * fill * settings.penalty_rate
    pen = np.where(full, np.clip(e_s, 0.0, pen_due), pen_due)
    bad = np.where(full, np.maximum(-e_s, 0.0), 0.0)
    returned = np.where(full, np.maximum(e_s - pen, 0.0), 0.0)
    qty_after[idx] = np.where(full, 0.0, q - cq)
    margin_after[idx] = np.where(full, 0.0, w + realised - slip - pen)
    fund_now = fund_after + float(pen.sum())
    total_bad = float(bad.sum())
    draw = min(total_bad, fund_now)
    if total_bad > 0:
        share = bad / total_bad
        fund_draw, uncovered = draw * share, (total_bad - draw) * share
    else:
        fund_draw = uncovered = np.zeros(k)
    out = IsolatedLiquidation(
        index=idx, triggered=trig, qty_after=qty_after, margin_after=margin_after, full=full, fraction=f,
        fill_price=fill, exec_price=fill * (1.0 - sd * s), closed_qty=cq, realised_pnl=realised,
        slippage_cost=slip, penalty=pen, bad_debt=bad, fund_draw=fund_draw, uncovered_bad_debt=uncovered,
        returned=returned, fund_after=fund_now - draw,
    )
    out.totals = {name: float(getattr(out, name).sum()) for name in _FLOWS}
    out.totals["liquidations"] = float(k)
    out.totals["liquidated_notional"] = float((cq * c * fill).sum())
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

