"""One entry point for the three margin modes: requirements, health factor and liquidation price.

``compute_margin(portfolio, params, mode)`` returns per-pool (top-level account) IM, MM, haircut collateral,
unrealised P&L, health factor ``(collateral + uPnL) / MM`` and a liquidation price:

* isolated: per position, the exact closed form (:mod:`margin.isolated`) with the position's isolated
  margin ``W`` = its initial margin at entry unless given; the account row reports the largest position's;
* cross / portfolio: the price of the account's dominant underlying (largest |delta notional|) at which
  the health factor reaches 1, everything else fixed (options repriced with Black-76 at their implied vol,
  collateral in that asset revalued). Found for all accounts at once (no loop over accounts): secant
  bracketing, then regula falsi (Illinois) on the accounts still searching; NaN when no price in
  [0.01 F, 11 F] liquidates the account.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from margin.accounts import Portfolio, pool_sum
from margin.collateral import collateral_value
from margin.cross import cross_requirements
from margin.instruments import InstrumentArrays, black76_price, unrealised_pnl
from margin.isolated import (
    isolated_requirements,
    liquidation_price_inverse,
    liquidation_price_linear,
    liquidation_price_tiered,
    tier_lookup,
    tier_table,
)
from margin.params import MarginParams, ParamsFile
from margin.portfolio import (
    aggregate_grid_risk,
    delta_notional,
    fhs_scenarios,
    grid_shocks,
    option_addons,
    risk_measure,
)

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
    correlation: np.ndarray | None = None  # FHS mode: EWMA correlation across underlyings (real time)
    position_lp: np.ndarray | None = None  # (A, I) isolated liquidation price per position (NaN: none)
    position_margin: np.ndarray | None = None  # (A, I) isolated margin per position
    positions: np.ndarray | None = None
    instrument_ids: tuple[str, ...] = ()

    @property
    def position_liquidation(self) -> list[dict[str, Any]]:
        """Isolated mode: one record per open position (account, instrument, size, margin, liquidation price)."""
        if self.position_lp is None or self.positions is None:
            return []
        rows, cols = np.nonzero(self.positions)
        return [
            {
                "pool": self.pool_ids[self.pool_index[r]],
                "account": self.account_ids[r],
                "instrument": self.instrument_ids[i],
                "size": float(self.positions[r, i]),
                "isolated_margin": float(self.position_margin[r, i]),
                "liquidation_price": None if not np.isfinite(self.position_lp[r, i]) else float(self.position_lp[r, i]),
            }
            for r, i in zip(rows.tolist(), cols.tolist(), strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return None if not np.isfinite(x) else float(x)

        accounts = []
        by_pool: dict[str, list[dict[str, Any]]] = {}
        for rec in self.position_liquidation:
            by_pool.setdefault(rec["pool"], []).append(rec)
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
                    "positions": by_pool.get(pid, []),
                }
            )
        out: dict[str, Any] = {"mode": self.mode, "scenarios": self.scenarios, "accounts": accounts}
        if self.correlation is not None:
            out["ewma_correlation"] = self.correlation.tolist()
        return out


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
        self.haircuts = list(dict.fromkeys(m.haircuts for m in params.markets))  # identical configs valued once
        self.mark = pf.underlying_price_per_instrument()
        self.cmark = pf.contract_mark()
        self.sigma = pf.implied_vol()
        self.now = pf.as_of
        self.scenarios = scenarios
        self.correlation: np.ndarray | None = None
        insts = pf.instruments
        self.sub_arrays = []
        for u in range(len(self.arr.underlyings_unique)):
            cols = np.flatnonzero(self.arr.underlying_index == u)
            self.sub_arrays.append((cols, InstrumentArrays.from_instruments([insts[c] for c in cols])))
        if mode == "portfolio" and scenarios == "fhs":
            rm = params.risk_model
            cols = [rm.underlyings.index(u) for u in self.arr.underlyings_unique]
            ret = np.asarray(rm.historical_returns, dtype=np.float64)
            shocks, corr = fhs_scenarios(ret, rm.ewma_lambda, rm.horizon_bars, warmup=min(20, len(ret) // 4))
            self.fhs_spot = shocks[:, cols].T  # (U, n)
            self.correlation = corr[np.ix_(cols, cols)]
        self.grid_corr: np.ndarray | None = None
        self.grid_stress = 0.0
        rm = params.risk_model
        if mode == "portfolio" and scenarios == "grid" and rm.grid_correlation:
            missing = [u for u in self.arr.underlyings_unique if u not in rm.underlyings]
            if missing:
                raise ValueError(f"risk_model.grid_correlation does not cover underlyings {missing} "
                                 f"(it has {list(rm.underlyings)})")
            cols = [rm.underlyings.index(u) for u in self.arr.underlyings_unique]
            self.grid_corr = np.asarray(rm.grid_correlation, dtype=np.float64)[np.ix_(cols, cols)]
            self.grid_stress = rm.grid_stress_weight

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
        sign_u = np.ones((p.shape[0], n_u))
        for u, g in enumerate(grids):
            cols, sub = self.sub_arrays[u]
            sh, vo = grid_shocks(g)
            s = scenario_pnl(sub, mark[..., cols], self.sigma[cols], self.now, sh, vo)
            if s.ndim == 2:
                loss = p[:, cols] @ -s  # negate the small S, not the (A, n) product (exact either way)
            else:
                loss = -np.einsum("ai,ain->an", p[:, cols], s)
            if self.grid_corr is not None:  # direction of the worst scenario: +1 spot down, -1 spot up
                worst = loss.argmax(axis=-1)
                sign_u[:, u] = np.where(sh[worst] <= 0.0, 1.0, -1.0)
                risk = (np.take_along_axis(loss, worst[:, None], axis=-1)[:, 0] if g.measure == "max"
                        else risk_measure(loss, g.measure, g.confidence))
                im_u[:, u] = np.maximum(risk, 0.0)
            else:
                im_u[:, u] = np.maximum(risk_measure(loss, g.measure, g.confidence), 0.0)
        if self.grid_corr is not None:
            base = aggregate_grid_risk(im_u, sign_u, self.grid_corr, self.grid_stress)
            base_mm = aggregate_grid_risk(im_u * frac, sign_u, self.grid_corr, self.grid_stress)
            return base + add.sum(axis=1), base_mm + add @ frac
        im_u += add
        return im_u.sum(axis=1), im_u @ frac


def _isolated_position_lp(st: _State, im_pos: np.ndarray) -> np.ndarray:
    """``(A, I)`` isolated liquidation prices with ``W`` = each position's IM (NaN for options/flat/none)."""
    pf, arr = st.pf, st.arr
    out = np.full(pf.positions.shape, np.nan)
    for i in range(len(arr.ids)):  # loop over instruments (columns), vectorised over accounts
        q = pf.positions[:, i]
        r = np.flatnonzero(q)
        if arr.is_option[i] or r.size == 0:
            continue
        prm = st.prm_i[i]
        entry = pf.entry[r, i]
        w = im_pos[r, i] / entry if arr.is_inverse[i] else im_pos[r, i]
        fee = prm.taker_fee_rate if prm.close_fee_in_mm else 0.0
        tiers = prm.tiers_at(st.now)
        side, qa, cs = np.sign(q[r]), np.abs(q[r]), arr.contract_size[i]
        if arr.is_inverse[i]:
            # tiers on the USD notional N = q c (fixed): MM in coin = (m N - cum) / P = m_eff N / P
            tab = tier_table(tiers)
            n_usd = qa * cs
            k = tier_lookup(n_usd, tab)
            m_eff = tab["mm"][k] - tab["cum_mm"][k] / n_usd
            lp = liquidation_price_inverse(side, qa, entry, w, m_eff, 0.0, fee, cs)
        elif prm.mm_basis == "entry":
            tab = tier_table(tiers)
            k = tier_lookup(qa * cs * entry, tab)
            lp = liquidation_price_linear(side, qa, entry, w, tab["mm"][k], tab["cum_mm"][k], fee, cs, mm_basis="entry")
        else:
            lp = liquidation_price_tiered(side, qa, entry, w, tiers, close_fee_rate=fee, contract_size=cs)
        out[r, i] = np.where(np.isfinite(lp) & (lp > 0), lp, np.nan)
    return out


def _equity(st: _State, mark_rows: np.ndarray, cmark_rows: np.ndarray, coll_prices: np.ndarray) -> np.ndarray:
    pf, arr = st.pf, st.arr
    u = unrealised_pnl(pf.positions, pf.entry, cmark_rows, arr.contract_size, arr.is_inverse).sum(axis=1)
    c_rows = collateral_value(pf.balances, coll_prices, pf.slots, st.haircuts)
    return pool_sum(c_rows + u, pf.pool_index, pf.n_pools)


#: Domain of the relative move ``x`` of the dominant underlying searched for a liquidation price: ``F (1 + x)``
#: in ``[0.01 F, 11 F]``.
_X_DOWN, _X_UP = -0.99, 10.0
#: Coarse levels of ``|x|`` the bracketing falls back to when the secant extrapolation does not bracket.
_LEVELS = np.array([0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.9, 0.99, 1.5,
                    2.5, 5.0, 10.0])
_SECANT_TRIES = 4  # extrapolation steps per pool before falling back to the coarse levels
_OVERSHOOT = 1.02  # extrapolated steps go 2 % past the secant root so that the root is bracketed
_X_TOL = 1e-13  # bracket width (relative to 1 + |x|) at which a pool has converged


class _PoolRows:
    """Rows of each pool, to evaluate pools (repeats allowed) on a sub-portfolio of their rows."""

    def __init__(self, pf: Portfolio) -> None:
        self.order = np.argsort(pf.pool_index, kind="stable")
        self.starts = np.searchsorted(pf.pool_index[self.order], np.arange(pf.n_pools + 1))

    def view(self, st: _State, pools: np.ndarray) -> _State:
        """``st`` on the rows of ``pools`` (pool numbers, repeats allowed): row ``j`` of the result's pools is
        ``pools[j]``; the full state when ``pools`` is every pool in order."""
        pf = st.pf
        if len(pools) == pf.n_pools and np.array_equal(pools, np.arange(pf.n_pools)):
            return st
        first, cnt = self.starts[pools], self.starts[pools + 1] - self.starts[pools]
        new_pool = np.repeat(np.arange(len(pools)), cnt)
        rows = self.order[np.repeat(first - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))]
        sub_pf = copy.copy(pf)  # keeps the instrument arrays; only the row fields change
        for name, value in (("account_ids", tuple(map(pf.account_ids.__getitem__, rows.tolist()))),
                            ("pool_index", new_pool),
                            ("pool_ids", tuple(map(pf.pool_ids.__getitem__, pools.tolist()))),
                            ("positions", pf.positions[rows]), ("entry", pf.entry[rows]),
                            ("balances", pf.balances[rows])):
            object.__setattr__(sub_pf, name, value)
        sub = copy.copy(st)
        sub.pf = sub_pf
        return sub


def _gap_function(st: _State) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], np.ndarray, np.ndarray]:
    """``gap(x, pools)``: equity - MM of ``pools`` with their dominant underlying moved by ``x`` (relative;
    ``x[j]`` for ``pools[j]``, a pool may repeat with several moves).

    Returns ``(gap, ustar, dval)``: the function, each pool's dominant underlying and its delta notional
    (USD, collateral held in that coin included). Only the rows of ``pools`` are evaluated.
    """
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
    t = arr.time_to_expiry(st.now)
    o = arr.is_option
    base_opt = black76_price(st.mark[o], arr.strike[o], t[o], st.sigma[o], arr.is_call[o])
    cprice = pf.collateral_prices()
    slot_asset = np.array([a for a, _ in pf.slots], dtype=object)
    und_names = np.array(arr.underlyings_unique, dtype=object)
    pool_rows = _PoolRows(pf)

    def gap(x: np.ndarray, pools: np.ndarray) -> np.ndarray:
        sub = pool_rows.view(st, pools)
        spf = sub.pf
        x_rows = x[spf.pool_index]
        u_rows = ustar[pools][spf.pool_index]
        hit = arr.underlying_index[None, :] == u_rows[:, None]
        mark_rows = st.mark[None, :] * (1.0 + x_rows[:, None] * hit)
        cmark_rows = np.where(arr.is_option[None, :], st.cmark[None, :], mark_rows)
        if o.any():
            new = black76_price(mark_rows[:, o], arr.strike[o], t[o], st.sigma[o], arr.is_call[o])
            cmark_rows[:, o] = st.cmark[o] + new - base_opt
        chit = slot_asset[None, :] == und_names[u_rows][:, None]
        cp = cprice[None, :] * (1.0 + x_rows[:, None] * chit)
        _, mm = sub.requirements(mark_rows, cmark_rows)
        return _equity(sub, mark_rows, cmark_rows, cp) - pool_sum(mm, spf.pool_index, spf.n_pools)

    return gap, ustar, dval


def _liquidation_search(st: _State) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """Dominant-underlying price at which each pool's equity equals its MM (vectorised over pools).

    ``x`` (the relative move of the dominant underlying in the losing direction) is bracketed by secant
    extrapolation from ``x = 0`` and a 1 % probe (2 % past the secant root; exact for the piecewise-linear
    equity - MM of perps and futures), falling back to coarse levels out to ``F (1 + x)`` in ``[0.01 F, 11 F]``,
    then refined by regula falsi with the Illinois modification until the bracket is narrower than
    ``1e-13 (1 + |x|)`` or ``|equity - MM|`` divided by the bracket's slope is below ``1e-13 (1 + x)`` (the
    price to ~1e-13 relative). Every step evaluates only the pools still searching; the coarse levels of
    all pools that need them are evaluated together in one step.
    """
    pf, arr = st.pf, st.arr
    n = pf.n_pools
    gap, ustar, dval = _gap_function(st)
    direction = -np.sign(dval)  # the move that loses money
    x_end = np.where(direction < 0, _X_DOWN, _X_UP)
    x_out = np.full(n, np.nan)
    act = np.flatnonzero(direction != 0)
    a = np.zeros(n)  # healthy side (gap > 0)
    ga = np.zeros(n)
    b = np.zeros(n)  # liquidated side (gap <= 0)
    gb = np.zeros(n)
    if act.size:
        g0 = gap(np.zeros(act.size), act)
        x_out[act[g0 <= 0]] = 0.0  # liquidatable at the current marks
        ga[act] = g0
    # bracketing: secant extrapolation through the last two healthy points (2 % past its root) ...
    cand = act[ga[act] > 0] if act.size else act
    p, gp = np.zeros(n), np.zeros(n)  # the healthy point before ``a``
    x_try = direction[cand] * 0.01
    bracketed = np.zeros(n, dtype=bool)
    scan = [np.zeros(0, dtype=int)]
    for step in range(_SECANT_TRIES + 1):
        if cand.size == 0:
            break
        g = gap(x_try, cand)
        liq = g <= 0
        hit = cand[liq]
        b[hit], gb[hit], bracketed[hit] = x_try[liq], g[liq], True
        ok = cand[~liq]
        p[ok], gp[ok] = a[ok], ga[ok]
        a[ok], ga[ok] = x_try[~liq], g[~liq]
        cand = ok[a[ok] != x_end[ok]]  # healthy at the end of the domain: no liquidation price (NaN)
        if step == _SECANT_TRIES:
            break
        ac, dc = a[cand], direction[cand]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            stepv = _OVERSHOOT * ga[cand] * (ac - p[cand]) / (gp[cand] - ga[cand])
        good = np.isfinite(stepv) & (stepv * dc > 0)
        scan.append(cand[~good])  # equity - MM does not fall towards a root: the coarse levels decide
        cand, ac, dc, stepv = cand[good], ac[good], dc[good], stepv[good]
        x_try = np.where(dc < 0, np.maximum(ac + stepv, _X_DOWN), np.minimum(ac + stepv, _X_UP))
    # ... else every coarse level beyond the last healthy point out to the end of the domain, in one evaluation
    sc = np.concatenate([*scan, cand])
    if sc.size:
        end = np.abs(x_end[sc])[:, None]
        lev = np.minimum(_LEVELS[None, :], end)
        ok_lv = (lev > np.abs(a[sc])[:, None]) & np.c_[np.ones(sc.size, dtype=bool), lev[:, 1:] != lev[:, :-1]]
        i, j = np.nonzero(ok_lv)
        xs = direction[sc][:, None] * lev
        g_lv = np.full(lev.shape, np.inf)
        g_lv[i, j] = gap(xs[i, j], sc[i])
        neg = g_lv <= 0
        has = neg.any(axis=1)
        first = np.argmax(neg, axis=1)
        prev = np.maximum(first - 1, 0)
        rr = np.arange(sc.size)
        use_prev = has & (first > 0) & ok_lv[rr, prev]
        k_prev = sc[use_prev]
        a[k_prev], ga[k_prev] = xs[rr, prev][use_prev], g_lv[rr, prev][use_prev]
        k_hit = sc[has]
        b[k_hit], gb[k_hit], bracketed[k_hit] = xs[rr, first][has], g_lv[rr, first][has], True
    # regula falsi (Illinois) inside each bracket
    live = np.flatnonzero(bracketed)
    side = np.zeros(n, dtype=int)  # which end moved last: +1 b, -1 a
    for _ in range(100):
        if live.size == 0:
            break
        al, bl, gal, gbl = a[live], b[live], ga[live], gb[live]
        narrow = np.abs(bl - al) <= _X_TOL * (1.0 + np.abs(bl))
        x_out[live[narrow]] = bl[narrow]
        keep = ~narrow
        live, al, bl, gal, gbl = live[keep], al[keep], bl[keep], gal[keep], gbl[keep]
        if live.size == 0:
            break
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            c = bl - gbl * (bl - al) / (gbl - gal)
        bad = ~np.isfinite(c) | (c <= np.minimum(al, bl)) | (c >= np.maximum(al, bl))
        c = np.where(bad, 0.5 * (al + bl), c)
        g = gap(c, live)
        neg = g <= 0
        sl = side[live]
        ga[live] = np.where(neg & (sl == 1), 0.5 * gal, gal)  # Illinois: halve the stale end
        gb[live] = np.where(~neg & (sl == -1), 0.5 * gbl, gbl)
        b[live[neg]], gb[live[neg]] = c[neg], g[neg]
        a[live[~neg]], ga[live[~neg]] = c[~neg], g[~neg]
        side[live] = np.where(neg, 1, -1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slope = np.abs((gbl - gal) / (bl - al))
        done = np.abs(g) <= _X_TOL * slope * (1.0 + c)  # |x - root| below ~1e-13 of the price F (1 + x)
        x_out[live[done]] = c[done]
        live = live[~done]
    if live.size:  # not converged in 100 steps (not expected): the liquidated end
        x_out[live] = b[live]
    f_u = np.zeros(len(arr.underlyings_unique))
    f_u[arr.underlying_index] = st.mark
    lp = f_u[ustar] * (1.0 + x_out)
    name_of = np.array([*arr.underlyings_unique, None], dtype=object)  # the last entry: no dominant underlying
    names = tuple(name_of[np.where(direction != 0, ustar, len(arr.underlyings_unique))].tolist())
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
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # equity / a subnormal MM: inf
        health = np.where(mm > 0, equity / mm, np.inf)
    pos_lp = im_pos = None
    if mode == "isolated":
        arr = pf.arrays
        im_pos, _ = isolated_requirements(
            pf.positions, pf.entry, st.mark, st.cmark, arr.contract_size, arr.is_inverse, arr.is_option,
            arr.is_call, arr.strike, st.prm_i, st.now,
        )
        pos_lp = _isolated_position_lp(st, im_pos)
        # per pool: the liquidation price of its largest position (by USD notional) that has one
        notional = np.abs(pf.positions) * np.where(arr.is_inverse, arr.contract_size, arr.contract_size * st.mark)
        notional = np.where(np.isfinite(pos_lp), notional, -1.0)
        best_col = notional.argmax(axis=1)
        rows = np.arange(pf.positions.shape[0])
        row_best = notional[rows, best_col]
        order = np.lexsort((row_best, pf.pool_index))  # by pool, then notional ascending
        last = np.r_[pf.pool_index[order][1:] != pf.pool_index[order][:-1], True]
        pick = order[last]  # best row per pool (pools without rows keep NaN)
        lp = np.full(pf.n_pools, np.nan)
        ok = row_best[pick] > 0
        lp[pf.pool_index[pick[ok]]] = pos_lp[pick[ok], best_col[pick[ok]]]
        names = np.full(pf.n_pools, None, dtype=object)
        names[pf.pool_index[pick[ok]]] = np.array(arr.underlyings, dtype=object)[best_col[pick[ok]]]
        lnames = tuple(names.tolist())
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
        correlation=st.correlation,
        position_lp=pos_lp,
        position_margin=im_pos,
        positions=pf.positions if mode == "isolated" else None,
        instrument_ids=pf.arrays.ids,
    )
