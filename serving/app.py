"""The margin feed service (FastAPI; ``volmargin serve --host 127.0.0.1 --port 8000`` runs it under uvicorn).

Routes
------
``GET /v1/params/{market}``
    The current signed record (404 unknown market; 503 when none was published or it has expired: an expired
    record is never presented as current).
``GET /v1/params/{market}/history?limit=&before=``
    Records newest first.
``POST /v1/margin?mode=cross&scenarios=auto``
    Body: a portfolio (schemas/portfolio.schema.json). Margin, health factor and liquidation prices of every
    account with the current records' parameters (422 for invalid input, naming the JSON path and value).
``GET /healthz``, ``GET /readyz``, ``GET /metrics``
    Liveness; readiness (every market has a current record); Prometheus metrics.
``POST /v1/admin/publish/{market}``, ``POST /v1/admin/pause/{market}``
    Need the API key (``X-API-Key`` or ``Authorization: Bearer``) equal to ``VOLMARGIN_API_KEY`` (constant-time
    comparison): 401 without a key, 403 with a wrong one or when no key is configured.

Every error is JSON ``{"error": <code>, "detail": <message>}``. A per-client token bucket (peer address)
answers 429 past ``rate`` requests/s (burst ``burst``); bodies above ``max_body_bytes`` get 413. The signing key
is read from the file named by ``VOLMARGIN_SIGNING_KEY_FILE`` only when an admin publish needs it, and never
logged.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.feed import canonical_json
from serving.keys import KEY_ENV, load_key
from serving.markets import MarketsFile
from serving.store import FeedStore

__all__ = ["ServiceSettings", "create_app", "API_KEY_ENV"]

log = logging.getLogger(__name__)

#: Environment variable holding the admin API key.
API_KEY_ENV = "VOLMARGIN_API_KEY"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServiceSettings:
    """Settings of the service.

    Parameters
    ----------
    api_key : str, optional
        Admin API key (``VOLMARGIN_API_KEY``); None disables the admin routes (403).
    signing_key_file : Path, optional
        Signing key for admin publishes (``VOLMARGIN_SIGNING_KEY_FILE``).
    rate : float
        Requests per second per client (token refill), > 0.
    burst : int
        Bucket size, >= 1.
    max_body_bytes : int
        Largest request body accepted.
    """

    api_key: str | None = None
    signing_key_file: Path | None = None
    rate: float = 2000.0
    burst: int = 4000
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a number > 0 (requests/s), got {self.rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError(f"{API_KEY_ENV} must be at least 16 characters, got {len(self.api_key)}")

    @classmethod
    def from_env(cls, **overrides: Any) -> ServiceSettings:
        """Settings from ``VOLMARGIN_API_KEY``, ``VOLMARGIN_SIGNING_KEY_FILE``, ``VOLMARGIN_RATE_LIMIT``
        (requests/s), ``VOLMARGIN_RATE_BURST`` and ``VOLMARGIN_MAX_BODY_BYTES``; ``overrides`` win."""
        kw: dict[str, Any] = {}
        if os.environ.get(API_KEY_ENV):
            kw["api_key"] = os.environ[API_KEY_ENV]
        if os.environ.get(KEY_ENV):
            kw["signing_key_file"] = Path(os.environ[KEY_ENV])
        for env, name, conv in (("VOLMARGIN_RATE_LIMIT", "rate", float), ("VOLMARGIN_RATE_BURST", "burst", int),
                                ("VOLMARGIN_MAX_BODY_BYTES", "max_body_bytes", int)):
            if os.environ.get(env):
                try:
                    kw[name] = conv(os.environ[env])
                except ValueError:
                    raise ValueError(f"{env} must be a number, got {os.environ[env]!r}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# ------------------------------------------------------------------------------------------- middleware
def _route_label(path: str) -> str:
    if path.startswith("/v1/params/"):
        return "/v1/params/{market}/history" if path.endswith("/history") else "/v1/params/{market}"
    if path.startswith("/v1/admin/publish/"):
        return "/v1/admin/publish/{market}"
    if path.startswith("/v1/admin/pause/"):
        return "/v1/admin/pause/{market}"
    if path in ("/v1/margin", "/healthz", "/readyz", "/metrics"):
        return path
    return "other"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """Pure ASGI middleware: per-client token bucket, body-size limit, request metrics."""

    def __init__(self, app: ASGIApp, settings: ServiceSettings, metrics: dict[str, Any]) -> None:
        self.app = app
        self.s = settings
        self.metrics = metrics
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def _allow(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(client, (float(self.s.burst), now))
            tokens = min(float(self.s.burst), tokens + (now - last) * self.s.rate)
            ok = tokens >= 1.0
            self.buckets[client] = (tokens - 1.0 if ok else tokens, now)
            if len(self.buckets) > 100_000:  # bounded memory: forget idle clients
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        label = _route_label(scope.get("path", ""))
        status_holder = {"status": 500}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            client = (scope.get("client") or ("unknown", 0))[0]
            if not self._allow(client):
                status_holder["status"] = 429
                await _send_json(send, 429, {"error": "rate_limited",
                                             "detail": f"more than {self.s.rate:g} requests/s from {client}"},
                                 [(b"retry-after", b"1")])
                return
            length = None
            for k, v in scope.get("headers", ()):
                if k == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        length = -1
            if length is not None and (length < 0 or length > self.s.max_body_bytes):
                status_holder["status"] = 413
                await _send_json(send, 413, {"error": "body_too_large",
                                             "detail": f"request body of {length} bytes exceeds the limit of "
                                                       f"{self.s.max_body_bytes} bytes"})
                return
            received = 0
            limit = self.s.max_body_bytes

            async def receive_limited() -> Message:
                nonlocal received
                msg = await receive()
                if msg["type"] == "http.request":
                    received += len(msg.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge(received)
                return msg

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except _BodyTooLarge as exc:
                status_holder["status"] = 413
                await _send_json(send, 413, {"error": "body_too_large",
                                             "detail": f"request body of more than {exc.args[0]} bytes exceeds the "
                                                       f"limit of {limit} bytes"})
        finally:
            dt = time.perf_counter() - t0
            self.metrics["latency"].labels(route=label).observe(dt)
            self.metrics["requests"].labels(route=label, status=str(status_holder["status"])).inc()


class _BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------------- app
def _err(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _now_s() -> int:
    return int(time.time())


def margin_params_file(params_by_market: Mapping[str, Mapping[str, Any]]) -> Any:
    """The ``ParamsFile`` the margin route uses: each market's ``MarginParams`` document (a record's
    ``params``), one per underlying (``market_id``), the first market in sorted order winning."""
    from margin.params import MarginParams, ParamsFile

    seen: dict[str, Any] = {}
    for _m, doc in sorted(params_by_market.items()):
        p = MarginParams.from_dict(doc)
        seen.setdefault(p.market_id, p)
    return ParamsFile(markets=tuple(seen.values()))


def create_app(markets: MarketsFile, store: FeedStore | str | Path | None = None,
               settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI application of the feed (see the module docstring).

    Parameters
    ----------
    markets : MarketsFile
        Configured markets (unknown ids are 404).
    store : FeedStore or path, optional
        The record store (default ``markets.feed.db``).
    settings : ServiceSettings, optional
        Default: :meth:`ServiceSettings.from_env`.
    """
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    s = settings or ServiceSettings.from_env()
    st = store if isinstance(store, FeedStore) else FeedStore(store or markets.feed.db)
    db_path = st.path

    def get_store() -> FeedStore:  # FeedStore keeps one SQLite connection per thread
        return st

    registry = CollectorRegistry()
    metrics = {
        "requests": Counter("volmargin_http_requests_total", "HTTP requests", ["route", "status"], registry=registry),
        "latency": Histogram("volmargin_http_request_seconds", "Request latency", ["route"], registry=registry,
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)),
        "published": Counter("volmargin_feed_published_total", "Records published through the admin route",
                             ["market", "fallback"], registry=registry),
        "age": Gauge("volmargin_feed_record_age_seconds", "Age of the current record", ["market"], registry=registry),
    }
    app = FastAPI(title="volmargin margin feed", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.markets = markets
    app.state.settings = s
    app.state.metrics_registry = registry
    params_cache: dict[tuple[tuple[str, int], ...], Any] = {}

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _err(exc.status_code, code, str(exc.detail))

    def check_market(market: str) -> JSONResponse | None:
        if market not in markets.markets:
            return _err(404, "unknown_market", f"unknown market {market!r}; configured: {', '.join(sorted(markets.markets))}")
        return None

    def current_doc(market: str) -> tuple[Any, JSONResponse | None]:
        rec = get_store().current_cached(market)
        if rec is None:
            return None, _err(503, "no_record", f"no record has been published for {market}")
        vu = int(rec["message"]["validUntil"])
        if _now_s() >= vu:
            return None, _err(503, "expired", f"the last record of {market} (update {rec['update_id']}) expired at "
                                             f"{rec['valid_until']}; the publisher is behind")
        return rec, None

    @app.get("/v1/params/{market}")
    async def get_params(market: str) -> Response:
        bad = check_market(market)
        if bad is not None:
            return bad
        rec, err = current_doc(market)
        if err is not None:
            return err
        return Response(content=rec.text, media_type="application/json",
                        headers={"cache-control": "no-store", "x-update-id": str(rec["update_id"])})

    @app.get("/v1/params/{market}/history")
    async def get_history(market: str, limit: str = "50", before: str | None = None) -> Response:
        bad = check_market(market)
        if bad is not None:
            return bad
        try:
            lim = int(limit)
        except ValueError:
            return _err(422, "invalid_input", f"limit must be an integer in [1, 1000], got {limit!r}")
        bef = None
        if before is not None:
            try:
                bef = int(before)
            except ValueError:
                return _err(422, "invalid_input", f"before must be an integer update id, got {before!r}")
        try:
            recs = get_store().history(market, limit=lim, before=bef)
        except ValueError as exc:
            return _err(422, "invalid_input", str(exc))
        body = '{"market":' + json.dumps(market) + ',"records":[' + ",".join(r.text for r in recs) + "]}"
        return Response(content=body, media_type="application/json", headers={"cache-control": "no-store"})

    def current_params() -> tuple[Any, dict[str, str]]:
        docs = {}
        stale = {}
        for m in markets.markets:
            rec, err = current_doc(m)
            if rec is None:
                stale[m] = json.loads(err.body)["detail"] if err is not None else "no record"
                continue
            docs[m] = rec
        key = tuple(sorted((m, int(r["update_id"])) for m, r in docs.items()))
        pf = params_cache.get(key)
        if pf is None:
            pf = margin_params_file({m: r["params"] for m, r in docs.items()})
            params_cache.clear()
            params_cache[key] = pf
        return pf, stale

    def margin_sync(body: bytes, mode: str, scenarios: str, liq: str) -> Response:
        from margin.engine import compute_margin
        from serving.margin_api import PortfolioError, dump_response, margin_response, parse_portfolio

        if mode not in ("isolated", "cross", "portfolio"):
            return _err(422, "invalid_input", f"mode must be isolated, cross or portfolio, got {mode!r}")
        if scenarios not in ("auto", "grid", "fhs"):
            return _err(422, "invalid_input", f"scenarios must be auto, grid or fhs, got {scenarios!r}")
        if liq not in ("true", "false"):
            return _err(422, "invalid_input", f"liquidation_price must be true or false, got {liq!r}")
        try:
            pf = parse_portfolio(body)
        except PortfolioError as exc:
            code = "invalid_json" if str(exc).startswith("request body is not valid JSON") else "invalid_input"
            return _err(422, code, str(exc))
        params, stale = current_params()
        need = set(pf.arrays.underlyings_unique)
        have = {m.market_id for m in params.markets}
        missing = sorted(need - have)
        if missing:
            why = "; ".join(f"{k}: {v}" for k, v in stale.items())
            return _err(422, "no_params", f"no current margin parameters for underlying(s) {missing}"
                                          + (f" ({why})" if why else "") + f"; served: {sorted(have)}")
        try:
            res = compute_margin(pf, params, mode, scenarios=scenarios,  # type: ignore[arg-type]
                                 liquidation_price=liq == "true")
        except (ValueError, KeyError) as exc:
            return _err(422, "invalid_input", str(exc.args[0] if isinstance(exc, KeyError) else exc))
        out = margin_response(res)
        out["params"] = {m.market_id: {"update_valid_from": m.to_dict()["valid_from"],
                                       "valid_until": m.to_dict()["valid_until"]}
                         for m in params.markets if m.market_id in need}
        return Response(dump_response(out), media_type="application/json")

    @app.post("/v1/margin")
    async def post_margin(request: Request, mode: str = "cross", scenarios: str = "auto",
                          liquidation_price: str = "true") -> Response:
        body = await request.body()
        return await run_in_threadpool(margin_sync, body, mode, scenarios, liquidation_price)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            problems = {}
            for m in markets.markets:
                _rec, err = current_doc(m)
                if err is not None:
                    problems[m] = json.loads(err.body)["detail"]
        except Exception as exc:  # noqa: BLE001 - any store failure means not ready
            return _err(503, "not_ready", f"feed store {db_path} unreadable: {exc}")
        if problems:
            return JSONResponse({"error": "not_ready", "detail": problems}, status_code=503)
        return JSONResponse({"status": "ready", "markets": sorted(markets.markets)})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        now = _now_s()
        for m in markets.markets:
            rec = get_store().current(m)
            if rec is not None:
                metrics["age"].labels(market=m).set(now - int(rec["message"]["validFrom"]))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------------------- admin
    def admin_check(request: Request) -> JSONResponse | None:
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            return _err(401, "unauthorized", "admin routes need an API key (X-API-Key or Authorization: Bearer)")
        if s.api_key is None:
            return _err(403, "forbidden", f"admin routes are disabled: {API_KEY_ENV} is not set on the server")
        if not hmac.compare_digest(given.encode("utf-8"), s.api_key.encode("utf-8")):
            return _err(403, "forbidden", "wrong API key")
        return None

    @app.post("/v1/admin/pause/{market}")
    async def admin_pause(market: str, request: Request, paused: str = "true", reason: str | None = None) -> Response:
        bad = admin_check(request) or check_market(market)
        if bad is not None:
            return bad
        if paused not in ("true", "false"):
            return _err(422, "invalid_input", f"paused must be true or false, got {paused!r}")
        get_store().set_paused(market, paused == "true", reason)
        return JSONResponse({"market": market, "paused": paused == "true", "reason": reason})

    @app.post("/v1/admin/publish/{market}")
    async def admin_publish(market: str, request: Request) -> Response:
        bad = admin_check(request) or check_market(market)
        if bad is not None:
            return bad
        if s.signing_key_file is None:
            return _err(503, "no_signing_key", f"{KEY_ENV} is not set on the server: it cannot sign")
        try:
            key = load_key(s.signing_key_file)
        except (OSError, ValueError) as exc:
            return _err(503, "no_signing_key", str(exc))

        def run() -> Any:
            from serving.publish import publish_market

            return publish_market(markets, market, FeedStore(db_path), key)

        try:
            res = await run_in_threadpool(run)
        except ValueError as exc:
            return _err(409, "conflict", str(exc))
        if res.record is None:
            return JSONResponse({"error": "not_published", "detail": res.skipped}, status_code=409)
        metrics["published"].labels(market=market, fallback=str(res.fallback).lower()).inc()
        return Response(content=canonical_json(dict(res.record)), media_type="application/json", status_code=201)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _err(422, "invalid_input", "; ".join(parts))

    async def warm_up() -> None:
        """Pay the margin route's one-off costs before the server accepts connections, not in the first client's
        request (~0.8 s): anyio's thread-pool backend (imported on the first ``run_in_threadpool``, ~0.2 s) and
        worker thread, then imports, schema validators, parameter objects, first numpy calls of the engine."""
        await run_in_threadpool(warm_margin)
        # Everything alive now (modules, schemas, parameters: ~100k objects) lives as long as the process: move it
        # out of the cyclic collector's generations, so the full collections that a 1,000-account request's
        # allocations trigger do not traverse it each time (~70 ms on 2 shared cores, the margin route's tail).
        # A request allocated ~40k tracked containers when records were decoded as dicts (the decoded Structs are
        # now untracked, gc=False): collect the young generation every 20,000 allocations instead of 700, so a
        # request triggers few cheap collections rather than dozens; cyclic garbage is still collected.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 10, 10)

    def warm_margin() -> None:
        try:
            from margin.engine import compute_margin
            from serving.loadgen import portfolio_doc
            from serving.margin_api import (
                _document_decoder,
                _fast_validator,
                dump_response,
                margin_response,
                parse_portfolio,
            )

            _document_decoder()
            _fast_validator()
            params, _stale = current_params()
            marks = {m.market_id: 100.0 for m in params.markets}
            if marks:
                pf = parse_portfolio(json.dumps(portfolio_doc(8, underlyings=marks)).encode())
                res = compute_margin(pf, params, "cross", scenarios="auto", liquidation_price=True)
                dump_response(margin_response(res))
        except Exception as exc:  # noqa: BLE001 - a warm-up failure only means the first request is slower
            log.debug("margin warm-up skipped: %s", exc)

    app.router.on_startup.append(warm_up)
    app.add_middleware(_Guard, settings=s, metrics=metrics)  # type: ignore[arg-type]
    return app
