"""Margin backtest throughput: 100,000 positions × 2,750 daily bars × 5 policies.

Writes benchmarks/results/bench_backtest.json with

* ``seconds``: wall time of the 5 policies (``static_0.10``, ``ewma_ccp``, ``garch_fhs``, ``predictive`` with
  fixed parameters, ``oracle_vol``): building each margin path and replaying it with
  :func:`backtest.simulation.run_backtest` (everything on: partial liquidation, volume slippage, fund, top-ups,
  funding, fees, the ledger check at every bar); best of ``--repeats`` rounds (the machine is shared);
  target < 60 s on 2 cores;
* ``ratio_vs_loop``: the per-position plain loop (:func:`backtest.simulation.reference_backtest`, timed on a
  subsample and scaled to all positions) against the vectorised backtest of the same policy on all
  positions, both in the frozen setting (positions independent), measured in the same run; the
  subsample's per-position outcomes are compared (``loop_max_rel_diff``: largest ``|a - b| / max(1, |b|)``);
* ``ratio_vs_loop_hold60``: the same with a mean holding period of 60 bars instead of 10 (about 6x more
  positions open per bar: the vectorised cost per bar is mostly fixed overhead, the loop's grows with them);
* ``bound_table_seconds``: the bound's cohort table (13 grid levels, per-position outcomes) for scale.

Market: ``data_pipelines.synthetic.simulate`` (regime-switching GARCH-t with jumps, seed 0), its true
conditional variance as the forecast (timing only). Run: ``.venv/bin/python benchmarks/bench_backtest.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from backtest.bound import cohort_table
from backtest.factory import make_policy
from backtest.population import PopulationConfig, generate_population
from backtest.simulation import BacktestConfig, reference_backtest, run_backtest
from data_pipelines.synthetic import simulate
from margin.policies import PolicyContext
from models.base import VolatilityForecast

OUT = Path(__file__).resolve().parent / "results" / "bench_backtest.json"
POLICIES = ("static_0.10", "ewma_ccp", "garch_fhs", "predictive", "oracle_vol")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--bars", type=int, default=2750)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop-sample", type=int, default=5000)
    args = ap.parse_args()

    sim = simulate(args.bars, seed=0)
    bars = sim.bars
    var = sim.true_variance.to_numpy()
    fc = VolatilityForecast(origins=bars.index, variance=np.c_[var, var, var], model="true_variance",
                            std_resid=sim.returns.to_numpy() / np.sqrt(var))
    ctx = PolicyContext(bars=bars, forecast=fc, cut=bars.index[args.bars // 2])
    pop = generate_population(len(bars), PopulationConfig(n_positions=args.positions, seed=0))
    # the synthetic market's volume (~2,000 units a bar) is far below the population's open notional: scale it
    # so that the population is a small share of the market (as with real BTC volumes)
    cfg = BacktestConfig(volume_scale=1000.0)
    cfgs = {"predictive": {"level": 0.1, "power": 0.5, "stress": 0.0, "omega": 0.5}}

    per_policy: dict[str, float] = {}
    results: dict[str, dict[str, float]] = {}
    rounds = []
    for _ in range(args.repeats):
        total = 0.0
        for name in POLICIES:
            t0 = time.perf_counter()
            path = make_policy(name, **cfgs.get(name, {})).path(ctx)
            res = run_backtest(bars, path, pop, cfg)
            dt = time.perf_counter() - t0
            total += dt
            per_policy[name] = min(per_policy.get(name, np.inf), dt)
            results[name] = {k: res.metrics()[k] for k in ("liquidations", "bad_debt", "avg_collateral",
                                                            "ledger_residual", "max_im_increase_5d")}
        rounds.append(total)
    seconds = min(rounds)

    # per-position loop vs vectorised, same policy, frozen setting (positions independent)
    fz = cfg.frozen_copy()
    path = make_policy("ewma_ccp").path(ctx)
    vec = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_backtest(bars, path, pop, fz)
        vec = min(vec, time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    sub = pop.subset(rng.choice(len(pop), size=min(args.loop_sample, len(pop)), replace=False))
    t0 = time.perf_counter()
    ref = reference_backtest(bars, path, sub, fz)
    loop_sub = time.perf_counter() - t0
    loop = loop_sub * len(pop) / len(sub)
    chk = run_backtest(bars, path, sub, fz, per_position=True).per_position
    diff = max(float(np.max(np.abs(chk[k] - ref[k]) / np.maximum(1.0, np.abs(ref[k]))))
               for k in ("liquidations", "liquidation_events", "bad_debt", "collateral", "topups"))

    # the same comparison with longer holding periods (mean 60 bars: ~6x more positions open per bar)
    pop60 = generate_population(len(bars), PopulationConfig(n_positions=args.positions, seed=0, hold_mean_bars=60))
    vec60 = np.inf
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_backtest(bars, path, pop60, fz)
        vec60 = min(vec60, time.perf_counter() - t0)
    sub60 = pop60.subset(rng.choice(len(pop60), size=min(args.loop_sample // 2, len(pop60)), replace=False))
    t0 = time.perf_counter()
    reference_backtest(bars, path, sub60, fz)
    loop60 = (time.perf_counter() - t0) * len(pop60) / len(sub60)

    t0 = time.perf_counter()
    cohort_table(bars, pop, cfg, (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.33, 0.5),
                 0.5, start=ctx.cut)
    bound_s = time.perf_counter() - t0

    out = {
        "benchmark": "margin backtest: 100k positions x 2,750 daily bars x 5 policies (paths + replay)",
        "positions": args.positions,
        "bars": args.bars,
        "policies": list(POLICIES),
        "seconds": seconds,
        "seconds_rounds": rounds,
        "target_seconds": 60.0,
        "seconds_per_policy_best": per_policy,
        "vectorised_seconds_one_policy_frozen": vec,
        "loop_sample": len(sub),
        "loop_seconds_sample": loop_sub,
        "loop_seconds_extrapolated": loop,
        "ratio_vs_loop": loop / vec,
        "loop_max_rel_diff": diff,
        "ratio_vs_loop_hold60": loop60 / vec60,
        "vectorised_seconds_hold60": vec60,
        "loop_seconds_extrapolated_hold60": loop60,
        "bound_table_seconds": bound_s,
        "results": results,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, OUT)
    print(json.dumps({k: out[k] for k in ("seconds", "ratio_vs_loop", "ratio_vs_loop_hold60", "loop_max_rel_diff",
                                       "bound_table_seconds")}))


if __name__ == "__main__":
    main()
