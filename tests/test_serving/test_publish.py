"""Publishing: the pinned (here: fitted and cached) model through the policy and controls to a stored record;
faults (model missing, stale input, out-of-bounds value) give fallback records that say why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from serving_test_helpers import KEY_HEX, markets_doc

from serving.feed import verify_record
from serving.markets import load_markets
from serving.publish import compute_proposal, publish_market
from serving.store import FeedStore

KEY = bytes.fromhex(KEY_HEX)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_publish_fits_caches_and_signs(tmp_path, cache_dir):
    cfg = load_markets(markets_doc(tmp_path, cache_dir))
    store = FeedStore(cfg.feed.db)
    as_of = datetime(2020, 3, 12, tzinfo=UTC)
    res = publish_market(cfg, "BTC-PERP", store, KEY, as_of=as_of, now=T0)
    rec = res.record
    assert rec is not None and not rec["fallback"] and rec["update_id"] == 1
    assert verify_record(rec, now=T0).market == "BTC-PERP"
    lin = rec["lineage"]
    assert lin["as_of"] == "2020-03-12T00:00:00Z" and lin["last_bar"] == "2020-03-12T00:00:00Z"
    assert lin["model_name"] == "vol-BTC" and lin["model_source"] in ("fitted", "cache") and len(lin["data_hash"]) == 64
    assert rec["valid_from"] == "2030-01-01T00:00:00Z"  # validity stamped at publishing, not at as_of
    p = rec["params"]
    assert [t["max_notional"] for t in p["tiers"]] == [1_000_000.0, None]
    assert p["tiers"][1]["im_rate"] == min(1.0, 2 * p["tiers"][0]["im_rate"])
    s = 4 * rec["forecast"]["sigma_h"]
    assert np.allclose(p["scenario_grid"]["spot_shocks"], np.linspace(-s, s, 7))
    # the policy's raw IM equals garch_fhs on the same forecast rows (no controls bound on the first record)
    assert abs(rec["message"]["imRate"] / 1e8 - max(0.02, min(0.5, rec["forecast"]["raw_im"]))) < 1e-8
    # second compute: forecast rows from the cache
    again = compute_proposal(cfg, "BTC-PERP", as_of=as_of)
    assert again.lineage["model_source"] == "cache" and again.forecast == rec["forecast"]


def test_model_missing_stale_and_out_of_bounds_fall_back(tmp_path, cache_dir):
    bars = pd.DataFrame({"time": pd.date_range("2019-01-01", periods=400, freq="D", tz="UTC")})
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.03, 400)))
    bars = bars.assign(open=close, high=close * 1.01, low=close * 0.99, close=close, volume=1000.0)
    csv = tmp_path / "XYZ.csv"
    bars.to_csv(csv, index=False)
    doc = markets_doc(tmp_path, cache_dir)
    eth = doc["markets"]["ETH-PERP"]
    doc["markets"]["NOMODEL-PERP"] = {**eth, "model": {"name": "vol-nothing", "alias": "champion", "window": 60}}
    doc["markets"]["XYZ-PERP"] = {**eth, "input": f"csv:{csv}", "underlying": "XYZ",
                                  "failsafe": {"static_im": 0.2, "max_input_age": "2d"}}
    doc["markets"]["WILD-PERP"] = {**eth, "failsafe": {"static_im": 0.3, "sanity": [0.0001, 0.01]}}
    cfg = load_markets(doc)
    store = FeedStore(cfg.feed.db)
    r = publish_market(cfg, "NOMODEL-PERP", store, KEY, now=T0).record
    assert r["fallback"] and "model cannot load" in r["fallback_reason"] and "vol-nothing" in r["fallback_reason"]
    assert r["message"]["imRate"] == 12_000_000  # the static policy's IM
    r = publish_market(cfg, "XYZ-PERP", store, KEY, now=T0).record
    assert r["fallback"] and r["fallback_reason"].startswith("input stale: last bar 2020-02-04")
    # replaying inside the input's range: fresh, a normal record, which then feeds the next fallback's floor
    r = publish_market(cfg, "XYZ-PERP", store, KEY, as_of=datetime(2020, 2, 4, tzinfo=UTC),
                       now=T0 + timedelta(minutes=1)).record
    assert not r["fallback"]
    r = publish_market(cfg, "WILD-PERP", store, KEY, now=T0).record
    assert r["fallback"] and "sanity bounds" in r["fallback_reason"] and r["message"]["imRate"] == 30_000_000


def test_paused_market_is_not_published(tmp_path, cache_dir):
    cfg = load_markets(markets_doc(tmp_path, cache_dir))
    store = FeedStore(cfg.feed.db)
    store.set_paused("ETH-PERP", True, "incident")
    res = publish_market(cfg, "ETH-PERP", store, KEY, now=T0)
    assert res.record is None and res.skipped == "market ETH-PERP is paused: incident"


def test_market_takes_the_dynamic_grid_policy_of_a_run(tmp_path, cache_dir):
    """``scenario_grid: {source: dynamic_grid, params_from: RUN_DIR}``: the record's grid is the one the run's
    ``dynamic_grid`` path set for the underlying at the market's last bar; an unreadable run gives a fallback."""
    from dataclasses import replace

    from margin.dynamic_grid import static_grid_path

    times = pd.date_range("2019-01-01", "2020-12-31", freq="D", tz="UTC")
    base = static_grid_path(times, ("BTC", "ETH"), 0.1, vol_shock=0.3, n_spot=9, mm_fraction=0.7)
    ranges = np.linspace(0.05, 0.4, len(times))[:, None] * np.ones((1, 2))
    path = replace(base, range_new=ranges, range_open=ranges.copy())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path.write(run_dir / "portfolio_grid.json")
    doc = markets_doc(tmp_path, cache_dir)
    doc["markets"]["BTC-PERP"]["scenario_grid"] = {"source": "dynamic_grid", "params_from": str(run_dir)}
    doc["markets"]["GONE-PERP"] = {**doc["markets"]["BTC-PERP"],
                                   "scenario_grid": {"source": "dynamic_grid", "params_from": str(tmp_path / "nope")}}
    cfg = load_markets(doc)
    store = FeedStore(cfg.feed.db)
    as_of = datetime(2020, 3, 12, tzinfo=UTC)
    rec = publish_market(cfg, "BTC-PERP", store, KEY, as_of=as_of, now=T0).record
    assert rec is not None and not rec["fallback"]
    i = times.get_loc(pd.Timestamp(as_of))
    shocks = rec["params"]["scenario_grid"]["spot_shocks"]
    assert len(shocks) == 9 and abs(max(shocks) - ranges[i, 0]) < 1e-12 and abs(min(shocks) + ranges[i, 0]) < 1e-12
    assert rec["params"]["scenario_grid"]["mm_fraction"] == 0.7
    assert rec["lineage"]["scenario_grid"]["bar"] == "2020-03-12T00:00:00Z"
    assert verify_record(rec, now=T0).market == "BTC-PERP"
    r = publish_market(cfg, "GONE-PERP", store, KEY, as_of=as_of, now=T0).record
    assert r["fallback"] and r["fallback_reason"].startswith("dynamic grid unavailable: scenario_grid.params_from")


def test_dynamic_grid_source_needs_a_run():
    import pytest

    from serving.markets import GridCfg

    with pytest.raises(ValueError, match="params_from"):
        GridCfg(source="dynamic_grid")
