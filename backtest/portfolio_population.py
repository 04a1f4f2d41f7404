"""A seeded population of multi-instrument accounts for the portfolio-margin backtest.

The bars are cut into **cycles** of ``cycle_bars`` bars. Each cycle lists its own instruments per underlying
(a linear perpetual, a dated future and four European options: ATM call and put, a call struck ``otm`` above
and a put struck ``otm`` below the spot at the cycle's first close, all expiring ``expiry_extra_bars`` after the
cycle's last bar) and every account opens a fresh book at the cycle's first close and closes it at its last close
(unless liquidated in full before). So at every bar the same ``n_accounts`` books are live, each on its cycle's
instruments, and the book a strategy holds is redrawn every cycle from the seed.

Strategies (``strategy_weights``; sizes in USD notional drawn lognormal around ``notional_median``):

* ``directional``: a long or short perp on one underlying;
* ``basis``: long perp, short the cycle's future (same contracts; a cash-and-carry on the perp-future basis);
* ``covered_call``: long perp, short the OTM call (one call per perp contract);
* ``short_straddle``: short the ATM call and the ATM put;
* ``pair``: long one underlying's perp, short another's, equal notional (cross-asset);
* ``subaccounts``: a parent pool with two subaccount rows: a directional perp on one underlying and a short
  straddle on another (no netting across subaccounts; they share the parent's collateral).

Collateral (``collateral_weights``): USDC, USDT, BTC, ETH on the home chain, or USDC bridged from another chain
(``arbitrum``; valued with the bridge haircut). The amount posted is ``buffer × IM`` of the book at opening under
the policy being run (``buffer`` drawn per account in ``[buffer_low, buffer_high]``), after haircuts, so the
collateral locked depends on the policy, as in the isolated backtest. A share ``top_up_share`` of accounts tops
up on margin calls.

Marks (stated, since the bundled data have no options): the perps mark at the underlying close, the future at
``close × exp(carry × time to expiry)``, options by Black-76 on the close with an implied-vol path built from
realised volatility, ``iv_t = max(iv_floor, iv_premium × sqrt(bars_per_year × EWMA_0.94 variance of the
underlying's returns up to t))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from margin.instruments import Instrument, black76_price

__all__ = ["AccountPopulationConfig", "AccountPopulation", "CycleBook", "generate_accounts", "implied_vol_path",
           "STRATEGIES", "SLOTS"]

STRATEGIES: tuple[str, ...] = ("directional", "basis", "covered_call", "short_straddle", "pair", "subaccounts")
#: Collateral slots (asset, chain); the last is bridged (off the home chain ``ethereum``).
SLOTS: tuple[tuple[str, str], ...] = (("USDC", "ethereum"), ("USDT", "ethereum"), ("BTC", "ethereum"),
                                      ("ETH", "ethereum"), ("USDC", "arbitrum"))
_KIND_COLS = ("PERP", "FUT", "C-ATM", "P-ATM", "C-OTM", "P-OTM")


@dataclass(frozen=True)
class AccountPopulationConfig:
    """Settings of :func:`generate_accounts` (fractions as decimals, amounts USD)."""

    n_accounts: int = 1000
    cycle_bars: int = 30
    expiry_extra_bars: int = 7
    strategy_weights: Mapping[str, float] = field(default_factory=lambda: {
        "directional": 0.3, "basis": 0.15, "covered_call": 0.15, "short_straddle": 0.15, "pair": 0.15,
        "subaccounts": 0.10})
    collateral_weights: Mapping[str, float] = field(default_factory=lambda: {
        "USDC": 0.55, "USDT": 0.10, "BTC": 0.15, "ETH": 0.10, "USDC@arbitrum": 0.10})
    notional_median: float = 100_000.0
    notional_sigma: float = 1.0
    buffer_low: float = 1.05
    buffer_high: float = 1.6
    top_up_share: float = 0.4
    otm: float = 0.10
    carry: float = 0.05
    iv_premium: float = 1.1
    iv_floor: float = 0.2
    iv_lambda: float = 0.94
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.n_accounts) != self.n_accounts or self.n_accounts < 1:
            raise ValueError(f"n_accounts must be an integer >= 1, got {self.n_accounts!r}")
        if self.cycle_bars < 2:
            raise ValueError(f"cycle_bars must be >= 2, got {self.cycle_bars!r}")
        bad = sorted(set(self.strategy_weights) - set(STRATEGIES))
        if bad:
            raise ValueError(f"strategy_weights names unknown strategies {bad}; known: {list(STRATEGIES)}")
        known_c = {"USDC", "USDT", "BTC", "ETH", "USDC@arbitrum"}
        if set(self.collateral_weights) - known_c:
            raise ValueError(f"collateral_weights keys must be in {sorted(known_c)}, got {sorted(self.collateral_weights)}")
        if not 1.0 <= self.buffer_low <= self.buffer_high:
            raise ValueError(f"need 1 <= buffer_low <= buffer_high, got {self.buffer_low!r}, {self.buffer_high!r}")
        if not 0.0 <= self.top_up_share <= 1.0:
            raise ValueError(f"top_up_share must be in [0, 1], got {self.top_up_share!r}")


def implied_vol_path(closes: np.ndarray, bars_per_year: float, *, premium: float = 1.1, floor: float = 0.2,
                     lam: float = 0.94) -> np.ndarray:
    """``(T, U)`` annualised implied vols from realised volatility (see the module docstring); causal."""
    c = np.asarray(closes, dtype=np.float64)
    r = np.zeros_like(c)
    r[1:] = np.log(c[1:] / c[:-1])
    v = np.empty_like(c)
    acc = np.mean(r[1:31] ** 2, axis=0) if len(c) > 1 else np.full(c.shape[1], 1e-4)
    for t in range(len(c)):
        acc = lam * acc + (1.0 - lam) * r[t] ** 2
        v[t] = acc
    return np.maximum(floor, premium * np.sqrt(bars_per_year * v))


@dataclass(frozen=True)
class CycleBook:
    """One cycle: its bars ``[start, stop]`` (open at ``start``'s close, close at ``stop``'s), instruments and
    every account's book (contracts per instrument, per row)."""

    start: int
    stop: int
    instruments: tuple[Instrument, ...]
    positions: np.ndarray  # (R, I) contracts
    carry: float

    def mark_path(self, closes: np.ndarray, iv: np.ndarray, times: pd.DatetimeIndex, underlyings: tuple[str, ...],
                  t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        """Contract marks ``(n, I)`` of bars ``t0..t1`` (inclusive) and the implied vol of each column ``(n, I)``:
        perps at the close, the future at ``close × exp(carry × tau)``, options by Black-76 (one vectorised call)."""
        u_of = np.array([underlyings.index(x.underlying) for x in self.instruments])
        f = np.asarray(closes[t0:t1 + 1], dtype=np.float64)[:, u_of]
        vol = np.asarray(iv[t0:t1 + 1], dtype=np.float64)[:, u_of]
        ts = (times[t0:t1 + 1].asi8 / 1e9)[:, None]
        exp = np.array([x.expiry.timestamp() if x.expiry is not None else np.nan for x in self.instruments])
        tau = np.maximum((exp[None, :] - ts) / (365.0 * 86400.0), 0.0)
        is_opt = np.array([x.is_option for x in self.instruments])
        is_fut = np.array([(not x.is_option) and x.expiry is not None for x in self.instruments])
        cm = f.copy()
        cm[:, is_fut] = f[:, is_fut] * np.exp(self.carry * tau[:, is_fut])
        if is_opt.any():
            k = np.array([x.strike if x.is_option else np.nan for x in self.instruments])[is_opt]
            call = np.array([x.option_type == "call" for x in self.instruments])[is_opt]
            cm[:, is_opt] = black76_price(f[:, is_opt], k[None, :], tau[:, is_opt], vol[:, is_opt], call[None, :])
        return cm, vol

    def marks(self, closes_t: np.ndarray, iv_t: np.ndarray, now: pd.Timestamp, underlyings: tuple[str, ...]
              ) -> tuple[dict[str, float], dict[str, float], dict[str, float], np.ndarray]:
        """Underlying marks, instrument marks, implied vols at ``now`` and the ``(I,)`` contract marks."""
        cm, vol = self.mark_path(np.asarray(closes_t)[None, :], np.asarray(iv_t)[None, :], pd.DatetimeIndex([now]),
                                 underlyings, 0, 0)
        return self.market_dicts(closes_t, cm[0], vol[0], underlyings) + (cm[0],)

    def market_dicts(self, closes_t: np.ndarray, cm_t: np.ndarray, vol_t: np.ndarray, underlyings: tuple[str, ...]
                     ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        und = {u: float(closes_t[j]) for j, u in enumerate(underlyings)}
        inst = {x.instrument_id: float(cm_t[k]) for k, x in enumerate(self.instruments) if x.expiry is not None}
        ivs = {x.instrument_id: float(vol_t[k]) for k, x in enumerate(self.instruments) if x.is_option}
        return und, inst, ivs


@dataclass(frozen=True)
class AccountPopulation:
    """Accounts (rows) with their pools, strategies, collateral slot and the cycles' books.

    ``pool_index`` maps rows to pools (subaccounts share their parent's pool); ``slot`` is each pool's collateral
    slot in :data:`SLOTS`; ``buffer`` the multiple of opening IM it posts; ``tops_up`` whether it answers margin
    calls. Rows, pools and per-pool draws are fixed; the books are redrawn every cycle.
    """

    underlyings: tuple[str, ...]
    times: pd.DatetimeIndex
    closes: np.ndarray  # (T, U)
    iv: np.ndarray  # (T, U)
    pool_index: np.ndarray  # (R,)
    strategy: np.ndarray  # (P,) strategy name per pool
    slot: np.ndarray  # (P,) index into SLOTS
    buffer: np.ndarray  # (P,)
    tops_up: np.ndarray  # (P,) bool
    cycles: tuple[CycleBook, ...]
    cfg: AccountPopulationConfig

    @property
    def n_pools(self) -> int:
        return len(self.strategy)

    @property
    def n_rows(self) -> int:
        return len(self.pool_index)

    def subset(self, pools: np.ndarray) -> AccountPopulation:
        """The population restricted to ``pools`` (their rows, renumbered; used by the per-account loop)."""
        pools = np.asarray(pools, dtype=np.intp)
        keep = np.isin(self.pool_index, pools)
        remap = np.full(self.n_pools, -1, dtype=np.intp)
        remap[pools] = np.arange(len(pools))
        cyc = tuple(CycleBook(c.start, c.stop, c.instruments, c.positions[keep], c.carry) for c in self.cycles)
        return AccountPopulation(self.underlyings, self.times, self.closes, self.iv, remap[self.pool_index[keep]],
                                 self.strategy[pools], self.slot[pools], self.buffer[pools], self.tops_up[pools],
                                 cyc, self.cfg)


def _instruments(cycle: int, underlyings: tuple[str, ...], spot: np.ndarray, expiry: pd.Timestamp,
                 otm: float) -> tuple[Instrument, ...]:
    out = []
    exp = expiry.to_pydatetime()
    for j, u in enumerate(underlyings):
        s = float(spot[j])
        out.append(Instrument(f"{u}-PERP", "linear_perp", u))
        out.append(Instrument(f"{u}-FUT-{cycle}", "future", u, expiry=exp))
        for tag, typ, k in (("C-ATM", "call", s), ("P-ATM", "put", s), ("C-OTM", "call", s * (1 + otm)),
                            ("P-OTM", "put", s * (1 - otm))):
            out.append(Instrument(f"{u}-{tag}-{cycle}", "option", u, expiry=exp, strike=k, option_type=typ))
    return tuple(out)


def generate_accounts(closes: pd.DataFrame, cfg: AccountPopulationConfig | None = None) -> AccountPopulation:
    """Draw the population over the bars of ``closes`` (``T × U`` USD closes, UTC index, one column per underlying).

    Deterministic given ``cfg.seed``.
    """
    cfg = cfg or AccountPopulationConfig()
    if not isinstance(closes.index, pd.DatetimeIndex) or len(closes) < cfg.cycle_bars + 1:
        raise ValueError(f"closes must have a DatetimeIndex and more than cycle_bars={cfg.cycle_bars} rows, "
                         f"got {len(closes)}")
    c = closes.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(c) & (c > 0)):
        raise ValueError("closes must be finite and > 0")
    und = tuple(str(x) for x in closes.columns)
    times = pd.DatetimeIndex(closes.index)
    times = times.tz_localize("UTC") if times.tz is None else times.tz_convert("UTC")
    step = ((times[-1] - times[0]) / (len(times) - 1)).round("s")  # the bar spacing, whole seconds
    bpy = pd.Timedelta(days=365) / step
    iv = implied_vol_path(c, bpy, premium=cfg.iv_premium, floor=cfg.iv_floor, lam=cfg.iv_lambda)
    rng = np.random.default_rng(cfg.seed)
    names = [s for s in STRATEGIES if cfg.strategy_weights.get(s, 0) > 0]
    w = np.array([cfg.strategy_weights[s] for s in names], dtype=np.float64)
    strat = np.array(names, dtype=object)[rng.choice(len(names), cfg.n_accounts, p=w / w.sum())]
    if len(und) < 2:  # pairs and subaccounts need two underlyings
        strat = np.where(np.isin(strat, ["pair", "subaccounts"]), "directional", strat)
    ckeys = list(cfg.collateral_weights)
    cw = np.array([cfg.collateral_weights[k] for k in ckeys], dtype=np.float64)
    slot_of = {"USDC": 0, "USDT": 1, "BTC": 2, "ETH": 3, "USDC@arbitrum": 4}
    slot = np.array([slot_of[ckeys[i]] for i in rng.choice(len(ckeys), cfg.n_accounts, p=cw / cw.sum())])
    for k, asset in ((2, "BTC"), (3, "ETH")):  # coin collateral needs that coin's price
        if asset not in und:
            slot[slot == k] = 0
    buffer = rng.uniform(cfg.buffer_low, cfg.buffer_high, cfg.n_accounts)
    tops_up = rng.random(cfg.n_accounts) < cfg.top_up_share
    n_rows_per = np.where(strat == "subaccounts", 2, 1)
    pool_index = np.repeat(np.arange(cfg.n_accounts), n_rows_per)
    first_row = np.r_[0, np.cumsum(n_rows_per)[:-1]]
    n_rows = int(n_rows_per.sum())
    u_n = len(und)
    cycles = []
    starts = list(range(0, len(times) - 1, cfg.cycle_bars))
    for ci, s in enumerate(starts):
        e = min(s + cfg.cycle_bars, len(times) - 1)
        expiry = times[e] + step * cfg.expiry_extra_bars
        insts = _instruments(ci, und, c[s], expiry, cfg.otm)
        pos = np.zeros((n_rows, len(insts)))
        spot = c[s]
        notional = cfg.notional_median * np.exp(cfg.notional_sigma * rng.standard_normal(cfg.n_accounts))
        u1 = rng.integers(0, u_n, cfg.n_accounts)
        u2 = (u1 + rng.integers(1, max(u_n, 2), cfg.n_accounts)) % u_n
        side = np.where(rng.random(cfg.n_accounts) < 0.5, 1.0, -1.0)

        def col(u: np.ndarray, kind: str) -> np.ndarray:
            return u * len(_KIND_COLS) + _KIND_COLS.index(kind)

        q1 = notional / spot[u1]
        q2 = notional / spot[u2]
        r0 = first_row
        for name in names:
            m = strat == name
            if not m.any():
                continue
            rows, a, b = r0[m], u1[m], u2[m]
            if name == "directional":
                pos[rows, col(a, "PERP")] = side[m] * q1[m]
            elif name == "basis":
                pos[rows, col(a, "PERP")] = q1[m]
                pos[rows, col(a, "FUT")] = -q1[m]
            elif name == "covered_call":
                pos[rows, col(a, "PERP")] = q1[m]
                pos[rows, col(a, "C-OTM")] = -q1[m]
            elif name == "short_straddle":
                pos[rows, col(a, "C-ATM")] = -0.5 * q1[m]
                pos[rows, col(a, "P-ATM")] = -0.5 * q1[m]
            elif name == "pair":
                pos[rows, col(a, "PERP")] = q1[m]
                pos[rows, col(b, "PERP")] = -q2[m]
            elif name == "subaccounts":
                pos[rows, col(a, "PERP")] = side[m] * q1[m]
                pos[rows + 1, col(b, "C-ATM")] = -0.5 * q2[m]
                pos[rows + 1, col(b, "P-ATM")] = -0.5 * q2[m]
        cycles.append(CycleBook(start=s, stop=e, instruments=insts, positions=pos, carry=cfg.carry))
    return AccountPopulation(underlyings=und, times=times, closes=c, iv=iv, pool_index=pool_index,
                             strategy=strat, slot=slot, buffer=buffer, tops_up=tops_up, cycles=tuple(cycles), cfg=cfg)
