"""Scale-out benchmark → benchmarks/results/bench_scale.json.

1. **Sweep**: ``--tasks`` (default 64) walk-forward tasks (16 simulated daily markets × EWMA, EWMA λ=0.90,
   HAR, GARCH(1,1)) run IN THE SAME RUN three ways: serially in this process (``Executor()``, BLAS and
   torch pinned to one thread like a worker; run first and last, the faster counts), in a local process
   pool of ``W`` and on a local Ray instance with ``W`` CPUs. ``speedup_pool`` and ``speedup_ray`` time
   the first call, which includes spawning the workers and their importing the project (torch, arch,
   scikit-learn: seconds per worker); ``speedup_pool_warm`` / ``speedup_ray_warm`` the same tasks again
   on the same workers (a ``with`` block's pool, a long-lived Ray cluster); ``start_s`` is the
   difference. ``ray.init`` itself is reported apart as ``ray_init_s``. The runs' forecasts are
   compared bit for bit (``results_identical``). Speedups are serial seconds over parallel seconds.
2. **Overhead per task**: no-op tasks (``math.sqrt``) at two counts, ``N1`` and ``N2`` (best of 3 runs
   each), on each backend; ``overhead_per_task_ms`` is the slope ``(t(N2) - t(N1)) / (N2 - N1)``
   (wall-clock cost of one more task, with ``W`` warm workers) and ``fixed_overhead_s`` the intercept.
   ``sweep_overhead_per_task_ms`` is what the real sweep lost per task: ``(W * t_parallel - t_serial) / n``.
3. **Minute features**: a synthetic 20-asset, 3-year, 1-minute set (31.5 million bars; generated on
   demand under ``--data-dir``, outside the repository, and reused when it is already there) is turned
   into features partition by partition (asset × month) by ``data_pipelines.minute`` in a child process
   that runs them one after the other; ``peak_rss_mb`` is that process's peak resident memory
   (``ru_maxrss``), against a 2 GB target. The features written (~5 GB) are deleted afterwards unless
   ``--keep-features``.

The machine is shared: the 1-, 5- and 15-minute load averages are recorded at the start and the end of
each part (a load above the core count means other work competed for the CPUs).

Run: ``.venv/bin/python benchmarks/bench_scale.py`` (about 15 minutes on 2 cores; the minute set takes
~2 minutes to generate the first time and ~1.9 GB of disk under ``artifacts/bench/minute``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.atomic import atomic_write_text  # noqa: E402
from data_pipelines.features import build_features  # noqa: E402
from data_pipelines.minute import MinuteSetSpec, build_partitioned_features, generate_minute_set  # noqa: E402
from data_pipelines.synthetic import simulate  # noqa: E402
from training.walk_forward import TaskFailure, WalkForwardTask, run_task  # noqa: E402
from volmargin.executor import Executor, shutdown_ray  # noqa: E402

MODELS = (("ewma", "ewma", {}), ("ewma", "ewma90", {"lam": 0.90}), ("har", "har", {}), ("garch", "garch", {}))
CUT = pd.Timestamp("2017-06-01", tz="UTC")


def load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def sweep_tasks(n_tasks: int) -> list[WalkForwardTask]:
    """``n_tasks`` walk-forward tasks: simulated daily markets (560 bars each) × the four models."""
    n_assets = math.ceil(n_tasks / len(MODELS))
    tasks = []
    for a in range(n_assets):
        frame = build_features(simulate(560, seed=100 + a, start="2016-01-01").bars)
        for name, key, params in MODELS:
            tasks.append(WalkForwardTask(asset=f"SYN{a:02d}", frame=frame, model_name=name, model_key=key,
                                         params=params, horizon=5, cut=CUT, min_train=300, refit_every=60,
                                         block=60, seed=1))
    return tasks[:n_tasks]


def timed(ex: Executor, fn: Any, tasks: list[Any]) -> tuple[float, list[Any]]:
    t = time.perf_counter()
    out = ex.map(fn, tasks)
    return time.perf_counter() - t, out


def forecasts_equal(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, TaskFailure) or isinstance(y, TaskFailure):
            return False
        if not np.array_equal(x.forecast.variance, y.forecast.variance):
            return False
    return True


def overhead(ex: Executor, n1: int, n2: int, repeat: int = 3) -> dict[str, float]:
    """No-op tasks at two counts (best of ``repeat`` each): cost of one more task, and the fixed cost."""
    xs1, xs2 = [float(i) for i in range(n1)], [float(i) for i in range(n2)]
    t1 = min(timed(ex, math.sqrt, xs1)[0] for _ in range(repeat))
    t2 = min(timed(ex, math.sqrt, xs2)[0] for _ in range(repeat))
    slope = (t2 - t1) / (n2 - n1)
    return {"per_task_ms": 1e3 * slope, "fixed_s": t1 - n1 * slope, f"seconds_{n1}": t1, f"seconds_{n2}": t2,
            "repeat": repeat}


def run_sweep(n_tasks: int, workers: int, n1: int, n2: int) -> dict[str, Any]:
    import ray
    import torch
    from threadpoolctl import threadpool_limits

    tasks = sweep_tasks(n_tasks)
    out: dict[str, Any] = {"tasks": len(tasks), "workers": workers, "load_start": load(),
                           "task": "walk-forward (asset x model), 560 daily bars, refit every 60, horizon 5",
                           "models": [k for _, k, _ in MODELS]}

    def serial_run() -> tuple[float, list[Any]]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(1):
                return timed(Executor(), run_task, tasks)
        finally:
            torch.set_num_threads(threads)

    t_first, serial = serial_run()
    out["load_after_serial"] = load()
    with Executor(workers=workers) as pool:  # one pool for the block: cold (spawn + imports), then warm
        out["pool_s"], pooled = timed(pool, run_task, tasks)
        out["pool_warm_s"], pooled_warm = timed(pool, run_task, tasks)
        out["load_after_pool"] = load()
        out["overhead_pool"] = overhead(pool, n1, n2)
    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024**2,
             configure_logging=False)
    out["ray_init_s"] = time.perf_counter() - t
    rex = Executor(backend="ray", address="auto")
    try:
        out["ray_s"], rayed = timed(rex, run_task, tasks)  # cold: Ray starts and warms its workers
        out["ray_warm_s"], rayed_warm = timed(rex, run_task, tasks)  # the same workers again
        out["load_after_ray"] = load()
        out["overhead_ray"] = overhead(rex, n1, n2)
    finally:
        ray.shutdown()
        shutdown_ray()
    with threadpool_limits(1):
        out["overhead_serial"] = overhead(Executor(), n1, n2)
    t_second, _ = serial_run()  # again at the end: the load may have changed meanwhile
    out["serial_runs_s"] = [t_first, t_second]
    out["serial_s"] = min(t_first, t_second)
    out["load_end"] = load()
    out["results_identical"] = bool(all(forecasts_equal(serial, other)
                                        for other in (pooled, pooled_warm, rayed, rayed_warm)))
    out["failed_tasks"] = int(sum(isinstance(r, TaskFailure) for r in serial))
    out["speedup_pool"] = out["serial_s"] / out["pool_s"]
    out["speedup_pool_warm"] = out["serial_s"] / out["pool_warm_s"]
    out["start_s"] = {"pool": out["pool_s"] - out["pool_warm_s"], "ray": out["ray_s"] - out["ray_warm_s"],
                      "ray_init": out["ray_init_s"]}
    out["speedup_ray"] = out["serial_s"] / out["ray_s"]
    out["speedup_ray_warm"] = out["serial_s"] / out["ray_warm_s"]
    out["overhead_per_task_ms"] = {"pool": out["overhead_pool"]["per_task_ms"],
                                   "ray": out["overhead_ray"]["per_task_ms"]}
    out["fixed_overhead_s"] = {"pool": out["overhead_pool"]["fixed_s"], "ray": out["overhead_ray"]["fixed_s"]}
    out["sweep_overhead_per_task_ms"] = {
        "pool": 1e3 * (workers * out["pool_s"] - out["serial_s"]) / len(tasks),
        "pool_warm": 1e3 * (workers * out["pool_warm_s"] - out["serial_s"]) / len(tasks),
        "ray": 1e3 * (workers * out["ray_s"] - out["serial_s"]) / len(tasks),
        "ray_warm": 1e3 * (workers * out["ray_warm_s"] - out["serial_s"]) / len(tasks),
    }
    return out


def child_features(bars_root: str, out_root: str) -> None:
    """Child process: build the features serially, print a JSON line with the time and peak RSS."""
    t = time.perf_counter()
    rep = build_partitioned_features(bars_root, out_root)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": peak_kb / 1024, **rep.to_dict()}))


def run_minute(data_dir: Path, assets: int, days: int, workers: int, keep: bool) -> dict[str, Any]:
    spec = MinuteSetSpec(assets=assets, days=days)
    out: dict[str, Any] = {"assets": assets, "days": days, "bar": spec.bar, "bars_per_asset": spec.n_bars,
                           "bars_total": spec.n_bars * assets, "data_dir": str(data_dir), "load_start": load()}
    manifest = data_dir / "manifest.json"
    reused = manifest.exists() and json.loads(manifest.read_text()).get("spec", {}).get("assets") == assets
    t = time.perf_counter()
    bars_root = generate_minute_set(data_dir, spec, executor=Executor(workers=workers))
    out["generate_s"] = time.perf_counter() - t
    out["generate_reused"] = bool(reused and out["generate_s"] < 5)
    out["bars_bytes_on_disk"] = sum(p.stat().st_size for p in bars_root.rglob("*.parquet"))
    feats = data_dir / "features"
    shutil.rmtree(feats, ignore_errors=True)
    out["load_before_features"] = load()
    proc = subprocess.run([sys.executable, __file__, "--child-features", str(bars_root), str(feats)],
                          capture_output=True, text=True, check=False, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"feature child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    out["features_bytes_on_disk"] = sum(p.stat().st_size for p in feats.rglob("*.parquet"))
    if not keep:
        shutil.rmtree(feats, ignore_errors=True)
    out.update({
        "features_s": child["seconds"],
        "peak_rss_mb": child["peak_rss_mb"],
        "peak_rss_target_mb": 2048,
        "partitions": child["partitions"],
        "rows": child["rows"],
        "warmup_bars": child["warmup_bars"],
        "rows_per_second": child["rows"] / child["seconds"],
        "load_end": load(),
        "how": "one child process, partitions (asset x month) one after the other: each reads its month plus "
               "the warm-up bars (30-day HAR window) through a pyarrow dataset filter and writes its features",
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--noop", type=int, nargs=2, default=(16, 528), metavar=("N1", "N2"))
    ap.add_argument("--assets", type=int, default=20)
    ap.add_argument("--days", type=int, default=3 * 365)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "artifacts" / "bench" / "minute",
                    help="where the minute set is generated (ignored by git; reused between runs)")
    ap.add_argument("--keep-features", action="store_true")
    ap.add_argument("--skip-minute", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_scale.json")
    ap.add_argument("--child-features", nargs=2, metavar=("BARS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_features:
        child_features(*args.child_features)
        return
    if args.tasks < 64:
        ap.error(f"--tasks must be >= 64 (the sweep the issue asks for), got {args.tasks}")
    import optuna
    import ray

    result: dict[str, Any] = {
        "benchmark": "scale-out: serial vs local process pool vs local Ray; minute-bar features",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "ray": ray.__version__, "optuna": optuna.__version__, "numpy": np.__version__,
                    "pandas": pd.__version__},
        "load_start": load(),
        "note": "shared machine: compare load averages with the core count; timings are one run each",
    }
    sweep = run_sweep(args.tasks, args.workers, *args.noop)
    for k in ("speedup_pool", "speedup_ray", "speedup_pool_warm", "speedup_ray_warm", "overhead_per_task_ms"):
        result[k] = sweep[k]
    result["sweep"] = sweep
    if not args.skip_minute:
        minute = run_minute(args.data_dir, args.assets, args.days, args.workers, args.keep_features)
        result["peak_rss_mb"] = minute["peak_rss_mb"]
        result["minute_features"] = minute
    result["load_end"] = load()
    atomic_write_text(args.out, json.dumps(result, indent=2))
    summary = {k: result.get(k) for k in ("speedup_pool", "speedup_ray", "speedup_pool_warm", "speedup_ray_warm",
                                          "overhead_per_task_ms", "peak_rss_mb")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
