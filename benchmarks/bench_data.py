"""Data-pipeline benchmark → benchmarks/results/bench_data.json.

1. Load + check/clean + features for every bundled set (best of ``--repeat`` runs, seconds).
2. ``build_features`` on 1,000,000 synthetic 1-minute bars (vectorised, best of ``--repeat``), against a
   naive per-row Python loop computing the same columns, measured IN THE SAME RUN. The loop is timed
   on a contiguous subsample of ``--loop-rows`` rows and extrapolated linearly per row to 1,000,000
   (its cost per row is constant: rolling windows use running sums, the extreme-return median sorts
   a fixed 250-return window). The loop's output is checked against the vectorised output on the
   subsample (rtol 1e-7) so the comparison is like for like.
3. A cProfile of the vectorised ``build_features`` (top functions by cumulative time), kept in the
   JSON: profile first, optimise second.

Run: ``.venv/bin/python benchmarks/bench_data.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.features import VARIANCE_FLOOR, build_features, har_window_bars  # noqa: E402
from data_pipelines.pipeline import prepare_dataset, write_prepared  # noqa: E402
from data_pipelines.quality import DEFAULT_EXTREME_SIGMA, DEFAULT_EXTREME_WINDOW, check_and_clean  # noqa: E402
from data_pipelines.sources import BUNDLED, load_raw  # noqa: E402
from data_pipelines.synthetic import simulate  # noqa: E402

LN2 = math.log(2.0)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def features_loop(bars: pd.DataFrame, *, har_windows: dict[str, int], yz_window: int = 30,
                  sigma: float = DEFAULT_EXTREME_SIGMA, window: int = DEFAULT_EXTREME_WINDOW) -> dict[str, list]:
    """The naive baseline: one Python iteration per bar, plain floats, running sums for windows."""
    o_, h_, l_, c_ = (bars[k].tolist() for k in ("open", "high", "low", "close"))
    ns = bars.index.asi8.tolist()
    bar_ns = ns[1] - ns[0]
    n = len(o_)
    cols: dict[str, list] = {k: [] for k in ("ret", "ret_bars", "gap", "extreme", "var_sq", "var_pk", "var_gk",
                                             "var_rs", "var_yz", *har_windows)}
    k_yz = 0.34 / (1.34 + (yz_window + 1) / (yz_window - 1))
    ov_q: deque = deque()
    oc_q: deque = deque()
    rs_q: deque = deque()
    s_ov = s_ov2 = s_oc = s_oc2 = s_rs = 0.0
    har_q = {k: deque() for k in har_windows}
    har_s = dict.fromkeys(har_windows, 0.0)
    z_q: deque = deque()
    prev_c = None
    prev_t = None
    for i in range(n):
        o, h, lo, c = o_[i], h_[i], l_[i], c_[i]
        if prev_c is None:
            r = math.nan
            kb = math.nan
            ovn = math.nan
        else:
            r = math.log(c / prev_c)
            kb = float(round((ns[i] - prev_t) / bar_ns))
            ovn = math.log(o / prev_c)
        cols["ret"].append(r)
        cols["ret_bars"].append(kb)
        cols["gap"].append(kb > 1)
        # extreme flag vs trailing robust scale (previous `window` returns)
        z = abs(r) / math.sqrt(kb) if prev_c is not None else math.nan
        flag = False
        past = [v for v in z_q if not math.isnan(v)]
        if len(past) >= 30 and not math.isnan(z):
            scale = statistics.median(past) / 0.6744897501960817
            flag = scale > 0 and z > sigma * scale
        cols["extreme"].append(flag)
        z_q.append(z)
        if len(z_q) > window:
            z_q.popleft()
        sq = r * r
        cols["var_sq"].append(sq if math.isnan(sq) or sq >= VARIANCE_FLOOR else VARIANCE_FLOOR)
        u, d, cc = math.log(h / o), math.log(lo / o), math.log(c / o)
        pk = (u - d) ** 2 / (4 * LN2)
        gk = 0.5 * (u - d) ** 2 - (2 * LN2 - 1) * cc * cc
        rs = u * (u - cc) + d * (d - cc)
        cols["var_pk"].append(max(pk, VARIANCE_FLOOR))
        cols["var_gk"].append(max(gk, VARIANCE_FLOOR))
        cols["var_rs"].append(max(rs, VARIANCE_FLOOR))
        # Yang-Zhang with running sums over the last yz_window bars
        for q, x in ((ov_q, ovn), (oc_q, cc), (rs_q, rs)):
            q.append(x)
        if not math.isnan(ovn):
            s_ov += ovn
            s_ov2 += ovn * ovn
        s_oc += cc
        s_oc2 += cc * cc
        s_rs += rs
        if len(oc_q) > yz_window:
            x = ov_q.popleft()
            if not math.isnan(x):
                s_ov -= x
                s_ov2 -= x * x
            x = oc_q.popleft()
            s_oc -= x
            s_oc2 -= x * x
            s_rs -= rs_q.popleft()
        if len(oc_q) == yz_window and not math.isnan(ov_q[0]):
            w = yz_window
            var_o = (s_ov2 - s_ov * s_ov / w) / (w - 1)
            var_c = (s_oc2 - s_oc * s_oc / w) / (w - 1)
            yz = var_o + k_yz * var_c + (1 - k_yz) * s_rs / w
            cols["var_yz"].append(max(yz, VARIANCE_FLOOR))
        else:
            cols["var_yz"].append(math.nan)
        base = cols["var_gk"][-1]
        for name, w in har_windows.items():
            q = har_q[name]
            q.append(base)
            har_s[name] += base
            if len(q) > w:
                har_s[name] -= q.popleft()
            cols[name].append(har_s[name] / w if len(q) == w else math.nan)
        prev_c, prev_t = c, ns[i]
    return cols


def bench_bundled(repeat: int) -> dict:
    out: dict = {}
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for sid, spec in BUNDLED.items():
            if not spec.available():
                out[sid] = {"skipped": "package not installed"}
                continue
            t_load, raw = best_of(lambda sid=sid: load_raw(sid), repeat)
            t_clean, (bars, rep) = best_of(lambda raw=raw: check_and_clean(raw), repeat)
            t_feat, _ = best_of(lambda bars=bars: build_features(bars), repeat)
            t_prep, prepared = best_of(lambda sid=sid: prepare_dataset(sid), repeat)
            t_write, _ = best_of(lambda p=prepared, sid=sid: write_prepared(p, Path(tmp) / p.asset), repeat)
            out[sid] = {"rows_in": rep.rows_in, "rows_out": rep.rows_out, "load_s": t_load, "check_clean_s": t_clean,
                        "features_s": t_feat, "prepare_dataset_s": t_prep, "write_prepared_s": t_write}
            total += t_prep + t_write
    out["total_prepare_and_write_s"] = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--loop-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_data.json")
    args = ap.parse_args()

    result: dict = {
        "benchmark": "data_pipelines",
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "numpy": np.__version__, "pandas": pd.__version__},
    }
    result["bundled"] = bench_bundled(args.repeat)

    t_sim, path = best_of(lambda: simulate(args.rows, seed=0, bar="1min", intraday_steps=8), 1)
    bars = path.bars
    t_vec, feats = best_of(lambda: build_features(bars), args.repeat)

    prof = cProfile.Profile()
    prof.enable()
    build_features(bars)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(12)
    top = [ln.strip() for ln in s.getvalue().splitlines() if ln.strip() and ln.strip()[0].isdigit()][:12]

    # the profile's former hot spot (before: a full rolling median, ~half of build_features):
    # both implementations timed here on the same returns
    from data_pipelines.quality import _extreme_candidates_fast, _extreme_exact

    r = feats["ret"].to_numpy()
    z = np.abs(r) / np.sqrt(feats["ret_bars"].to_numpy())
    t_exact, flags_exact = best_of(lambda: _extreme_exact(z, DEFAULT_EXTREME_SIGMA, DEFAULT_EXTREME_WINDOW, 30), args.repeat)
    t_fast, flags_fast = best_of(lambda: _extreme_candidates_fast(z, DEFAULT_EXTREME_SIGMA, DEFAULT_EXTREME_WINDOW), args.repeat)
    if flags_fast is None or not np.array_equal(flags_exact, flags_fast):
        raise SystemExit("extreme-return fast path did not run or disagrees with the exact rolling median")

    m = min(args.loop_rows, len(bars))
    sub = bars.iloc[:m]
    har_windows = {f"har_{d:g}": har_window_bars(d, "1min") for d in (1, 7, 30)}
    t_loop, cols = best_of(lambda: features_loop(sub, har_windows=har_windows), 1)
    vec_sub = build_features(sub)
    max_rel = {}
    for name, vals in cols.items():
        ref = vec_sub[name].to_numpy(dtype=np.float64)
        got = np.asarray(vals, dtype=np.float64)
        both = ~np.isnan(ref)
        if not np.array_equal(both, ~np.isnan(got)):
            raise SystemExit(f"loop and vectorised disagree on NaN pattern of {name}")
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(got[both] - ref[both]) / np.maximum(np.abs(ref[both]), 1e-300)
        max_rel[name] = float(rel.max()) if rel.size else 0.0
        if max_rel[name] > 1e-7:
            raise SystemExit(f"loop and vectorised differ on {name}: max rel {max_rel[name]:.3g}")
    loop_per_row = t_loop / m
    loop_extrapolated = loop_per_row * len(bars)
    result["features_1m_bars"] = {
        "rows": len(bars),
        "bar": "1min",
        "columns": list(feats.columns),
        "simulate_s": t_sim,
        "vectorised_s": t_vec,
        "vectorised_rows_per_s": len(bars) / t_vec,
        "loop_rows_measured": m,
        "loop_measured_s": t_loop,
        "loop_s_per_row": loop_per_row,
        "loop_extrapolated_s": loop_extrapolated,
        "loop_note": f"naive per-row Python loop timed on the first {m:,} rows and extrapolated linearly to "
                     f"{len(bars):,} rows (constant cost per row); its output matches the vectorised one "
                     "on those rows (max relative difference per column in loop_max_rel_diff)",
        "loop_max_rel_diff": max_rel,
        "ratio_vs_loop": loop_extrapolated / t_vec,
        "profile_top_cumulative": top,
        "extreme_flag_full_rolling_median_s": t_exact,
        "extreme_flag_candidate_median_s": t_fast,
        "extreme_flag_note": "profiling showed the trailing rolling median of the extreme-return flag at ~half of "
                             "build_features; it now computes exact medians only for candidate rows (block "
                             "lower bound), identical flags (checked above)",
    }
    result["ratio_vs_loop"] = result["features_1m_bars"]["ratio_vs_loop"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    f = result["features_1m_bars"]
    print(f"bundled total prepare+write {result['bundled']['total_prepare_and_write_s']:.2f}s; "
          f"features {f['rows']:,} bars: vectorised {f['vectorised_s']:.2f}s, loop ~{f['loop_extrapolated_s']:.1f}s "
          f"-> ratio_vs_loop {f['ratio_vs_loop']:.0f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
