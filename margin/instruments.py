"""Instruments: linear and inverse perpetuals, dated futures, European options (Black-76).

Units and conventions
---------------------
* Quantities are signed numbers of contracts (long > 0).
* Linear contracts (``linear_perp``, ``future``, ``option``): one contract is ``contract_size`` units of the
  underlying; P&L is ``qty * contract_size * (exit - entry)`` in the quote currency (USD).
* Inverse contracts (``inverse_perp``, ``inverse_future``): one contract is worth ``contract_size`` USD;
  P&L is in the coin, ``qty * contract_size * (1/entry - 1/exit)``. In a unified USD-valued account this
  coin P&L is valued at the (scenario) price, ``qty * contract_size * (exit/entry - 1)`` USD.
* Options are European, priced with Black-76 on the underlying forward/mark ``F``; ``r`` is the
  continuously compounded discount rate (0 by default, as crypto options settle on the future), time to
  expiry ``T`` is in years (ACT/365), volatilities are annualised decimals.
* Scenario P&L (:func:`scenario_pnl`) is per contract in USD for relative spot shocks ``s``
  (``F -> F (1 + s)``) and relative implied-vol shocks ``v`` (``sigma -> sigma (1 + v)``), with no time
  decay inside the scenario (as exchange portfolio-margin grids do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import numpy as np
from scipy.special import ndtr

__all__ = [
    "InstrumentKind",
    "Instrument",
    "InstrumentArrays",
    "black76_price",
    "black76_greeks",
    "year_fraction",
    "scenario_pnl",
    "unrealised_pnl",
    "trade_fee",
    "funding_payment",
    "round_to_tick",
]

_SECONDS_PER_YEAR = 365.0 * 24.0 * 3600.0


class InstrumentKind(StrEnum):
    LINEAR_PERP = "linear_perp"
    INVERSE_PERP = "inverse_perp"
    FUTURE = "future"
    INVERSE_FUTURE = "inverse_future"
    OPTION = "option"


_INVERSE = {InstrumentKind.INVERSE_PERP, InstrumentKind.INVERSE_FUTURE}
_PERP = {InstrumentKind.LINEAR_PERP, InstrumentKind.INVERSE_PERP}


@dataclass(frozen=True, slots=True)
class Instrument:
    """One tradable contract.

    Parameters
    ----------
    instrument_id : str
        Unique id, e.g. ``"BTC-PERP"``.
    kind : InstrumentKind
    underlying : str
        Underlying / market id, e.g. ``"BTC"`` (matches ``MarginParams.market_id``).
    contract_size : float
        Underlying units per contract (linear) or USD per contract (inverse); > 0.
    tick_size : float
        Price increment in USD; > 0.
    expiry : datetime, optional
        UTC expiry (futures and options).
    strike : float, optional
        Option strike in USD.
    option_type : {"call", "put"}, optional
    """

    instrument_id: str
    kind: InstrumentKind
    underlying: str
    contract_size: float = 1.0
    tick_size: float = 0.01
    expiry: datetime | None = None
    strike: float | None = None
    option_type: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", InstrumentKind(self.kind))
        except ValueError:
            kinds = [k.value for k in InstrumentKind]
            raise ValueError(f"instrument {self.instrument_id}: kind must be one of {kinds}, got {self.kind!r}") from None
        for name in ("contract_size", "tick_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"instrument {self.instrument_id}: {name} must be a positive number, got {v!r}")
        if isinstance(self.expiry, str):
            object.__setattr__(self, "expiry", datetime.fromisoformat(self.expiry.replace("Z", "+00:00")))
        if self.expiry is not None:
            if self.expiry.tzinfo is None:
                raise ValueError(f"instrument {self.instrument_id}: expiry must be timezone-aware (UTC)")
            object.__setattr__(self, "expiry", self.expiry.astimezone(UTC))
        if self.kind in (InstrumentKind.FUTURE, InstrumentKind.INVERSE_FUTURE, InstrumentKind.OPTION):
            if self.expiry is None:
                raise ValueError(f"instrument {self.instrument_id}: {self.kind.value} needs an expiry")
        if self.kind is InstrumentKind.OPTION:
            if self.option_type not in ("call", "put"):
                raise ValueError(
                    f"instrument {self.instrument_id}: option_type must be 'call' or 'put', got {self.option_type!r}"
                )
            k = self.strike
            if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k <= 0:
                raise ValueError(f"instrument {self.instrument_id}: strike must be a positive number, got {k!r}")

    @property
    def is_inverse(self) -> bool:
        return self.kind in _INVERSE

    @property
    def is_perp(self) -> bool:
        return self.kind in _PERP

    @property
    def is_option(self) -> bool:
        return self.kind is InstrumentKind.OPTION


@dataclass(frozen=True)
class InstrumentArrays:
    """Column arrays of a list of instruments (for vectorised pricing), length ``I``."""

    ids: tuple[str, ...]
    underlyings: tuple[str, ...]
    underlying_index: np.ndarray  # (I,) int index into ``underlyings_unique``
    underlyings_unique: tuple[str, ...]
    contract_size: np.ndarray
    is_inverse: np.ndarray
    is_option: np.ndarray
    is_perp: np.ndarray
    is_call: np.ndarray
    strike: np.ndarray  # NaN for non-options
    expiry_ts: np.ndarray  # POSIX seconds, NaN for perps

    @classmethod
    def from_instruments(cls, instruments: Sequence[Instrument]) -> InstrumentArrays:
        ids = tuple(i.instrument_id for i in instruments)
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})
            raise ValueError(f"duplicate instrument_id {dup}")
        unds = tuple(i.underlying for i in instruments)
        uniq = tuple(dict.fromkeys(unds))
        pos = {u: k for k, u in enumerate(uniq)}
        return cls(
            ids=ids,
            underlyings=unds,
            underlying_index=np.array([pos[u] for u in unds], dtype=np.intp),
            underlyings_unique=uniq,
            contract_size=np.array([i.contract_size for i in instruments], dtype=np.float64),
            is_inverse=np.array([i.is_inverse for i in instruments], dtype=bool),
            is_option=np.array([i.is_option for i in instruments], dtype=bool),
            is_perp=np.array([i.is_perp for i in instruments], dtype=bool),
            is_call=np.array([i.option_type == "call" for i in instruments], dtype=bool),
            strike=np.array([i.strike if i.strike is not None else np.nan for i in instruments], dtype=np.float64),
            expiry_ts=np.array(
                [i.expiry.timestamp() if i.expiry is not None else np.nan for i in instruments], dtype=np.float64
            ),
        )

    def time_to_expiry(self, now: datetime) -> np.ndarray:
        """Years to expiry (ACT/365) at UTC ``now``, floored at 0; NaN for perpetuals."""
        return np.maximum((self.expiry_ts - now.timestamp()) / _SECONDS_PER_YEAR, 0.0)


def year_fraction(start: datetime, end: datetime) -> float:
    """ACT/365 year fraction between two UTC datetimes."""
    return (end - start).total_seconds() / _SECONDS_PER_YEAR


def round_to_tick(price: np.ndarray | float, tick: float, side: np.ndarray | float = 0) -> np.ndarray:
    """Round prices to the tick: ``side > 0`` rounds up, ``side < 0`` down, 0 to nearest."""
    p = np.asarray(price, dtype=np.float64) / tick
    side = np.asarray(side)
    return np.where(side > 0, np.ceil(p - 1e-9), np.where(side < 0, np.floor(p + 1e-9), np.round(p))) * tick


# ----------------------------------------------------------------------------- Black-76
def _d1d2(f, k, t, sigma):
    sq = sigma * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = (np.log(f / k) + 0.5 * sq * sq) / sq
    return d1, d1 - sq, sq


def black76_price(
    f: np.ndarray | float,
    k: np.ndarray | float,
    t: np.ndarray | float,
    sigma: np.ndarray | float,
    is_call: np.ndarray | bool,
    r: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Black-76 price of European options on a forward, in the forward's currency (USD).

    Parameters
    ----------
    f, k : array_like
        Forward (or mark) price and strike, USD, > 0.
    t : array_like
        Time to expiry in years (>= 0); at ``t = 0`` or ``sigma = 0`` the price is the discounted
        intrinsic value ``e^{-rT} max(±(F - K), 0)``.
    sigma : array_like
        Annualised implied volatility (decimal), >= 0.
    is_call : array_like of bool
    r : array_like
        Continuously compounded rate (decimal per year).

    Returns
    -------
    np.ndarray
        Option price per unit of underlying, broadcast shape.
    """
    f, k, t, sigma, r = (np.asarray(x, dtype=np.float64) for x in (f, k, t, sigma, r))
    is_call = np.asarray(is_call, dtype=bool)
    d1, d2, sq = _d1d2(f, k, t, sigma)
    disc = np.exp(-r * t)
    call = disc * (f * ndtr(d1) - k * ndtr(d2))
    put = disc * (k * ndtr(-d2) - f * ndtr(-d1))
    live = sq > 0
    intrinsic = disc * np.where(is_call, np.maximum(f - k, 0.0), np.maximum(k - f, 0.0))
    return np.where(live, np.where(is_call, call, put), intrinsic)


def black76_greeks(
    f: np.ndarray | float,
    k: np.ndarray | float,
    t: np.ndarray | float,
    sigma: np.ndarray | float,
    is_call: np.ndarray | bool,
    r: np.ndarray | float = 0.0,
) -> dict[str, np.ndarray]:
    """Black-76 greeks per unit of underlying.

    Returns
    -------
    dict
        ``delta`` (dV/dF), ``gamma`` (d²V/dF²), ``vega`` (dV/dsigma per 1.00 of vol), ``theta``
        (dV/dt per year of calendar time, i.e. ``-dV/dT``), ``rho`` (dV/dr). Zero gamma/vega/theta
        at expiry or zero vol.
    """
    f, k, t, sigma, r = (np.asarray(x, dtype=np.float64) for x in (f, k, t, sigma, r))
    is_call = np.asarray(is_call, dtype=bool)
    d1, d2, sq = _d1d2(f, k, t, sigma)
    live = sq > 0
    disc = np.exp(-r * t)
    pdf = np.exp(-0.5 * np.where(live, d1, 0.0) ** 2) / math.sqrt(2.0 * math.pi)
    price = black76_price(f, k, t, sigma, is_call, r)
    itm = np.where(is_call, f > k, f < k)
    delta_live = np.where(is_call, disc * ndtr(d1), -disc * ndtr(-d1))
    delta_dead = np.where(itm, np.where(is_call, disc, -disc), 0.0)
    safe_sq = np.where(live, sq, 1.0)
    safe_t = np.where(t > 0, t, 1.0)
    gamma = np.where(live, disc * pdf / (f * safe_sq), 0.0)
    vega = np.where(live, disc * f * pdf * np.sqrt(t), 0.0)
    theta = np.where(live, -disc * f * pdf * sigma / (2.0 * np.sqrt(safe_t)) + r * price, r * price)
    return {
        "delta": np.where(live, delta_live, delta_dead),
        "gamma": gamma,
        "vega": vega,
        "theta": theta,
        "rho": -t * price,
    }


# ------------------------------------------------------------------------ P&L and fees
def scenario_pnl(
    arrays: InstrumentArrays,
    mark: np.ndarray,
    sigma: np.ndarray,
    now: datetime,
    spot_shock: np.ndarray,
    vol_shock: np.ndarray,
    r: float = 0.0,
) -> np.ndarray:
    """Scenario P&L per contract, USD: the ``S`` matrix (instruments × scenarios).

    Parameters
    ----------
    arrays : InstrumentArrays
        ``I`` instruments.
    mark : np.ndarray
        ``(I,)`` underlying forward/mark price per instrument (for options: the forward ``F``), USD; a
        per-account ``(A, I)`` array gives per-account matrices ``(A, I, n)``.
    sigma : np.ndarray
        ``(I,)`` annualised implied volatility (ignored for non-options; NaN allowed there).
    now : datetime
        UTC valuation time (time to expiry for options).
    spot_shock, vol_shock : np.ndarray
        ``(U, n)`` relative shocks per underlying (row order ``arrays.underlyings_unique``) and
        scenario; a 1-D ``(n,)`` array applies the same shock to every underlying.

    Returns
    -------
    np.ndarray
        ``(I, n)`` float64 P&L per contract (long one contract) in USD.
    """
    mark = np.asarray(mark, dtype=np.float64)
    spot_shock = np.atleast_2d(np.asarray(spot_shock, dtype=np.float64))
    vol_shock = np.atleast_2d(np.asarray(vol_shock, dtype=np.float64))
    if spot_shock.shape[0] == 1:
        spot_shock = np.repeat(spot_shock, len(arrays.underlyings_unique), axis=0)
    if vol_shock.shape[0] == 1:
        vol_shock = np.repeat(vol_shock, len(arrays.underlyings_unique), axis=0)
    s = spot_shock[arrays.underlying_index]  # (I, n)
    v = vol_shock[arrays.underlying_index]
    cs = arrays.contract_size[:, None]
    # linear: cs * F * s ; inverse valued at the scenario price: cs * s
    out = np.where(arrays.is_inverse[:, None], cs * s, cs * mark[..., None] * s)
    if arrays.is_option.any():
        o = np.flatnonzero(arrays.is_option)
        t = arrays.time_to_expiry(now)[o][:, None]
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), mark.shape)[..., o, None]
        f0 = mark[..., o, None]
        k = arrays.strike[o][:, None]
        c = arrays.is_call[o][:, None]
        base = black76_price(f0, k, t, sig, c, r)
        shocked = black76_price(f0 * (1.0 + s[o]), k, t, np.maximum(sig * (1.0 + v[o]), 0.0), c, r)
        out[..., o, :] = cs[o] * (shocked - base)
    return out


def unrealised_pnl(
    qty: np.ndarray, entry: np.ndarray, mark: np.ndarray, contract_size: np.ndarray, is_inverse: np.ndarray
) -> np.ndarray:
    """Unrealised P&L in USD (inverse coin P&L valued at the mark).

    ``entry``/``mark`` are contract prices: underlying price for futures/perps, option premium per unit of
    underlying for options (linear).
    """
    qty, entry, mark, cs = (np.asarray(x, dtype=np.float64) for x in (qty, entry, mark, contract_size))
    if not np.any(is_inverse):  # linear only: one pass (flat rows have entry 0 and give 0)
        lin = qty * cs * (mark - entry)
        return np.where(qty == 0, 0.0, lin)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = qty * cs * (mark / entry - 1.0)
    lin = qty * cs * (mark - entry)
    return np.where(qty == 0, 0.0, np.where(is_inverse, inv, lin))


def trade_fee(
    qty: np.ndarray | float,
    price: np.ndarray | float,
    fee_rate: float,
    contract_size: np.ndarray | float = 1.0,
    is_inverse: np.ndarray | bool = False,
) -> np.ndarray:
    """Fee of a trade, in the settlement currency: USD for linear, coin for inverse.

    Linear: ``|qty| * cs * price * fee_rate``; inverse: ``|qty| * cs / price * fee_rate``.
    """
    q = np.abs(np.asarray(qty, dtype=np.float64)) * contract_size
    price = np.asarray(price, dtype=np.float64)
    return np.where(is_inverse, q / price, q * price) * fee_rate


def funding_payment(
    qty: np.ndarray | float,
    mark: np.ndarray | float,
    funding_rate: np.ndarray | float,
    contract_size: np.ndarray | float = 1.0,
    is_inverse: np.ndarray | bool = False,
) -> np.ndarray:
    """Funding received by the holder for one funding interval (negative = paid).

    A positive ``funding_rate`` means longs pay shorts: ``-qty * cs * mark * rate`` (USD) for linear
    perps, ``-qty * cs / mark * rate`` (coin) for inverse perps.
    """
    q = np.asarray(qty, dtype=np.float64) * contract_size
    mark = np.asarray(mark, dtype=np.float64)
    return -np.where(is_inverse, q / mark, q * mark) * np.asarray(funding_rate, dtype=np.float64)
