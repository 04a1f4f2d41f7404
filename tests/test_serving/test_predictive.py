"""A ``predictive`` market on a fresh clone (no MLflow run, empty cache): the first publish fits the model and
the policy's parameters on the bars before the publish window and caches both; the next publish reuses the
cached fit (no second fit); the lineage records the fit. Refits when the cut moves on, never reuses a fit
from after the cut; inline and ``fitted_from`` parameters; configuration errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from serving_test_helpers import KEY_HEX, markets_doc, write_yaml

from margin.controls import Controls
from margin.policies import PolicyContext
from margin.predictive import PredictivePolicy
from serving.feed import verify_record
from serving.forecast import model_forecast
from serving.markets import load_markets
from serving.predictive import policy_kwargs
from serving.publish import load_market_data, publish_market
from serving.store import FeedStore

KEY = bytes.fromhex(KEY_HEX)
T0 = datetime(2030, 1, 1, tzinfo=UTC)
AS_OF = datetime(2020, 3, 12, tzinfo=UTC)
# small enough for a test (a few seconds): 200 bars, 300 positions, 4 grid points
FIT = {"bars": 200, "positions": 300, "rounds": 1, "refit_every": "30d",
       "grid": {"level": [0.05, 0.1, 0.2], "power": [0.0, 1.0], "release": [1.0]}}


def _doc(tmp_path, cache, **policy):
    doc = markets_doc(tmp_path, cache)
    eth = doc["markets"]["ETH-PERP"]
    doc["markets"]["ETH-PRED"] = {**eth, "policy": {"name": "predictive", "fit": FIT, **policy}}
    return doc


@pytest.fixture
def fresh(tmp_path):
    """A fresh clone: empty cache, no registry (the autouse fixture points MLflow at a missing database)."""
    cache = tmp_path / "cache"
    cfg = load_markets(_doc(tmp_path, cache))
    return cfg, FeedStore(cfg.feed.db), cache


def test_fresh_clone_fits_then_reuses_the_cached_fit(fresh, monkeypatch):
    cfg, store, cache = fresh
    rec = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF, now=T0).record
    assert rec is not None and not rec["fallback"], rec and rec["fallback_reason"]
    verify_record(rec, now=T0)
    fit = rec["lineage"]["policy"]["fit"]
    assert fit["source"] == "fitted" and fit["bars"] == 200 and fit["positions"] == 300
    assert fit["evaluations"] >= 4 and fit["params"]["level"] in (0.05, 0.1, 0.2)
    assert fit["params"]["power"] in (0.0, 1.0) and fit["model_version"] == rec["lineage"]["model_version"]
    assert rec["lineage"]["model_source"] == "fitted"
    # the cut is the first bar of the publish window: the fit saw only bars before it
    first_origin = pd.Timestamp(AS_OF) - pd.Timedelta(days=cfg.market("ETH-PRED").model.window - 1)
    assert pd.Timestamp(fit["cut"]) == first_origin
    assert pd.Timestamp(fit["first_bar"]) == first_origin - pd.Timedelta(days=200)  # daily bars, no gaps here
    assert (cache / "ETH-PRED" / fit["cache_file"]).is_file()

    # the raw IM is the fitted policy on the publish window's forecast (controls relaxed)
    data = load_market_data("bundled:coinbase-pro/ETH")
    feats = data.features[data.features.index <= pd.Timestamp(AS_OF)]
    mf = model_forecast("ETH-PRED", cfg.market("ETH-PRED").model, feats, tracking_uri="sqlite:////nonexistent/x.db",
                        cache_dir=cache)
    bars = feats.loc[feats.index >= mf.forecast.origins[0], ["open", "high", "low", "close", "volume"]]
    ctx = PolicyContext(bars=bars, forecast=mf.forecast,
                        controls=Controls(floor=1e-6, ceiling=1.0, max_change=1e6, notice_bars=0, mm_fraction=0.5))
    path = PredictivePolicy(**policy_kwargs(fit["params"])).path(ctx)
    assert rec["forecast"]["raw_im"] == pytest.approx(float(path.im_rate[-1]), rel=1e-12)

    # second publish: the cached fit (fitting again would fail here)
    import backtest.fit

    def no_fit(*a, **k):
        raise ValueError("fit_predictive called although a cached fit is valid")

    monkeypatch.setattr(backtest.fit, "fit_predictive", no_fit)
    rec2 = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF, now=T0 + timedelta(minutes=1)).record
    fit2 = rec2["lineage"]["policy"]["fit"]
    assert not rec2["fallback"] and rec2["update_id"] == 2
    assert fit2["source"] == "cache" and fit2["params"] == fit["params"] and fit2["cut"] == fit["cut"]
    assert rec2["lineage"]["model_source"] == "cache" and rec2["forecast"]["raw_im"] == rec["forecast"]["raw_im"]
    # 10 days on: the same fit (cut 10 days old < refit_every 30d)
    rec3 = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF + timedelta(days=10),
                          now=T0 + timedelta(minutes=2)).record
    assert rec3["lineage"]["policy"]["fit"]["source"] == "cache" and rec3["lineage"]["policy"]["fit"]["cut"] == fit["cut"]
    # 10 days before: the cached fit is from after this cut, so it is not used (the fit is attempted)
    rec4 = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF - timedelta(days=10),
                          now=T0 + timedelta(minutes=3)).record
    assert rec4["fallback"] and "fit_predictive called" in rec4["fallback_reason"]


@pytest.mark.slow
def test_refit_after_refit_every(fresh):
    cfg, store, cache = fresh
    f1 = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF, now=T0).record["lineage"]["policy"]["fit"]
    f2 = publish_market(cfg, "ETH-PRED", store, KEY, as_of=AS_OF + timedelta(days=31),
                        now=T0 + timedelta(minutes=1)).record["lineage"]["policy"]["fit"]
    assert f2["source"] == "fitted" and pd.Timestamp(f2["cut"]) - pd.Timestamp(f1["cut"]) == pd.Timedelta(days=31)
    assert len(list((cache / "ETH-PRED").glob("predictive-*.json"))) == 2


def test_cli_publish_on_a_fresh_clone(tmp_path, key_file):
    import typer
    from typer.testing import CliRunner

    from volmargin.commands import serve as serve_cmd

    app = typer.Typer()
    app.callback()(lambda: None)
    serve_cmd.register(app)
    cache = tmp_path / "cache"
    doc = _doc(tmp_path, cache, params={"level": 0.1, "power": 0.5})  # level and power held fixed: 1 evaluation
    doc["markets"]["ETH-PRED"]["policy"]["fit"] = {**FIT, "grid": {"release": [1.0], "mm_k": [0.0]}}
    mf = write_yaml(tmp_path / "markets.yaml", doc)
    r = CliRunner().invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PRED", "--key", str(key_file),
                                 "--as-of", "2020-03-12", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    fit = out["lineage"]["policy"]["fit"]
    assert not out["fallback"] and fit["source"] == "fitted" and fit["evaluations"] == 1
    assert fit["params"]["level"] == 0.1 and fit["params"]["power"] == 0.5
    # the next publish (a minute later: past min_interval 0) says where the parameters came from
    r = CliRunner().invoke(app, ["publish", "--markets", str(mf), "--market", "ETH-PRED", "--key", str(key_file),
                                 "--as-of", "2020-03-12"])
    assert r.exit_code == 0, r.output
    assert "predictive parameters from the cache, fitted on 200 bars before 2020-01-13T00:00:00Z" in " ".join(r.output.split())


def test_inline_and_fitted_from_parameters(tmp_path, cache_dir):
    details = tmp_path / "run" / "details.json"
    details.parent.mkdir()
    params = {"level": 0.12, "power": 0.75, "stress": 0.0, "omega": 0.5, "floor": 0.02, "quantile_weight": 0.5,
              "release": 1.0, "mm_at_entry": 0.0, "mm_k": 0.0, "mm_floor": 0.0, "mm_fraction": 0.0, "sigma_ref": 0.04,
              "alpha": 100.0, "beta": 1e-4, "evaluations": 50, "n_positions_fit": 10000}
    details.write_text(json.dumps({"assets": {"ETH": {"predictive_params": params}}}))
    doc = markets_doc(tmp_path, cache_dir)
    eth = doc["markets"]["ETH-PERP"]
    doc["markets"]["FROM-RUN"] = {**eth, "policy": {"name": "predictive", "fitted_from": str(details.parent)}}
    doc["markets"]["INLINE"] = {**eth, "policy": {"name": "predictive", "params": {"level": 0.12, "power": 0.75,
                                                                                   "sigma_ref": 0.04}}}
    doc["markets"]["NO-RUN"] = {**eth, "policy": {"name": "predictive", "fitted_from": str(tmp_path / "nothing")}}
    cfg = load_markets(doc)
    store = FeedStore(cfg.feed.db)
    a = publish_market(cfg, "FROM-RUN", store, KEY, as_of=AS_OF, now=T0).record
    b = publish_market(cfg, "INLINE", store, KEY, as_of=AS_OF, now=T0).record
    assert a["lineage"]["policy"]["fit"] == {"source": "fitted_from", "fitted_from": str(details.parent)}
    assert b["lineage"]["policy"]["fit"] == {"source": "config"}
    assert not a["fallback"] and np.isclose(a["forecast"]["raw_im"], b["forecast"]["raw_im"], rtol=1e-12)
    c = publish_market(cfg, "NO-RUN", store, KEY, as_of=AS_OF, now=T0).record
    assert c["fallback"] and "policy predictive failed" in c["fallback_reason"] and "details.json" in c["fallback_reason"]


def test_too_few_bars_before_the_cut_falls_back(tmp_path):
    doc = _doc(tmp_path, tmp_path / "cache")
    doc["markets"]["ETH-PRED"]["policy"]["fit"] = {**FIT, "bars": 5000}
    cfg = load_markets(doc)
    rec = publish_market(cfg, "ETH-PRED", FeedStore(cfg.feed.db), KEY, as_of=AS_OF, now=T0).record
    assert rec["fallback"] and "need at least 5060 (fit.bars 5000" in rec["fallback_reason"]
    assert rec["message"]["imRate"] == 12_000_000  # the static policy's IM


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"name": "ewma_ccp", "fit": {}}, "fit and fitted_from are for the predictive policy, not 'ewma_ccp'"),
        ({"name": "predictive", "fit": {}, "fitted_from": "runs:/x"}, "give fit or fitted_from, not both"),
        ({"name": "predictive", "fit": {"grid": {"levle": [0.1]}}}, "grid: unknown parameter(s) ['levle']"),
        ({"name": "predictive", "fit": {"bars": 10}}, "greater than or equal to 60"),
        ({"name": "predictive", "fit": {"refit_every": "soon"}}, "refit_every must be a duration"),
        ({"name": "predictive", "fit": {"weights": {"gamma": 1.0}}}, "weights: unknown key(s) ['gamma']"),
    ],
)
def test_fit_settings_are_checked(tmp_path, cache_dir, policy, message):
    doc = markets_doc(tmp_path, cache_dir)
    doc["markets"]["ETH-PERP"]["policy"] = policy
    with pytest.raises(ValueError, match="markets.ETH-PERP.policy") as err:
        load_markets(doc)
    assert message in str(err.value)
