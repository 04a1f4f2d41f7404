"""One entry point for the three margin modes: requirements, health factor and liquidation price.

``compute_margin(portfolio, params, mode)`` returns per-pool (top-level account) IM, MM, haircut collateral,
unrealised P&L, health factor ``(collateral + uPnL) / MM`` and a liquidation price:

* isolated: per position, the exact closed form (:mod:`margin.isolated`) with the position's isolated
  margin ``W`` = its initial margin at entry unless given; the account row reports the largest position's;
* cross / portfolio: the price of the account's dominant underlying (largest |delta notional|) at which
  the health factor reaches 1, everything else fixed (options repriced with Black-76 at their implied vol,
  collateral in that asset revalued). Found by a vectorised scan and bisection over all accounts at once
  (no loop over accounts); NaN when no price in (0, 11 F] liquidates the account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from margin.accounts import Portfolio, pool_sum
from margin.collateral import collateral_value
from margin.cross import cross_requirements
from margin.instruments import black76_price, unrealised_pnl
from margin.isolated import isolated_requirements, liquidation_price_tiered
from margin.params import MarginParams, ParamsFile
from margin.portfolio import delta_notional, fhs_scenarios, grid_shocks, option_addons, risk_measure

__all__ = ["Mode", "MarginResult", "compute_margin", "params_for"]

Mode = Literal["isolated", "cross", "portfolio"]
ScenarioSource = Literal["auto", "grid", "fhs"]


@dataclass(frozen=True)
class MarginResult:
    """Margin of every pool (top-level account; subaccounts share its collateral)."""

    mode: str
    scenarios: str | None
    pool_ids: tuple[str, ...]
    account_ids: tuple[str, ...]
    pool_index: np.ndarray
    im_rows: np.ndarray
    mm_rows: np.ndarray
    im: np.ndarray
    mm: np.ndarray
    collateral: np.ndarray
    unrealised: np.ndarray
    equity: np.ndarray
    health: np.ndarray
    liquidation_price: np.ndarray
    liquidation_underlying: tuple[str | None, ...]
    position_liquidation: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return None if not np.isfinite(x) else float(x)

        accounts = []
        for k, pid in enumerate(self.pool_ids):
            rows = np.flatnonzero(self.pool_index == k)
            accounts.append(
                {
                    "account": pid,
                    "initial_margin": float(self.im[k]),
                    "maintenance_margin": float(self.mm[k]),
                    "collateral_value": float(self.collateral[k]),
                    "unrealised_pnl": float(self.unrealised[k]),
                    "equity": float(self.equity[k]),
                    "health_factor": f(self.health[k]),
                    "liquidation_price": f(self.liquidation_price[k]),
                    "liquidation_underlying": self.liquidation_underlying[k],
                    "subaccounts": [
                        {"id": self.account_ids[r], "initial_margin": float(self.im_rows[r]),
                         "maintenance_margin": float(self.mm_rows[r])}
                        for r in rows
                    ],
                    "positions": [p for p in self.position_liquidation if p["pool"] == pid],
                }
            )
        return {"mode": self.mode, "scenarios": self.scenarios, "accounts": accounts}


def params_for(portfolio: Portfolio, params: ParamsFile) -> list[MarginParams]:
    """MarginParams of each underlying in ``portfolio.arrays.underlyings_unique`` (KeyError names the gap)."""
    by = params.by_market()
    out = []
    for u in portfolio.arrays.underlyings_unique:
        if u not in by:
            raise KeyError(f"no MarginParams for market {u!r} in the params file (markets: {sorted(by)})")
        out.append(by[u])
    return out


class _State:
    """Shared inputs of one evaluation; marks may be per row ``(A, I)`` for the liquidation-price search."""

    def __init__(self, pf: Portfolio, params: ParamsFile, mode: str, scenarios: str) -> None:
        self.pf = pf
        self.arr = pf.arrays
        self.mode = mode
        self.prm_u = params_for(pf, params)
        self.prm_i = [self.prm_u[k] for k in self.arr.underlying_index]
        self.haircuts = [m.haircuts for m in params.markets]
        self.mark = pf.underlying_price_per_instrument()
        self.cmark = pf.contract_mark()
        self.sigma = pf.implied_vol()
        self.now = pf.as_of
        self.scenarios = scenarios
        if mode == "portfolio" and scenarios == "fhs":
            rm = params.risk_model
            cols = [rm.underlyings.index(u) for u in self.arr.underlyings_unique]
            ret = np.asarray(rm.historical_returns, dtype=np.float64)
            shocks, _ = fhs_scenarios(ret, rm.ewma_lambda, rm.horizon_bars, warmup=min(20, len(ret) // 4))
            self.fhs_spot = shocks[:, cols].T  # (U, n)

    def requirements(self, mark: np.ndarray, cmark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pf, arr = self.pf, self.arr
        p = pf.positions
        if self.mode == "isolated":
            im, mm = isolated_requirements(
                p, pf.entry, mark, cmark, arr.contract_size, arr.is_inverse, arr.is_option, arr.is_call,
                arr.strike, self.prm_i, self.now,
            )
            return im.sum(axis=1), mm.sum(axis=1)
        if self.mode == "cross":
            return cross_requirements(p, arr, mark, cmark, self.prm_u, self.now)
        return self._portfolio(mark)

    def _portfolio(self, mark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from margin.instruments import scenario_pnl

        arr, p = self.arr, self.pf.positions
        n_u = len(arr.underlyings_unique)
        grids = [m.scenario_grid for m in self.prm_u]
        frac = np.array([g.mm_fraction for g in grids])
        # add-ons at the current marks (also inside the liquidation-price search)
        add = option_addons(p, arr, self.mark, self.sigma, self.now, grids)  # (A, U)
        if self.scenarios == "fhs":
            g0 = max(grids, key=lambda g: (g.confidence, g.measure != "max"))
            s = scenario_pnl(arr, mark, self.sigma, self.now, self.fhs_spot, np.zeros_like(self.fhs_spot))
            loss = -(p @ s) if s.ndim == 2 else -np.einsum("ai,ain->an", p, s)
            base = np.maximum(risk_measure(loss, g0.measure, g0.confidence), 0.0)
            im = base + add.sum(axis=1)
            return im, base * frac.max() + add @ frac
        im_u = np.zeros((p.shape[0], n_u))
        for u, g in enumerate(grids):
            cols = arr.underlying_index == u
            sh, vo = grid_shocks(g)
            spot = np.zeros((n_u, sh.size))
            spot[u] = sh
            vol = np.zeros((n_u, sh.size))
            vol[u] = vo
            s = scenario_pnl(arr, mark, self.sigma, self.now, spot, vol)
            if s.ndim == 2:
                loss = -(p[:, cols] @ s[cols])
            else:
                loss = -np.einsum("ai,ain->an", p[:, cols], s[:, cols])
            im_u[:, u] = np.maximum(risk_measure(loss, g.measure, g.confidence), 0.0)
        im_u += add
        return im_u.sum(axis=1), im_u @ frac


def _isolated_position_lp(st: _State, im_pos: np.ndarray) -> list[dict[str, Any]]:
    pf, arr = st.pf, st.arr
    out: list[dict[str, Any]] = []
    rows, cols = np.nonzero(pf.positions)
    if rows.size == 0:
        return out
    lps = np.full(rows.size, np.nan)
    for i in np.unique(cols):
        sel = cols == i
        if arr.is_option[i]:
            continue
        r = rows[sel]
        q = pf.positions[r, i]
        prm = st.prm_i[i]
        entry = pf.entry[r, i]
        w = im_pos[r, i] / entry if arr.is_inverse[i] else im_pos[r, i]
        fee = prm.taker_fee_rate if prm.close_fee_in_mm else 0.0
        lps[sel] = liquidation_price_tiered(
            np.sign(q), np.abs(q), entry, w, prm.tiers_at(st.now), inverse=bool(arr.is_inverse[i]),
            close_fee_rate=fee, contract_size=arr.contract_size[i],
        )
    for k, (r, i) in enumerate(zip(rows, cols, strict=True)):
        out.append(
            {
                "pool": pf.pool_ids[pf.pool_index[r]],
                "account": pf.account_ids[r],
                "instrument": arr.ids[i],
                "size": float(pf.positions[r, i]),
                "isolated_margin": float(im_pos[r, i]),
                "liquidation_price": None if not np.isfinite(lps[k]) or lps[k] <= 0 else float(lps[k]),
            }
        )
    return out


def _equity(st: _State, mark_rows: np.ndarray, cmark_rows: np.ndarray, coll_prices: np.ndarray) -> np.ndarray:
    pf, arr = st.pf, st.arr
    u = unrealised_pnl(pf.positions, pf.entry, cmark_rows, arr.contract_size, arr.is_inverse).sum(axis=1)
    c_rows = collateral_value(pf.balances, coll_prices, pf.slots, st.haircuts)
    return pool_sum(c_rows + u, pf.pool_index, pf.n_pools)


def _liquidation_search(st: _State) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """Dominant-underlying price at which each pool's equity equals its MM (vectorised over pools)."""
    pf, arr = st.pf, st.arr
    n_pools = pf.n_pools
    delta = pool_sum(delta_notional(pf.positions, arr, st.mark, st.sigma, st.now), pf.pool_index, n_pools)
    # collateral held in an underlying's coin is exposure to that underlying too
    raw_coll = pf.balances * pf.collateral_prices()[None, :]
    for c, (asset, _) in enumerate(pf.slots):
        if asset in arr.underlyings_unique:
            delta[:, arr.underlyings_unique.index(asset)] += pool_sum(raw_coll[:, c], pf.pool_index, n_pools)
    ustar = np.argmax(np.abs(delta), axis=1)
    dval = delta[np.arange(n_pools), ustar]
    direction = -np.sign(dval)  # the move that loses money
    t = arr.time_to_expiry(st.now)
    o = arr.is_option
    base_opt = black76_price(st.mark[o], arr.strike[o], t[o], st.sigma[o], arr.is_call[o])
    cprice = pf.collateral_prices()
    slot_asset = np.array([a for a, _ in pf.slots], dtype=object)
    und_names = np.array(arr.underlyings_unique, dtype=object)

    def gap(x_pool: np.ndarray) -> np.ndarray:
        x_rows = x_pool[pf.pool_index]
        hit = arr.underlying_index[None, :] == ustar[pf.pool_index][:, None]
        mark_rows = st.mark[None, :] * (1.0 + x_rows[:, None] * hit)
        cmark_rows = np.where(arr.is_option[None, :], st.cmark[None, :], mark_rows)
        if o.any():
            new = black76_price(mark_rows[:, o], arr.strike[o], t[o], st.sigma[o], arr.is_call[o])
            cmark_rows[:, o] = st.cmark[o] + new - base_opt
        chit = slot_asset[None, :] == und_names[ustar][pf.pool_index][:, None]
        cp = cprice[None, :] * (1.0 + x_rows[:, None] * chit)
        _, mm = st.requirements(mark_rows, cmark_rows)
        return _equity(st, mark_rows, cmark_rows, cp) - pool_sum(mm, pf.pool_index, n_pools)

    levels = np.concatenate([np.linspace(0.0, 0.3, 61), np.linspace(0.31, 0.99, 35)])
    up_levels = np.concatenate([levels, np.linspace(1.2, 10.0, 23)])
    lo = np.zeros(n_pools)
    hi = np.full(n_pools, np.nan)
    found = np.zeros(n_pools, dtype=bool)
    prev = np.zeros(n_pools)
    for k, lv in enumerate(up_levels):
        x = np.where(direction < 0, -min(lv, 0.99), lv) * (direction != 0)
        g = gap(x)
        newly = (~found) & (g <= 0) & (direction != 0)
        if k == 0:
            hi = np.where(newly, 0.0, hi)
            lo = np.where(newly, 0.0, lo)
        else:
            hi = np.where(newly, x, hi)
            lo = np.where(newly, prev, lo)
        found |= newly
        prev = x
        if found[direction != 0].all():
            break
    live = found & (hi != lo)
    a, b = lo.copy(), np.where(found, hi, 0.0)
    for _ in range(60):
        if not live.any():
            break
        mid = 0.5 * (a + b)
        g = gap(np.where(live, mid, 0.0))
        neg = g <= 0
        b = np.where(live & neg, mid, b)
        a = np.where(live & ~neg, mid, a)
    x_star = np.where(found, b, np.nan)
    f_u = np.zeros(len(arr.underlyings_unique))
    f_u[arr.underlying_index] = st.mark
    lp = f_u[ustar] * (1.0 + x_star)
    names = tuple(arr.underlyings_unique[u] if direction[k] != 0 else None for k, u in enumerate(ustar))
    return lp, names


def compute_margin(
    portfolio: Portfolio,
    params: ParamsFile,
    mode: Mode = "cross",
    scenarios: ScenarioSource = "auto",
    liquidation_price: bool = True,
) -> MarginResult:
    """Margin, health factor and liquidation price of every account.

    Parameters
    ----------
    portfolio : Portfolio
    params : ParamsFile
        ``MarginParams`` per underlying and the risk model (joint historical scenarios, EWMA settings).
    mode : {"isolated", "cross", "portfolio"}
    scenarios : {"auto", "grid", "fhs"}
        Portfolio mode only: the spot × vol grid of each market, or joint filtered historical scenarios
        from ``params.risk_model``. ``auto`` uses FHS when the risk model covers every underlying and a
        market asks for ``es``/``var``, else the grid.
    liquidation_price : bool
        Also search the liquidation price (cross/portfolio) — skip for speed.
    """
    if mode not in ("isolated", "cross", "portfolio"):
        raise ValueError(f"mode must be 'isolated', 'cross' or 'portfolio', got {mode!r}")
    if scenarios not in ("auto", "grid", "fhs"):
        raise ValueError(f"scenarios must be 'auto', 'grid' or 'fhs', got {scenarios!r}")
    rm = params.risk_model
    covered = bool(rm.historical_returns) and set(portfolio.arrays.underlyings_unique) <= set(rm.underlyings)
    if mode != "portfolio":
        src = None
    elif scenarios == "auto":
        wants = any(m.scenario_grid.measure != "max" for m in params_for(portfolio, params))
        src = "fhs" if covered and wants else "grid"
    else:
        if scenarios == "fhs" and not covered:
            raise ValueError(
                f"scenarios='fhs' needs risk_model.historical_returns covering {list(portfolio.arrays.underlyings_unique)},"
                f" got underlyings {list(rm.underlyings)}"
            )
        src = scenarios
    st = _State(portfolio, params, mode, src or "grid")
    pf = portfolio
    im_rows, mm_rows = st.requirements(st.mark, st.cmark)
    coll_rows = collateral_value(pf.balances, pf.collateral_prices(), pf.slots, st.haircuts)
    upnl_rows = pf.unrealised(st.cmark)
    im = pool_sum(im_rows, pf.pool_index, pf.n_pools)
    mm = pool_sum(mm_rows, pf.pool_index, pf.n_pools)
    coll = pool_sum(coll_rows, pf.pool_index, pf.n_pools)
    upnl = pool_sum(upnl_rows, pf.pool_index, pf.n_pools)
    equity = coll + upnl
    with np.errstate(divide="ignore", invalid="ignore"):
        health = np.where(mm > 0, equity / mm, np.inf)
    pos_lp: list[dict[str, Any]] = []
    if mode == "isolated":
        arr = pf.arrays
        im_pos, _ = isolated_requirements(
            pf.positions, pf.entry, st.mark, st.cmark, arr.contract_size, arr.is_inverse, arr.is_option,
            arr.is_call, arr.strike, st.prm_i, st.now,
        )
        pos_lp = _isolated_position_lp(st, im_pos)
        lp = np.full(pf.n_pools, np.nan)
        names: list[str | None] = [None] * pf.n_pools
        best = np.zeros(pf.n_pools)
        for rec, (r, i) in zip(pos_lp, zip(*np.nonzero(pf.positions), strict=True), strict=True):
            k = pf.pool_index[r]
            size = abs(rec["size"]) * arr.contract_size[i] * (1.0 if arr.is_inverse[i] else st.mark[i])
            if rec["liquidation_price"] is not None and size > best[k]:
                best[k], lp[k], names[k] = size, rec["liquidation_price"], arr.underlyings[i]
        lnames = tuple(names)
    elif liquidation_price:
        lp, lnames = _liquidation_search(st)
    else:
        lp, lnames = np.full(pf.n_pools, np.nan), (None,) * pf.n_pools
    return MarginResult(
        mode=mode,
        scenarios=src,
        pool_ids=pf.pool_ids,
        account_ids=pf.account_ids,
        pool_index=pf.pool_index,
        im_rows=im_rows,
        mm_rows=mm_rows,
        im=im,
        mm=mm,
        collateral=coll,
        unrealised=upnl,
        equity=equity,
        health=health,
        liquidation_price=lp,
        liquidation_underlying=lnames,
        position_liquidation=pos_lp,
    )
