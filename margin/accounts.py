"""Accounts, subaccounts and positions as dense arrays.

Rows are (sub)accounts. Each row belongs to a collateral **pool** owned by a top-level account; a
subaccount's row points at its parent's pool, so subaccounts share the parent's collateral. Requirements
are computed per row (a subaccount is margined on its own positions, with no netting across subaccounts:
that is what subaccounts are for) and summed per pool; collateral and unrealised P&L are pooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter, itemgetter, methodcaller
from typing import Any, Literal, NamedTuple

import numpy as np

from margin.instruments import Instrument, InstrumentArrays, unrealised_pnl

__all__ = ["Portfolio", "MarketData", "pool_sum", "RECORD_DEFAULTS"]


def pool_sum(values: np.ndarray, pool_index: np.ndarray, n_pools: int) -> np.ndarray:
    """Sum rows of ``values`` (``(A,)`` or ``(A, k)``) into pools with ``np.add.at`` semantics."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:  # bincount: the same sums, several times faster than np.add.at
        return np.bincount(np.asarray(pool_index, dtype=np.intp), weights=v, minlength=n_pools).astype(np.float64)
    out = np.zeros((n_pools,) + v.shape[1:], dtype=np.float64)
    np.add.at(out, pool_index, v)
    return out


@dataclass(frozen=True)
class MarketData:
    """Marks at one UTC time.

    Parameters
    ----------
    underlying_price : dict
        USD mark (index/forward) per underlying.
    instrument_mark : dict
        Contract mark per instrument id: futures/perps may override the underlying mark (basis), options
        give the premium per unit of underlying in USD.
    implied_vol : dict
        Annualised implied volatility per option id.
    collateral_price : dict
        USD price per unit of each collateral asset.
    """

    underlying_price: Mapping[str, float]
    instrument_mark: Mapping[str, float]
    implied_vol: Mapping[str, float]
    collateral_price: Mapping[str, float]


@dataclass(frozen=True)
class Portfolio:
    """Positions, entries and collateral of many (sub)accounts, all as dense arrays.

    Attributes
    ----------
    account_ids : tuple of str
        ``A`` row ids (top-level accounts and subaccounts).
    pool_index : np.ndarray
        ``(A,)`` pool number of each row; pools are numbered by ``pool_ids``.
    pool_ids : tuple of str
        Id of the top-level account owning each pool.
    instruments : tuple of Instrument
    positions : np.ndarray
        ``(A, I)`` signed contracts.
    entry : np.ndarray
        ``(A, I)`` entry prices (USD; option premium per unit for options); 0 where flat.
    slots : tuple of (asset, chain)
        ``C`` collateral slots.
    balances : np.ndarray
        ``(A, C)`` collateral amounts (pooled by ``pool_index``).
    market : MarketData
    as_of : datetime
        UTC valuation time.
    """

    account_ids: tuple[str, ...]
    pool_index: np.ndarray
    pool_ids: tuple[str, ...]
    instruments: tuple[Instrument, ...]
    positions: np.ndarray
    entry: np.ndarray
    slots: tuple[tuple[str, str], ...]
    balances: np.ndarray
    market: MarketData
    as_of: datetime

    def __post_init__(self) -> None:
        a, i = self.positions.shape
        if self.entry.shape != (a, i):
            raise ValueError(f"entry shape {self.entry.shape} != positions shape {(a, i)}")
        if self.balances.shape != (a, len(self.slots)):
            raise ValueError(f"balances shape {self.balances.shape} != {(a, len(self.slots))}")
        if len(self.instruments) != i:
            raise ValueError(f"{len(self.instruments)} instruments but positions have {i} columns")
        object.__setattr__(self, "_arrays", InstrumentArrays.from_instruments(self.instruments))

    # ------------------------------------------------------------------ views
    @property
    def arrays(self) -> InstrumentArrays:
        return self._arrays  # type: ignore[attr-defined]

    @property
    def n_pools(self) -> int:
        return len(self.pool_ids)

    def underlying_price_per_instrument(self) -> np.ndarray:
        """``(I,)`` underlying/forward mark of each instrument (futures use their own mark if given)."""
        out = np.empty(len(self.instruments))
        for k, inst in enumerate(self.instruments):
            if not inst.is_option and inst.instrument_id in self.market.instrument_mark:
                out[k] = self.market.instrument_mark[inst.instrument_id]
            else:
                out[k] = self.market.underlying_price[inst.underlying]
        return out

    def contract_mark(self) -> np.ndarray:
        """``(I,)`` contract mark: underlying mark for futures/perps, option premium per unit for options."""
        f = self.underlying_price_per_instrument()
        return np.array(
            [self.market.instrument_mark[x.instrument_id] if x.is_option else f[k] for k, x in enumerate(self.instruments)]
        )

    def implied_vol(self) -> np.ndarray:
        """``(I,)`` implied vols (NaN for non-options)."""
        return np.array([self.market.implied_vol.get(x.instrument_id, np.nan) for x in self.instruments])

    def collateral_prices(self) -> np.ndarray:
        return np.array([self.market.collateral_price[a] for a, _ in self.slots], dtype=np.float64)

    def unrealised(self, contract_mark: np.ndarray | None = None) -> np.ndarray:
        """``(A,)`` unrealised P&L per row in USD at the given (default: current) contract marks."""
        m = self.contract_mark() if contract_mark is None else contract_mark
        arr = self.arrays
        u = unrealised_pnl(self.positions, self.entry, m[None, :], arr.contract_size[None, :], arr.is_inverse[None, :])
        return u.sum(axis=1)

    # -------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, records: Literal["mapping", "attributes"] = "mapping") -> Portfolio:
        """Build from the portfolio JSON (see ``schemas/portfolio.schema.json``).

        Assumes the document passed schema validation; semantic errors raise ``ValueError`` naming the
        JSON path and value.

        ``records="attributes"``: the accounts, subaccounts, positions and collateral entries under
        ``d["accounts"]`` are objects whose attributes are the schema's fields, every optional field present
        with the value of :data:`RECORD_DEFAULTS` when it was absent (e.g. ``msgspec`` Structs decoded with
        those defaults; the service decodes bodies so, without building a dict per record).
        """
        acc = _MAPPING if records == "mapping" else _ATTRIBUTES
        as_of = datetime.fromisoformat(str(d["as_of"]).replace("Z", "+00:00"))
        if as_of.tzinfo is None:
            raise ValueError(f"$.as_of must be timezone-aware UTC, got {d['as_of']!r}")
        as_of = as_of.astimezone(UTC)
        instruments = []
        for k, x in enumerate(d["instruments"]):
            try:
                instruments.append(
                    Instrument(
                        instrument_id=x["id"],
                        kind=x["kind"],
                        underlying=x["underlying"],
                        contract_size=x.get("contract_size", 1.0),
                        tick_size=x.get("tick_size", 0.01),
                        expiry=x.get("expiry"),
                        strike=x.get("strike"),
                        option_type=x.get("option_type"),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"$.instruments[{k}]: {exc}") from None
        col = {x.instrument_id: k for k, x in enumerate(instruments)}
        if len(col) != len(instruments):
            raise ValueError("$.instruments: duplicate instrument id")
        marks = d["marks"]
        market = MarketData(
            underlying_price=dict(marks["underlyings"]),
            instrument_mark={k: v["mark"] for k, v in marks.get("instruments", {}).items()},
            implied_vol={k: v["iv"] for k, v in marks.get("instruments", {}).items() if "iv" in v},
            collateral_price=dict(marks.get("collateral", {})),
        )
        for k, x in enumerate(instruments):
            if x.underlying not in market.underlying_price:
                raise ValueError(f"$.instruments[{k}].underlying: no mark for underlying {x.underlying!r} in $.marks.underlyings")
            if x.is_option and (x.instrument_id not in market.instrument_mark or x.instrument_id not in market.implied_vol):
                raise ValueError(f"$.marks.instruments.{x.instrument_id}: option needs 'mark' and 'iv'")
        accounts = d["accounts"]
        subs = list(map(acc.subaccounts, accounts))
        if any(subs):  # rows: each account, then its subaccounts (sharing its pool)
            rows = [(acc.id(r), ai, r, si) for ai, acct in enumerate(accounts)
                    for si, r in chain(((None, acct),), enumerate(subs[ai]))]
            docs = list(map(_ROW_DOC, rows))
            ids = list(map(_ROW_ID, rows))
            pool_index = np.array(list(map(_ROW_POOL, rows)), dtype=np.intp)
        else:  # no subaccounts (the common book): one row per account, built without a Python-level loop
            rows = None
            docs = list(accounts)
            ids = list(map(acc.id, docs))
            pool_index = np.arange(len(docs), dtype=np.intp)
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})
            raise ValueError(f"$.accounts: duplicate account id {dup}")
        clists = list(map(acc.collateral, docs))
        ckeys = _collateral_keys(clists, acc)
        slots = {key: k for k, key in enumerate(dict.fromkeys(ckeys))}  # numbered in order of first appearance
        for asset, _ in slots:
            if asset not in market.collateral_price:
                raise ValueError(f"$.marks.collateral: no price for collateral asset {asset!r}")
        filled = _fill_fast(docs, instruments, col, slots, clists=clists, ckeys=ckeys, access=acc)
        if filled is None:  # anything unusual (an error to name, netting within a row): the exact loop
            if rows is None:
                rows = [(x, ai, r, None) for ai, (x, r) in enumerate(zip(ids, docs, strict=True))]
            filled = _fill_slow(rows, instruments, col, slots, access=acc)
        pos, entry, bal = filled
        pool_ids = ids if rows is None else list(map(acc.id, accounts))
        return cls(
            account_ids=tuple(ids),
            pool_index=pool_index,
            pool_ids=tuple(pool_ids),
            instruments=tuple(instruments),
            positions=pos,
            entry=entry,
            slots=tuple(slots),
            balances=bal,
            market=market,
            as_of=as_of,
        )

    @classmethod
    def from_arrays(
        cls,
        instruments: Sequence[Instrument],
        positions: np.ndarray,
        entry: np.ndarray,
        market: MarketData,
        as_of: datetime,
        balances: np.ndarray | None = None,
        slots: Sequence[tuple[str, str]] = (("USDC", "ethereum"),),
        pool_index: np.ndarray | None = None,
    ) -> Portfolio:
        """Build directly from arrays (each row its own pool unless ``pool_index`` is given)."""
        positions = np.asarray(positions, dtype=np.float64)
        a = positions.shape[0]
        pidx = np.arange(a) if pool_index is None else np.asarray(pool_index, dtype=np.intp)
        n_pools = int(pidx.max()) + 1 if a else 0
        bal = np.zeros((a, len(slots))) if balances is None else np.asarray(balances, dtype=np.float64)
        return cls(
            account_ids=tuple(f"a{k}" for k in range(a)),
            pool_index=pidx,
            pool_ids=tuple(f"a{k}" for k in range(n_pools)),
            instruments=tuple(instruments),
            positions=positions,
            entry=np.asarray(entry, dtype=np.float64),
            slots=tuple(slots),
            balances=bal,
            market=market,
            as_of=as_of,
        )


def _fill_slow(rows: list[tuple[str, int, Any, int | None]], instruments: list[Instrument],
               col: dict[str, int], slots: dict[tuple[str, str], int], *,
               access: _Access | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, entries and balances of ``rows``, position by position (validating; netting within a row)."""
    acc = access or _MAPPING
    a, n_i = len(rows), len(instruments)
    pos = np.zeros((a, n_i))
    entry = np.zeros((a, n_i))
    bal = np.zeros((a, len(slots)))
    for r, (_, ai, acct, si) in enumerate(rows):
        path = f"$.accounts[{ai}]" if si is None else f"$.accounts[{ai}].subaccounts[{si}]"
        for pi, p in enumerate(acc.positions(acct)):
            where = f"{path}.positions[{pi}]"
            iid = acc.instrument(p)
            if iid not in col:
                raise ValueError(f"{where}.instrument: unknown instrument {iid!r}")
            size = acc.size(p)
            if isinstance(size, bool) or not isinstance(size, int | float) or not math.isfinite(size):
                raise ValueError(f"{where}.size: must be a finite number, got {size!r}")
            ep = acc.entry_price(p)
            if size != 0 and (ep is None or not math.isfinite(ep) or ep <= 0 and not instruments[col[iid]].is_option):
                raise ValueError(f"{where}.entry_price: must be a positive number, got {ep!r}")
            c = col[iid]
            old = pos[r, c]
            new = old + size
            # average entry of same-direction additions (netting within a row)
            if old == 0 or np.sign(old) == np.sign(size):
                entry[r, c] = (abs(old) * entry[r, c] + abs(size) * (ep or 0.0)) / max(abs(new), _TINY)
            elif np.sign(new) != np.sign(old) and new != 0:
                entry[r, c] = ep
            pos[r, c] = new
        for ci, cl in enumerate(acc.collateral(acct)):
            amt = acc.amount(cl)
            if isinstance(amt, bool) or not isinstance(amt, int | float) or not math.isfinite(amt) or amt < 0:
                raise ValueError(f"{path}.collateral[{ci}].amount: must be a non-negative number, got {amt!r}")
            bal[r, slots[(acc.asset(cl), acc.chain(cl))]] += amt
    return pos, entry, bal


_NUM = {int, float}  # exact types: bool (a subclass of int) is not a number here
# the smallest positive float: the entry average divides by max(|size|, _TINY), i.e. by |size| for any non-zero
# size, subnormal ones included (a floor of 1e-300 gave a 1e-310-contract position an entry 1e-10 of its price)
_TINY = math.ulp(0.0)
_NUM_OR_NONE = {int, float, type(None)}
_ROW_ID, _ROW_POOL, _ROW_DOC = itemgetter(0), itemgetter(1), itemgetter(2)

#: What an absent optional field of an account, subaccount, position or collateral entry means.
RECORD_DEFAULTS: dict[str, Any] = {"subaccounts": (), "positions": (), "collateral": (), "entry_price": None,
                                   "chain": "ethereum"}


class _Access(NamedTuple):
    """Readers of the fields of the records under ``$.accounts`` (C-level callables, for ``map``)."""

    id: Callable[[Any], Any]
    subaccounts: Callable[[Any], Any]
    positions: Callable[[Any], Any]
    collateral: Callable[[Any], Any]
    instrument: Callable[[Any], Any]
    size: Callable[[Any], Any]
    entry_price: Callable[[Any], Any]
    asset: Callable[[Any], Any]
    chain: Callable[[Any], Any]
    amount: Callable[[Any], Any]


def _readers(required: Callable[[str], Callable[[Any], Any]],
             optional: Callable[[str, Any], Callable[[Any], Any]]) -> _Access:
    return _Access(**{f: optional(f, RECORD_DEFAULTS[f]) if f in RECORD_DEFAULTS else required(f)
                      for f in _Access._fields})


_MAPPING = _readers(itemgetter, lambda f, default: methodcaller("get", f, default))  # plain JSON (dicts)
_ATTRIBUTES = _readers(attrgetter, lambda f, _default: attrgetter(f))  # objects carrying every default


def _collateral_keys(clists: list[Any], acc: _Access) -> list[tuple[str, str]]:
    """(asset, chain) of every collateral entry of every row, in order (chain defaults to ethereum)."""
    cflat = list(chain.from_iterable(clists))
    return list(zip(map(acc.asset, cflat), map(acc.chain, cflat), strict=True))


def _fill_fast(docs: list[Mapping[str, Any]], instruments: list[Instrument], col: dict[str, int],
               slots: dict[tuple[str, str], int], *, clists: list[Any] | None = None,
               ckeys: list[tuple[str, str]] | None = None,
               access: _Access | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_fill_slow` for the common case, with array operations: the same arrays, bit for bit (the same
    floating-point expressions), or None when a row nets two positions of one instrument or anything fails
    a check (then :func:`_fill_slow` runs and names the first error). ``docs`` are the rows' documents;
    ``clists``/``ckeys`` (each row's collateral list, :func:`_collateral_keys` of them) when already built."""
    acc = access or _MAPPING
    a, n_i = len(docs), len(instruments)
    # map/itemgetter over the flat lists: the same values as comprehensions, about twice as fast
    plists = list(map(acc.positions, docs))
    if clists is None:
        clists = list(map(acc.collateral, docs))
    flat = list(chain.from_iterable(plists))
    try:
        cidx = list(map(col.__getitem__, map(acc.instrument, flat)))
        sizes = list(map(acc.size, flat))
    except (KeyError, TypeError):
        return None
    eps = list(map(acc.entry_price, flat))
    if not set(map(type, sizes)) <= _NUM or not set(map(type, eps)) <= _NUM_OR_NONE:
        return None
    try:
        size = np.array(sizes, dtype=np.float64)
        if None in eps:  # a flat position without an entry price
            none = np.array([x is None for x in eps], dtype=bool)
            ep = np.array([np.nan if x is None else x for x in eps], dtype=np.float64)
        else:
            none = np.zeros(len(eps), dtype=bool)
            ep = np.array(eps, dtype=np.float64)
    except OverflowError:
        return None
    prow = np.repeat(np.arange(a, dtype=np.intp), list(map(len, plists)))
    pcol = np.array(cidx, dtype=np.intp)
    if not np.isfinite(size).all():
        return None
    is_opt = np.array([x.is_option for x in instruments], dtype=bool)
    live = size != 0
    with np.errstate(invalid="ignore"):
        bad = live & (none | ~np.isfinite(ep) | ((ep <= 0) & ~is_opt[pcol]))
    if bad.any():
        return None
    seen = np.zeros((a, n_i), dtype=bool)
    seen[prow, pcol] = True
    if np.count_nonzero(seen) != len(prow):  # netting within a row: order matters, keep the loop's arithmetic
        return None
    pos = np.zeros((a, n_i))
    entry = np.zeros((a, n_i))
    # first (and only) position of its (row, instrument): old = 0, entry = (|0|*0 + |size|*(ep or 0)) / max(|size|, tiny)
    ep0 = np.where(none | (ep == 0), 0.0, ep)
    mag = np.abs(size)
    entry[prow, pcol] = (0.0 * 0.0 + mag * ep0) / np.maximum(mag, _TINY)
    pos[prow, pcol] = 0.0 + size
    bal = np.zeros((a, len(slots)))
    cflat = list(chain.from_iterable(clists))
    try:
        amts = list(map(acc.amount, cflat))
    except (KeyError, TypeError):
        return None
    if not set(map(type, amts)) <= _NUM:
        return None
    try:
        amt = np.array(amts, dtype=np.float64)
    except OverflowError:
        return None
    if not (np.isfinite(amt).all() and (amt >= 0).all()):
        return None
    crow = np.repeat(np.arange(a, dtype=np.intp), list(map(len, clists)))
    try:
        cslot = np.array(list(map(slots.__getitem__, _collateral_keys(clists, acc) if ckeys is None else ckeys)),
                         dtype=np.intp)
    except (KeyError, TypeError):
        return None
    np.add.at(bal, (crow, cslot), amt)  # in order, like the loop's +=
    return pos, entry, bal
