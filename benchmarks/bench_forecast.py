"""Forecaster benchmark → benchmarks/results/bench_forecast.json.

1. Rolling GARCH(1,1)-t refits over the FULL bundled:bitstamp/BTC daily history: an expanding window
   starting at ``--min-train`` bars, a refit at EVERY bar, a one-step forecast after each. Warm
   starts (the same instance re-used, starting from the last good parameters) against cold starts
   (``warm_start=False``: arch's own starting-value search each time), both measured in the same run,
   interleaved bar by bar (cold fit, warm fit, next bar) so that both see the same machine load.
   Key ``warm_vs_cold_speedup`` = cold seconds / warm seconds of the fits (wall; CPU time is reported
   too, since the machine is shared; the one-step forecast after each fit is timed separately). The forecasts of both runs are compared (they must agree closely).
2. Neural training on the 2-core machine (one torch thread per model, see ``NEURAL_WF``): the
   walk-forward schedule of
   configs/train_btc.yaml for the GRU (expanding window from 365 bars, refit every 250 bars,
   ``lookback=30, horizon=5, min_train_windows=150``, one-bar updates in between), run in full with
   a loop that mirrors training/walk_forward.py; seconds per fold (fit) and total, and the
   projection for the three neural models (gru, tcn, hybrid) from the measured GRU/TCN/hybrid fold
   times.
3. Inference latency of one forecast per registered model, fitted on the full BTC history:
   ``predict_variance(5)`` and ``update(one bar) + predict_variance(5)``, median of ``--reps`` (ms).

Run: ``.venv/bin/python benchmarks/bench_forecast.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.pipeline import prepare_dataset  # noqa: E402
from models import FORECASTERS, get_forecaster  # noqa: E402

# one torch thread per model: these networks are tiny, and on a shared 2-core machine two intra-op
# threads spin against each other (measured: one BTC fold 130 s wall with 2 threads vs 8 s with 1);
# the two cores are used by running two (model, fold) tasks in parallel (training's executor)
NEURAL_WF = {"lookback": 30, "horizon": 5, "min_train_windows": 150, "n_threads": 1}


def rolling_garch_pair(frame, start: int) -> tuple[dict, dict]:
    """Cold and warm GARCH(1,1)-t refits at every bar, interleaved bar by bar so that both see the
    same load on the shared machine; fits timed (wall and CPU), forecasts timed separately."""
    models = {
        "cold": get_forecaster("garch", warm_start=False, quantile_levels=None),
        "warm": get_forecaster("garch", warm_start=True, quantile_levels=None),
    }
    acc = {k: {"wall": 0.0, "cpu": 0.0, "pred": 0.0, "iters": [], "fc": []} for k in models}
    for i in range(start, len(frame)):
        w = frame.iloc[: i + 1]
        for key, model in models.items():
            a = acc[key]
            t, c = time.perf_counter(), time.process_time()
            model.fit(w)
            a["wall"] += time.perf_counter() - t
            a["cpu"] += time.process_time() - c
            a["iters"].append(model.n_iter_)
            t = time.perf_counter()
            a["fc"].append(model.predict_variance(1).variance[0, 0])
            a["pred"] += time.perf_counter() - t
    out = []
    for key, model in models.items():
        a = acc[key]
        out.append(
            {
                "fits": len(a["fc"]),
                "seconds": a["wall"],
                "cpu_seconds": a["cpu"],
                "ms_per_fit": 1e3 * a["wall"] / len(a["fc"]),
                "forecast_seconds": a["pred"],
                "mean_optimizer_iterations": float(np.mean(a["iters"])),
                "fallbacks": int(model.n_fallbacks_),
                "forecasts": np.asarray(a["fc"]),
            }
        )
    return out[0], out[1]


def neural_walk_forward(frame, name: str, min_train: int, refit_every: int, horizon: int) -> dict:
    model = get_forecaster(name, **NEURAL_WF)
    fold_fit_s, epochs = [], []
    t0 = time.perf_counter()
    upd_s = 0.0
    for i in range(min_train - 1, len(frame)):
        if (i - (min_train - 1)) % refit_every == 0:
            t = time.perf_counter()
            model.fit(frame.iloc[: i + 1])
            fold_fit_s.append(time.perf_counter() - t)
            epochs.append(model.train_result_.epochs_run)
        else:
            t = time.perf_counter()
            model.update(frame.iloc[i : i + 1])
            upd_s += time.perf_counter() - t
        t = time.perf_counter()
        model.predict_variance(horizon)
        upd_s += time.perf_counter() - t
    total = time.perf_counter() - t0
    return {
        "folds": len(fold_fit_s),
        "origins": len(frame) - (min_train - 1),
        "fit_seconds_per_fold": [round(x, 3) for x in fold_fit_s],
        "mean_fit_seconds_per_fold": float(np.mean(fold_fit_s)),
        "epochs_per_fold": epochs,
        "update_predict_seconds": upd_s,
        "total_seconds": total,
    }


def latency(frame, name: str, reps: int) -> dict:
    fitted = get_forecaster(name).fit(frame.iloc[:-reps])
    pred = []
    for _ in range(reps):
        t = time.perf_counter()
        fitted.predict_variance(5)
        pred.append(time.perf_counter() - t)
    upd = []
    m = copy.deepcopy(fitted)
    bars = [frame.iloc[len(frame) - reps + k : len(frame) - reps + k + 1] for k in range(reps)]
    for b in bars:
        t = time.perf_counter()
        m.update(b)
        m.predict_variance(5)
        upd.append(time.perf_counter() - t)
    return {"predict_ms": 1e3 * statistics.median(pred), "update_predict_ms": 1e3 * statistics.median(upd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="bundled:bitstamp/BTC")
    ap.add_argument("--min-train", type=int, default=365)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_forecast.json"))
    ap.add_argument("--skip-neural", action="store_true")
    args = ap.parse_args()

    frame = prepare_dataset(args.source).features
    out: dict = {
        "benchmark": "forecast",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "2-core machine shared with other jobs while measured; CPU seconds reported next to wall",
        },
        "data": {"source": args.source, "bars": len(frame), "start": str(frame.index[0]), "end": str(frame.index[-1])},
    }

    # 1. rolling GARCH(1,1)-t, refit every bar, warm vs cold (interleaved; same data, same run)
    cold, warm = rolling_garch_pair(frame, args.min_train - 1)
    rel = np.abs(warm["forecasts"] / cold["forecasts"] - 1)
    out["garch_rolling_refit"] = {
        "model": "garch (GARCH(1,1)-t, zero mean, arch)",
        "window": f"expanding from {args.min_train} bars, refit at every bar over the full history",
        "cold": {k: v for k, v in cold.items() if k != "forecasts"},
        "warm": {k: v for k, v in warm.items() if k != "forecasts"},
        "forecast_max_rel_diff_warm_vs_cold": float(rel.max()),
        "forecast_median_rel_diff_warm_vs_cold": float(np.median(rel)),
    }
    out["warm_vs_cold_speedup"] = cold["seconds"] / warm["seconds"]
    out["warm_vs_cold_speedup_cpu"] = cold["cpu_seconds"] / warm["cpu_seconds"]
    print(f"garch rolling: cold {cold['seconds']:.1f}s warm {warm['seconds']:.1f}s "
          f"speedup {out['warm_vs_cold_speedup']:.2f}x", flush=True)

    # 2. neural walk-forward on 2 threads
    if not args.skip_neural:
        nw = {}
        for name in ("gru", "tcn", "hybrid"):
            nw[name] = neural_walk_forward(frame, name, args.min_train, refit_every=250, horizon=5)
            print(f"{name} walk-forward: {nw[name]['total_seconds']:.1f}s", flush=True)
        out["neural_walk_forward"] = {
            "schedule": "configs/train_btc.yaml: expanding from 365 bars, refit every 250, one-bar updates between",
            "params": NEURAL_WF,
            "models": nw,
            "gru_total_seconds": nw["gru"]["total_seconds"],
            "all_neural_total_seconds": sum(v["total_seconds"] for v in nw.values()),
            "target_seconds": 180,
        }

    # 3. latency per registered model
    out["latency_ms"] = {}
    for name in sorted(FORECASTERS):
        out["latency_ms"][name] = latency(frame, name, args.reps)
        print(f"latency {name}: {out['latency_ms'][name]}", flush=True)

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(out, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
