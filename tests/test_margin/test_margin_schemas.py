"""JSON Schemas: packaged copies equal the top-level ones, examples validate, errors name path and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from margin.params import MarginParams, ParamsFile, RiskTier
from margin.validation import SCHEMAS, load_params_file, load_portfolio, load_schema, validate_document

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_and_packaged_copy_matches(name):
    s = load_schema(name)
    Draft202012Validator.check_schema(s)
    top = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
    assert top == s


def test_examples_validate_and_load():
    pf = load_portfolio(ROOT / "configs/examples/portfolio.json")
    prm = load_params_file(ROOT / "configs/examples/params.json")
    assert len(pf.pool_ids) == 3 and {m.market_id for m in prm.markets} == {"BTC", "ETH"}


def test_margin_params_to_dict_validates():
    for p in (
        MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05),
        MarginParams(market_id="ETH", tiers=(RiskTier(1e5, 0.02, 0.01), RiskTier(None, 0.05, 0.02))),
    ):
        validate_document(p.to_dict(), "margin_params")
        validate_document(ParamsFile(markets=(p,)).to_dict(), "params_file")


def test_flat_and_tiers_exclusive():
    d = MarginParams(market_id="BTC", im_rate=0.1, mm_rate=0.05).to_dict()
    d["tiers"] = [{"max_notional": None, "im_rate": 0.1, "mm_rate": 0.05}]
    with pytest.raises(ValueError, match=r"^\$"):
        validate_document(d, "margin_params")


def test_error_names_path_and_value():
    d = json.loads((ROOT / "configs/examples/portfolio.json").read_text())
    d["instruments"][3]["strike"] = -1
    with pytest.raises(ValueError, match=r"\$\.instruments\[3\]\.strike: .*\(got -1\)"):
        validate_document(d, "portfolio")
    d["instruments"][3]["strike"] = float("inf")
    with pytest.raises(ValueError, match=r"\$\.instruments\[3\]\.strike: must be a finite number, got inf"):
        validate_document(d, "portfolio")


class TestDynamicGridParams:
    """A params file produced from a ``dynamic_grid`` GridPath at a bar (offsets across underlyings included)
    validates against the schema and loads back to the same ParamsFile."""

    @staticmethod
    def _path():
        import numpy as np
        import pandas as pd

        from margin.dynamic_grid import GridPath

        times = pd.date_range("2025-12-25", periods=4, freq="D", tz="UTC")
        rng = np.linspace(0.05, 0.2, 4)[:, None] * np.ones((1, 2))
        corr = np.tile(np.array([[1.0, 0.6], [0.6, 1.0]]), (4, 1, 1))
        return GridPath(times=times, underlyings=("BTC", "ETH"), range_new=rng, range_open=rng,
                        vol_shock=np.full((4, 2), 0.25), correlation=corr, stress_weight=np.full(4, 0.3),
                        concentration_addon=np.zeros((4, 2)))

    def test_grid_params_validate_and_round_trip(self, tmp_path):
        prm = self._path().params_at(2)
        doc = prm.to_dict()
        assert doc["risk_model"]["grid_correlation"] == [[1.0, 0.6], [0.6, 1.0]]
        assert doc["risk_model"]["grid_stress_weight"] == pytest.approx(0.3)
        validate_document(doc, "params_file")
        f = tmp_path / "params.json"
        f.write_text(json.dumps(doc))
        back = load_params_file(f)
        assert back.risk_model.grid_correlation == prm.risk_model.grid_correlation
        assert back.risk_model.grid_stress_weight == prm.risk_model.grid_stress_weight
        assert back.by_market()["ETH"].scenario_grid == prm.by_market()["ETH"].scenario_grid

    @pytest.mark.parametrize(("field", "value", "needle"), [
        ("grid_stress_weight", 1.5, "$.risk_model.grid_stress_weight"),
        ("grid_correlation", [[1.0, 1.2], [1.2, 1.0]], "$.risk_model.grid_correlation[0][1]"),
    ])
    def test_bad_grid_fields_name_the_path(self, field, value, needle):
        doc = self._path().params_at(0).to_dict()
        doc["risk_model"][field] = value
        with pytest.raises(ValueError, match=needle.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
            validate_document(doc, "params_file")
