"""Bar-by-bar backtest of multi-instrument accounts through the margin engine, in cross or portfolio mode.

Each cycle of the population (:mod:`backtest.portfolio_population`) runs on its own instruments; the insurance
fund and the ledger carry across cycles. Timing follows :mod:`margin.controls`: the grid published at the close of
bar ``t`` (``GridPath`` row ``t``) sets the IM of books opening at that close and binds on open books during bar
``t + 1``.

* **Opening** (a cycle's first close): every account's book is margined with ``compute_margin`` under the opening
  grid (``range_new``); it posts ``buffer × max(IM, min_posted × gross notional)`` of haircut collateral in its
  collateral asset (the amount is that value divided by price and haircuts).
* **Each bar**: marks (perps at the close, the future with carry, options by Black-76 on the implied-vol path);
  ``compute_margin(portfolio, params, mode, scenarios="grid", liquidation_price=False)`` gives per pool IM, MM and
  the health factor ``(haircut collateral + uPnL) / MM``.
* **Liquidation** of pools with health <= 1, the worst pool first (ascending health): the fraction to close comes
  from :func:`margin.liquidation.liquidate_accounts` (partial close to ``target_health``, full close when the
  penalty and slippage exceed equity); the positions of every row of the pool are cut pro rata, the closed part's
  P&L is realised into the pool's home-chain USDC, the penalty goes to the insurance fund, and on a full close the
  loss past zero (on market-value equity) is bad debt, paid by the fund while it lasts (worst pool first) and
  otherwise uncovered. Slippage: ``slippage_base + slippage_range_coef × max_u |r_u,t|`` (a close-to-close proxy of
  the bar's range; the volume term is off), on gross notional.
* **Margin calls**: pools still open with health below ``margin_call_health`` that answer calls deposit home-chain
  USDC to bring haircut equity back to IM.
* **Closing** (the cycle's last close): the remaining equity is withdrawn.
* **Accounting identity** (every bar, :class:`margin.liquidation.Ledger`): market-value equity of the open pools +
  withdrawn = deposits + top-ups + mark-to-market P&L (positions and collateral, from bar-to-bar price changes)
  - penalties - slippage + bad debt; fund = initial + penalties - draws; bad debt = draws + uncovered.

Gross notional (penalty, slippage, exposure): ``|contracts| × underlying price`` for every instrument (options
included, a stated choice). ``avg_collateral`` = posted collateral (USD at posting, × bars held) / policy-independent
exposure (gross notional at opening × bars of the cycle), as in the isolated backtest.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from backtest.portfolio_population import SLOTS, AccountPopulation, CycleBook
from margin.accounts import MarketData, Portfolio
from margin.collateral import haircut_value, slot_haircuts
from margin.dynamic_grid import GridPath
from margin.engine import compute_margin
from margin.liquidation import Ledger, liquidate_accounts
from margin.params import LiquidationSettings, MarginParams

__all__ = ["PortfolioBacktestConfig", "PortfolioBacktestResult", "run_portfolio_backtest", "cycle_window",
           "margin_orderings"]

log = logging.getLogger(__name__)


def _default_liq() -> LiquidationSettings:
    return LiquidationSettings(slippage_volume_coef=0.0)


@dataclass(frozen=True)
class PortfolioBacktestConfig:
    """Settings of :func:`run_portfolio_backtest`.

    Parameters
    ----------
    mode : {"portfolio", "cross"}
        Engine mode every bar.
    liquidation : LiquidationSettings
        Penalty, partial-close rule, slippage, insurance fund (volume slippage is not modelled: keep it 0).
    template : MarginParams
        Non-grid fields of every market (haircuts, option rule for cross mode).
    margin_call_health : float
        Health below which an account that answers calls tops up to IM.
    min_posted : float
        Least collateral posted at opening, as a fraction of gross notional.
    check_identity : bool
        Check the accounting identity at every bar (raises when a residual exceeds ``1e-9`` relative).
    record_margins : bool
        Keep per-bar IM, MM and health per pool (``result.margins``; tests).
    """

    mode: str = "portfolio"
    liquidation: LiquidationSettings = field(default_factory=_default_liq)
    template: MarginParams = field(default_factory=lambda: MarginParams(market_id="_", im_rate=0.1, mm_rate=0.05))
    margin_call_health: float = 1.2
    min_posted: float = 0.01
    check_identity: bool = True
    record_margins: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("portfolio", "cross"):
            raise ValueError(f"mode must be 'portfolio' or 'cross', got {self.mode!r}")
        if self.margin_call_health < 1.0:
            raise ValueError(f"margin_call_health must be >= 1, got {self.margin_call_health!r}")
        if not 0.0 <= self.min_posted < 1.0:
            raise ValueError(f"min_posted must be in [0, 1), got {self.min_posted!r}")


@dataclass
class PortfolioBacktestResult:
    """Outcome of one grid policy on the account population (USD; rates as fractions).

    ``liquidations``: account-cycles liquidated at least once (partially or fully: traders hit);
    ``liquidation_events``: every liquidation step; ``full_closes``; ``bad_debt`` (before the fund), ``fund_draw``,
    ``uncovered_bad_debt``; ``avg_collateral`` = ``collateral_locked / exposure``; ``ledger_residual``: the largest
    relative residual of the identity over the bars. ``series``: per bar ``liquidations``, ``bad_debt``, ``fund``,
    ``collateral``, ``n_open``, ``top_ups``. ``per_pool``: per account, summed over cycles.
    """

    policy: str
    mode: str
    liquidations: int
    liquidation_events: int
    full_closes: int
    bad_debt: float
    fund_draw: float
    uncovered_bad_debt: float
    penalties: float
    slippage: float
    top_ups: int
    top_up_amount: float
    collateral_locked: float
    exposure: float
    avg_collateral: float
    ledger_residual: float
    n_account_cycles: int
    fund_end: float
    series: pd.DataFrame
    per_pool: dict[str, np.ndarray]
    margins: list[dict[str, np.ndarray]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        keys = ("liquidations", "liquidation_events", "full_closes", "bad_debt", "fund_draw", "uncovered_bad_debt",
                "penalties", "slippage", "top_ups", "top_up_amount", "collateral_locked", "exposure",
                "avg_collateral", "ledger_residual", "n_account_cycles", "fund_end")
        return {k: float(getattr(self, k)) for k in keys}


def cycle_window(pop: AccountPopulation, start: int = 0, end: int | None = None) -> list[CycleBook]:
    """Cycles opening in bars ``[start, end)``; one still open at ``end`` closes at bar ``end`` (the cut)."""
    end = len(pop.times) - 1 if end is None else min(end, len(pop.times) - 1)
    out = []
    for c in pop.cycles:
        if start <= c.start < end:
            out.append(c if c.stop <= end else CycleBook(c.start, end, c.instruments, c.positions, c.carry))
    return out


class _Cycle:
    """Arrays of one cycle's run (rows = the population's rows)."""

    def __init__(self, pop: AccountPopulation, book: CycleBook, cfg: PortfolioBacktestConfig) -> None:
        self.pop, self.book, self.cfg = pop, book, cfg
        self.n_rows, self.n_pools = pop.n_rows, pop.n_pools
        self.u_of_inst = np.array([pop.underlyings.index(x.underlying) for x in book.instruments])
        self.parent_row = np.r_[0, np.flatnonzero(np.diff(pop.pool_index)) + 1]  # first row of each pool
        base = MarketData({u: 1.0 for u in pop.underlyings}, {}, {}, self._coll_prices_dict(pop.closes[book.start]))
        self.template = Portfolio(
            account_ids=tuple(f"r{i}" for i in range(self.n_rows)), pool_index=pop.pool_index,
            pool_ids=tuple(f"p{i}" for i in range(self.n_pools)), instruments=book.instruments,
            positions=np.zeros_like(book.positions), entry=np.zeros_like(book.positions), slots=SLOTS,
            balances=np.zeros((self.n_rows, len(SLOTS))), market=base, as_of=pop.times[book.start].to_pydatetime())

    def _coll_prices_dict(self, closes_t: np.ndarray) -> dict[str, float]:
        und = self.pop.underlyings
        d = {"USDC": 1.0, "USDT": 1.0}
        for a in ("BTC", "ETH"):
            d[a] = float(closes_t[und.index(a)]) if a in und else 1.0
        return d

    def coll_prices(self, t: int) -> np.ndarray:
        d = self._coll_prices_dict(self.pop.closes[t])
        return np.array([d[a] for a, _ in SLOTS])

    def marks(self, t: int) -> tuple[MarketData, np.ndarray]:
        pop, b = self.pop, self.book
        if not hasattr(self, "_cm"):  # every bar of the cycle at once (vectorised Black-76)
            self._cm, self._vol = b.mark_path(pop.closes, pop.iv, pop.times, pop.underlyings, b.start, b.stop)
        cm, vol = self._cm[t - b.start], self._vol[t - b.start]
        und, inst, ivs = b.market_dicts(pop.closes[t], cm, vol, pop.underlyings)
        return MarketData(und, inst, ivs, self._coll_prices_dict(pop.closes[t])), cm

    def portfolio(self, t: int, market: MarketData, pos: np.ndarray, entry: np.ndarray, bal: np.ndarray) -> Portfolio:
        pf = copy.copy(self.template)  # keeps the instrument arrays; only row data and marks change
        for name, value in (("positions", pos), ("entry", entry), ("balances", bal), ("market", market),
                            ("as_of", self.pop.times[t].to_pydatetime())):
            object.__setattr__(pf, name, value)
        return pf


@dataclass(frozen=True)
class _PoolMargin:
    """The fields of :class:`margin.engine.MarginResult` the loop reads, per pool (closed pools: nothing required)."""

    im: np.ndarray
    mm: np.ndarray
    equity: np.ndarray
    unrealised: np.ndarray
    health: np.ndarray


def _margin_alive(cy: _Cycle, pf: Portfolio, prm: Any, mode: str, alive: np.ndarray) -> Any:
    """``compute_margin`` on the rows of open pools only (closed pools are flat and hold nothing)."""
    if alive.all():
        return compute_margin(pf, prm, mode, scenarios="grid", liquidation_price=False)
    n_p = len(alive)
    out = _PoolMargin(im=np.zeros(n_p), mm=np.zeros(n_p), equity=np.zeros(n_p), unrealised=np.zeros(n_p),
                      health=np.full(n_p, np.inf))
    if not alive.any():
        return out
    rows = alive[pf.pool_index]
    new_pool = np.cumsum(alive) - 1
    sub = copy.copy(pf)
    n_rows, n_pools = int(rows.sum()), int(alive.sum())
    for name, value in (("positions", pf.positions[rows]), ("entry", pf.entry[rows]), ("balances", pf.balances[rows]),
                        ("pool_index", new_pool[pf.pool_index[rows]]), ("account_ids", pf.account_ids[:n_rows]),
                        ("pool_ids", pf.pool_ids[:n_pools])):
        object.__setattr__(sub, name, value)
    res = compute_margin(sub, prm, mode, scenarios="grid", liquidation_price=False)
    for name in ("im", "mm", "equity", "unrealised", "health"):
        getattr(out, name)[alive] = getattr(res, name)
    return out


def _slot_factor(cfg: PortfolioBacktestConfig) -> np.ndarray:
    """Haircut value of one USD of each slot."""
    hc = cfg.template.haircuts
    base, off = slot_haircuts(SLOTS, hc)
    return haircut_value(np.ones(len(SLOTS)), base, hc.size_brackets, off, hc.bridge_haircut)


def run_portfolio_backtest(pop: AccountPopulation, path: GridPath, cfg: PortfolioBacktestConfig | None = None, *,
                           start: int = 0, end: int | None = None, scale: float = 1.0,
                           on_bar: Callable[[int, Portfolio, Any], None] | None = None) -> PortfolioBacktestResult:
    """Replay the cycles opening in bars ``[start, end)`` under ``path`` (see the module docstring).

    Parameters
    ----------
    pop : AccountPopulation
    path : GridPath
        On the population's bar times and underlyings.
    cfg : PortfolioBacktestConfig, optional
    start, end : int
        Bar window (``end`` is the cut: a cycle still open there closes at that bar).
    scale : float
        Multiplier on every spot range (a grid policy brought to a budget without re-running the controls).
    on_bar : callable, optional
        ``on_bar(t, portfolio, params)`` before each bar's liquidations (tests inspect the books margined).
    """
    cfg = cfg or PortfolioBacktestConfig()
    with threadpool_limits(limits=1):  # multi-threaded BLAS thrashes on these skinny products (docs/margin.md)
        return _run(pop, path, cfg, start, end, scale, on_bar)


def _run(pop: AccountPopulation, path: GridPath, cfg: PortfolioBacktestConfig, start: int, end: int | None,
         scale: float, on_bar: Callable[[int, Portfolio, Any], None] | None) -> PortfolioBacktestResult:
    if not path.times.equals(pop.times) or tuple(path.underlyings) != tuple(pop.underlyings):
        raise ValueError("path must be on the population's bar times and underlyings")
    liq = cfg.liquidation
    ledger = Ledger(fund_initial=liq.insurance_fund_initial)
    fund = liq.insurance_fund_initial
    factor = _slot_factor(cfg)
    n_p = pop.n_pools
    per = {k: np.zeros(n_p) for k in ("liquidations", "bad_debt", "collateral", "exposure", "top_ups")}
    per["liquidations"] = np.zeros(n_p, dtype=np.int64)
    rows_series: list[dict[str, float]] = []
    margins: list[dict[str, np.ndarray]] | None = [] if cfg.record_margins else None
    tot = {"events": 0, "full": 0, "hit": 0, "top_ups": 0, "top_up_amount": 0.0, "locked": 0.0, "exposure": 0.0,
           "n_cycles": 0}
    worst_resid = 0.0
    params_cache: dict[tuple[Any, ...], Any] = {}

    def params(t: int, opening: bool) -> Any:
        rng_ = path.range_new[t] if opening else path.range_open[t]
        key = (rng_.tobytes(), path.vol_shock[t].tobytes(), path.concentration_addon[t].tobytes(),
               float(path.stress_weight[t]), None if path.correlation is None else path.correlation[t].tobytes())
        if key not in params_cache:
            if len(params_cache) > 64:
                params_cache.clear()
            params_cache[key] = path.params_at(t, opening=opening, scale=scale, template=cfg.template,
                                               liquidation=liq)
        return params_cache[key]

    for book in cycle_window(pop, start, end):
        cy = _Cycle(pop, book, cfg)
        s, e = book.start, book.stop
        pos = book.positions.copy()
        market, cm = cy.marks(s)
        entry = np.where(pos != 0, cm[None, :], 0.0)
        bal = np.zeros((pop.n_rows, len(SLOTS)))
        pf = cy.portfolio(s, market, pos, entry, bal)
        res0 = compute_margin(pf, params(s, True), cfg.mode, scenarios="grid", liquidation_price=False)
        und_px = pop.closes[s][cy.u_of_inst]
        gross_rows = np.abs(pos) @ und_px
        gross = np.bincount(pop.pool_index, weights=gross_rows, minlength=n_p)
        need = pop.buffer * np.maximum(res0.im, cfg.min_posted * gross)
        cpx = cy.coll_prices(s)
        amount = need / (cpx[pop.slot] * factor[pop.slot])
        bal[cy.parent_row, pop.slot] = amount
        posted = need / factor[pop.slot]  # USD market value at posting
        ledger.deposits += float(posted.sum())
        alive = gross > 0
        exposure = gross * (e - s)
        tot["exposure"] += float(exposure.sum())
        per["exposure"] += exposure
        tot["n_cycles"] += int(alive.sum())
        hit = np.zeros(n_p, dtype=bool)
        basis = float((pos * entry).sum())  # sum of contracts × entry: changes only when positions do
        prev_cm, prev_cpx = cm, cpx
        for t in range(s + 1, e + 1):
            market, cm = cy.marks(t)
            cpx = cy.coll_prices(t)
            # mark-to-market P&L of the bar (positions and collateral held through it)
            ledger.realised_pnl += float((pos @ (cm - prev_cm)).sum() + (bal @ (cpx - prev_cpx)).sum())
            prev_cm, prev_cpx = cm, cpx
            tot["locked"] += float(posted[alive].sum())
            per["collateral"] += np.where(alive, posted, 0.0)
            pf = cy.portfolio(t, market, pos, entry, bal)
            prm = params(t - 1, False)
            res = _margin_alive(cy, pf, prm, cfg.mode, alive)
            if on_bar is not None:
                on_bar(t, pf, prm)
            raw_coll = np.bincount(pop.pool_index, weights=bal @ cpx, minlength=n_p)
            eq_raw = raw_coll + res.unrealised  # market-value equity (the engine's uPnL, collateral unhaircut)
            health = res.health
            if margins is not None:
                margins.append({"bar": np.array(t), "im": res.im.copy(), "mm": res.mm.copy(), "health": health.copy(),
                                "alive": alive.copy()})
            bar_bad = bar_draw = 0.0
            n_liq = 0
            trig = np.flatnonzero(alive & (health <= 1.0))
            if trig.size:
                trig = trig[np.argsort(health[trig], kind="stable")]  # worst pool first
                r_t = np.abs(np.log(pop.closes[t] / pop.closes[t - 1])).max()
                slip_rate = liq.slippage_base + liq.slippage_range_coef * r_t
                gross_now = np.bincount(pop.pool_index, weights=np.abs(pos) @ pop.closes[t][cy.u_of_inst],
                                        minlength=n_p)
                step = liquidate_accounts(res.equity[trig], res.mm[trig], gross_now[trig], liq, slip_rate)
                f = step["fraction"]
                n_t = gross_now[trig]
                slip = f * n_t * slip_rate
                e_s = eq_raw[trig] - slip
                pen = np.clip(e_s, 0.0, f * n_t * liq.penalty_rate)
                full = f >= 1.0
                bad = np.where(full, np.maximum(-e_s, 0.0), 0.0)
                returned = np.where(full, np.maximum(e_s - pen, 0.0), 0.0)
                for j in range(trig.size):  # the fund pays the worst pool first (trig is sorted by health)
                    d = min(fund, float(bad[j]))
                    fund -= d
                    bar_draw += d
                ledger.penalties += float(pen.sum())
                ledger.slippage += float(slip.sum())
                ledger.bad_debt += float(bad.sum())
                ledger.fund_draw += bar_draw
                ledger.uncovered_bad_debt += float(bad.sum()) - bar_draw
                ledger.withdrawn += float(returned.sum())
                fund += float(pen.sum())
                bar_bad = float(bad.sum())
                upnl_rows = ((cm[None, :] - entry) * pos).sum(axis=1)
                rows_f = np.zeros(n_p)
                rows_f[trig] = f
                fr = rows_f[pop.pool_index]  # per row
                realised_rows = fr * upnl_rows
                # partial: realise the closed part into home-chain USDC of the parent row, pay penalty + slippage
                part = trig[~full]
                cash = np.zeros(n_p)
                np.add.at(cash, pop.pool_index, realised_rows)
                cash[part] -= slip[~full] + pen[~full]
                bal[cy.parent_row[part], 0] += cash[part]
                pos *= (1.0 - fr)[:, None]
                gone = trig[full]
                gone_rows = np.isin(pop.pool_index, gone)
                pos[gone_rows] = 0.0
                bal[gone_rows] = 0.0
                entry[gone_rows] = 0.0
                posted[trig] *= 1.0 - f
                alive[gone] = False
                basis = float((pos * entry).sum())
                newly = ~hit[trig]
                per["liquidations"][trig[newly]] += 1
                hit[trig] = True
                per["bad_debt"][trig] += bad
                n_liq = int(trig.size)
                tot["events"] += n_liq
                tot["full"] += int(full.sum())
                tot["hit"] += int(newly.sum())
            # margin calls: pools still open, below the call level, that answer calls, top up to IM
            tu = 0
            if t < e:
                liq_now = np.zeros(n_p, dtype=bool)
                liq_now[trig] = True
                call = alive & ~liq_now & pop.tops_up & (health < cfg.margin_call_health) & (res.im > res.equity)
                if call.any():
                    d = (res.im[call] - res.equity[call]) / factor[0]
                    bal[cy.parent_row[call], 0] += d
                    posted[call] += d
                    ledger.top_ups += float(d.sum())
                    tot["top_ups"] += int(call.sum())
                    tot["top_up_amount"] += float(d.sum())
                    per["top_ups"][call] += 1
                    tu = int(call.sum())
            if t == e:  # the cycle closes: withdraw what is left
                upnl_rows = ((cm[None, :] - entry) * pos).sum(axis=1)
                left = (bal @ cpx).sum() + upnl_rows.sum()
                ledger.withdrawn += float(left)
                pos[:] = 0.0
                bal[:] = 0.0
                entry[:] = 0.0
                alive[:] = False
            if cfg.check_identity:  # open equity from marks and entries, independently of the flows booked
                open_eq = float((bal.sum(axis=0) @ cpx) + (pos @ cm).sum() - (basis if t < e else 0.0))
                r = ledger.residuals(open_eq, fund)
                sc = ledger.scale()
                worst = max(abs(v) for v in r.values()) / sc
                worst_resid = max(worst_resid, worst)
                if worst > 1e-9:
                    raise AssertionError(f"accounting identity broken at bar {t}: residuals {r} (scale {sc:.3g})")
            rows_series.append({"bar": t, "liquidations": n_liq, "bad_debt": bar_bad, "fund_draw": bar_draw,
                                "fund": fund, "collateral": float(posted[alive].sum()), "n_open": int(alive.sum()),
                                "top_ups": tu})
    series = pd.DataFrame(rows_series)
    if len(series):
        series.index = pop.times[series["bar"].to_numpy()]
    exp_ = tot["exposure"]
    return PortfolioBacktestResult(
        policy=path.policy, mode=cfg.mode, liquidations=tot["hit"], liquidation_events=tot["events"],
        full_closes=tot["full"], bad_debt=ledger.bad_debt, fund_draw=ledger.fund_draw,
        uncovered_bad_debt=ledger.uncovered_bad_debt, penalties=ledger.penalties, slippage=ledger.slippage,
        top_ups=tot["top_ups"], top_up_amount=tot["top_up_amount"], collateral_locked=tot["locked"], exposure=exp_,
        avg_collateral=tot["locked"] / exp_ if exp_ > 0 else math.nan, ledger_residual=worst_resid,
        n_account_cycles=tot["n_cycles"], fund_end=fund, series=series, per_pool=per, margins=margins,
        meta={"scale": scale, "start": start, "end": end})


def margin_orderings(pf: Portfolio, params: Any) -> dict[str, np.ndarray]:
    """Per pool, the grid IM of one book three ways: ``portfolio`` (the engine's portfolio mode, with the offsets
    of ``params``), ``cross`` (each underlying's grid, summed: no offsets) and ``isolated`` (each instrument's grid,
    summed), add-ons off. Sub-additivity of the worst loss and ``sqrt(m' L m) <= sum m`` give
    ``portfolio <= cross <= isolated``."""
    from dataclasses import replace

    from margin.instruments import scenario_pnl
    from margin.params import ParamsFile, RiskModel
    from margin.portfolio import grid_shocks, scenario_margin

    port = compute_margin(pf, params, "portfolio", scenarios="grid", liquidation_price=False).im
    nocorr = ParamsFile(markets=params.markets, risk_model=replace(params.risk_model, grid_correlation=(),
                                                                   grid_stress_weight=0.0)
                        if params.risk_model.grid_correlation else RiskModel())
    cross = compute_margin(pf, nocorr, "portfolio", scenarios="grid", liquidation_price=False).im
    arr = pf.arrays
    by = params.by_market()
    mark = pf.underlying_price_per_instrument()
    sig = pf.implied_vol()
    iso_rows = np.zeros(pf.positions.shape[0])
    for u, name in enumerate(arr.underlyings_unique):
        cols = np.flatnonzero(arr.underlying_index == u)
        from margin.instruments import InstrumentArrays

        sub = InstrumentArrays.from_instruments([pf.instruments[c] for c in cols])
        sh, vo = grid_shocks(by[name].scenario_grid)
        s_mat = scenario_pnl(sub, mark[cols], sig[cols], pf.as_of, sh, vo)
        iso_rows += scenario_margin(pf.positions[:, cols], s_mat, groups=np.arange(len(cols)))
    iso = np.bincount(pf.pool_index, weights=iso_rows, minlength=pf.n_pools)
    return {"portfolio": port, "cross": cross, "isolated": iso}
