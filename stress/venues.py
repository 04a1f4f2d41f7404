"""Contagion across venues: a perp venue (the margin engine, cross or portfolio accounts) and a lending market.

Traders hold a cross (or portfolio) account on the perp venue, margined by :func:`margin.engine.compute_margin`
with collateral in USDC, ETH and BTC bridged from another chain (valued by :mod:`margin.collateral`'s
haircuts), and a loan on the lending market: ETH and BTC deposited, USDC borrowed (the USDC they post on the
perp venue). Both venues trade against one spot market per asset, moved by the
:class:`stress.impact.ImpactModel`; each step runs waves until no account is liquidatable:

* perp venue: accounts with health ``<= 1`` are liquidated by :func:`margin.liquidation.liquidate_accounts`
  (partial: the fraction ``f`` of every position closes at the mark; full: positions close, the account's
  ETH/BTC collateral is sold, bad debt goes to the insurance fund);
* lending market: a loan with ``Σ units × price × liquidation_threshold < debt × USDC price`` is liquidated:
  the liquidator repays ``close_factor`` of the debt and seizes collateral worth ``repaid × (1 + bonus)``
  pro rata by value (all of it, and the rest of the debt is bad debt, when that is not enough) and sells it;
* the sales and perp close-outs move the spot prices, which marks down the collateral and positions on the
  other venue: the next wave.

Bridge outage: from ``bridge_outage_bar`` the bridged collateral gets ``outage_haircut`` as its bridge haircut
(1.0 = worth zero). Stablecoin depeg and correlations go through the scenario's price paths.

Conservation: every trade is against the outside market at the executed price, so cash and units move
between parties and are never created; :meth:`ContagionResult.conservation` reports the residuals
(``Σ cash``, ``Σ units`` per asset over every party, and total wealth at the final prices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pandas as pd

from margin.accounts import MarketData, Portfolio
from margin.engine import compute_margin
from margin.instruments import Instrument
from margin.liquidation import liquidate_accounts
from margin.params import CollateralHaircuts, LiquidationSettings, MarginParams, ParamsFile
from stress.impact import ImpactModel

__all__ = ["VenueConfig", "ContagionResult", "run_contagion", "ASSETS"]

ASSETS: tuple[str, ...] = ("BTC", "ETH")
_SLOTS = (("USDC", "ethereum"), ("ETH", "ethereum"), ("BTC", "arbitrum"))
_NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class VenueConfig:
    """Traders, the perp venue and the lending market (USD amounts, rates as fractions).

    Parameters
    ----------
    n_traders : int
    seed : int
    perp_mode : {"cross", "portfolio"}
        Margin mode of the perp accounts.
    leverage : float
        Median desired perp leverage at the start (notional / haircut collateral), lognormal with
        ``leverage_sigma``, capped by ``1 / IM`` of the first step (the larger of the two markets' IM).
    long_share : float
        Share of traders long (both perps on the same side).
    equity_usd : float
        Median trader wealth, lognormal (sigma 1).
    ltv : float
        Loan-to-value of each loan at the start (below ``liquidation_threshold``).
    liquidation_threshold, close_factor, liquidation_bonus : float
        Lending market rules.
    fund_initial : float
        Perp insurance fund.
    liquidation : LiquidationSettings
        Perp liquidation rule.
    bridge_outage_bar : int, optional
        Bar from which bridged collateral is haircut by ``outage_haircut``.
    outage_haircut : float
        Bridge haircut during the outage (1.0 = zero value).
    max_waves : int
    """

    n_traders: int = 2000
    seed: int = 0
    perp_mode: Literal["cross", "portfolio"] = "cross"
    leverage: float = 4.0
    leverage_sigma: float = 0.5
    long_share: float = 0.7
    equity_usd: float = 20_000.0
    ltv: float = 0.65
    liquidation_threshold: float = 0.8
    close_factor: float = 0.5
    liquidation_bonus: float = 0.05
    fund_initial: float = 2.0e6
    liquidation: LiquidationSettings = field(default_factory=LiquidationSettings)
    bridge_outage_bar: int | None = None
    outage_haircut: float = 1.0
    max_waves: int = 50

    def __post_init__(self) -> None:
        if int(self.n_traders) != self.n_traders or self.n_traders < 2:
            raise ValueError(f"venues.n_traders must be an integer >= 2, got {self.n_traders!r}")
        if self.perp_mode not in ("cross", "portfolio"):
            raise ValueError(f"venues.perp_mode must be 'cross' or 'portfolio', got {self.perp_mode!r}")
        if not 0.0 < self.ltv < self.liquidation_threshold <= 1.0:
            raise ValueError(f"venues.ltv must be in (0, liquidation_threshold={self.liquidation_threshold}), got {self.ltv!r}")
        if not 0.0 < self.close_factor <= 1.0:
            raise ValueError(f"venues.close_factor must be in (0, 1], got {self.close_factor!r}")
        if not 0.0 <= self.liquidation_bonus < 1.0:
            raise ValueError(f"venues.liquidation_bonus must be in [0, 1), got {self.liquidation_bonus!r}")
        if not 0.0 <= self.outage_haircut <= 1.0:
            raise ValueError(f"venues.outage_haircut must be in [0, 1], got {self.outage_haircut!r}")
        if not self.leverage > 0:
            raise ValueError(f"venues.leverage must be > 0, got {self.leverage!r}")


@dataclass(frozen=True)
class ContagionResult:
    """Per-venue outcomes (USD) and the per-step series of a contagion run."""

    perp_liquidations: int
    perp_liquidated_notional: float
    perp_bad_debt: float
    lending_liquidations: int
    lending_liquidated_notional: float
    lending_bad_debt: float
    fund_min: float
    fund_end: float
    cascade_depth: int
    impact_from_liquidations: float
    cover2_need: float
    cover2_fund: float
    series: pd.DataFrame
    residuals: dict[str, float]
    #: liquidated notional per trader (USD, perp close-outs plus lending seizures), for counterfactuals
    liquidated_by_trader: np.ndarray | None = None

    @property
    def liquidated_notional(self) -> float:
        return self.perp_liquidated_notional + self.lending_liquidated_notional

    @property
    def bad_debt(self) -> float:
        return self.perp_bad_debt + self.lending_bad_debt

    def conservation(self) -> dict[str, float]:
        """Largest absolute residuals of cash, units and wealth conservation (USD or units)."""
        return dict(self.residuals)


class _Book:
    """Every party's cash (USD) and units per asset; trades with the outside market keep the sums fixed."""

    def __init__(self) -> None:
        self.cash: dict[str, float] = {}
        self.units: dict[str, np.ndarray] = {}

    def move_cash(self, frm: str, to: str, amount: float) -> None:
        self.cash[frm] = self.cash.get(frm, 0.0) - amount
        self.cash[to] = self.cash.get(to, 0.0) + amount

    def move_units(self, frm: str, to: str, units: np.ndarray) -> None:
        z = np.zeros(len(ASSETS))
        self.units[frm] = self.units.get(frm, z) - units
        self.units[to] = self.units.get(to, z) + units


def run_contagion(
    prices: pd.DataFrame,
    im_mm: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: VenueConfig | None = None,
    impact: ImpactModel | None = None,
) -> ContagionResult:
    """Run the two venues over ``prices`` (exogenous closes per step of ``BTC``, ``ETH`` and ``USDC``).

    Parameters
    ----------
    prices : pd.DataFrame
        Columns ``BTC``, ``ETH`` (USD), ``USDC`` (USD per coin, 1 when pegged); one row per step.
    im_mm : dict
        ``{"BTC": (im, mm), "ETH": (im, mm)}`` rates per step (the margin policy's path; MM binds from the
        next step as in the backtest).
    cfg : VenueConfig, optional
    impact : ImpactModel, optional
        Spot impact of the sales (``depth_usd`` per asset; default none).

    Returns
    -------
    ContagionResult
    """
    cfg = cfg or VenueConfig()
    imp = impact or ImpactModel(kind="none")
    for col in ("BTC", "ETH", "USDC"):
        if col not in prices.columns:
            raise ValueError(f"prices must have a {col!r} column, got {list(prices.columns)}")
    x = prices[["BTC", "ETH"]].to_numpy(dtype=np.float64)
    usdc = prices["USDC"].to_numpy(dtype=np.float64)
    T = len(prices)
    rng = np.random.default_rng(cfg.seed)
    n = int(cfg.n_traders)
    p0 = x[0]
    wealth = cfg.equity_usd * np.exp(rng.standard_normal(n))
    side = np.where(rng.random(n) < cfg.long_share, 1.0, -1.0)
    lev = cfg.leverage * np.exp(cfg.leverage_sigma * rng.standard_normal(n))
    # as in the backtest, leverage is capped by the IM in force when the accounts open (the first step)
    lev = np.minimum(lev, 1.0 / max(float(im_mm[a][0][0]) for a in ASSETS))
    mix = rng.uniform(0.2, 0.8, n)  # share of wealth deposited as BTC (rest ETH) on the lending market
    # lending: deposit the wealth in BTC/ETH, borrow USDC at ltv; perp: post the USDC, 20 % ETH and bridged BTC
    dep = np.column_stack((wealth * mix / p0[0], wealth * (1 - mix) / p0[1]))
    debt = cfg.ltv * wealth / usdc[0]  # USDC owed
    bal = np.column_stack((0.8 * debt, 0.1 * debt * usdc[0] / p0[1], 0.1 * debt * usdc[0] / p0[0]))
    coll_usd = 0.98 * 0.8 * debt * usdc[0] + 0.9 * 0.2 * debt * usdc[0] * 0.95
    notional = lev * coll_usd
    split = rng.uniform(0.3, 0.7, n)
    pos = side[:, None] * np.column_stack((notional * split / p0[0], notional * (1 - split) / p0[1]))
    entry = np.tile(p0, (n, 1))
    # the parties' books: the trader's wallet came from outside; the lending pool lent the USDC
    book = _Book()
    book.units["lending"] = dep.sum(axis=0)
    book.units["perp_coll"] = np.array([bal[:, 2].sum(), bal[:, 1].sum()])
    book.units["liquidators"] = np.zeros(2)
    book.units["market"] = -(book.units["lending"] + book.units["perp_coll"])  # bought from the market
    book.cash = {"perp_coll": float(bal[:, 0].sum() * usdc[0]), "pool": -float(debt.sum() * usdc[0]),
                 "fund": cfg.fund_initial, "liquidators": 0.0, "traders": 0.0, "market": 0.0}
    book.cash["outside"] = -sum(book.cash.values())  # the start: every party's cash came from outside
    cash0 = sum(book.cash.values())
    # USD claims: the pool is owed `debt`, traders owe it (written off as bad debt)
    instruments = [Instrument("BTC-PERP", "linear_perp", "BTC"), Instrument("ETH-PERP", "linear_perp", "ETH")]
    fund = cfg.fund_initial
    u = np.zeros(2)
    u_liq = np.zeros(2)
    perp_alive = np.ones(n, dtype=bool)
    liq_by = np.zeros(n)
    rows = []
    perp_liq = lend_liq = 0
    perp_liqn = lend_liqn = perp_bad = lend_bad = 0.0
    depth_max = 0
    max_move = 0.0
    fund_min = fund
    pending_pnl = np.zeros(n)  # perp P&L settled in USDC (negative = owed)
    cover2_need = 0.0
    cover2_fund = fund

    def params_at(t: int, mm_prev: bool = True) -> ParamsFile:
        k = max(t - 1, 0) if mm_prev else t
        hc = CollateralHaircuts()
        if cfg.bridge_outage_bar is not None and t >= cfg.bridge_outage_bar:
            hc = replace(hc, bridge_haircut=cfg.outage_haircut)
        mk = []
        for a in ASSETS:
            im, mm = im_mm[a]
            mk.append(MarginParams(market_id=a, im_rate=float(im[k]), mm_rate=float(min(mm[k], im[k])), haircuts=hc,
                                   liquidation=cfg.liquidation))
        return ParamsFile(markets=tuple(mk))

    for t in range(T):
        u *= 1.0 - imp.resilience
        u_liq *= 1.0 - imp.resilience
        sells = np.zeros(2)  # cumulative net sell flow per asset in the step (USD)
        waves = 0
        prm = params_at(t)
        while waves < cfg.max_waves:
            px = x[t] * np.exp(u + np.array([imp.log_impact(-s_, imp.depth_usd) for s_ in sells]))
            md = MarketData(dict(zip(ASSETS, px, strict=True)), {}, {},
                            {"USDC": float(usdc[t]), "ETH": float(px[1]), "BTC": float(px[0])})
            live_bal = bal.copy()
            live_bal[:, 0] += pending_pnl / usdc[t]
            pf = Portfolio.from_arrays(instruments, pos, entry, md, _NOW, balances=live_bal, slots=_SLOTS)
            mr = compute_margin(pf, prm, cfg.perp_mode, liquidation_price=False)
            if t == 0 and waves == 0:
                # Cover-2 at the start: losses past each account's equity at the scenario's worst prices
                worst = np.where(pos > 0, x.min(axis=0), x.max(axis=0))
                loss = -(mr.equity + (pos * (worst - px)).sum(axis=1))
                cover2_need = float(np.sort(np.maximum(loss, 0.0))[-2:].sum())
            trig = perp_alive & (mr.mm > 0) & (mr.equity <= mr.mm)
            hf = (dep @ px) * cfg.liquidation_threshold / np.maximum(debt * usdc[t], 1e-12)
            ltrig = (debt > 1e-9) & (hf < 1.0)
            if not trig.any() and not ltrig.any():
                break
            waves += 1
            flow = np.zeros(2)
            if trig.any():
                i = np.flatnonzero(trig)
                notl = (np.abs(pos[i]) * px).sum(axis=1)
                res = liquidate_accounts(mr.equity[i], mr.mm[i], notl, cfg.liquidation)
                f = res["fraction"]
                closed = f[:, None] * pos[i]
                flow -= (closed * px).sum(axis=0)  # longs closed = sells
                realised = (closed * (px - entry[i])).sum(axis=1)
                pending_pnl[i] += realised - res["slippage_cost"] - res["penalty"]
                book.move_cash("market", "perp_coll", float(realised.sum()))
                book.move_cash("perp_coll", "market", float(res["slippage_cost"].sum()))
                book.move_cash("perp_coll", "fund", float(res["penalty"].sum()))
                fund += float(res["penalty"].sum())
                pos[i] -= closed
                perp_liq += i.size
                liq_by[i] += (np.abs(closed) * px).sum(axis=1)
                perp_liqn += float((np.abs(closed) * px).sum())
                full = f >= 1.0
                if full.any():
                    fi = i[full]
                    # the venue sells the account's ETH/BTC collateral; bad debt is what stays negative
                    units = np.column_stack((bal[fi, 2], bal[fi, 1]))
                    book.move_units("perp_coll", "market", units.sum(axis=0))
                    book.move_cash("market", "perp_coll", float((units * px).sum()))
                    flow -= (units * px).sum(axis=0)
                    cash = bal[fi, 0] * usdc[t] + pending_pnl[fi] + (units * px).sum(axis=1)
                    bad = np.maximum(-cash, 0.0)
                    draw = min(float(bad.sum()), fund)
                    fund -= draw
                    perp_bad += float(bad.sum())
                    book.move_cash("fund", "perp_coll", draw)
                    book.move_cash("outside", "perp_coll", float(bad.sum()) - draw)  # socialised
                    ret = np.maximum(cash, 0.0)
                    book.move_cash("perp_coll", "traders", float(ret.sum()))
                    bal[fi] = 0.0
                    pending_pnl[fi] = 0.0
                    pos[fi] = 0.0
                    perp_alive[fi] = False
            if ltrig.any():
                i = np.flatnonzero(ltrig)
                repay = cfg.close_factor * debt[i]
                val = dep[i] * px
                tot = val.sum(axis=1)
                want = repay * usdc[t] * (1.0 + cfg.liquidation_bonus)
                short = want >= tot
                take = np.where(short[:, None], 1.0, want[:, None] / np.maximum(tot[:, None], 1e-300)) * dep[i]
                paid = np.where(short, tot / (usdc[t] * (1.0 + cfg.liquidation_bonus)), repay)
                bad = np.where(short, debt[i] - paid, 0.0)
                debt[i] -= paid + bad
                dep[i] -= take
                seized = take.sum(axis=0)
                book.move_units("lending", "liquidators", seized)
                book.move_cash("liquidators", "pool", float(paid.sum() * usdc[t]))
                book.move_units("liquidators", "market", seized)
                book.move_cash("market", "liquidators", float(seized @ px))
                lend_bad += float((bad * usdc[t]).sum())  # the pool's claim is written off (no cash moves)
                flow -= seized * px
                lend_liq += i.size
                lend_liqn += float((seized * px).sum())
                liq_by[i] += take @ px
            sells -= flow
            if not imp.active:
                continue
        move = np.array([imp.log_impact(-s_, imp.depth_usd) for s_ in sells])
        u += move
        u_liq += move
        max_move = max(max_move, float(np.max(np.abs(np.expm1(u_liq)))))
        depth_max = max(depth_max, waves)
        fund_min = min(fund_min, fund)
        px_end = x[t] * np.exp(u)
        rows.append({"BTC": px_end[0], "ETH": px_end[1], "USDC": usdc[t], "fund": fund, "waves": waves,
                     "perp_open": float((np.abs(pos) * px_end).sum()), "debt": float(debt.sum() * usdc[t])})
    series = pd.DataFrame(rows, index=prices.index)
    resid = {"cash": abs(sum(book.cash.values()) - cash0),
             "units_btc": float(abs(sum(v[0] for v in book.units.values()))),
             "units_eth": float(abs(sum(v[1] for v in book.units.values())))}
    return ContagionResult(
        perp_liquidations=perp_liq, perp_liquidated_notional=perp_liqn, perp_bad_debt=perp_bad,
        lending_liquidations=lend_liq, lending_liquidated_notional=lend_liqn, lending_bad_debt=lend_bad,
        fund_min=float(fund_min), fund_end=float(fund), cascade_depth=int(depth_max),
        impact_from_liquidations=float(max_move) if math.isfinite(max_move) else 0.0,
        cover2_need=cover2_need, cover2_fund=float(cover2_fund), series=series, residuals=resid,
        liquidated_by_trader=liq_by,
    )
