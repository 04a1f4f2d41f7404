"""Load for the service: synthetic portfolios and a bounded open-loop load driver (used by
``benchmarks/bench_serving.py`` and the integration tests).

The driver sends requests at a fixed rate (open loop: a slow answer does not slow the schedule, so queueing
shows in the latency) for a bounded time and count, to a loopback URL only, from worker threads of its own
process, and reports per route ``rps`` (answers per second achieved), ``p50_ms``, ``p99_ms`` and ``errors``
(non-2xx answers and transport failures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

__all__ = ["portfolio_doc", "LoadSpec", "drive", "check_loopback"]


def portfolio_doc(n_accounts: int, *, seed: int = 42, as_of: str = "2026-01-01T12:00:00Z",
                  underlyings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A portfolio document (schemas/portfolio.schema.json) of ``n_accounts`` accounts with linear perps on
    ``underlyings`` (name -> mark price; default BTC, ETH, LTC), USDC and BTC collateral, seeded."""
    if isinstance(n_accounts, bool) or not isinstance(n_accounts, int) or n_accounts < 1:
        raise ValueError(f"n_accounts must be a positive integer, got {n_accounts!r}")
    rng = np.random.default_rng(seed)
    marks = dict(underlyings or {"BTC": 90000.0, "ETH": 3000.0, "LTC": 100.0})
    inst = [{"id": f"{u}-PERP", "kind": "linear_perp", "underlying": u, "contract_size": 1.0, "tick_size": 0.01}
            for u in marks]
    accounts = []
    names = list(marks)
    for i in range(n_accounts):
        k = int(rng.integers(1, len(names) + 1))
        chosen = rng.choice(len(names), size=k, replace=False)
        positions = []
        notional = 0.0
        for j in chosen:
            u = names[int(j)]
            size = float(np.round(rng.lognormal(0.0, 1.0) * 10000.0 / marks[u], 4)) or 0.001
            size = size if rng.random() < 0.5 else -size
            entry = float(np.round(marks[u] * (1 + rng.normal(0, 0.03)), 2))
            positions.append({"instrument": f"{u}-PERP", "size": size, "entry_price": entry})
            notional += abs(size) * marks[u]
        coll = [{"asset": "USDC", "chain": "ethereum", "amount": float(np.round(notional / rng.uniform(2, 20), 2))}]
        if rng.random() < 0.3:
            coll.append({"asset": "BTC", "chain": "ethereum", "amount": float(np.round(rng.uniform(0.01, 0.5), 4))})
        accounts.append({"id": f"acct-{i:06d}", "collateral": coll, "positions": positions})
    return {
        "as_of": as_of,
        "instruments": inst,
        "marks": {"underlyings": marks, "collateral": {"USDC": 1.0, "USDT": 1.0, "BTC": marks.get("BTC", 90000.0)}},
        "accounts": accounts,
    }


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not on the loopback range (load is never sent elsewhere)."""
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise ValueError(f"load is only sent to loopback addresses (127.0.0.0/8, localhost, ::1), got host {host!r}")


@dataclass(frozen=True)
class LoadSpec:
    """One route's load: ``method`` ``path`` at ``rate`` requests/s for ``duration_s`` (at most ``max_requests``)."""

    name: str
    method: str
    path: str
    rate: float
    duration_s: float
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    max_requests: int = 100_000
    workers: int = 8


def drive(base_url: str, spec: LoadSpec, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send ``spec``'s load to ``base_url`` (loopback only) and measure it.

    Returns
    -------
    dict
        ``requests``, ``rps``, ``p50_ms``, ``p99_ms``, ``max_ms`` (from each request's scheduled time),
        ``service_p99_ms`` (from when it was sent), ``errors`` (non-2xx or failed),
        ``status`` counts, ``rate_target``, ``duration_s``.
    """
    import http.client

    check_loopback(base_url)
    u = urlparse(base_url)
    host, port, prefix = u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/")
    n = int(min(spec.max_requests, max(1, round(spec.rate * spec.duration_s))))
    interval = 1.0 / spec.rate
    lat = np.full(n, np.nan)
    svc = np.full(n, np.nan)
    status: list[int] = [0] * n
    nxt = {"i": 0}
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05
    headers = dict(spec.headers)
    url = prefix + spec.path

    def worker() -> None:
        # the standard library's keep-alive client: a fraction of httpx's CPU per request, so a 2-core machine
        # can drive hundreds of requests/s without the driver (one process, one GIL) falling behind its schedule
        con = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    i = nxt["i"]
                    if i >= n:
                        return
                    nxt["i"] = i + 1
                due = t0 + i * interval
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                start = time.perf_counter()
                try:
                    con.request(spec.method, url, body=spec.body, headers=headers)
                    r = con.getresponse()
                    r.read()
                    status[i] = r.status
                    if r.will_close:
                        con.close()
                except (OSError, http.client.HTTPException):
                    status[i] = -1
                    con.close()  # reconnects on the next request
                end = time.perf_counter()
                # latency from the scheduled time: queueing behind a late request counts (no coordinated omission)
                lat[i] = (end - min(due, start)) * 1000.0
                svc[i] = (end - start) * 1000.0
        finally:
            con.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, spec.workers))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=spec.duration_s + 60)
    elapsed = time.perf_counter() - t0
    ok = np.array([200 <= s < 300 for s in status])
    done = np.isfinite(lat)
    counts: dict[str, int] = {}
    for s in status:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return {
        "requests": int(n),
        "rate_target": spec.rate,
        "duration_s": round(elapsed, 3),
        "rps": round(float(done.sum()) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(float(np.nanpercentile(lat, 50)), 3) if done.any() else None,
        "p99_ms": round(float(np.nanpercentile(lat, 99)), 3) if done.any() else None,
        "max_ms": round(float(np.nanmax(lat)), 3) if done.any() else None,
        "service_p99_ms": round(float(np.nanpercentile(svc, 99)), 3) if done.any() else None,
        "errors": int((~ok).sum()),
        "status": counts,
    }
