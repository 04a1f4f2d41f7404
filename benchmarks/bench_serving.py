"""Load test of the margin feed service on loopback: ``python benchmarks/bench_serving.py``.

Publishes the shipped markets (configs/markets.yaml, fresh store, key and model/fit cache in a temporary
folder: a fresh clone, so the first publish fits BTC's GARCH and LTC's predictive parameters; then once more
from the cache), starts the real service (uvicorn, one process) on 127.0.0.1, and drives it from a separate
process with a bounded, open-loop load per route:

* ``GET /v1/params/BTC-PERP`` at 500 requests/s for 10 s (target p99 < 10 ms);
* ``POST /v1/margin`` with a 1,000-account portfolio, with liquidation prices (target p99 < 50 ms) and without.

Writes ``benchmarks/results/bench_serving.json``: per route ``rps``, ``p50_ms``, ``p99_ms``, ``errors`` (and the
load it was driven with, and the server's CPU time per request), measured in this run, and the machine's load average before and after (other
processes share the cores). Latencies count from each request's scheduled send time.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "results" / "bench_serving.json"

_SERVER = r"""
import sys, uvicorn
from serving.app import ServiceSettings, create_app
from serving.markets import load_markets
cfg = load_markets(sys.argv[1])
app = create_app(cfg, sys.argv[2], ServiceSettings(rate=5000.0, burst=10000))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="error", access_log=False)
"""

_DRIVER = r"""
import json, sys
from serving.loadgen import LoadSpec, drive
spec = json.loads(sys.argv[2])
body = open(spec.pop("body_file"), "rb").read() if spec.get("body_file") else None
spec.pop("body_file", None)
print(json.dumps(drive(sys.argv[1], LoadSpec(body=body, **spec))))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _in_process(body: bytes, served: dict) -> dict:
    """The margin route's work on the benchmark's 1,000-account body in this process, against the plain path a
    caller of the engine would write (``json.loads``, the engine's ``jsonschema`` validation,
    ``Portfolio.from_dict``, ``compute_margin``, ``json.dumps(to_dict())``), both giving the same JSON (checked):
    medians of back-to-back runs (warm caches), and of the route's runs after 0.2 s idle (what a request
    arriving at 5/s meets: caches the other process and the host have used in between)."""
    from margin.accounts import Portfolio
    from margin.engine import compute_margin
    from margin.validation import validate_document
    from serving.app import margin_params_file
    from serving.margin_api import dump_response, margin_response, parse_portfolio

    params = margin_params_file(served)

    def plain() -> bytes:
        doc = json.loads(body)
        validate_document(doc, "portfolio")
        res = compute_margin(Portfolio.from_dict(doc), params, "cross", liquidation_price=True)
        return json.dumps(res.to_dict(), allow_nan=False).encode()

    def route() -> bytes:
        res = compute_margin(parse_portfolio(body), params, "cross", liquidation_price=True)
        return dump_response(margin_response(res))

    if json.loads(plain()) != json.loads(route()):
        raise RuntimeError("the route's response differs from the plain path's")

    def median_ms(fn, n: int, idle_s: float = 0.0) -> float:
        times = []
        for _ in range(n):
            if idle_s:
                time.sleep(idle_s)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1000.0, 3)

    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)  # the server's collector settings (serving/app.py), for both paths
    try:
        base_ms, route_ms = median_ms(plain, 10), median_ms(route, 30)
        idle_ms = median_ms(route, 20, idle_s=0.2)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    return {"accounts": 1000, "baseline": "json.loads + validate_document + Portfolio.from_dict + compute_margin + "
                                          "json.dumps(to_dict())",
            "baseline_ms": base_ms, "route_ms": route_ms, "speedup": round(base_ms / route_ms, 2),
            "route_after_idle_ms": idle_ms}


def main() -> dict:
    import yaml

    from serving.keys import generate_key, load_key
    from serving.loadgen import portfolio_doc
    from serving.markets import load_markets
    from serving.publish import publish_market
    from serving.store import FeedStore

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    doc = yaml.safe_load((REPO / "configs" / "markets.yaml").read_text())
    doc["feed"]["db"] = str(tmp / "feed.db")
    doc["feed"]["cache_dir"] = str(tmp / "cache")
    mf = tmp / "markets.yaml"
    mf.write_text(yaml.safe_dump(doc))
    cfg = load_markets(mf)
    generate_key(tmp / "key")
    key = load_key(tmp / "key")
    store = FeedStore(cfg.feed.db)
    load_before = [round(x, 2) for x in os.getloadavg()]
    publish_s = []
    fits = {}
    served = {}  # what the server margins with: MarginParams per underlying, from the records
    for rnd in range(2):  # fresh clone (fits), then from the cache (within min_interval: computed, not stored)
        t0 = time.perf_counter()
        for m in cfg.markets:
            res = publish_market(cfg, m, store, key)
            if rnd == 0 and res.record is not None:
                served[m] = res.record["params"]
            if rnd == 0 and (res.record is None or res.record["fallback"]):
                raise RuntimeError(f"{m}: no normal record published ({res.skipped or res.record['fallback_reason']})")
            fit = res.record["lineage"]["policy"].get("fit") if res.record is not None else None
            if rnd == 0 and fit:
                fits[m] = {"seconds": fit["seconds"], "bars": fit["bars"], "positions": fit["positions"],
                           "evaluations": fit["evaluations"], "im_rate": res.record["message"]["imRate"] / 1e8,
                           "params": {k: fit["params"][k] for k in ("level", "power", "release", "mm_k")}}
        publish_s.append(time.perf_counter() - t0)
    body = tmp / "portfolio.json"
    body.write_text(json.dumps(portfolio_doc(1000)))
    in_process = _in_process(body.read_bytes(), served)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    srv = subprocess.Popen([sys.executable, "-c", _SERVER, str(mf), cfg.feed.db, str(port)], env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(200):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not become ready")
        loads = {
            "GET /v1/params/{market}": {"name": "params", "method": "GET", "path": "/v1/params/BTC-PERP", "rate": 500.0,
                                        "duration_s": 10.0, "workers": 16},
            "POST /v1/margin (1000 accounts)": {"name": "margin", "method": "POST", "path": "/v1/margin", "rate": 5.0,
                                                "duration_s": 20.0, "workers": 4, "body_file": str(body),
                                                "headers": [["content-type", "application/json"]]},
            "POST /v1/margin (1000 accounts, liquidation_price=false)": {
                "name": "margin_nolp", "method": "POST", "path": "/v1/margin?liquidation_price=false", "rate": 10.0,
                "duration_s": 10.0, "workers": 4, "body_file": str(body),
                "headers": [["content-type", "application/json"]]},
        }
        routes = {}
        for label, spec in loads.items():
            spec = dict(spec)
            spec["headers"] = [tuple(h) for h in spec.get("headers", [])]
            cpu0 = _cpu_seconds(srv.pid)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run([sys.executable, "-c", _DRIVER, base, json.dumps(spec)], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300, check=True)
            routes[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            # the load driver's own CPU (interpreter start included): it shares the 2 cores with the server
            routes[label]["driver_cpu_ms_per_request"] = round(
                (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1000.0 / routes[label]["requests"], 2)
            # CPU the server spent per request: what the route costs, whatever else runs on the machine
            cpu = _cpu_seconds(srv.pid)
            if cpu is not None and cpu0 is not None:
                routes[label]["server_cpu_ms_per_request"] = round((cpu - cpu0) * 1000.0 / routes[label]["requests"], 2)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    result = {
        "benchmark": "serving",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        # uvicorn's "auto" picks uvloop and httptools when they are installed (uvicorn[standard])
        "uvicorn": {"loop": "uvloop" if _has("uvloop") else "asyncio", "http": "httptools" if _has("httptools") else "h11"},
        "load_average_1_5_15": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "publish_3_markets_fresh_s": round(publish_s[0], 3),
        "publish_3_markets_cached_s": round(publish_s[1], 3),
        "predictive_fits": fits,
        "targets": {"GET /v1/params/{market}": "p99 < 10 ms at 500 req/s",
                    "POST /v1/margin (1000 accounts)": "p99 < 50 ms"},
        "routes": routes,
        "margin_in_process": in_process,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    from data_pipelines.atomic import atomic_write_text

    atomic_write_text(OUT, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = main()
    ip = res["margin_in_process"]
    sys.stdout.write(f"margin in-process, 1000 accounts: plain path {ip['baseline_ms']} ms, route {ip['route_ms']} ms "
                     f"({ip['speedup']}x), route after 0.2 s idle {ip['route_after_idle_ms']} ms\n")
    for label, r in res["routes"].items():
        sys.stdout.write(f"{label}: rps {r['rps']} p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms errors {r['errors']} "
                         f"server CPU {r.get('server_cpu_ms_per_request')} ms/request "
                         f"driver CPU {r.get('driver_cpu_ms_per_request')} ms/request\n")
