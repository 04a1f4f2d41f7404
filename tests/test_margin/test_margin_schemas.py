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
