"""Portfolio-margin throughput: 10 instruments × 33 scenarios on 1,000,000 accounts.

Writes benchmarks/results/bench_margin.json with

* ``accounts_per_second`` of the chunked fast path (float32, ``margin.portfolio.max_loss_margin_chunked``),
  best of a small sweep over memory layout of the positions (row- or column-major; column-major lets BLAS
  read each instrument's chunk contiguously), chunk size and worker threads (1 or 2, each with
  single-threaded BLAS),
  best-of-N wall time (the machine is shared: minima are the least noisy);
* ``float32_max_rel_error`` against the float64 result (accounts with margin >= 1e-3 of the median) and
  ``float32_max_err_vs_gross`` (error / the account's gross scenario exposure ``max_k sum_i |p_i S_ik|``);
* ``ratio_vs_loop``: a per-account loop calling NumPy per account (float64, timed on a subsample, scaled);
  ``ratio_vs_loop_float64_fast_path`` compares it with the float64 fast path;
* ``ratio_to_read_floor``: fast-path time / one read pass over the positions array (``np.add.reduce``);
* ``ratio_to_compute_floor``: fast-path time / (2·A·I·S flops at the float32 GEMM rate measured in this run
  on a 2048² square product).

The final fast-path, read-pass and GEMM timings are interleaved (one of each per round, best of the rounds)
so that the three see the same load on the shared machine.

Run: ``.venv/bin/python benchmarks/bench_margin.py [--accounts N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from margin.instruments import Instrument, InstrumentArrays
from margin.params import ScenarioGrid
from margin.portfolio import grid_scenario_matrix, max_loss_margin_chunked, scenario_margin

OUT = Path(__file__).resolve().parent / "results" / "bench_margin.json"


def best_time(fn, repeats: int) -> tuple[float, float]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def build(n_accounts: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    exp = now + timedelta(days=30)
    inst = [
        Instrument("BTC-PERP", "linear_perp", "BTC", contract_size=0.001),
        Instrument("BTC-INV", "inverse_perp", "BTC", contract_size=100.0),
        Instrument("BTC-FUT", "future", "BTC", contract_size=0.001, expiry=exp),
        Instrument("BTC-C-100k", "option", "BTC", expiry=exp, strike=100_000, option_type="call", contract_size=0.1),
        Instrument("BTC-P-80k", "option", "BTC", expiry=exp, strike=80_000, option_type="put", contract_size=0.1),
        Instrument("BTC-C-90k", "option", "BTC", expiry=exp, strike=90_000, option_type="call", contract_size=0.1),
        Instrument("ETH-PERP", "linear_perp", "ETH", contract_size=0.01),
        Instrument("ETH-FUT", "future", "ETH", contract_size=0.01, expiry=exp),
        Instrument("ETH-C-3500", "option", "ETH", expiry=exp, strike=3_500, option_type="call"),
        Instrument("ETH-P-2500", "option", "ETH", expiry=exp, strike=2_500, option_type="put"),
    ]
    arr = InstrumentArrays.from_instruments(inst)
    mark = np.array([90_000.0] * 6 + [3_000.0] * 4)
    sigma = np.array([np.nan, np.nan, np.nan, 0.55, 0.6, 0.5, np.nan, np.nan, 0.7, 0.75])
    s = grid_scenario_matrix(arr, mark, sigma, now, ScenarioGrid())  # (10, 33), joint grid
    rng = np.random.default_rng(seed)
    p = rng.normal(0.0, 50.0, (n_accounts, len(inst)))
    p *= rng.uniform(size=p.shape) < 0.35  # most accounts hold a few of the ten instruments
    return p, s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--loop-sample", type=int, default=20_000)
    args = ap.parse_args()
    load_start = os.getloadavg()
    p64, s = build(args.accounts)
    a, i_n = p64.shape
    n_s = s.shape[1]
    p32 = p64.astype(np.float32)

    # float64 reference (chunked, checked against the plain GEMM on a slice)
    p64f = np.asfortranarray(p64)
    ref = max_loss_margin_chunked(p64f, s, chunk=2048, workers=2)
    np.testing.assert_allclose(ref[:50_000], scenario_margin(p64[:50_000], s), rtol=1e-12, atol=1e-9)
    t64, _ = best_time(lambda: max_loss_margin_chunked(p64f, s, chunk=2048, workers=2), max(3, args.repeats // 3))

    out = np.empty(a, dtype=np.float32)
    # the same (accounts x instruments) array in row-major and column-major memory order
    layouts = {"C": p32, "F": np.asfortranarray(p32)}
    sweep = {}
    for lay, arr_ in layouts.items():
        for workers in (1, 2):
            for chunk in (1024, 2048, 4096):
                sweep[(lay, workers, chunk)] = best_time(
                    lambda c=chunk, w=workers, x=arr_: max_loss_margin_chunked(x, s, chunk=c, out=out, workers=w),
                    max(3, args.repeats // 2),
                )
    layout, workers, chunk = min(sweep, key=lambda k: sweep[k][0])
    pbest = layouts[layout]
    got = max_loss_margin_chunked(pbest, s, chunk=chunk, workers=workers).copy()
    np.testing.assert_array_equal(got, max_loss_margin_chunked(p32, s, chunk=chunk))

    # final timings interleaved (fast path, read pass, square GEMM) so that all three see the same load
    flat32 = p32.ravel()
    x = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
    fast_ts, read_ts, gemm_ts = [], [], []
    for _ in range(args.repeats):
        fast_ts.append(best_time(lambda: max_loss_margin_chunked(pbest, s, chunk=chunk, out=out, workers=workers), 1)[0])
        read_ts.append(best_time(lambda: np.add.reduce(flat32), 1)[0])
        gemm_ts.append(best_time(lambda: x @ x, 1)[0])
    t_fast, t_fast_median = min(fast_ts), float(np.median(fast_ts))
    t_read = min(read_ts)
    t_gemm = min(gemm_ts)
    sig = ref >= 1e-3 * np.median(ref[ref > 0])
    rel_err = float(np.max(np.abs(got[sig] - ref[sig]) / ref[sig]))
    gross = (np.abs(p64) @ np.abs(s)).max(axis=1)
    err_gross = float(np.max(np.abs(got - ref) / np.maximum(gross, 1e-300)))

    # per-account loop baseline (NumPy call per account), timed on a subsample
    sub = p64[: args.loop_sample]
    loop_out = np.empty(len(sub))

    def loop() -> None:
        for k in range(len(sub)):
            loop_out[k] = max(0.0, float(-(sub[k] @ s).min()))

    t_loop_sub, _ = best_time(loop, 3)
    np.testing.assert_allclose(loop_out, ref[: len(sub)], rtol=1e-10, atol=1e-9)
    t_loop = t_loop_sub * a / len(sub)

    gemm_rate = 2 * 2048**3 / t_gemm
    flops = 2.0 * a * i_n * n_s
    t_compute_floor = flops / gemm_rate

    res = {
        "benchmark": "portfolio margin, worst loss over a 33-scenario grid (11 spot x 3 vol), 10 instruments",
        "accounts": a,
        "instruments": i_n,
        "scenarios": n_s,
        "dtype": "float32",
        "layout": {"C": "row-major (accounts x instruments)", "F": "column-major (accounts x instruments)"}[layout],
        "chunk": chunk,
        "workers": workers,
        "seconds_best": t_fast,
        "seconds_median": t_fast_median,
        "accounts_per_second": a / t_fast,
        "accounts_per_second_median": a / t_fast_median,
        "target_accounts_per_second": 40e6,
        "float64_seconds_best": t64,
        "float64_accounts_per_second": a / t64,
        "float32_max_rel_error": rel_err,
        "float32_max_err_vs_gross": err_gross,
        "loop_seconds_extrapolated": t_loop,
        "loop_sample": len(sub),
        "ratio_vs_loop": t_loop / t_fast,
        "ratio_vs_loop_float64_fast_path": t_loop / t64,
        "read_floor_seconds": t_read,
        "ratio_to_read_floor": t_fast / t_read,
        "gemm_gflops_float32": gemm_rate / 1e9,
        "compute_floor_seconds": t_compute_floor,
        "ratio_to_compute_floor": t_fast / t_compute_floor,
        "sweep_seconds_best": {f"layout={lay},workers={w},chunk={c}": v[0] for (lay, w, c), v in sweep.items()},
        "threads": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "numpy": np.__version__,
        "machine": platform.processor() or platform.machine(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "note": "shared 2-core machine (other jobs running): best-of-N times, compare the load averages. "
        "The skinny GEMM (K=10, N=33) runs well below the square-GEMM rate in BLAS; a steady <= 3x of the "
        "compute floor would need a fused GEMM+max kernel (numba or C), not installed.",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, OUT)
    print(json.dumps({k: res[k] for k in ("accounts_per_second", "ratio_vs_loop", "ratio_to_read_floor",
                                          "ratio_to_compute_floor", "float32_max_rel_error")}, indent=2))


if __name__ == "__main__":
    main()
