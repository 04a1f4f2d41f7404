"""Portfolio-margin backtest throughput: 10,000 multi-instrument accounts × 2,750 daily bars, one policy.

Writes benchmarks/results/bench_portfolio_backtest.json with

* ``seconds``: wall time of :func:`backtest.portfolio_backtest.run_portfolio_backtest` (portfolio mode through
  ``compute_margin`` every bar, the ``dynamic_grid`` path, partial liquidations, margin calls and the accounting
  identity checked every bar) on ``accounts`` accounts (plus their subaccount rows) × ``bars`` bars of three
  underlyings (18 instruments live per cycle);
* ``ratio_vs_loop``: a per-account loop (the same backtest run on one account at a time, timed on a sample of
  ``loop_sample`` accounts over ``loop_bars`` bars and scaled to accounts × bars) / ``seconds``;
* the machine (cores, load average before and after) since the machine is shared.

Prices are synthetic (a seeded stochastic-volatility walk with correlated shocks, stated): the bundled daily sets do
not share 2,750 bars of three assets, and throughput does not depend on the prices.

Run: ``.venv/bin/python benchmarks/bench_portfolio_backtest.py [--accounts N] [--bars T] [--mode portfolio|cross]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from backtest.portfolio_backtest import PortfolioBacktestConfig, run_portfolio_backtest
from backtest.portfolio_population import AccountPopulationConfig, generate_accounts
from margin.dynamic_grid import DynamicGridPolicy
from margin.policies import PolicyContext
from models.base import VolatilityForecast

OUT = Path(__file__).resolve().parent / "results" / "bench_portfolio_backtest.json"


def synthetic_closes(n_bars: int, seed: int = 42) -> tuple[pd.DataFrame, np.ndarray]:
    """Three correlated assets with a common log-vol random walk; returns closes and the per-bar variance."""
    rng = np.random.default_rng(seed)
    lv = np.cumsum(rng.standard_normal(n_bars) * 0.05)
    lv = lv - 0.9 * pd.Series(lv).ewm(halflife=200).mean().to_numpy()  # mean-reverting log vol
    vol = 0.035 * np.exp(lv)
    z = rng.standard_normal((n_bars, 3))
    mult = np.array([1.0, 1.2, 1.4])
    r = np.c_[z[:, 0], 0.8 * z[:, 0] + 0.6 * z[:, 1], 0.7 * z[:, 0] + 0.71 * z[:, 2]] * vol[:, None] * mult
    r[0] = 0.0
    times = pd.date_range("2015-08-08", periods=n_bars, freq="D", tz="UTC")
    closes = pd.DataFrame(np.exp(np.cumsum(r, axis=0)) * [300.0, 3.0, 4.0], index=times, columns=["BTC", "ETH", "LTC"])
    return closes, (vol[:, None] * mult) ** 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--bars", type=int, default=2_750)
    ap.add_argument("--mode", default="portfolio")
    ap.add_argument("--loop-sample", type=int, default=20)
    ap.add_argument("--loop-bars", type=int, default=300)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    load0 = os.getloadavg()
    closes, var = synthetic_closes(a.bars)
    ctx = {}
    for j, u in enumerate(closes.columns):
        fc = VolatilityForecast(origins=closes.index, variance=var[:, j:j + 1], model="synthetic_oracle")
        ctx[u] = PolicyContext(bars=pd.DataFrame({"close": closes[u]}), forecast=fc)
    t0 = time.perf_counter()
    pop = generate_accounts(closes, AccountPopulationConfig(n_accounts=a.accounts, seed=42))
    path = DynamicGridPolicy(k=3.0).path(ctx)
    setup = time.perf_counter() - t0
    cfg = PortfolioBacktestConfig(mode=a.mode)
    t0 = time.perf_counter()
    res = run_portfolio_backtest(pop, path, cfg)
    seconds = time.perf_counter() - t0
    # per-account loop: the same backtest, one account at a time, on a sample of accounts and bars
    rng = np.random.default_rng(0)
    sample = rng.choice(pop.n_pools, size=min(a.loop_sample, pop.n_pools), replace=False)
    lb = min(a.loop_bars, a.bars - 1)
    t0 = time.perf_counter()
    for p in sample:
        run_portfolio_backtest(pop.subset(np.array([p])), path, cfg, start=0, end=lb)
    loop_sample_s = time.perf_counter() - t0
    loop_est = loop_sample_s / len(sample) * pop.n_pools * ((a.bars - 1) / lb)
    out = {
        "benchmark": "portfolio_backtest",
        "accounts": a.accounts,
        "rows": pop.n_rows,
        "bars": a.bars,
        "cycles": len(pop.cycles),
        "instruments_per_cycle": len(pop.cycles[0].instruments),
        "mode": a.mode,
        "policy": "dynamic_grid",
        "seconds": round(seconds, 3),
        "target_seconds": 60.0,
        "meets_target": seconds < 60.0,
        "account_bars_per_second": round(a.accounts * (a.bars - 1) / seconds, 1),
        "setup_seconds": round(setup, 3),
        "ratio_vs_loop": round(loop_est / seconds, 2),
        "loop": {"sample_accounts": int(len(sample)), "sample_bars": lb, "sample_seconds": round(loop_sample_s, 3),
                 "estimated_seconds": round(loop_est, 1)},
        "outcome": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.metrics().items()},
        "machine": {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load0],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "numpy": np.__version__, "blas_threads": 1},
        "data": "synthetic: seeded stochastic-volatility walk, 3 correlated assets (bundled sets lack 2,750 shared bars)",
    }
    path_out = Path(a.out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path_out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
