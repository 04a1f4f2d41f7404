"""The service on a real uvicorn server (loopback): every route, bad input, auth, limits, faults; the Python
watcher; margin responses equal the engine's."""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
import uvicorn
from serving_test_helpers import ADDRESS, KEY_HEX, markets_doc

from margin.engine import compute_margin
from margin.params import MarginParams, ParamsFile
from serving.app import ServiceSettings, create_app
from serving.client import FeedWatcher
from serving.loadgen import portfolio_doc
from serving.margin_api import dump_response, margin_response, parse_portfolio
from serving.markets import load_markets
from serving.publish import publish_market
from serving.store import FeedStore

API_KEY = "test-api-key-0123456789"


@pytest.fixture(scope="module")
def live(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("svc")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/absent/mlruns.db")
    keyf = tmp / "k"
    keyf.write_text(KEY_HEX)
    os.chmod(keyf, 0o600)
    cfg = load_markets(markets_doc(tmp, cache_dir))
    store = FeedStore(cfg.feed.db)
    for m in ("ETH-PERP", "BTC-PERP"):
        assert publish_market(cfg, m, store, bytes.fromhex(KEY_HEX)).record is not None
    app = create_app(cfg, cfg.feed.db, ServiceSettings(api_key=API_KEY, signing_key_file=keyf, max_body_bytes=600_000))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", access_log=False))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        yield c, cfg, store
    server.should_exit = True
    th.join(timeout=10)
    mp.undo()


def test_params_history_health_metrics(live):
    c, cfg, _ = live
    r = c.get("/v1/params/ETH-PERP")
    assert r.status_code == 200 and r.json()["market"] == "ETH-PERP" and r.headers["x-update-id"] == "1"
    assert r.json()["signer"] == ADDRESS
    assert c.get("/v1/params/DOGE-PERP").json()["error"] == "unknown_market"
    assert c.get("/v1/params/DOGE-PERP").status_code == 404
    h = c.get("/v1/params/BTC-PERP/history", params={"limit": 5})
    assert h.status_code == 200 and [x["update_id"] for x in h.json()["records"]] == [1]
    assert c.get("/v1/params/BTC-PERP/history", params={"limit": "x"}).status_code == 422
    assert c.get("/v1/params/BTC-PERP/history", params={"limit": 0}).status_code == 422
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    m = c.get("/metrics").text
    assert 'volmargin_http_requests_total{route="/v1/params/{market}",status="200"}' in m
    assert "volmargin_feed_record_age_seconds" in m
    assert c.get("/nope").status_code == 404


def test_margin_route_and_bad_input(live):
    c, _, _ = live
    doc = portfolio_doc(20, underlyings={"BTC": 9000.0, "ETH": 200.0})
    r = c.post("/v1/margin", content=json.dumps(doc))
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["accounts"]) == 20 and all(a["maintenance_margin"] > 0 for a in out["accounts"])
    assert any(a["liquidation_price"] is not None for a in out["accounts"])
    assert c.post("/v1/margin", content=b"{not json").json()["error"] == "invalid_json"
    bad = copy.deepcopy(doc)
    bad["accounts"][3]["positions"][0]["size"] = float("nan")
    r = c.post("/v1/margin", content=json.dumps(bad))  # json.dumps writes the NaN literal
    assert r.status_code == 422 and "$.accounts[3].positions[0].size" in r.json()["detail"]
    bad = copy.deepcopy(doc)
    bad["accounts"][0]["positions"][0]["size"] = "ten"
    r = c.post("/v1/margin", content=json.dumps(bad))
    assert r.status_code == 422 and "$.accounts[0].positions[0].size" in r.json()["detail"]
    ltc = portfolio_doc(2, underlyings={"LTC": 50.0})
    r = c.post("/v1/margin", content=json.dumps(ltc))
    assert r.status_code == 422 and "LTC" in r.json()["detail"]
    assert c.post("/v1/margin", params={"mode": "nope"}, content=json.dumps(doc)).status_code == 422
    big = json.dumps(portfolio_doc(3000))
    r = c.post("/v1/margin", content=big)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_admin_routes(live):
    c, _, store = live
    assert c.post("/v1/admin/pause/ETH-PERP").status_code == 401
    assert c.post("/v1/admin/pause/ETH-PERP", headers={"X-API-Key": "wrong-key-wrong-key"}).status_code == 403
    ok = {"Authorization": f"Bearer {API_KEY}"}
    assert c.post("/v1/admin/pause/NOPE", headers=ok).status_code == 404
    r = c.post("/v1/admin/pause/ETH-PERP", headers=ok, params={"reason": "drill"})
    assert r.status_code == 200 and store.is_paused("ETH-PERP") == (True, "drill")
    r = c.post("/v1/admin/publish/ETH-PERP", headers=ok)
    assert r.status_code == 409 and "paused" in r.json()["detail"]
    c.post("/v1/admin/pause/ETH-PERP", headers=ok, params={"paused": "false"})
    r = c.post("/v1/admin/publish/ETH-PERP", headers={"X-API-Key": API_KEY})
    assert r.status_code == 201 and r.json()["update_id"] == 2
    assert c.get("/v1/params/ETH-PERP").json()["update_id"] == 2


def test_watcher_accepts_then_rejects_replay_and_wrong_signer(live):
    c, cfg, store = live
    w = FeedWatcher(base_url=str(c.base_url), market="BTC-PERP", signer=ADDRESS, domain=cfg.domain(),
                    rules=cfg.market("BTC-PERP").rules())
    first = w.poll(c)
    assert first.status == "accepted"
    assert w.poll(c).status == "unchanged"
    old = dict(first.record)
    publish_market(cfg, "BTC-PERP", store, bytes.fromhex(KEY_HEX))
    assert w.poll(c).status == "accepted"
    v = w.check(old)
    assert v.status == "rejected" and "replay" in v.reason
    stranger = FeedWatcher(base_url=str(c.base_url), market="BTC-PERP", signer="0x" + "33" * 20)
    v = stranger.poll(c)
    assert v.status == "rejected" and "not the expected signer" in v.reason


def test_expired_record_is_not_served(tmp_path, cache_dir):
    from fastapi.testclient import TestClient

    cfg = load_markets(markets_doc(tmp_path, cache_dir))
    store = FeedStore(cfg.feed.db)
    publish_market(cfg, "ETH-PERP", store, bytes.fromhex(KEY_HEX), now=datetime(2021, 1, 1, tzinfo=UTC))
    c = TestClient(create_app(cfg, store, ServiceSettings(rate=1.0, burst=3)))
    r = c.get("/v1/params/ETH-PERP")
    assert r.status_code == 503 and r.json()["error"] == "expired"
    assert c.get("/readyz").status_code == 503
    codes = [c.get("/healthz").status_code for _ in range(5)]
    assert 429 in codes  # burst of 3, 1 request/s: the rate limit bites


def test_margin_response_equals_engine_to_dict():
    doc = portfolio_doc(200, seed=3)
    pf = parse_portfolio(json.dumps(doc).encode())
    prm = ParamsFile(markets=tuple(MarginParams(market_id=u, im_rate=0.1, mm_rate=0.05) for u in ("BTC", "ETH", "LTC")))
    for mode in ("cross", "isolated", "portfolio"):
        res = compute_margin(pf, prm, mode)
        a, b = json.loads(dump_response(margin_response(res))), res.to_dict()
        assert json.dumps(a) == json.dumps(b, allow_nan=False)  # same keys in the same order, same values
    assert math.isfinite(a["accounts"][0]["initial_margin"])
