"""Cascade engine throughput: one million positions through a 1,000-step intraday crash with cascades.

Writes benchmarks/results/bench_stress.json with

* ``seconds``: wall time of :func:`stress.cascade.run_cascade` on ``--positions`` positions (all open at the
  first close, held past the end) over ``--steps`` one-minute bars of a seeded crash (calm, then about
  -15 % over the middle 400 steps with noise, then a partial rebound), with square-root impact (depth
  scaled to the book, shrinking with volatility and drawdown), partial liquidations stepping within a bar
  (``max_steps_per_bar`` 20), funding, fees, the fund and the ledger check at every bar; best of
  ``--repeats``; target < 30 s on 2 cores;
* ``ratio_vs_loop``: the per-position plain loop (:func:`stress.reference.reference_cascade`) on a subset of
  ``--loop-sample`` positions (its depth scaled by the subset's share, so each position sees the same
  impact per unit of its flow) against the vectorised engine on all positions, per position, measured in
  the same run; ``loop_max_rel_diff`` compares the loop with the engine on that same subset;
* ``cascade_depth``, ``liquidations``, ``liquidated_notional``, ``impact_from_liquidations`` of the big run
  (so the benchmark is seen to cascade), ``loadavg`` (1, 5, 15 min) before and after, ``cpu_count``.

Run: ``.venv/bin/python benchmarks/bench_stress.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from backtest.population import Population, PopulationConfig
from backtest.simulation import BacktestConfig
from margin.path import MarginPath
from stress.cascade import CascadeConfig, run_cascade
from stress.impact import ImpactModel
from stress.reference import reference_cascade

OUT = Path(__file__).resolve().parent / "results" / "bench_stress.json"


def crash_bars(steps: int, seed: int = 0) -> pd.DataFrame:
    """Seeded one-minute bars: calm, a crash of about -15 % over the middle 40 %, a partial rebound."""
    rng = np.random.default_rng(seed)
    n = steps + 1
    drift = np.zeros(n)
    a, b = int(0.3 * n), int(0.7 * n)
    drift[a:b] = np.log(0.85) / (b - a)
    drift[b:] = np.log(1.1) / max(n - b, 1)
    vol = np.where((np.arange(n) >= a) & (np.arange(n) < b), 0.004, 0.0015)
    r = drift + vol * rng.standard_normal(n)
    r[0] = 0.0
    close = 40_000.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate(([close[0]], close[:-1]))
    span = np.abs(rng.standard_normal(n)) * vol
    high = np.maximum(open_, close) * np.exp(span)
    low = np.minimum(open_, close) * np.exp(-span)
    idx = pd.date_range("2024-03-01", periods=n, freq="min", tz="UTC")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close}, index=idx)


def book(n: int, n_bars: int, seed: int = 0) -> Population:
    rng = np.random.default_rng(seed)
    cfg = PopulationConfig(n_positions=n, seed=seed, topup_prob=0.0, funding_rate=0.00001)
    lev = np.clip(np.exp(np.log(4.0) + 0.7 * rng.standard_normal(n)), 1.0, 100.0)
    side = np.where(rng.random(n) < 0.6, 1.0, -1.0)
    notional = np.exp(np.log(10_000.0) + rng.standard_normal(n))
    return Population(open_bar=np.zeros(n, dtype=np.int64), hold_bars=np.full(n, 10 * n_bars), side=side,
                      leverage_draw=lev, notional=notional, topup_u=rng.random(n), n_bars=n_bars, cfg=cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--loop-sample", type=int, default=2000)
    args = ap.parse_args()

    load0 = os.getloadavg()
    bars = crash_bars(args.steps)
    n_bars = len(bars)
    path = MarginPath(times=bars.index, im_rate=np.full(n_bars, 0.02), mm_rate=np.full(n_bars, 0.01), policy="static")
    pop = book(args.positions, n_bars)
    depth = 0.05 * float(pop.notional.sum())  # the calm depth: 5 % of the open notional
    bt = BacktestConfig(frozen=True, topups=False, fund_initial=1e-4 * float(pop.notional.sum()), max_steps_per_bar=20)
    imp = ImpactModel(kind="sqrt", coef=0.1, depth_usd=depth, resilience=0.05)
    cfg = CascadeConfig(backtest=bt, impact=imp)

    best = float("inf")
    res = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = run_cascade(bars, path, pop, cfg)
        best = min(best, time.perf_counter() - t0)

    # the loop on a subset, its depth and fund scaled by the subset's share; the engine on the same subset
    k = min(args.loop_sample, args.positions)
    idx = np.sort(np.random.default_rng(1).choice(args.positions, size=k, replace=False))
    sub = pop.subset(idx)
    share = float(sub.notional.sum() / pop.notional.sum())
    cfg_s = replace(cfg, impact=replace(imp, depth_usd=depth * share),
                    backtest=replace(bt, fund_initial=bt.fund0 * share))
    t0 = time.perf_counter()
    ref = reference_cascade(bars, path, sub, cfg_s)
    loop_s = time.perf_counter() - t0
    vec_sub = run_cascade(bars, path, sub, cfg_s)
    diff = abs(vec_sub.liquidated_notional - ref["liquidated_notional"]) / max(1.0, abs(ref["liquidated_notional"]))
    diff = max(diff, float(np.max(np.abs(vec_sub.series["fund"].to_numpy() - ref["fund"]) / np.maximum(1.0, np.abs(ref["fund"])))))
    per_pos_loop = loop_s / k
    per_pos_vec = best / args.positions
    out = {
        "benchmark": "stress cascade engine: positions x intraday crash steps with liquidation cascades",
        "positions": args.positions,
        "steps": args.steps,
        "seconds": round(best, 3),
        "target_seconds": 30.0,
        "ratio_vs_loop": round(per_pos_loop / per_pos_vec, 1),
        "loop_seconds_on_sample": round(loop_s, 3),
        "loop_sample": k,
        "loop_max_rel_diff": diff,
        "cascade_depth": res.cascade_depth,
        "liquidations": res.liquidations,
        "liquidation_events": res.liquidation_events,
        "liquidated_notional": res.liquidated_notional,
        "impact_from_liquidations": res.impact_from_liquidations,
        "bad_debt": res.bad_debt,
        "ledger_residual": res.ledger_residual,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(OUT)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
