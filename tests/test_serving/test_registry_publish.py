"""Publishing from the MLflow registry: a small EWMA model logged as a pyfunc and registered as champion of
``vol-ETH`` (``training.registry.register_and_promote``) in a temporary SQLite tracking store, with its
walk-forward table. A market naming it by alias or by version publishes the table's rows then the logged
model updated bar by bar to the as-of time, equal to a forecaster run over the same bars by hand; a
version that does not exist falls back; a predictive market fits on the registered model's rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from serving_test_helpers import KEY_HEX, markets_doc

from models.base import get_forecaster
from models.pyfunc import forecast_table
from serving.markets import load_markets
from serving.publish import load_market_data, publish_market
from serving.store import FeedStore

KEY = bytes.fromhex(KEY_HEX)
T0 = datetime(2030, 1, 1, tzinfo=UTC)
FIT_END = pd.Timestamp("2019-06-30", tz="UTC")  # the model is fitted on bars up to here
TABLE_END = pd.Timestamp("2019-09-30", tz="UTC")  # its walk-forward table (and logged state) reach here
AS_OF = datetime(2019, 12, 31, tzinfo=UTC)


def _evaluation() -> dict:
    green = {"0.99": {"traffic_light": "green"}}
    return {"cut": "2019-06-30", "models": {"ewma": {
        "spec": {"name": "ewma", "key": "ewma", "params": {"lam": 0.94}, "version": "e1"},
        "pre_cut": {"qlike": 0.4, "in_mcs": True, "var": green, "dm": {}},
        "held_out": {"qlike": 0.3, "var": green},
    }}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tracking store with ``vol-ETH`` v1 (champion): EWMA fitted to 2019-06-30, table and state to 2019-09-30."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from models.pyfunc import log_forecaster
    from training.registry import register_and_promote

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    feats = load_market_data("bundled:coinbase-pro/ETH").features
    f = get_forecaster("ewma", lam=0.94).fit(feats[feats.index <= FIT_END])
    window = feats[(feats.index > FIT_END) & (feats.index <= TABLE_END)]
    table = forecast_table(f, window, 3).set_index("origin")
    table_path = tmp / "ewma-table.parquet"
    table.to_parquet(table_path)
    f.update(window)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        exp = client.create_experiment("serving-registry", artifact_location=(tmp / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_forecaster(f, name="model", horizon=3)
        logged = {"models": {"ewma": {"run_id": run.info.run_id, "forecast_table": str(table_path),
                                      "forecast_artifact": "", "model_uri": info.model_uri}}}
        d = register_and_promote("bundled:coinbase-pro/ETH", _evaluation(), logged, tracking_uri=uri,
                                 artifacts_dir=tmp / "a", parent_run_id="p", schedule={})
        assert d.promoted and str(client.get_model_version_by_alias("vol-ETH", "champion").version) == "1"
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


def _markets(tmp_path, cache, uri, **extra):
    doc = markets_doc(tmp_path, cache)
    eth = doc["markets"]["ETH-PERP"]
    no_fit = {"name": "vol-ETH", "horizon": 3, "window": 60}
    doc["markets"] = {
        "BY-ALIAS": {**eth, "model": {**no_fit, "alias": "champion"}},
        "BY-VERSION": {**eth, "model": {**no_fit, "alias": None, "version": "1"}},
        "NO-VERSION": {**eth, "model": {**no_fit, "alias": None, "version": "7"}},
        **extra,
    }
    doc["feed"]["tracking_uri"] = uri
    return load_markets(doc)


def test_publish_from_registry_by_alias_and_version(registry, tmp_path):
    cfg = _markets(tmp_path, tmp_path / "cache", registry)
    store = FeedStore(cfg.feed.db)
    feats = load_market_data("bundled:coinbase-pro/ETH").features
    # reference: the same EWMA fitted to 2019-06-30, updated bar by bar to the as-of time
    ref = get_forecaster("ewma", lam=0.94).fit(feats[feats.index <= FIT_END])
    ref_tab = forecast_table(ref, feats[(feats.index > FIT_END) & (feats.index <= pd.Timestamp(AS_OF))], 3)
    want = ref_tab[["h.1", "h.2", "h.3"]].to_numpy()[-1]
    recs = {}
    for m in ("BY-ALIAS", "BY-VERSION"):
        rec = publish_market(cfg, m, store, KEY, as_of=AS_OF, now=T0).record
        assert rec is not None and not rec["fallback"], rec and rec["fallback_reason"]
        lin = rec["lineage"]
        assert lin["model_name"] == "vol-ETH" and lin["model_version"] == "1" and lin["model_source"] == "registry"
        assert lin["model_spec"]["name"] == "ewma" and lin["last_bar"] == "2019-12-31T00:00:00Z"
        np.testing.assert_allclose(rec["forecast"]["variance"], want, rtol=1e-10)
        assert rec["forecast"]["origin"] == "2019-12-31T00:00:00Z" and rec["forecast"]["version"] == "1"
        recs[m] = rec
    assert recs["BY-ALIAS"]["lineage"]["model_alias"] == "champion"
    assert recs["BY-VERSION"]["lineage"]["model_alias"] is None
    assert recs["BY-ALIAS"]["message"]["imRate"] == recs["BY-VERSION"]["message"]["imRate"]
    # inside the table's range the rows come from the table alone
    early = publish_market(cfg, "BY-ALIAS", store, KEY, as_of=datetime(2019, 9, 15, tzinfo=UTC),
                           now=T0 + timedelta(minutes=1)).record
    row = pd.Timestamp("2019-09-15")
    tab = forecast_table(get_forecaster("ewma", lam=0.94).fit(feats[feats.index <= FIT_END]),
                         feats[(feats.index > FIT_END) & (feats.index <= TABLE_END)], 3).set_index("origin")
    np.testing.assert_allclose(early["forecast"]["variance"], tab.loc[row, ["h.1", "h.2", "h.3"]].to_numpy(), rtol=1e-12)
    missing = publish_market(cfg, "NO-VERSION", store, KEY, as_of=AS_OF, now=T0).record
    assert missing["fallback"] and "registered model 'vol-ETH' (version 7) not found" in missing["fallback_reason"]


def test_predictive_market_fits_on_the_registered_model(registry, tmp_path):
    pred = {
        "input": "bundled:coinbase-pro/ETH", "underlying": "ETH",
        "model": {"name": "vol-ETH", "alias": "champion", "horizon": 3, "window": 30},
        "policy": {"name": "predictive", "fit": {"bars": 90, "positions": 300,
                                                 "grid": {"level": [0.1, 0.2], "power": [0.5], "mm_k": [0.0],
                                                          "release": [1.0]}}},
        "controls": {"floor": 0.02, "ceiling": 0.5, "max_change": 0.25, "notice": "1h", "min_interval": 0},
        "failsafe": {"static_im": 0.12},
    }
    cfg = _markets(tmp_path, tmp_path / "cache", registry, **{"ETH-PRED": pred})
    rec = publish_market(cfg, "ETH-PRED", FeedStore(cfg.feed.db), KEY, as_of=AS_OF, now=T0).record
    assert not rec["fallback"], rec["fallback_reason"]
    fit = rec["lineage"]["policy"]["fit"]
    assert fit["source"] == "fitted" and fit["model_version"] == "1" and fit["bars"] == 90
    assert fit["params"]["level"] in (0.1, 0.2) and pd.Timestamp(fit["cut"]) == pd.Timestamp("2019-12-02", tz="UTC")
