"""training.registry: promotion gate (pure) and registration / pinning on a temporary SQLite store."""

from __future__ import annotations

import copy
import json

import pytest

from training.registry import (
    Decision,
    best_candidate,
    decide,
    list_registered,
    pinned_champion,
    register_and_promote,
    registered_name,
)


def _model(q_pre, q_ho, in_mcs=True, zone="green", dm=None, version="v"):
    return {
        "spec": {"name": "m", "key": "m", "params": {}, "version": version},
        "pre_cut": {"qlike": q_pre, "in_mcs": in_mcs, "var": {"0.99": {"traffic_light": zone}}, "dm": dm or {}},
        "held_out": {"qlike": q_ho, "var": {"0.99": {"traffic_light": "green"}}},
    }


def _evaluation():
    return {
        "cut": "2018-01-01",
        "models": {
            "ewma": _model(0.40, 0.30, version="e1"),
            "garch": _model(0.35, 0.50, version="g1", dm={"ewma": {"pvalue_better": 0.01}, "har": {"pvalue_better": 0.2}}),
            "har": _model(0.30, 0.20, in_mcs=False, version="h1"),
        },
    }


class TestGate:
    def test_first_champion_lowest_qlike_inside_mcs(self):
        ev = _evaluation()
        # har has the lowest QLIKE but is outside the MCS
        assert best_candidate(ev) == "garch"
        d = decide("bundled:bitstamp/BTC", ev, None)
        assert d.promoted and d.champion_after == "garch" and "no champion yet" in d.reasons[0]

    def test_first_champion_skips_red_traffic_light(self):
        ev = _evaluation()
        ev["models"]["garch"]["pre_cut"]["var"]["0.99"]["traffic_light"] = "red"
        assert best_candidate(ev) == "garch"
        d = decide("x", ev, None)
        assert d.promoted and d.champion_after == "ewma"
        assert any("skipped for their traffic light: garch" in r for r in d.reasons)
        # when no MCS member passes, the QLIKE rule alone decides
        ev["models"]["ewma"]["pre_cut"]["var"]["0.99"]["traffic_light"] = "red"
        d = decide("x", ev, None)
        assert d.champion_after == "garch" and "WARNING: no MCS member" in d.reasons[0]

    def test_challenger_promoted_when_all_checks_pass(self):
        d = decide("x", _evaluation(), "ewma")
        assert d.promoted and d.champion_after == "garch" and d.checks["dm_pvalue_better"] == 0.01

    @pytest.mark.parametrize(
        ("mutate", "reason"),
        [
            (lambda ev: ev["models"]["garch"]["pre_cut"]["dm"]["ewma"].update(pvalue_better=0.2), "Diebold-Mariano"),
            (
                lambda ev: [ev["models"][k]["pre_cut"]["var"]["0.99"].update(traffic_light="red") for k in ("garch", "ewma")],
                "traffic light is red",
            ),
        ],
    )
    def test_challenger_blocked(self, mutate, reason):
        ev = _evaluation()
        mutate(ev)
        d = decide("x", ev, "ewma")
        assert not d.promoted and d.champion_after == "ewma"
        assert any(reason in r for r in d.reasons)

    def test_searched_challenger_also_needs_the_search_wide_spa_test(self):
        ev = _evaluation()  # garch beats ewma with a DM p-value of 0.01 ...
        sel = {"garch": {"pvalue": 0.23, "trials": 40, "test": "SPA"}}  # ... but was the best of 40 trials
        d = decide("x", ev, "ewma", selection=sel)
        assert not d.promoted and d.champion_after == "ewma" and d.checks["selection"]["pvalue"] == 0.23
        assert any("best of 40 search trials: SPA p-value 0.23" in r for r in d.reasons)
        d = decide("x", ev, "ewma", selection={"garch": {"pvalue": None, "trials": 0, "error": "no trial"}})
        assert not d.promoted and any("no trial" in r for r in d.reasons)
        d = decide("x", ev, "ewma", selection={"garch": {"pvalue": 0.01, "trials": 40}})
        assert d.promoted and any("SPA p=0.01 over 40 search trials" in r for r in d.reasons)
        d = decide("x", ev, "ewma", selection={"other-key": {"pvalue": 0.9, "trials": 3}})  # not the candidate
        assert d.promoted and "selection" not in d.checks

    def test_red_model_is_not_even_a_challenger(self):
        ev = _evaluation()
        ev["models"]["garch"]["pre_cut"]["var"]["0.99"]["traffic_light"] = "red"
        d = decide("x", ev, "ewma")
        assert d.candidate == "ewma" and d.champion_after == "ewma"

    def test_champion_outside_mcs_with_lower_qlike_kept(self):
        d = decide("x", _evaluation(), "har")
        assert not d.promoted and d.champion_after == "har"
        assert any("not below the champion" in r for r in d.reasons)

    def test_held_out_never_influences_the_choice(self):
        ev = _evaluation()
        d1 = decide("x", ev, "ewma")
        ev2 = copy.deepcopy(ev)
        for m in ev2["models"].values():
            m["held_out"] = {"qlike": 1e9, "var": {"0.99": {"traffic_light": "red"}}, "in_mcs": False}
        assert decide("x", ev2, "ewma") == d1
        assert decide("x", ev2, None) == decide("x", ev, None)

    def test_unevaluated_champion_kept(self):
        d = decide("x", _evaluation(), "<unevaluated:tcn>")
        assert not d.promoted

    def test_registered_names(self):
        assert registered_name("bundled:bitstamp/BTC") == "vol-BTC"
        assert registered_name("bundled:coinbase-pro/ETH") == "vol-ETH"
        assert registered_name("bundled:coinbase-pro/LTC") == "vol-LTC"
        assert registered_name("bundled:tsd/BTC-15m") == "vol-BTC-15m"


class TestRegistryStore:
    def test_register_promote_and_pin(self, tmp_path):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.create_experiment("reg-test")
        table = tmp_path / "garch.parquet"
        table.write_text("x")

        def logged():
            runs = {k: client.create_run(exp).info.run_id for k in ("ewma", "garch", "har")}
            return {"models": {k: {"run_id": r, "forecast_table": str(table), "forecast_artifact": f"runs:/{r}/forecast/t.parquet",
                                    "model_uri": None} for k, r in runs.items()}}

        ds = "bundled:bitstamp/BTC"
        ev = _evaluation()
        ev["models"]["garch"]["pre_cut"]["dm"] = {}
        d1 = register_and_promote(ds, ev, logged(), tracking_uri=uri, artifacts_dir=tmp_path / "a",
                                  parent_run_id="p1", schedule={"refit_every": 20})
        assert isinstance(d1, Decision) and d1.promoted and d1.champion_after == "garch"
        assert str(client.get_model_version_by_alias("vol-BTC", "champion").version) == "1"

        # second job at the same cut: ewma best now but not significantly better -> challenger only
        ev2 = _evaluation()
        ev2["models"]["ewma"]["pre_cut"].update(qlike=0.2, dm={"garch": {"pvalue_better": 0.3}})
        d2 = register_and_promote(ds, ev2, logged(), tracking_uri=uri, artifacts_dir=tmp_path / "a",
                                  parent_run_id="p2", schedule={"refit_every": 20})
        assert d2.candidate == "ewma" and not d2.promoted and d2.champion_before == "garch"
        assert str(client.get_model_version_by_alias("vol-BTC", "champion").version) == "1"
        assert str(client.get_model_version_by_alias("vol-BTC", "challenger").version) == "2"
        v2 = client.get_model_version("vol-BTC", "2")
        assert v2.tags["decision"] == "challenger" and "Diebold-Mariano" in v2.tags["decision_reasons"]

        pin = pinned_champion(ds, "2018-01-01", artifacts_dir=tmp_path / "a")
        assert pin.model_version == "1" and pin.spec["version"] == "g1" and pin.forecast_table == str(table)
        # same answer from the MLflow registry tag when the local record is missing
        pin2 = pinned_champion(ds, "2018-01-01", artifacts_dir=tmp_path / "none", tracking_uri=uri)
        assert pin2.model_version == "1"
        with pytest.raises(KeyError, match="no champion recorded"):
            pinned_champion(ds, "2019-01-01", artifacts_dir=tmp_path / "a")
        record = json.loads((tmp_path / "a" / "registry" / "vol-BTC.json").read_text())
        assert len(record["history"]) == 2 and record["champion_at_cut"]["2018-01-01"]["version"] == "1"

        listed = list_registered(uri)
        assert listed[0]["name"] == "vol-BTC" and set(listed[0]["aliases"]) == {"champion", "challenger"}
