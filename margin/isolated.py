"""Isolated margin: per-position IM/MM with notional risk-limit tiers, liquidation and bankruptcy prices.

Conventions (also in docs/margin.md)
------------------------------------
* A position has side ``+1`` (long) or ``-1`` (short), size ``q > 0`` contracts, entry price ``E`` and an
  isolated margin balance ``W`` (deposited margin, *after* the opening fee, plus funding received minus
  funding paid). Fees and funding therefore enter only through ``W``; the optional close-fee term adds
  ``fee_rate * notional_at_liquidation`` to the maintenance requirement (Bybit's "fee to close").
* Maintenance margin is charged on **mark** notional (Binance style): ``MM(P) = m * q * c * P - cum`` for
  linear contracts, ``MM(P) = m * q * c / P - cum`` (coin) for inverse, where ``m`` is the tier's MM rate
  and ``cum`` the tier's maintenance amount that makes ``MM`` continuous across tiers. ``mm_basis="entry"``
  charges it on entry notional instead (Bybit USDT style, ``MM = m q c E - cum``).
* Liquidation price ``L``: equity at ``L`` equals maintenance margin.
  Linear (``N = q c``):  long ``L = (N E - W - cum) / (N (1 - m - f))``,
  short ``L = (N E + W + cum) / (N (1 + m + f))``.
  Inverse (coin, ``N = q c`` USD): long ``L = N (1 + m + f) / (W + cum + N / E)``,
  short ``L = N (1 - m - f) / (N / E - W - cum)``.
* Bankruptcy price ``B`` (equity 0, or equity = fee to close when a close fee is given): linear long
  ``E - W / N``, short ``E + W / N``; inverse long ``N / (W + N / E)``, short ``N / (N / E - W)``.
* Where no finite positive price exists (e.g. a long with margin above its notional, or a coin-margined
  short with ``W >= N / E``), the long liquidation/bankruptcy price is 0 and the short one ``inf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from margin.params import MarginParams, OptionMarginRule, RiskTier

__all__ = [
    "tier_table",
    "tier_lookup",
    "tiered_requirement",
    "liquidation_price_linear",
    "bankruptcy_price_linear",
    "liquidation_price_inverse",
    "bankruptcy_price_inverse",
    "liquidation_price_tiered",
    "option_margin",
    "isolated_requirements",
]


def tier_table(tiers: Sequence[RiskTier]) -> dict[str, np.ndarray]:
    """Arrays of a tier list: caps, IM/MM rates and the continuous maintenance/initial amounts (cum).

    ``cum_n = cum_{n-1} + floor_n * (rate_n - rate_{n-1})`` with ``floor_n`` the previous tier's cap
    (Binance "maintenance amount"), so ``rate_n * N - cum_n`` is continuous and non-decreasing in ``N``.
    Tables are cached by tier list (a margin call evaluates the same few tier lists many times, e.g. in the
    liquidation-price search); their arrays are read-only.
    """
    return _tier_table(tuple(tiers))


@lru_cache(maxsize=1024)
def _tier_table(tiers: tuple[RiskTier, ...]) -> dict[str, np.ndarray]:
    caps = np.array([t.max_notional for t in tiers], dtype=np.float64)
    im = np.array([t.im_rate for t in tiers], dtype=np.float64)
    mm = np.array([t.mm_rate for t in tiers], dtype=np.float64)
    floors = np.concatenate(([0.0], caps[:-1]))
    cum_mm = np.cumsum(floors * np.diff(mm, prepend=mm[0]))
    cum_im = np.cumsum(floors * np.diff(im, prepend=im[0]))
    out = {"caps": caps, "floors": floors, "im": im, "mm": mm, "cum_mm": cum_mm, "cum_im": cum_im}
    for a in out.values():
        a.flags.writeable = False
    return out


def tier_lookup(notional: np.ndarray, table: dict[str, np.ndarray]) -> np.ndarray:
    """Tier index of each (absolute) notional: the first tier whose cap is >= notional."""
    idx = np.searchsorted(table["caps"], np.abs(np.asarray(notional, dtype=np.float64)), side="left")
    return np.minimum(idx, len(table["caps"]) - 1)


def tiered_requirement(notional: np.ndarray, table: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(IM, MM) in quote currency for absolute notionals under a tier table.

    ``IM = im_n * N - cum_im_n`` and ``MM = mm_n * N - cum_mm_n`` for the tier ``n`` containing ``N``:
    continuous, zero at zero, non-decreasing in ``N``.
    """
    n = np.abs(np.asarray(notional, dtype=np.float64))
    k = tier_lookup(n, table)
    im = table["im"][k] * n - table["cum_im"][k]
    mm = table["mm"][k] * n - table["cum_mm"][k]
    return im, mm


def _arr(*xs):
    return tuple(np.asarray(x, dtype=np.float64) for x in xs)


def liquidation_price_linear(
    side: np.ndarray | float,
    qty: np.ndarray | float,
    entry: np.ndarray | float,
    margin: np.ndarray | float,
    mm_rate: np.ndarray | float,
    cum: np.ndarray | float = 0.0,
    close_fee_rate: np.ndarray | float = 0.0,
    contract_size: np.ndarray | float = 1.0,
    mm_basis: str = "mark",
) -> np.ndarray:
    """Liquidation price of isolated linear positions (USD), vectorised.

    Parameters
    ----------
    side : array_like
        +1 long, -1 short.
    qty : array_like
        Position size in contracts (> 0).
    entry : array_like
        Average entry price, USD.
    margin : array_like
        Isolated margin balance ``W`` in USD (after fees, including funding).
    mm_rate : array_like
        Maintenance margin rate (fraction).
    cum : array_like
        Maintenance amount of the tier (USD).
    close_fee_rate : array_like
        Fee to close at the liquidation price, added to maintenance margin (fraction of notional).
    contract_size : array_like
        Underlying units per contract.
    mm_basis : {"mark", "entry"}
        Notional on which MM is charged.

    Returns
    -------
    np.ndarray
        Liquidation price; 0 for a long / ``inf`` for a short that cannot be liquidated.
    """
    side, qty, entry, margin, m, cum, f, cs = _arr(side, qty, entry, margin, mm_rate, cum, close_fee_rate, contract_size)
    n = qty * cs
    long = side > 0
    if mm_basis == "entry":
        # W + side*N*(L - E) = m*N*E - cum + f*N*L
        num = np.where(long, n * entry - margin + m * n * entry - cum, n * entry + margin - m * n * entry + cum)
        den = np.where(long, n * (1.0 - f), n * (1.0 + f))
    elif mm_basis == "mark":
        num = np.where(long, n * entry - margin - cum, n * entry + margin + cum)
        den = np.where(long, n * (1.0 - m - f), n * (1.0 + m + f))
    else:
        raise ValueError(f"mm_basis must be 'mark' or 'entry', got {mm_basis!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = num / den
    return np.where(long, np.where((den > 0) & (lp > 0), lp, 0.0), np.where(lp > 0, lp, np.inf))


def bankruptcy_price_linear(
    side: np.ndarray | float,
    qty: np.ndarray | float,
    entry: np.ndarray | float,
    margin: np.ndarray | float,
    contract_size: np.ndarray | float = 1.0,
    close_fee_rate: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Bankruptcy price (equity = fee to close, 0 without fee) of isolated linear positions, USD.

    ``E - side * W / (q c)`` without fee; with a close fee ``f``: long ``(N E - W) / (N (1 - f))``, short
    ``(N E + W) / (N (1 + f))`` (the liquidation price at ``m = 0``). Long floored at 0.
    """
    side, qty, entry, margin, cs, f = _arr(side, qty, entry, margin, contract_size, close_fee_rate)
    n = qty * cs
    bp = (n * entry - side * margin) / (n * (1.0 - side * f))
    return np.where(side > 0, np.maximum(bp, 0.0), bp)


def liquidation_price_inverse(
    side: np.ndarray | float,
    qty: np.ndarray | float,
    entry: np.ndarray | float,
    margin: np.ndarray | float,
    mm_rate: np.ndarray | float,
    cum: np.ndarray | float = 0.0,
    close_fee_rate: np.ndarray | float = 0.0,
    contract_size: np.ndarray | float = 1.0,
) -> np.ndarray:
    """Liquidation price of isolated inverse (coin-margined) positions, USD, vectorised.

    ``margin`` and ``cum`` are in the coin; MM is on mark value ``q c / P`` (coin).
    Returns ``inf`` for shorts that cannot be liquidated (``W + cum >= q c / E``).
    """
    side, qty, entry, margin, m, cum, f, cs = _arr(side, qty, entry, margin, mm_rate, cum, close_fee_rate, contract_size)
    n = qty * cs
    long = side > 0
    num = np.where(long, n * (1.0 + m + f), n * (1.0 - m - f))
    den = np.where(long, margin + cum + n / entry, n / entry - margin - cum)
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = num / den
    ok = (den > 0) & (num > 0)
    return np.where(ok, lp, np.where(long, 0.0, np.inf))


def bankruptcy_price_inverse(
    side: np.ndarray | float,
    qty: np.ndarray | float,
    entry: np.ndarray | float,
    margin: np.ndarray | float,
    contract_size: np.ndarray | float = 1.0,
    close_fee_rate: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Bankruptcy price of inverse positions, USD (``margin`` in coin).

    Long ``N (1 + f) / (W + N/E)``, short ``N (1 - f) / (N/E - W)`` (``inf`` if the denominator is <= 0),
    with ``f`` the fee to close at that price (0 by default).
    """
    side, qty, entry, margin, cs, f = _arr(side, qty, entry, margin, contract_size, close_fee_rate)
    n = qty * cs
    den = n / entry + side * margin
    with np.errstate(divide="ignore"):
        bp = n * (1.0 + side * f) / den
    return np.where(den > 0, bp, np.inf)


def liquidation_price_tiered(
    side: np.ndarray,
    qty: np.ndarray,
    entry: np.ndarray,
    margin: np.ndarray,
    tiers: Sequence[RiskTier],
    *,
    inverse: bool = False,
    close_fee_rate: float = 0.0,
    contract_size: np.ndarray | float = 1.0,
) -> np.ndarray:
    """Liquidation price with notional tiers: the tier is the one containing the notional *at* the price.

    Solves ``equity(P) = MM(notional(P))`` with the continuous tiered ``MM``; computes the candidate price
    of every tier and keeps the one whose notional at that price falls inside the tier (Binance rule:
    "substitute the MMR and maintenance amount of the level at the liquidation price"). For inverse
    contracts the tiers are read in coin notional ``q c / P`` and ``margin`` is in coin.
    """
    side, qty, entry, margin, cs = np.broadcast_arrays(*_arr(side, qty, entry, margin, contract_size))
    tab = tier_table(tiers)
    out = np.full(side.shape, np.nan)
    for k in range(len(tiers)):
        if inverse:
            lp = liquidation_price_inverse(side, qty, entry, margin, tab["mm"][k], tab["cum_mm"][k], close_fee_rate, cs)
            with np.errstate(divide="ignore"):
                notional = qty * cs / lp
        else:
            lp = liquidation_price_linear(side, qty, entry, margin, tab["mm"][k], tab["cum_mm"][k], close_fee_rate, cs)
            notional = qty * cs * lp
        inside = (notional > tab["floors"][k]) & (notional <= tab["caps"][k])
        if k == 0:
            inside |= notional <= 0
        out = np.where(np.isnan(out) & inside, lp, out)
    # no liquidation price in any tier (e.g. fully collateralised): use tier-0 answer (0 or inf)
    fallback = np.where(side > 0, 0.0, np.inf)
    return np.where(np.isnan(out), fallback, out)


def option_margin(
    qty: np.ndarray,
    forward: np.ndarray,
    strike: np.ndarray,
    is_call: np.ndarray,
    option_mark: np.ndarray,
    contract_size: np.ndarray,
    rule: OptionMarginRule,
) -> tuple[np.ndarray, np.ndarray]:
    """(IM, MM) of option positions, USD (Deribit standard-margin style).

    Short: ``IM = (max(a - OTM/F, b) * F + mark) * |q| c``, ``MM = (mm * F + mark) * |q| c``, with
    ``OTM = max(K - F, 0)`` for calls and ``max(F - K, 0)`` for puts. Long: 0 (premium already paid).
    """
    qty, f, k, mark, cs = _arr(qty, forward, strike, option_mark, contract_size)
    otm = np.where(is_call, np.maximum(k - f, 0.0), np.maximum(f - k, 0.0))
    short = np.where(qty < 0, -qty * cs, 0.0)
    im = (np.maximum(rule.im_rate - otm / f, rule.im_floor) * f + mark) * short
    mm = (rule.mm_rate * f + mark) * short
    return im, mm


def isolated_requirements(
    positions: np.ndarray,
    entry: np.ndarray,
    underlying_price: np.ndarray,
    contract_mark: np.ndarray,
    contract_size: np.ndarray,
    is_inverse: np.ndarray,
    is_option: np.ndarray,
    is_call: np.ndarray,
    strike: np.ndarray,
    params: Sequence[MarginParams],
    now=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Isolated IM and MM per position (accounts × instruments), USD.

    Futures and perps: tiered rates on the position's own notional; IM on entry notional, MM on mark
    notional (or entry when ``mm_basis="entry"``). Inverse notionals are ``|q| c`` USD. Options: see
    :func:`option_margin`. ``params[i]`` are the parameters of instrument ``i``'s market.

    Parameters
    ----------
    positions, entry : np.ndarray
        ``(A, I)`` signed contracts and entry prices.
    underlying_price : np.ndarray
        ``(I,)`` (or per-row ``(A, I)``) mark of the underlying/forward per instrument, USD.
    contract_mark : np.ndarray
        ``(I,)`` or ``(A, I)`` contract mark: the underlying mark for futures/perps, option premium per unit.
    """
    p = np.asarray(positions, dtype=np.float64)
    a, n_i = p.shape
    underlying_price = np.broadcast_to(np.asarray(underlying_price, dtype=np.float64), p.shape)
    contract_mark = np.broadcast_to(np.asarray(contract_mark, dtype=np.float64), p.shape)
    im = np.zeros_like(p)
    mm = np.zeros_like(p)
    tables: dict[int, dict[str, np.ndarray]] = {}
    for i in range(n_i):
        q = p[:, i]
        if is_option[i]:
            im[:, i], mm[:, i] = option_margin(
                q, underlying_price[:, i], strike[i], is_call[i], contract_mark[:, i], contract_size[i], params[i].option_rule
            )
            continue
        key = id(params[i])
        if key not in tables:
            tables[key] = tier_table(params[i].tiers_at(now))
        tab = tables[key]
        if is_inverse[i]:
            n_entry = n_mark = np.abs(q) * contract_size[i]
        else:
            n_entry = np.abs(q) * contract_size[i] * entry[:, i]
            n_mark = np.abs(q) * contract_size[i] * underlying_price[:, i]
        im[:, i] = tiered_requirement(n_entry, tab)[0]
        base = n_entry if params[i].mm_basis == "entry" else n_mark
        mm_i = tiered_requirement(base, tab)[1]
        if params[i].close_fee_in_mm:
            mm_i = mm_i + n_mark * params[i].taker_fee_rate
        mm[:, i] = mm_i
    return im, mm
